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
	"syscall"
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
	// mutual-TLS listener (its uid, gid and pid are then 0): for an allowed
	// signature, the identity the key set's allow list admitted (a
	// certificate may carry several), else the certificate's first.
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

// stallAfter is how long one Write may take before the log counts as
// stalled: a FIFO whose reader stopped reading, a file on a hung mount.
// The callers waiting for it then fail (ErrStalled), and so do new records
// until the Write returns, so that a signature is refused within this
// bound instead of hanging, and a second sink (Either) takes the records.
// Only the caller inside the Write stays until it returns. The records of
// the waiting callers are not written afterwards; the stalled write's own
// may be, although its callers were told it failed: the log may then hold
// a record of a signature that was refused, never lack one that was
// released.
const stallAfter = 5 * time.Second

// ErrStalled means a record failed because the audit log's writer has been
// blocked for longer than the stall bound. It wraps ErrWrite.
var ErrStalled = fmt.Errorf("%w: the audit log has not completed a write for over %v (a stalled reader of a FIFO, a hung mount?)", ErrWrite, stallAfter)

// maxPending bounds the bytes of records waiting for the writer. A caller
// whose record would take the pending buffer past it waits until the writer
// has taken the buffer; a single record larger than the bound is still
// accepted into an empty buffer.
const maxPending = 1 << 20

// Log appends records to a writer, one JSON object per line. It is safe for
// concurrent use.
//
// Writes are group commits. A caller that finds no write in progress writes
// its own record at once, with one Write call, exactly as a lone caller
// always has. Callers that arrive while a write is in progress append their
// lines to a pending buffer and wait; when the write in progress completes,
// its writer hands the writer's role to one of them, which writes the whole
// pending buffer with one Write call and reports the outcome to every
// record in it. Record therefore returns nil only after its own line was
// completely written, and a failed write fails exactly the records it held.
//
// A write that fails part-way (a full disk) leaves no half line behind: on
// a file the bytes it wrote are truncated away, so the log holds exactly the
// records whose callers were told they succeeded; on a writer that cannot
// be truncated, the next write starts with a newline, so the torn line stays
// a line of its own and every later record still parses.
type Log struct {
	w io.Writer
	c io.Closer

	// path and fi are the file Open opened and its identity: when the path
	// names another file (logrotate renamed ours) or none, the writer
	// reopens it before writing. It looks the path up (stat) when fw
	// saw an event on the file, when statEvery passed since it last did, or
	// before every write if there is no fw. Only the writer touches
	// these, and w and c.
	path      string
	fi        os.FileInfo
	fw        *fileWatch // nil: no inotify
	statAt    time.Time  // the last look that found the file; zero: look before the next write
	statEvery time.Duration
	stat      func(string) (os.FileInfo, error)

	mu      sync.Mutex
	cond    sync.Cond // signalled when the pending buffer is taken or the writer goes idle
	writing bool      // a writer owns the write; pending lines will be written
	closed  bool
	pending []byte // whole lines appended since the last write began
	cur     *group // the group of the callers waiting on pending; nil when pending is empty
	spare   []byte // the buffer of the previous write, for reuse
	limit   int    // maxPending, smaller in tests
	torn    bool   // the last write failed part-way and could not be undone; only the writer touches it

	// A write that does not return (see stallAfter) stalls the log.
	writes     uint64        // writes begun and ended, for the watchdog
	stalled    bool          // records fail at once until the write returns
	stallCh    chan struct{} // closed when the log stalls
	stallAfter time.Duration
	stop       chan struct{} // closed by Close: the watchdog ends

	lines sync.Pool // *[]byte buffers records are formatted into, outside the lock
}

// A group is the records of one Write call whose callers wait for its
// outcome. ch has room for one token: the writer role is handed to the group
// by sending the token, and the outcome is published by closing ch.
type group struct {
	ch  chan struct{}
	err error // set before ch is closed
}

// Open opens (creating with mode 0600) the audit file at path for appending.
// It refuses a symlink, and a regular file other users may read or write.
func Open(path string) (*Log, error) {
	f, fi, err := openFile(path)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	l := newLog(f, f)
	l.path, l.fi, l.stat, l.statEvery = path, fi, os.Stat, statEvery
	if w, err := newFileWatch(path); err == nil {
		l.fw = w
	}
	// The watch is on the file opened unless the path was renamed
	// meanwhile; if it was, the first write looks.
	if now, err := os.Stat(path); err == nil && os.SameFile(now, fi) {
		l.statAt = time.Now()
	}
	return l, nil
}

// statEvery is how often the writer looks the audit path up although the
// file's watch saw nothing: for what the watch cannot see (see fileWatch).
const statEvery = time.Second

// reopen reopens the audit file when its path no longer names the file the
// log writes to: logrotate renamed it (and will compress and delete it) or
// it was removed. Writing on into that file would account for signatures in
// a file nobody keeps. An error fails the write: better refuse a signature
// than record it where it is lost.
func (l *Log) reopen() error {
	if l.path == "" {
		return nil
	}
	now := time.Now()
	if l.fw != nil && !l.fw.changed() && now.Sub(l.statAt) < l.statEvery {
		return nil
	}
	// Until a look succeeds, every write looks: the events it consumed
	// are gone.
	l.statAt = time.Time{}
	fi, err := l.stat(l.path)
	if err == nil && os.SameFile(fi, l.fi) {
		l.statAt = now
		return nil
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	f, fi, err := openFile(l.path)
	if err != nil {
		return err
	}
	old := l.c
	l.w, l.c, l.fi, l.torn = f, f, fi, false
	if old != nil {
		old.Close()
	}
	if l.fw != nil && l.fw.rewatch(l.path) != nil {
		l.fw.close()
		l.fw = nil
	}
	// statAt stays zero: the path may have been renamed again between the
	// open and the watch, so the next write looks once more.
	return nil
}

// openFile opens (creating with mode 0600) the audit file at path for
// appending. It refuses a symlink (someone able to write the directory
// could point the records elsewhere), and a regular file others may read
// or write: the records name callers, key sets and URLs. A device or a
// FIFO is taken as it is.
func openFile(path string) (*os.File, os.FileInfo, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, nil, fmt.Errorf("%s is a symlink: give the audit log's own path", path)
	}
	if err != nil {
		return nil, nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	if fi.Mode().IsRegular() && fi.Mode().Perm()&0o007 != 0 {
		f.Close()
		return nil, nil, fmt.Errorf("%s has mode %v: other users may read or write the audit records; chmod o-rwx it (0600, or 0640 for a log reader's group)", path, fi.Mode().Perm())
	}
	return f, fi, nil
}

// New returns a log writing to w.
func New(w io.Writer) *Log { return newLog(w, nil) }

func newLog(w io.Writer, c io.Closer) *Log {
	return newLogStalling(w, c, stallAfter)
}

func newLogStalling(w io.Writer, c io.Closer, after time.Duration) *Log {
	l := &Log{w: w, c: c, limit: maxPending, stallAfter: after, stallCh: make(chan struct{}), stop: make(chan struct{})}
	l.cond.L = &l.mu
	go l.watch()
	return l
}

// watch marks the log stalled when one write has been in progress for
// stallAfter. It ends when the log is closed.
func (l *Log) watch() {
	t := time.NewTicker(max(l.stallAfter/10, time.Millisecond))
	defer t.Stop()
	var seen uint64
	var since time.Time
	for {
		var now time.Time
		select {
		case <-l.stop:
			return
		case now = <-t.C:
		}
		l.mu.Lock()
		switch {
		case !l.writing || l.writes != seen:
			seen, since = l.writes, now
		case !l.stalled && now.Sub(since) >= l.stallAfter:
			l.stalled = true
			close(l.stallCh)
			l.cond.Broadcast() // callers waiting for room fail too
		}
		l.mu.Unlock()
	}
}

// Record writes r. It returns nil only once r's line was completely written
// to the underlying writer. An error wraps ErrWrite; the caller must then
// not release whatever the record accounts for. After Close, Record returns
// an error wrapping ErrWrite and os.ErrClosed.
func (l *Log) Record(r Record) error {
	bp, _ := l.lines.Get().(*[]byte)
	if bp == nil {
		bp = new([]byte)
	}
	line := append(appendJSON((*bp)[:0], &r), '\n')

	l.mu.Lock()
	for !l.closed && !l.stalled && len(l.pending) > 0 && len(l.pending)+len(line) > l.limit {
		l.cond.Wait()
	}
	if l.closed {
		l.mu.Unlock()
		l.putLine(bp, line)
		return fmt.Errorf("%w: %w", ErrWrite, os.ErrClosed)
	}
	if l.stalled {
		l.mu.Unlock()
		l.putLine(bp, line)
		return ErrStalled
	}
	l.pending = append(l.pending, line...)
	l.putLine(bp, line)
	if !l.writing {
		// Nothing in progress, so nothing was pending: write this record now.
		l.writing = true
		return l.write(nil)
	}
	g := l.cur
	if g == nil {
		g = &group{ch: make(chan struct{}, 1)}
		l.cur = g
	}
	stalled := l.stallCh
	l.mu.Unlock()
	select {
	case _, lead := <-g.ch:
		return l.joined(g, lead)
	case <-stalled:
		// The write in progress does not return. When it does, its
		// writer drops this record rather than hand the group the write
		// (see write). A hand-off or outcome given before the stall is
		// taken still: a writer role left unclaimed would wedge the log.
		select {
		case _, lead := <-g.ch:
			return l.joined(g, lead)
		default:
			return ErrStalled
		}
	}
}

// joined is the outcome for a caller waiting in group g once g's channel
// gave it the writer role (lead) or was closed.
func (l *Log) joined(g *group, lead bool) error {
	if lead {
		// The previous writer handed the write of this group to us.
		l.mu.Lock()
		return l.write(g)
	}
	return g.err
}

// write writes the pending lines, which include the caller's own, with one
// Write call outside the lock, and reports the outcome to g, the callers
// waiting on them (nil when there are none). Then it hands the writer role
// to the callers that appended meanwhile, if any, rather than serving them
// itself, so that no caller's latency grows with the load of others. It is
// called with l.mu held and l.writing set, and returns with l.mu released.
func (l *Log) write(g *group) error {
	buf := l.pending
	l.pending, l.spare, l.cur = l.spare[:0], nil, nil
	l.writes++
	l.cond.Broadcast() // room in pending again
	l.mu.Unlock()

	var n int
	err := l.reopen()
	out := buf
	if l.torn {
		out = append([]byte{'\n'}, buf...)
	}
	if err == nil {
		n, err = l.w.Write(out)
		if err == nil && n < len(out) {
			err = io.ErrShortWrite
		}
	}
	if err != nil {
		err = fmt.Errorf("%w: %w", ErrWrite, err)
		if n > 0 && !l.untear(n) {
			l.torn = true // else the log is as before this write, torn or not
		}
	} else {
		l.torn = false
	}

	l.mu.Lock()
	l.writes++ // the watchdog times the next write from now
	if cap(buf) <= 2*l.limit {
		l.spare = buf[:0]
	}
	if g != nil {
		g.err = err
		close(g.ch)
	}
	if l.stalled {
		// The callers of the records pending were told they failed
		// (ErrStalled) and have gone: their records are dropped, and
		// the log takes records again.
		if next := l.cur; next != nil {
			next.err = ErrStalled
			close(next.ch)
		}
		l.pending, l.cur = l.pending[:0], nil
		l.stalled, l.stallCh = false, make(chan struct{})
		l.writing = false
		l.cond.Broadcast()
	} else if next := l.cur; next != nil {
		next.ch <- struct{}{} // never blocks: the one token of a group waiting for it
	} else {
		l.writing = false
		l.cond.Broadcast() // Close waits for the writer to go idle
	}
	l.mu.Unlock()
	return err
}

// truncater is a writer whose end can be cut off: an *os.File.
type truncater interface {
	Seek(offset int64, whence int) (int64, error)
	Truncate(size int64) error
}

// untear removes the last n bytes written, those of a failed write, if the
// writer is a file opened for appending (whose offset is then its end). It
// reports whether it did.
func (l *Log) untear(n int) bool {
	t, ok := l.w.(truncater)
	if !ok {
		return false
	}
	end, err := t.Seek(0, io.SeekCurrent)
	if err != nil || end < int64(n) {
		return false
	}
	return t.Truncate(end-int64(n)) == nil
}

// putLine returns a formatting buffer to the pool, unless a huge record
// made it too big to keep.
func (l *Log) putLine(bp *[]byte, line []byte) {
	if cap(line) <= 64<<10 {
		*bp = line
		l.lines.Put(bp)
	}
}

// Close waits until every record accepted so far has been written (or has
// failed), then closes the underlying file, if Open opened it. Records
// after Close fail. Closing a closed log does nothing and returns nil.
func (l *Log) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	close(l.stop)
	l.cond.Broadcast() // callers waiting for room now fail
	for l.writing {
		l.cond.Wait()
	}
	l.mu.Unlock()
	if l.fw != nil {
		l.fw.close()
	}
	if l.c == nil {
		return nil
	}
	return l.c.Close()
}
