package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"github.com/keyd-dev/keyd/keystore"
)

// servePKCS11Relay is the pkcs11 relay child, started as
//
//	bench -pkcs11-relay SOCKET MODULE TOKEN PINFILE ID:ALG[,ID:ALG...]
//
// It is the least a signing daemon can be: the "direct copy" signer (two
// pooled sessions, cached handles of session copies, the SoftHSM work keyd
// does per signature) in a process of its own, answering requests on
// a Unix socket, one goroutine per connection. A request is the key's index
// in the list (1 byte), the length (2 bytes, big-endian) and the bytes to
// sign as the mechanism wants them; the answer is a status (0 or 1), a
// length and the signature or the error text. No gRPC, no proof, no policy,
// no audit. The "bare relay" mode signs through it: what one more local
// process hop costs a signature on this machine, for the least daemon.
//
// It serves until SIGTERM/SIGINT (see serveConns).
func servePKCS11Relay(args []string) error {
	if len(args) != 5 {
		return errors.New("usage: bench -pkcs11-relay SOCKET MODULE TOKEN PINFILE ID:ALG[,ID:ALG...]")
	}
	socket, module, token, pinFile := args[0], args[1], args[2], args[3]
	pinBytes, err := os.ReadFile(pinFile)
	if err != nil {
		return err
	}
	d, err := openP11Direct(module, token, strings.TrimRight(string(pinBytes), "\r\n"), p11Sessions, true)
	if err != nil {
		return err
	}
	defer d.close()
	var ids []string
	for _, ka := range strings.Split(args[4], ",") {
		id, alg, ok := strings.Cut(ka, ":")
		if !ok {
			return fmt.Errorf("key %q: want ID:ALG", ka)
		}
		if err := d.addKey(id, keystore.Algorithm(alg)); err != nil {
			return err
		}
		ids = append(ids, id)
	}
	if len(ids) > 255 {
		return errors.New("at most 255 keys")
	}
	return serveConns(socket, func(_ context.Context, c net.Conn) { relaySigns(c, d.signRaw, ids) })
}

// relaySigns answers the sign requests of one connection with sign until
// the connection ends.
func relaySigns(c net.Conn, sign func(id string, data []byte) ([]byte, error), ids []string) {
	var hdr [3]byte
	buf := make([]byte, 1<<16)
	out := make([]byte, 0, 3+1024)
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		n := int(binary.BigEndian.Uint16(hdr[1:]))
		if _, err := io.ReadFull(c, buf[:n]); err != nil {
			return
		}
		var sig []byte
		err := fmt.Errorf("no key #%d", hdr[0])
		if int(hdr[0]) < len(ids) {
			sig, err = sign(ids[hdr[0]], buf[:n])
		}
		status := byte(0)
		if err != nil {
			status, sig = 1, []byte(err.Error())
		}
		out = append(out[:0], status, 0, 0)
		binary.BigEndian.PutUint16(out[1:], uint16(len(sig)))
		out = append(out, sig...)
		if _, err := c.Write(out); err != nil {
			return
		}
	}
}

// p11RelayClient signs through the relay child, one connection per
// concurrent caller (kept for the next call).
type p11RelayClient struct {
	socket string
	idle   chan *relayConnBuf
}

type relayConnBuf struct {
	net.Conn
	buf []byte
}

func newP11RelayClient(socket string) *p11RelayClient {
	return &p11RelayClient{socket: socket, idle: make(chan *relayConnBuf, 64)}
}

// sign has the key at index key in the relay's list sign data and returns
// the signature as the token made it.
func (r *p11RelayClient) sign(key byte, data []byte) ([]byte, error) {
	var c *relayConnBuf
	select {
	case c = <-r.idle:
	default:
		nc, err := net.Dial("unix", r.socket)
		if err != nil {
			return nil, err
		}
		c = &relayConnBuf{Conn: nc, buf: make([]byte, 1<<16)}
	}
	sig, err := c.roundTrip(key, data)
	if err != nil {
		c.Close()
		return nil, err
	}
	select {
	case r.idle <- c:
	default:
		c.Close()
	}
	return sig, nil
}

func (c *relayConnBuf) roundTrip(key byte, data []byte) ([]byte, error) {
	if len(data) > 1<<16-1 {
		return nil, fmt.Errorf("%d bytes to sign: too many for the relay", len(data))
	}
	req := append(c.buf[:0], key, 0, 0)
	binary.BigEndian.PutUint16(req[1:], uint16(len(data)))
	req = append(req, data...)
	if _, err := c.Write(req); err != nil {
		return nil, err
	}
	var hdr [3]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(hdr[1:]))
	sig := make([]byte, n)
	if _, err := io.ReadFull(c, sig); err != nil {
		return nil, err
	}
	if hdr[0] != 0 {
		return nil, fmt.Errorf("relay: %s", sig)
	}
	return sig, nil
}

// close closes the idle connections.
func (r *p11RelayClient) close() {
	for {
		select {
		case c := <-r.idle:
			c.Close()
		default:
			return
		}
	}
}
