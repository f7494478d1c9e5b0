package tpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"
)

// A TPM command or response starts with a 10-byte header: a 2-byte tag, the
// 4-byte size of the whole message and a 4-byte command or response code.
const (
	headerSize = 10
	// maxResponse bounds what a response may claim to be; real ones are a
	// few kilobytes (TPM_PT_MAX_RESPONSE_SIZE is 4096 on most TPMs).
	maxResponse = 64 << 10
)

// conn is one connection to a TPM. It carries one command at a time and is
// used only by whoever holds the Backend's token.
type conn interface {
	// roundTrip sends cmd and returns the response, giving up at deadline.
	// Any error leaves the connection unusable: the caller closes it.
	roundTrip(cmd []byte, deadline time.Time) ([]byte, error)
	close() error
}

// endpoint says where the TPM is and opens connections to it.
type endpoint struct {
	network string // "tcp", "unix" or "device"
	addr    string // host:port, socket path or device path
}

func (e endpoint) String() string {
	if e.network == "device" {
		return e.addr
	}
	return e.network + "://" + e.addr
}

// parseEndpoint turns Config.Device and Config.Address into an endpoint.
// Address takes "tcp://host:port", "unix:///path" (or "unix:/path") and a
// bare "host:port"; with neither set the device is /dev/tpmrm0.
func parseEndpoint(device, address string) (endpoint, error) {
	switch {
	case device != "" && address != "":
		return endpoint{}, errors.New("set either device or address, not both")
	case address != "":
		if rest, ok := strings.CutPrefix(address, "tcp://"); ok {
			if _, _, err := net.SplitHostPort(rest); err != nil {
				return endpoint{}, fmt.Errorf("address %q: %v", address, err)
			}
			return endpoint{"tcp", rest}, nil
		}
		if rest, ok := strings.CutPrefix(address, "unix://"); ok {
			if rest == "" {
				return endpoint{}, fmt.Errorf("address %q: empty socket path", address)
			}
			return endpoint{"unix", rest}, nil
		}
		if rest, ok := strings.CutPrefix(address, "unix:"); ok && strings.HasPrefix(rest, "/") {
			return endpoint{"unix", rest}, nil
		}
		if strings.Contains(address, "://") {
			return endpoint{}, fmt.Errorf("address %q: want tcp://host:port or unix:///path", address)
		}
		if _, _, err := net.SplitHostPort(address); err != nil {
			return endpoint{}, fmt.Errorf("address %q: want tcp://host:port or unix:///path", address)
		}
		return endpoint{"tcp", address}, nil
	case device != "":
		return endpoint{"device", device}, nil
	}
	return endpoint{"device", DefaultDevice}, nil
}

// dial opens a connection, giving up at deadline.
func (e endpoint) dial(ctx context.Context, deadline time.Time) (conn, error) {
	if e.network == "device" {
		return openDevice(e.addr)
	}
	d := net.Dialer{Deadline: deadline}
	c, err := d.DialContext(ctx, e.network, e.addr)
	if err != nil {
		return nil, err
	}
	return &streamConn{c: c}, nil
}

// streamConn speaks the raw TPM command stream over a socket, as swtpm's
// server port (and the kernel's vTPM proxy) do: the command bytes go out as
// they are, the response comes back as a header followed by the rest.
type streamConn struct {
	c   net.Conn
	buf [headerSize]byte
}

func (s *streamConn) roundTrip(cmd []byte, deadline time.Time) ([]byte, error) {
	if err := s.c.SetDeadline(deadline); err != nil {
		return nil, err
	}
	if _, err := s.c.Write(cmd); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(s.c, s.buf[:]); err != nil {
		return nil, err
	}
	size := int(binary.BigEndian.Uint32(s.buf[2:6]))
	if size < headerSize || size > maxResponse {
		return nil, fmt.Errorf("%w: response header claims %d bytes", errProtocol, size)
	}
	rsp := make([]byte, size)
	copy(rsp, s.buf[:])
	if _, err := io.ReadFull(s.c, rsp[headerSize:]); err != nil {
		return nil, err
	}
	return rsp, nil
}

func (s *streamConn) close() error { return s.c.Close() }

// deviceConn is a TPM character device: /dev/tpmrm0, the kernel's resource
// manager, which also flushes this connection's objects when it is closed.
// A write sends one command and one read returns the whole response. The
// kernel bounds each command by the TPM's own timeouts; the deadline applies
// on top where the device supports it.
type deviceConn struct {
	f   *os.File
	buf []byte
}

func openDevice(path string) (conn, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Mode()&os.ModeCharDevice == 0 {
		return nil, fmt.Errorf("%s is not a character device", path)
	}
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return &deviceConn{f: f, buf: make([]byte, maxResponse)}, nil
}

func (d *deviceConn) roundTrip(cmd []byte, deadline time.Time) ([]byte, error) {
	// Not every device file can take a deadline (os.ErrNoDeadline).
	_ = d.f.SetDeadline(deadline)
	if _, err := d.f.Write(cmd); err != nil {
		return nil, err
	}
	n, err := d.f.Read(d.buf)
	if err != nil {
		return nil, err
	}
	if n < headerSize || int(binary.BigEndian.Uint32(d.buf[2:6])) != n {
		return nil, fmt.Errorf("%w: read %d bytes of a response", errProtocol, n)
	}
	return bytes.Clone(d.buf[:n]), nil
}

func (d *deviceConn) close() error { return d.f.Close() }

// responseCode returns the response code of a response (or of a command: the
// same place holds the command code).
func responseCode(rsp []byte) uint32 {
	if len(rsp) < headerSize {
		return 0
	}
	return binary.BigEndian.Uint32(rsp[6:10])
}

// commandCode returns the command code of a command.
func commandCode(cmd []byte) uint32 { return responseCode(cmd) }
