package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// recordingWriter keeps every Write call, checks that each one holds only
// whole lines and that no two overlap, and can be made to block or fail
// chosen calls (numbered from 1).
type recordingWriter struct {
	t        testing.TB
	delay    time.Duration              // each call takes at least this long, like a syscall
	fail     func(n int, p []byte) bool // call n fails, writing nothing, if this says so
	blockAt  map[int]chan struct{}      // these calls wait for their channel to close
	inWrite  atomic.Bool                // a call is in progress
	mu       sync.Mutex                 // guards what follows
	calls    [][]byte                   // every call's bytes, failed ones included
	failed   []int                      // the calls that failed
	out      bytes.Buffer               // what was written
	closed   bool                       // Close was called
	afterCls int                        // calls after Close
	started  map[int]chan struct{}      // closed when call n starts
}

func (w *recordingWriter) Write(p []byte) (int, error) {
	if !w.inWrite.CompareAndSwap(false, true) {
		w.t.Errorf("two Write calls at once")
	}
	defer w.inWrite.Store(false)
	if len(p) == 0 || p[len(p)-1] != '\n' || !wholeLines(p) {
		w.t.Errorf("Write of %d bytes is not whole lines: %.200q", len(p), p)
	}
	w.mu.Lock()
	w.calls = append(w.calls, bytes.Clone(p))
	n := len(w.calls)
	if w.closed {
		w.afterCls++
	}
	started, block := w.started[n], w.blockAt[n]
	w.mu.Unlock()
	if started != nil {
		close(started)
	}
	if block != nil {
		<-block
	}
	// Like a syscall, let others run meanwhile; time.Sleep would round a
	// few µs up to a timer tick.
	for start := time.Now(); time.Since(start) < w.delay; {
		runtime.Gosched()
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fail != nil && w.fail(n, p) {
		w.failed = append(w.failed, n)
		return 0, &os.PathError{Op: "write", Path: "test", Err: syscall.ENOSPC}
	}
	return w.out.Write(p)
}

func (w *recordingWriter) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.closed = true
	return nil
}

// onStart returns a channel closed when Write call n starts.
func (w *recordingWriter) onStart(n int) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.started == nil {
		w.started = map[int]chan struct{}{}
	}
	c := make(chan struct{})
	w.started[n] = c
	return c
}

func (w *recordingWriter) numCalls() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.calls)
}

// wholeLines reports whether every line of p is a whole record.
func wholeLines(p []byte) bool {
	for line := range bytes.Lines(p) {
		if !bytes.HasPrefix(line, []byte(`{"time":"`)) || !bytes.HasSuffix(line, []byte(`,"outcome":"ok"}`+"\n")) {
			return false
		}
	}
	return true
}

// jtis returns the jti of each line of p, in order.
func jtis(p []byte) []string {
	var ids []string
	for line := range bytes.Lines(p) {
		_, after, ok := bytes.Cut(line, []byte(`"jti":"`))
		if !ok {
			continue
		}
		id, _, _ := bytes.Cut(after, []byte(`"`))
		ids = append(ids, string(id))
	}
	return ids
}

func rec(jti string) Record {
	return Record{Time: time.Unix(1795000000, 0).UTC(), Event: "sign", KeySet: "ks", Jti: jti, Outcome: "ok"}
}

// pendingLines is the number of records waiting for the writer.
func pendingLines(l *Log) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Count(l.pending, []byte("\n"))
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// recordAsync starts Record(rec(jti)) and returns the channel its result
// arrives on.
func recordAsync(l *Log, jti string) <-chan error {
	c := make(chan error, 1)
	go func() { c <- l.Record(rec(jti)) }()
	return c
}

func notYet(t *testing.T, what string, c <-chan error) {
	t.Helper()
	select {
	case err := <-c:
		t.Fatalf("%s returned (%v) before its write completed", what, err)
	case <-time.After(20 * time.Millisecond):
	}
}

// Many concurrent callers: every record is written exactly once, in the
// order each caller appended it, in few Write calls holding whole lines.
func TestGroupCommitConcurrent(t *testing.T) {
	const workers, each = 32, 2000
	for _, limit := range []int{maxPending, 1 << 10} {
		t.Run(fmt.Sprintf("limit=%d", limit), func(t *testing.T) {
			w := &recordingWriter{t: t, delay: 20 * time.Microsecond}
			l := New(w)
			l.limit = limit
			var wg sync.WaitGroup
			for g := range workers {
				wg.Go(func() {
					for i := range each {
						if err := l.Record(rec(fmt.Sprintf("%d-%d", g, i))); err != nil {
							t.Errorf("record %d-%d: %v", g, i, err)
							return
						}
					}
				})
			}
			wg.Wait()

			next := make([]int, workers) // the next record expected from each worker
			for _, id := range jtis(w.out.Bytes()) {
				var g, i int
				if _, err := fmt.Sscanf(id, "%d-%d", &g, &i); err != nil {
					t.Fatalf("jti %q: %v", id, err)
				}
				if i != next[g] {
					t.Fatalf("worker %d: record %d where %d was expected (lost, repeated or reordered)", g, i, next[g])
				}
				next[g]++
			}
			for g, n := range next {
				if n != each {
					t.Errorf("worker %d: %d records written, want %d", g, n, each)
				}
			}
			for i, c := range w.calls {
				if len(c) > limit {
					t.Errorf("Write %d has %d bytes, over the %d-byte bound", i+1, len(c), limit)
				}
			}
			calls, records := len(w.calls), workers*each
			t.Logf("%d records in %d Write calls (%.1f records per call)", records, calls, float64(records)/float64(calls))
			if calls > records/4 {
				t.Errorf("%d Write calls for %d records: no group commit", calls, records)
			}
		})
	}
}

// A lone caller writes at once, one Write per record.
func TestLoneCallerWritesEachRecord(t *testing.T) {
	w := &recordingWriter{t: t}
	l := New(w)
	for i := range 3 {
		if err := l.Record(rec(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
		if n := w.numCalls(); n != i+1 {
			t.Fatalf("after record %d: %d Write calls", i, n)
		}
	}
}

// While a write is in progress, callers wait; then one Write takes all of
// them, and none returns before its own record was written.
func TestFollowersWaitForBlockedWriter(t *testing.T) {
	release := make(chan struct{})
	w := &recordingWriter{t: t, blockAt: map[int]chan struct{}{1: release}}
	started := w.onStart(1)
	l := New(w)
	leader := recordAsync(l, "leader")
	<-started
	const n = 10
	var followers []<-chan error
	for i := range n {
		followers = append(followers, recordAsync(l, fmt.Sprint("f", i)))
	}
	waitFor(t, "followers to be pending", func() bool { return pendingLines(l) == n })
	notYet(t, "the leader", leader)
	for _, c := range followers {
		notYet(t, "a follower", c)
	}
	close(release)
	if err := <-leader; err != nil {
		t.Fatal(err)
	}
	for _, c := range followers {
		if err := <-c; err != nil {
			t.Fatal(err)
		}
	}
	if len(w.calls) != 2 || len(jtis(w.calls[1])) != n {
		t.Fatalf("%d Write calls %q, want the leader's and one with the %d followers", len(w.calls), w.calls, n)
	}
}

// The writer returns once its own record is written: the records that
// arrived meanwhile are written by one of their own callers, so a caller's
// latency does not grow with the load of others.
func TestWriterHandsOff(t *testing.T) {
	release1, release2 := make(chan struct{}), make(chan struct{})
	w := &recordingWriter{t: t, blockAt: map[int]chan struct{}{1: release1, 2: release2}}
	started1, started2 := w.onStart(1), w.onStart(2)
	l := New(w)
	a := recordAsync(l, "a")
	<-started1
	b := recordAsync(l, "b")
	waitFor(t, "b to be pending", func() bool { return pendingLines(l) == 1 })
	close(release1)
	if err := <-a; err != nil {
		t.Fatal(err)
	}
	<-started2 // b's write is blocked, a returned all the same
	notYet(t, "b", b)
	close(release2)
	if err := <-b; err != nil {
		t.Fatal(err)
	}
	if got := jtis(w.out.Bytes()); fmt.Sprint(got) != "[a b]" {
		t.Errorf("written %v", got)
	}
}

// A failed write fails exactly the records it held; the records before and
// after it succeed and are written once.
func TestGroupWriteFailure(t *testing.T) {
	release := make(chan struct{})
	w := &recordingWriter{t: t, blockAt: map[int]chan struct{}{1: release},
		fail: func(n int, _ []byte) bool { return n == 2 }}
	started := w.onStart(1)
	l := New(w)
	leader := recordAsync(l, "leader")
	<-started
	var group []<-chan error
	for i := range 5 {
		group = append(group, recordAsync(l, fmt.Sprint("g", i)))
	}
	waitFor(t, "the group to be pending", func() bool { return pendingLines(l) == 5 })
	close(release)
	if err := <-leader; err != nil {
		t.Fatalf("leader: %v", err)
	}
	for _, c := range group {
		err := <-c
		if !errors.Is(err, ErrWrite) || !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("record of the failed write: err = %v, want ErrWrite wrapping ENOSPC", err)
		}
	}
	// The failure is not sticky: the next record is written afresh.
	if err := l.Record(rec("after")); err != nil {
		t.Fatalf("record after the failure: %v", err)
	}
	if got := jtis(w.out.Bytes()); fmt.Sprint(got) != "[leader after]" {
		t.Errorf("written %v", got)
	}
	if len(w.calls) != 3 {
		t.Errorf("%d Write calls, want 3", len(w.calls))
	}
}

type shortWriter struct{}

func (shortWriter) Write(p []byte) (int, error) { return len(p) - 1, nil }

// A short write without an error is a failure all the same.
func TestShortWrite(t *testing.T) {
	err := New(shortWriter{}).Record(rec("short"))
	if !errors.Is(err, ErrWrite) || !errors.Is(err, io.ErrShortWrite) {
		t.Fatalf("err = %v, want ErrWrite wrapping io.ErrShortWrite", err)
	}
}

// Under contention, a Write fails (the first from the k-th on that holds
// more than one record): its records, and only those, get the error; every
// other record is written exactly once.
func TestGroupWriteFailureConcurrent(t *testing.T) {
	const workers, each, k = 16, 200, 100
	w := &recordingWriter{t: t, delay: 20 * time.Microsecond}
	w.fail = func(n int, p []byte) bool {
		return n >= k && len(w.failed) == 0 && bytes.Count(p, []byte("\n")) > 1
	}
	l := New(w)
	var mu sync.Mutex
	failed := map[string]bool{}
	var wg sync.WaitGroup
	for g := range workers {
		wg.Go(func() {
			for i := range each {
				id := fmt.Sprintf("%d-%d", g, i)
				if err := l.Record(rec(id)); err != nil {
					if !errors.Is(err, ErrWrite) || !errors.Is(err, syscall.ENOSPC) {
						t.Errorf("%s: %v", id, err)
					}
					mu.Lock()
					failed[id] = true
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if len(w.failed) != 1 {
		t.Fatalf("%d failed Write calls, want 1", len(w.failed))
	}
	inFailed := jtis(w.calls[w.failed[0]-1])
	t.Logf("the failed Write held %d records", len(inFailed))
	if len(inFailed) != len(failed) {
		t.Errorf("%d records failed, the failed Write held %d", len(failed), len(inFailed))
	}
	for _, id := range inFailed {
		if !failed[id] {
			t.Errorf("%s was in the failed Write but its caller got nil", id)
		}
	}
	seen := map[string]bool{}
	for _, id := range jtis(w.out.Bytes()) {
		if seen[id] || failed[id] {
			t.Errorf("%s written twice or written though failed", id)
		}
		seen[id] = true
	}
	if len(seen)+len(failed) != workers*each {
		t.Errorf("%d written + %d failed != %d", len(seen), len(failed), workers*each)
	}
}

// Past the bound, callers wait for the writer instead of growing the
// pending buffer.
func TestPendingIsBounded(t *testing.T) {
	release := make(chan struct{})
	w := &recordingWriter{t: t, blockAt: map[int]chan struct{}{1: release}}
	started := w.onStart(1)
	l := New(w)
	r := rec("x00")
	l.limit = 3 * (len(appendJSON(nil, &r)) + 1) // three records
	leader := recordAsync(l, "x99")
	<-started
	var cs []<-chan error
	for i := range 10 {
		cs = append(cs, recordAsync(l, fmt.Sprintf("x%02d", i)))
	}
	waitFor(t, "the buffer to fill", func() bool { return pendingLines(l) == 3 })
	time.Sleep(20 * time.Millisecond)
	l.mu.Lock()
	if len(l.pending) > l.limit {
		t.Errorf("%d bytes pending, bound %d", len(l.pending), l.limit)
	}
	l.mu.Unlock()
	close(release)
	for _, c := range append(cs, leader) {
		if err := <-c; err != nil {
			t.Fatal(err)
		}
	}
	for i, c := range w.calls {
		if len(c) > l.limit {
			t.Errorf("Write %d: %d bytes", i+1, len(c))
		}
	}
	if n := len(jtis(w.out.Bytes())); n != 11 {
		t.Errorf("%d records written, want 11", n)
	}
}

// A record larger than the bound is still written.
func TestRecordLargerThanBound(t *testing.T) {
	w := &recordingWriter{t: t}
	l := New(w)
	l.limit = 16
	if err := l.Record(rec("big")); err != nil {
		t.Fatal(err)
	}
	if n := len(jtis(w.out.Bytes())); n != 1 {
		t.Fatalf("%d records written", n)
	}
}

// Close waits for the records accepted before it, then closes the file;
// Record after Close fails.
func TestCloseWaitsForPending(t *testing.T) {
	release := make(chan struct{})
	w := &recordingWriter{t: t, blockAt: map[int]chan struct{}{1: release}}
	started := w.onStart(1)
	l := newLog(w, w)
	leader := recordAsync(l, "leader")
	<-started
	follower := recordAsync(l, "follower")
	waitFor(t, "the follower to be pending", func() bool { return pendingLines(l) == 1 })
	closed := make(chan error, 1)
	go func() { closed <- l.Close() }()
	waitFor(t, "Close to begin", func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.closed
	})
	if err := l.Record(rec("late")); !errors.Is(err, ErrWrite) || !errors.Is(err, os.ErrClosed) {
		t.Errorf("Record while closing: %v, want ErrWrite and os.ErrClosed", err)
	}
	notYet(t, "Close", closed)
	close(release)
	for _, c := range []<-chan error{leader, follower, closed} {
		if err := <-c; err != nil {
			t.Fatal(err)
		}
	}
	if !w.closed || w.afterCls != 0 {
		t.Errorf("closed %v, %d writes after Close", w.closed, w.afterCls)
	}
	if got := jtis(w.out.Bytes()); fmt.Sprint(got) != "[leader follower]" {
		t.Errorf("written %v", got)
	}
	if err := l.Record(rec("after")); !errors.Is(err, ErrWrite) || !errors.Is(err, os.ErrClosed) {
		t.Errorf("Record after Close: %v, want ErrWrite and os.ErrClosed", err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// oldLog is the log before group commit: one write(2) per record, under the
// mutex. It is kept here only for BenchmarkRecordParallel's comparison.
type oldLog struct {
	mu  sync.Mutex
	w   io.Writer
	buf []byte
}

func (l *oldLog) Record(r Record) error {
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

type countingWriter struct {
	w io.Writer
	n atomic.Int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	c.n.Add(1)
	return c.w.Write(p)
}

var impls = []struct {
	name string
	new  func(io.Writer) Sink
}{
	{"old", func(w io.Writer) Sink { return &oldLog{w: w} }},
	{"new", func(w io.Writer) Sink { return New(w) }},
}

// benchFile opens an audit file in b.TempDir() as Open does, behind a
// counter of Write calls.
func benchFile(b *testing.B) *countingWriter {
	f, err := os.OpenFile(filepath.Join(b.TempDir(), "audit.jsonl"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	return &countingWriter{w: f}
}

// BenchmarkRecordParallel compares the old one-write-per-record log with
// group commit, writing to a real file, with GOMAXPROCS callers (par=1) and
// with 8×GOMAXPROCS callers (par=8). writes/op is Write calls per record.
func BenchmarkRecordParallel(b *testing.B) {
	for _, impl := range impls {
		for _, par := range []int{1, 8} {
			b.Run(fmt.Sprintf("%s/par=%d", impl.name, par), func(b *testing.B) {
				cw := benchFile(b)
				l := impl.new(cw)
				r := sample()
				b.SetParallelism(par)
				b.ReportAllocs()
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if err := l.Record(r); err != nil {
							b.Error(err)
							return
						}
					}
				})
				b.StopTimer()
				b.ReportMetric(float64(cw.n.Load())/float64(b.N), "writes/op")
			})
		}
	}
}

// BenchmarkRecordSerial is a lone caller: group commit must cost it nothing.
func BenchmarkRecordSerial(b *testing.B) {
	for _, impl := range impls {
		b.Run(impl.name, func(b *testing.B) {
			l := impl.new(benchFile(b))
			r := sample()
			b.ReportAllocs()
			for b.Loop() {
				if err := l.Record(r); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// tearingFile is an audit file whose next writes fail part-way, as on a
// full disk: they write the first half of what they get, then fail.
type tearingFile struct {
	*os.File
	tear int // writes left to tear
}

func (f *tearingFile) Write(p []byte) (int, error) {
	if f.tear == 0 {
		return f.File.Write(p)
	}
	f.tear--
	n, err := f.File.Write(p[:len(p)/2])
	if err != nil {
		return n, err
	}
	return n, syscall.ENOSPC
}

// tearingWriter is the same for a writer that cannot be truncated.
type tearingWriter struct {
	bytes.Buffer
	tear int
}

func (w *tearingWriter) Write(p []byte) (int, error) {
	if w.tear == 0 {
		return w.Buffer.Write(p)
	}
	w.tear--
	n, _ := w.Buffer.Write(p[:len(p)/2])
	return n, syscall.ENOSPC
}

// A write that fails part-way leaves no half line in an audit file: the
// file holds exactly the records that succeeded, each a whole line.
func TestTornWriteTruncated(t *testing.T) {
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "audit.jsonl"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tf := &tearingFile{File: f}
	l := New(tf)
	if err := l.Record(rec("a")); err != nil {
		t.Fatal(err)
	}
	tf.tear = 2
	for _, k := range []string{"b", "c"} {
		if err := l.Record(rec(k)); !errors.Is(err, ErrWrite) || !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("Record(%s) on a full disk = %v; want ErrWrite wrapping ENOSPC", k, err)
		}
	}
	if err := l.Record(rec("d")); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if got := jtisOf(t, data); !reflect.DeepEqual(got, []string{"a", "d"}) {
		t.Errorf("audit file holds %q; want the records that succeeded, [a d]\n%s", got, data)
	}
}

// On a writer that cannot be truncated, the record after a torn write
// starts on a line of its own and parses.
func TestTornWriteNewline(t *testing.T) {
	w := &tearingWriter{}
	l := New(w)
	if err := l.Record(rec("a")); err != nil {
		t.Fatal(err)
	}
	w.tear = 1
	if err := l.Record(rec("b")); !errors.Is(err, ErrWrite) {
		t.Fatalf("Record(b) = %v; want ErrWrite", err)
	}
	for _, k := range []string{"c", "d"} {
		if err := l.Record(rec(k)); err != nil {
			t.Fatal(err)
		}
	}
	lines := strings.Split(strings.TrimSuffix(w.String(), "\n"), "\n")
	if len(lines) != 4 {
		t.Fatalf("%d lines; want 4 (a, the torn half of b, c, d):\n%s", len(lines), w.String())
	}
	var parsed []string
	for i, ln := range lines {
		var r Record
		if err := json.Unmarshal([]byte(ln), &r); err != nil {
			if i == 1 {
				continue // the torn line
			}
			t.Fatalf("line %d does not parse: %v\n%s", i, err, ln)
		}
		parsed = append(parsed, r.Jti)
	}
	if !reflect.DeepEqual(parsed, []string{"a", "c", "d"}) {
		t.Errorf("parsed %q; want [a c d]", parsed)
	}
}

// jtisOf parses data as JSON lines and returns each record's jti.
func jtisOf(t *testing.T, data []byte) []string {
	t.Helper()
	var out []string
	for i, ln := range strings.Split(strings.TrimSuffix(string(data), "\n"), "\n") {
		var r Record
		if err := json.Unmarshal([]byte(ln), &r); err != nil {
			t.Fatalf("line %d does not parse: %v\n%s", i, err, ln)
		}
		out = append(out, r.Jti)
	}
	return out
}
