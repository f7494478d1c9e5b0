package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// serveTPMRelay is the TPM relay child, started as
//
//	bench -tpm-relay SOCKET HOST:PORT
//
// It is the least a daemon between a caller and the TPM can be: it accepts
// connections on a Unix socket and forwards each TPM command, byte for byte,
// to the TPM at HOST:PORT over a connection of its own, then the response
// back. No gRPC, no policy, no parsing beyond the 10-byte header that gives
// the length. tpmInterleaved measures TPM2_Sign through it beside direct
// TPM2_Sign: what one more local process hop adds on this machine, what the
// least daemon in the path adds.
//
// Each connection has its own connection to the TPM (swtpm serves one at a
// time, so one caller at a time). It serves until SIGTERM/SIGINT (see
// serveConns).
func serveTPMRelay(args []string) error {
	if len(args) != 2 {
		return errors.New("usage: bench -tpm-relay SOCKET HOST:PORT")
	}
	socket, tpmAddr := args[0], args[1]
	return serveConns(socket, func(ctx context.Context, c net.Conn) {
		if err := relayConn(ctx, c, tpmAddr); err != nil && ctx.Err() == nil {
			fmt.Fprintf(os.Stderr, "bench tpm relay: %v\n", err)
		}
	})
}

// relayConn forwards the TPM commands of one caller connection to a new
// connection to the TPM, until the caller hangs up.
func relayConn(ctx context.Context, c net.Conn, tpmAddr string) error {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var dl net.Dialer
	t, err := dl.DialContext(dctx, "tcp", tpmAddr)
	if err != nil {
		return err
	}
	defer t.Close()
	cmd := make([]byte, tpmMaxMessage)
	rsp := make([]byte, tpmMaxMessage)
	for {
		m, err := readTPMMessage(c, cmd)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("from the caller: %w", err)
		}
		if _, err := t.Write(m); err != nil {
			return fmt.Errorf("to the TPM: %w", err)
		}
		r, err := readTPMMessage(t, rsp)
		if err != nil {
			return fmt.Errorf("from the TPM: %w", err)
		}
		if _, err := c.Write(r); err != nil {
			return fmt.Errorf("to the caller: %w", err)
		}
	}
}

// tpmMaxMessage bounds a TPM command or response the relay forwards.
const tpmMaxMessage = 64 << 10

// readTPMMessage reads one TPM command or response (tag, size, code, ...)
// into buf, which holds tpmMaxMessage bytes, and returns it.
func readTPMMessage(r io.Reader, buf []byte) ([]byte, error) {
	if _, err := io.ReadFull(r, buf[:10]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint32(buf[2:6]))
	if n < 10 || n > len(buf) {
		return nil, fmt.Errorf("TPM message header claims %d bytes", n)
	}
	if _, err := io.ReadFull(r, buf[10:n]); err != nil {
		return nil, fmt.Errorf("TPM message of %d bytes: %w", n, err)
	}
	return buf[:n], nil
}
