package audit

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// logrotate (without copytruncate) renames the audit file and later
// compresses and deletes the renamed file. Records accepted after the rename
// must land in a file at the configured path, created 0600, not in the
// renamed (soon deleted) file: a record that only ever reaches an unlinked
// inode is a signature nobody can account for.
//
// The writer learns of the rename or removal from the file's inotify watch
// and, without one, by looking the path up before each write: both ways are
// tested. With the watch, the periodic look is put off for the test's
// length, so only the watch's events can find the new file.
func TestRecordsAfterLogrotateReachThePath(t *testing.T) {
	for _, watched := range []bool{true, false} {
		t.Run(fmt.Sprintf("watched=%v", watched), func(t *testing.T) {
			testRecordsAfterLogrotate(t, watched)
		})
	}
}

// openWatched opens the audit log at p; without watched, the log has no
// watch (as where inotify is not available); with it, the writer never looks
// the path up for any other reason than the watch's events.
func openWatched(t *testing.T, p string, watched bool) *Log {
	t.Helper()
	l, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	if l.fw == nil {
		t.Fatal("Open set up no inotify watch on the audit file")
	}
	if watched {
		l.statEvery = time.Hour
	} else {
		l.fw.close()
		l.fw = nil
	}
	return l
}

func testRecordsAfterLogrotate(t *testing.T, watched bool) {
	p := filepath.Join(t.TempDir(), "audit.jsonl")
	l := openWatched(t, p, watched)
	defer l.Close()
	if err := l.Record(rec("a")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(p, p+".1"); err != nil { // logrotate: rotate
		t.Fatal(err)
	}
	if err := l.Record(rec("b")); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("after rotation, record b is not at %s: %v", p, err)
	}
	if got := jtisOf(t, data); !reflect.DeepEqual(got, []string{"b"}) {
		t.Errorf("%s holds %q; want [b]", p, got)
	}
	if fi, err := os.Stat(p); err == nil && fi.Mode().Perm() != 0o600 {
		t.Errorf("reopened audit file mode %v; want 0600", fi.Mode().Perm())
	}
	old, _ := os.ReadFile(p + ".1")
	if got := jtisOf(t, old); !reflect.DeepEqual(got, []string{"a"}) {
		t.Errorf("rotated file holds %q; want [a]", got)
	}

	// logrotate with compress: the rotated file is deleted, and with
	// "nocreate" nobody recreates the path either.
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	if err := l.Record(rec("c")); err != nil {
		t.Fatal(err)
	}
	data, err = os.ReadFile(p)
	if err != nil {
		t.Fatalf("after the file was removed, record c went nowhere: %v", err)
	}
	if got := jtisOf(t, data); !reflect.DeepEqual(got, []string{"c"}) {
		t.Errorf("%s holds %q; want [c]", p, got)
	}
}

// The audit file is refused when others may read or write it, or when its
// path is a symlink: at Open, and when a rotated file is replaced.
func TestOpenRefusesExposedFile(t *testing.T) {
	dir := t.TempDir()
	wide := filepath.Join(dir, "wide.jsonl")
	if err := os.WriteFile(wide, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(wide, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(wide); err == nil || !strings.Contains(err.Error(), "mode -rw-r--r--") {
		t.Errorf("Open of a 0644 file = %v; want a refusal naming the mode", err)
	}
	group := filepath.Join(dir, "group.jsonl")
	if err := os.WriteFile(group, nil, 0o640); err != nil {
		t.Fatal(err)
	}
	if l, err := Open(group); err != nil {
		t.Errorf("Open of a 0640 file: %v", err)
	} else {
		l.Close()
	}
	link := filepath.Join(dir, "link.jsonl")
	if err := os.Symlink(group, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(link); err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Errorf("Open of a symlink = %v; want a refusal", err)
	}

	// A rotation that leaves a file others may read at the path: the
	// record is refused, not written there.
	p := filepath.Join(dir, "audit.jsonl")
	l, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := os.Rename(p, p+".1"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := l.Record(sample()); !errors.Is(err, ErrWrite) {
		t.Errorf("Record after the path was replaced by a 0644 file = %v; want ErrWrite", err)
	}
}

// A lone writer does not look the audit path up for each record: the stat
// cost keyd about a tenth of its signing throughput (see fileWatch).
func TestRecordsDoNotLookUpThePath(t *testing.T) {
	p := filepath.Join(t.TempDir(), "audit.jsonl")
	l := openWatched(t, p, true)
	defer l.Close()
	var stats atomic.Int64
	l.stat = func(name string) (os.FileInfo, error) {
		stats.Add(1)
		return os.Stat(name)
	}
	for i := range 50 {
		if err := l.Record(rec(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	if n := stats.Load(); n != 0 {
		t.Errorf("50 records looked the path up %d times; want 0 while the file is unchanged", n)
	}
	// A change the watch sees: one look, then none again.
	if err := os.Chmod(p, 0o600); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if err := l.Record(rec(fmt.Sprint("after-chmod-", i))); err != nil {
			t.Fatal(err)
		}
	}
	if n := stats.Load(); n != 1 {
		t.Errorf("records after a chmod looked the path up %d times; want 1", n)
	}
}

// The watch does not see the audit file's directory renamed and replaced;
// the writer's periodic look does, within statEvery.
func TestDirectoryReplacedFoundByPeriodicLook(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "log")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "audit.jsonl")
	l := openWatched(t, p, true)
	defer l.Close()
	l.statEvery = 50 * time.Millisecond
	if err := l.Record(rec("a")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dir, dir+".old"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * l.statEvery)
	if err := l.Record(rec("b")); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("record b is not at %s once statEvery passed: %v", p, err)
	}
	if got := jtisOf(t, data); !reflect.DeepEqual(got, []string{"b"}) {
		t.Errorf("%s holds %q; want [b]", p, got)
	}
}
