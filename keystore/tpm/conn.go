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
	"strconv"
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
	// Any error leaves the connection unusable: the caller closes it. The
	// exception is errInterrupted, from a connection that is
	// interruptible: ctx ended before the exchange was complete, and it
	// stays pending: finish completes it.
	roundTrip(ctx context.Context, cmd []byte, deadline time.Time) ([]byte, error)
	// interruptible reports whether roundTrip returns when ctx ends;
	// otherwise it ignores ctx.
	interruptible() bool
	// finish completes an exchange roundTrip left with errInterrupted,
	// giving up at deadline.
	finish(deadline time.Time) ([]byte, error)
	close() error
}

// errInterrupted: the caller's context ended while its command was in
// flight.
var errInterrupted = errors.New("TPM command interrupted")

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
// bare "host:port"; with neither set the device is /dev/tpmrm0. A socket
// path must be absolute and a port a number, so that a mistyped address
// fails here, not as an unreachable TPM at the first use.
func parseEndpoint(device, address string) (endpoint, error) {
	switch {
	case device != "" && address != "":
		return endpoint{}, errors.New("set either device or address, not both")
	case address != "":
		const want = "want tcp://host:port or unix:///absolute/path"
		if rest, ok := strings.CutPrefix(address, "tcp://"); ok {
			return tcpEndpoint(address, rest)
		}
		if rest, ok := strings.CutPrefix(address, "unix:"); ok {
			rest = strings.TrimPrefix(rest, "//")
			if !strings.HasPrefix(rest, "/") {
				return endpoint{}, fmt.Errorf("address %q: the socket path must be absolute; %s", address, want)
			}
			return endpoint{"unix", rest}, nil
		}
		if strings.Contains(address, "://") {
			return endpoint{}, fmt.Errorf("address %q: %s", address, want)
		}
		return tcpEndpoint(address, address)
	case device != "":
		return endpoint{"device", device}, nil
	}
	return endpoint{"device", DefaultDevice}, nil
}

// tcpEndpoint checks hostport, the host:port part of address.
func tcpEndpoint(address, hostport string) (endpoint, error) {
	_, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return endpoint{}, fmt.Errorf("address %q: %v; want tcp://host:port or unix:///absolute/path", address, err)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return endpoint{}, fmt.Errorf("address %q: port %q is not a number from 1 to 65535", address, port)
	}
	return endpoint{"tcp", hostport}, nil
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
	return newStreamConn(c), nil
}

// streamConn speaks the raw TPM command stream over a socket, as swtpm's
// server port (and the kernel's vTPM proxy) do: the command bytes go out as
// they are, the response comes back as a header followed by the rest. An
// exchange can be interrupted by the caller's context (the socket's
// deadline is moved to the past) and resumed where it stopped.
type streamConn struct {
	c net.Conn

	// The exchange in progress: cmd[:sent] is written; buf[:got] of the
	// response is read.
	cmd  []byte
	sent int
	buf  []byte
	got  int

	interrupt func()        // interrupts the exchange; run by context.AfterFunc
	fired     chan struct{} // interrupt sends once it has run
}

func newStreamConn(c net.Conn) *streamConn {
	s := &streamConn{c: c, buf: make([]byte, 4096), fired: make(chan struct{}, 1)}
	s.interrupt = func() {
		s.c.SetDeadline(time.Unix(1, 0))
		s.fired <- struct{}{}
	}
	return s
}

func (s *streamConn) interruptible() bool { return true }

func (s *streamConn) roundTrip(ctx context.Context, cmd []byte, deadline time.Time) ([]byte, error) {
	if err := s.c.SetDeadline(deadline); err != nil {
		return nil, err
	}
	s.cmd, s.sent, s.got = cmd, 0, 0
	if ctx.Done() == nil {
		return s.exchange()
	}
	stop := context.AfterFunc(ctx, s.interrupt)
	rsp, err := s.exchange()
	if stop() {
		return rsp, err
	}
	// ctx ended: wait until interrupt has moved the deadline (which the
	// next roundTrip or finish sets again).
	<-s.fired
	if err != nil && isTimeout(err) {
		return nil, errInterrupted
	}
	return rsp, err
}

func (s *streamConn) finish(deadline time.Time) ([]byte, error) {
	if err := s.c.SetDeadline(deadline); err != nil {
		return nil, err
	}
	return s.exchange()
}

// exchange writes the rest of the command and reads the rest of the
// response, into buf: usually with one read.
func (s *streamConn) exchange() ([]byte, error) {
	for s.sent < len(s.cmd) {
		n, err := s.c.Write(s.cmd[s.sent:])
		s.sent += n
		if err != nil {
			return nil, err
		}
	}
	size := 0
	for {
		if s.got >= headerSize {
			size = int(binary.BigEndian.Uint32(s.buf[2:6]))
			if size < headerSize || size > maxResponse {
				return nil, fmt.Errorf("%w: response header claims %d bytes", errProtocol, size)
			}
			if s.got >= size {
				break
			}
			if size > len(s.buf) {
				s.buf = append(s.buf, make([]byte, size-len(s.buf))...)
			}
		}
		n, err := s.c.Read(s.buf[s.got:])
		s.got += n
		if err != nil {
			return nil, unexpectedEOF(err, s.got)
		}
	}
	if s.got > size {
		return nil, fmt.Errorf("%w: %d bytes after a response of %d", errProtocol, s.got-size, size)
	}
	s.cmd = nil
	return bytes.Clone(s.buf[:size]), nil
}

// unexpectedEOF is io.ReadFull's error: io.ErrUnexpectedEOF for an end of
// stream after part of a response.
func unexpectedEOF(err error, got int) error {
	if err == io.EOF && got > 0 {
		return io.ErrUnexpectedEOF
	}
	return err
}

func (s *streamConn) close() error { return s.c.Close() }

// deviceConn is a TPM character device: /dev/tpmrm0, the kernel's resource
// manager, which also flushes this connection's objects when it is closed.
// A write sends one command and one read returns the whole response. The
// kernel bounds each command by the TPM's own timeouts; the deadline applies
// on top where the device supports it.
//
// Go opens a character device non-blocking and waits in its poller. The
// kernel's TPM driver then runs each command asynchronously (Linux ≥ 4.20),
// and a read before the response is ready returns 0 bytes — which os.File
// would report as io.EOF (the bug google/go-tpm#75 fixed by polling). So
// the response is read through the raw descriptor: a read of 0 bytes, or
// EAGAIN, means "not yet", and keyd waits until the device is readable.
type deviceConn struct {
	f   *os.File
	raw syscall.RawConn
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
	return newDeviceConn(f)
}

func newDeviceConn(f *os.File) (*deviceConn, error) {
	raw, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &deviceConn{f: f, raw: raw, buf: make([]byte, maxResponse)}, nil
}

// interruptible is false: a read of the device cannot be relied on to
// resume after a deadline, so do waits for it in another goroutine.
func (d *deviceConn) interruptible() bool { return false }

func (d *deviceConn) finish(time.Time) ([]byte, error) {
	return nil, errors.New("device round trips are never interrupted")
}

func (d *deviceConn) roundTrip(_ context.Context, cmd []byte, deadline time.Time) ([]byte, error) {
	// Not every device file can take a deadline (os.ErrNoDeadline).
	_ = d.f.SetDeadline(deadline)
	if _, err := d.f.Write(cmd); err != nil {
		return nil, err
	}
	var (
		n    int
		rerr error
	)
	// Go's poller is edge-triggered: after a read of 0 bytes it waits for
	// the device's next wake-up, which the driver gives when the response
	// is ready, so even a kernel whose poll said "readable" too early
	// (before Linux 5.1) does not make this spin.
	err := d.raw.Read(func(fd uintptr) bool {
		n, rerr = syscall.Read(int(fd), d.buf)
		switch {
		case rerr == syscall.EINTR, rerr == syscall.EAGAIN:
			return false
		case rerr == nil && n == 0:
			return false // no response yet
		}
		return true
	})
	if err != nil {
		return nil, err // the deadline, or the file was closed
	}
	if rerr != nil {
		return nil, rerr
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
