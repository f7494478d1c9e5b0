package audit

import (
	"errors"
	"fmt"
	"log/slog"
	"log/syslog"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Sink takes audit records.
type Sink interface {
	Record(Record) error
}

// Syslog sends each record, as its JSON line, to a syslog socket with
// facility authpriv.
//
// A syslog daemon that stops reading must fail this sink, so that Either
// falls over to the other, not block every signature behind it (log/syslog
// cannot bound a send, hence this small writer). A send waits at most
// syslogTimeout for room in the socket's queue; after one timed out, the
// sink is stalled: sends only try, without waiting, until one succeeds.
type Syslog struct {
	addr, tag string

	mu      sync.Mutex
	conn    *net.UnixConn // nil after a failed send, until the next send redials
	stalled bool
	buf     []byte
}

// syslogTimeout bounds one send to the syslog socket.
const syslogTimeout = time.Second

// syslogPriority is authpriv.info.
const syslogPriority = syslog.LOG_AUTHPRIV | syslog.LOG_INFO

// OpenSyslog connects to the syslog datagram socket at address (e.g.
// /dev/log) and tags records with tag.
func OpenSyslog(address, tag string) (*Syslog, error) {
	s := &Syslog{addr: address, tag: tag}
	if err := s.dial(); err != nil {
		return nil, fmt.Errorf("audit syslog %s: %w", address, err)
	}
	return s, nil
}

func (s *Syslog) dial() error {
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: s.addr, Net: "unixgram"})
	if err != nil {
		return err
	}
	s.conn = c
	return nil
}

// Record implements Sink.
func (s *Syslog) Record(r Record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	// The format of log/syslog for a local socket.
	s.buf = fmt.Appendf(s.buf[:0], "<%d>%s %s[%d]: ", syslogPriority, time.Now().Format(time.Stamp), s.tag, os.Getpid())
	s.buf = append(appendJSON(s.buf, &r), '\n')
	err := s.send()
	if err != nil && s.conn == nil {
		// The connection failed, not for want of room (the syslog
		// daemon restarted with a new socket): reconnect once.
		err = s.send()
	}
	if err != nil {
		return fmt.Errorf("%w: syslog: %w", ErrWrite, err)
	}
	return nil
}

// send sends s.buf as one datagram. A send that found no room keeps the
// connection; one that failed otherwise drops it, and the next redials.
func (s *Syslog) send() error {
	if s.conn == nil {
		if err := s.dial(); err != nil {
			return err
		}
	}
	var err error
	if s.stalled {
		err = sendNow(s.conn, s.buf)
	} else if err = s.conn.SetWriteDeadline(time.Now().Add(syslogTimeout)); err == nil {
		_, err = s.conn.Write(s.buf)
	}
	switch {
	case err == nil:
		s.stalled = false
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, unix.EAGAIN):
		s.stalled = true
	default:
		s.conn.Close()
		s.conn, s.stalled = nil, false
	}
	return err
}

// sendNow sends b on c if the socket has room now, else fails with EAGAIN.
func sendNow(c *net.UnixConn, b []byte) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.Sendto(int(fd), b, unix.MSG_DONTWAIT, nil) }); err != nil {
		return err
	}
	return serr
}

// Close closes the connection.
func (s *Syslog) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		return nil
	}
	err := s.conn.Close()
	s.conn = nil
	return err
}

// Either records to every sink and succeeds when at least one of them has
// the record: the audit trail falls over from one sink to the other, and a
// signature is refused only when no sink could record it. Each sink's
// failure is logged.
func Either(log *slog.Logger, sinks ...Sink) Sink {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return either{log: log, sinks: sinks}
}

type either struct {
	log   *slog.Logger
	sinks []Sink
}

func (e either) Record(r Record) error {
	var errs []error
	for i, s := range e.sinks {
		if err := s.Record(r); err != nil {
			e.log.Error("audit sink failed", "sink", i, "err", err)
			errs = append(errs, err)
		}
	}
	if len(errs) == len(e.sinks) {
		return errors.Join(errs...)
	}
	return nil
}
