package rotation_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/rotation"
)

// The state file decides which keys sign and which are revoked: a store
// refuses one it did not write, as the keystores refuse such key files
// (S1), and never blocks on it. Each case is checked with a time limit.
func TestUntrustedStateRefused(t *testing.T) {
	chown := func(t *testing.T, path string) {
		if os.Geteuid() != 0 {
			t.Skip("chown to another user needs root")
		}
		if err := os.Chown(path, 65534, 65534); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name  string
		spoil func(t *testing.T, state, file string)
	}{
		{"fifo", func(t *testing.T, state, file string) {
			if err := os.Remove(file); err != nil {
				t.Fatal(err)
			}
			if err := syscall.Mkfifo(file, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"symlink", func(t *testing.T, state, file string) {
			other := filepath.Join(t.TempDir(), "keys.json")
			if err := os.Rename(file, other); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(other, file); err != nil {
				t.Fatal(err)
			}
		}},
		{"world-writable", func(t *testing.T, state, file string) {
			if err := os.Chmod(file, 0o666); err != nil {
				t.Fatal(err)
			}
		}},
		{"foreign-file", func(t *testing.T, state, file string) {
			chown(t, file)
		}},
		{"foreign-dir", func(t *testing.T, state, file string) {
			chown(t, state)
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t)
			f.manager(t, nil)
			f.store.Close()
			state := filepath.Join(f.dir, "state")
			file := filepath.Join(state, "keys.json")
			c.spoil(t, state, file)
			done := make(chan error, 1)
			go func() {
				s, err := rotation.OpenStore(state)
				if err == nil {
					_, err = s.Load()
					s.Close()
				}
				done <- err
			}()
			select {
			case err := <-done:
				if !errors.Is(err, keystore.ErrInsecureStorage) {
					t.Errorf("open and load: %v, want ErrInsecureStorage", err)
				}
			case <-time.After(5 * time.Second):
				// Unblock the reader of the FIFO.
				if w, err := os.OpenFile(file, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
					w.Close()
				}
				<-done
				t.Fatal("load blocked")
			}
		})
	}
}

// A state file far larger than Save writes (a wrong file restored in its
// place, a corrupted file system) is refused as corrupt, not read whole
// into memory at start. The file is sparse: it takes no disk space.
func TestOversizedStateRefused(t *testing.T) {
	f := newFixture(t)
	f.manager(t, nil)
	f.store.Close()
	state := filepath.Join(f.dir, "state")
	if err := os.Truncate(filepath.Join(state, "keys.json"), 1<<30); err != nil {
		t.Fatal(err)
	}
	s, err := rotation.OpenStore(state)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err = s.Load()
	runtime.ReadMemStats(&after)
	if !errors.Is(err, rotation.ErrCorruptState) {
		t.Errorf("Load of a 1 GiB state file = %v; want ErrCorruptState", err)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 16<<20 {
		t.Errorf("Load of a 1 GiB state file allocated %d MiB; want it refused before it is read whole", n>>20)
	}
}

// A kill -9 in the middle of a save leaves a temporary file; the next open
// of the store removes it, so a daemon that keeps crashing does not fill
// its state directory, and the state loads as the last complete save left
// it.
func TestCrashDuringSaveLeavesNoTempFile(t *testing.T) {
	if dir := os.Getenv("KEYD_TEST_SAVE_DIR"); dir != "" {
		// The child: save the same state until killed.
		s, err := rotation.OpenStore(dir)
		if err != nil {
			os.Exit(3)
		}
		vs, err := s.Load()
		if err != nil {
			os.Exit(4)
		}
		os.Stdout.Write([]byte("saving\n"))
		for {
			if err := s.Save(vs); err != nil {
				os.Exit(5)
			}
		}
	}
	f := newFixture(t)
	want := len(f.manager(t, nil).Versions())
	f.store.Close()
	state := filepath.Join(f.dir, "state")
	temps := func() []string {
		m, _ := filepath.Glob(filepath.Join(state, ".keys.json.tmp-*"))
		return m
	}
	for i := 0; i < 50 && len(temps()) == 0; i++ {
		child := exec.Command(os.Args[0], "-test.run=^TestCrashDuringSaveLeavesNoTempFile$")
		child.Env = append(os.Environ(), "KEYD_TEST_SAVE_DIR="+state)
		out, err := child.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := child.Start(); err != nil {
			t.Fatal(err)
		}
		out.Read(make([]byte, 7))
		time.Sleep(time.Duration(i%5) * time.Millisecond)
		child.Process.Kill()
		child.Wait()
	}
	if len(temps()) == 0 {
		t.Skip("no kill landed inside a save")
	}
	s, err := rotation.OpenStore(state)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if left := temps(); len(left) != 0 {
		t.Errorf("temporary files left after a restart: %v", left)
	}
	vs, err := s.Load()
	if err != nil || len(vs) != want {
		t.Errorf("load after the crash: %d versions, %v; want %d", len(vs), err, want)
	}
}

// A state file that is gone while the backend still holds keyd's keys is
// lost metadata, not a first start: keyd refuses to start rather than
// silently replace every active key with a new one (the kids and DPoP jkts
// clients hold would all change), and leaves the keys alone.
func TestLostStateIsNotAFirstStart(t *testing.T) {
	f := newFixture(t)
	f.manager(t, nil)
	before, err := f.backend.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(f.dir, "state", "keys.json")); err != nil {
		t.Fatal(err)
	}
	f.restart(t)
	m, err := rotation.New(t.Context(), rotation.Config{Backend: f.backend, Store: f.store, KeySets: sets})
	if !errors.Is(err, rotation.ErrCorruptState) {
		t.Errorf("start without the state file: %v, want ErrCorruptState", err)
		if m != nil {
			for _, v := range m.Versions() {
				t.Logf("new %s key %s", v.KeySet, v.Kid)
			}
		}
	}
	after, err := f.backend.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(before, after) {
		t.Errorf("backend keys %q, before %q", after, before)
	}
}
