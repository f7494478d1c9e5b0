package listener

import (
	"net"
	"sync"
	"syscall"
)

// Limit returns a listener that accepts at most n simultaneous connections
// from l; Accept waits while n are open (further clients wait in the
// kernel's accept queue, then are refused by it). Unlike
// golang.org/x/net/netutil's, its connections keep their SyscallConn, which
// peer-credential checks need.
func Limit(l net.Listener, n int) net.Listener {
	if n <= 0 {
		return l
	}
	return &limitListener{Listener: l, sem: make(chan struct{}, n), done: make(chan struct{})}
}

type limitListener struct {
	net.Listener
	sem       chan struct{}
	closeOnce sync.Once
	done      chan struct{}
}

func (l *limitListener) Accept() (net.Conn, error) {
	select {
	case l.sem <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.sem
		return nil, err
	}
	return ReleaseOnClose(c, func() { <-l.sem }), nil
}

func (l *limitListener) Close() error {
	err := l.Listener.Close()
	l.closeOnce.Do(func() { close(l.done) })
	return err
}

// ReleaseOnClose returns c, calling release once when it is first closed:
// a place taken in a count of open connections is given back. The
// returned connection keeps c's SyscallConn, which peer-credential checks
// need.
func ReleaseOnClose(c net.Conn, release func()) net.Conn {
	return &releaseConn{Conn: c, release: release}
}

type releaseConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *releaseConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// SyscallConn exposes the socket, for SO_PEERCRED.
func (c *releaseConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, syscall.EINVAL
}
