// Package audit writes one JSON line per signing decision.
//
// The log fails closed: Record returns an error when the line could not be
// written, and keyd then refuses the signature (UNAVAILABLE) rather than
// hand out a signature nobody can account for. A record never contains a
// token, an access token, a PIN or key material: only hashes such as ath.
package audit

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// ErrWrite means a record could not be written.
var ErrWrite = errors.New("audit log write failed")

// Record is one signing decision.
type Record struct {
	Time  time.Time `json:"time"`
	Event string    `json:"event"` // "sign"
	UID   uint32    `json:"uid"`
	GID   uint32    `json:"gid"`
	PID   int32     `json:"pid"`
	// Identity is the client certificate identity of a caller over the
	// mutual-TLS listener (its uid, gid and pid are then 0).
	Identity string   `json:"identity,omitempty"`
	KeySet   string   `json:"keyset"`
	Kid      string   `json:"kid,omitempty"`
	Purpose  string   `json:"purpose,omitempty"`
	Htm      string   `json:"htm,omitempty"`
	Htu      string   `json:"htu,omitempty"`
	Ath      string   `json:"ath,omitempty"`
	Iss      string   `json:"iss,omitempty"`
	Sub      string   `json:"sub,omitempty"`
	Aud      []string `json:"aud,omitempty"`
	Jti      string   `json:"jti,omitempty"`
	Exp      int64    `json:"exp,omitempty"`
	// Outcome is "ok" or the gRPC code name of the refusal.
	Outcome string `json:"outcome"`
	// Reason says why a request was refused, in the words the caller got.
	Reason string `json:"reason,omitempty"`
}

// Log appends records to a writer, one JSON object per line, one write per
// record. It is safe for concurrent use.
type Log struct {
	mu  sync.Mutex
	w   io.Writer
	c   io.Closer
	buf []byte
}

// Open opens (creating with mode 0600) the audit file at path for appending.
func Open(path string) (*Log, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	return &Log{w: f, c: f}, nil
}

// New returns a log writing to w.
func New(w io.Writer) *Log { return &Log{w: w} }

// Record writes r. An error wraps ErrWrite; the caller must then not release
// whatever the record accounts for.
func (l *Log) Record(r Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(appendJSON(l.buf[:0], &r), '\n')
	n, err := l.w.Write(l.buf)
	if err == nil && n < len(l.buf) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return fmt.Errorf("%w: %v", ErrWrite, err)
	}
	return nil
}

// Close closes the underlying file, if Open opened it.
func (l *Log) Close() error {
	if l.c == nil {
		return nil
	}
	return l.c.Close()
}
