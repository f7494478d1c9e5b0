package audit

import (
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

// stallingLog returns a log that counts as stalled after 100 ms, whose
// first Write blocks until unblock (or the test's end); started is closed
// when that Write begins.
func stallingLog(t *testing.T) (l *Log, w *recordingWriter, started <-chan struct{}, unblock func()) {
	release := make(chan struct{})
	w = &recordingWriter{t: t, blockAt: map[int]chan struct{}{1: release}}
	started = w.onStart(1)
	l = newLogStalling(w, w, 100*time.Millisecond)
	unblock = sync.OnceFunc(func() { close(release) })
	t.Cleanup(func() {
		unblock() // first: Close waits for the write
		l.Close()
	})
	return l, w, started, unblock
}

// A14: a write that does not return (the reader of a FIFO stalled, a
// hung mount) must not hold every later signature behind it. After the
// stall bound, the callers waiting for it fail with ErrStalled, and so do
// new records, at once, until the write returns; then the log takes
// records again, without the records of the callers it failed.
func TestStalledWriteFailsOthers(t *testing.T) {
	l, w, started, unblock := stallingLog(t)
	leader := recordAsync(l, "leader")
	<-started
	follower := recordAsync(l, "follower")
	select {
	case err := <-follower:
		if !errors.Is(err, ErrStalled) || !errors.Is(err, ErrWrite) {
			t.Fatalf("follower of a stalled write: %v, want ErrStalled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the follower of a stalled write still waits after 10 s")
	}
	start := time.Now()
	if err := l.Record(rec("new")); !errors.Is(err, ErrStalled) {
		t.Errorf("record while stalled: %v, want ErrStalled", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("record while stalled took %v, want it to fail at once", d)
	}
	notYet(t, "the stalled writer", leader)

	unblock()
	if err := <-leader; err != nil {
		t.Fatalf("the stalled write, once returned: %v", err)
	}
	if err := l.Record(rec("after")); err != nil {
		t.Fatalf("record after the write returned: %v", err)
	}
	got := strings.Join(jtis(w.out.Bytes()), " ")
	if got != "leader after" {
		t.Errorf("records written %q, want the stalled writer's and the later one", got)
	}
}

// Callers waiting for room in the pending buffer behind a stalled write
// fail too.
func TestStalledWriteFailsCallersWaitingForRoom(t *testing.T) {
	l, _, started, _ := stallingLog(t)
	r := rec("x00")
	l.limit = len(appendJSON(nil, &r)) + 1 // one record
	leader := recordAsync(l, "x99")
	<-started
	var cs []<-chan error
	for _, jti := range []string{"x01", "x02", "x03"} {
		cs = append(cs, recordAsync(l, jti))
	}
	for _, c := range cs {
		select {
		case err := <-c:
			if !errors.Is(err, ErrStalled) {
				t.Errorf("caller behind a stalled write: %v, want ErrStalled", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a caller behind a stalled write still waits after 10 s")
		}
	}
	notYet(t, "the stalled writer", leader)
}

// With a second sink, a stalled audit file is fallen over from: the
// record reaches syslog within the stall bound.
func TestStalledFileFallsOverToSyslog(t *testing.T) {
	pc, sl := syslogPair(t)
	l, _, started, _ := stallingLog(t)
	both := Either(nil, l, sl)
	recordAsync(l, "stuck")
	<-started
	done := make(chan error, 1)
	go func() { done <- both.Record(sample()) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("record with the file stalled and syslog working: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a record with the file stalled and syslog working still waits after 10 s")
	}
	buf := make([]byte, 4096)
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, _, err := pc.ReadFrom(buf); err != nil {
		t.Fatalf("syslog got nothing: %v", err)
	}
}
