package audit

import (
	"errors"
	"fmt"
	"log/slog"
	"log/syslog"
	"sync"
)

// Sink takes audit records.
type Sink interface {
	Record(Record) error
}

// Syslog sends each record, as its JSON line, to a syslog socket with
// facility authpriv.
type Syslog struct {
	mu  sync.Mutex
	w   *syslog.Writer
	buf []byte
}

// OpenSyslog connects to the syslog datagram socket at address (e.g.
// /dev/log) and tags records with tag.
func OpenSyslog(address, tag string) (*Syslog, error) {
	w, err := syslog.Dial("unixgram", address, syslog.LOG_AUTHPRIV|syslog.LOG_INFO, tag)
	if err != nil {
		return nil, fmt.Errorf("audit syslog %s: %w", address, err)
	}
	return &Syslog{w: w}, nil
}

// Record implements Sink.
func (s *Syslog) Record(r Record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf = appendJSON(s.buf[:0], &r)
	if err := s.w.Info(string(s.buf)); err != nil {
		return fmt.Errorf("%w: syslog: %v", ErrWrite, err)
	}
	return nil
}

// Close closes the connection.
func (s *Syslog) Close() error { return s.w.Close() }

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
