package rotation_test

import (
	"context"
	"crypto"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/rotation"
)

// An unloadable recorded key is DATA_LOSS for that version, not a daemon that cannot start.
func TestStartWithUnloadableKey(t *testing.T) {
	f := newFixture(t)
	m := f.manager(t, nil)
	old := active(t, m, "dpop")
	if _, err := m.Rotate(context.Background(), "dpop", true); err != nil {
		t.Fatal(err)
	}
	f.store.Close()
	f.backend.Close()
	if err := os.WriteFile(filepath.Join(f.dir, "keys", old.ID+".key"), []byte("garbage\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	f.open(t)
	m, err := rotation.New(context.Background(), rotation.Config{Backend: f.backend, Store: f.store, KeySets: sets})
	if err != nil {
		t.Fatalf("one unloadable draining key keeps the whole daemon from starting: %v", err)
	}
	if _, err := m.Acquire("dpop", old.Kid); !errors.Is(err, rotation.ErrKeyLost) {
		t.Errorf("unloadable key: %v, want ErrKeyLost", err)
	}
	for _, ks := range []string{"dpop", "assert"} {
		l, err := m.Acquire(ks, "")
		if err != nil {
			t.Errorf("key set %s: %v", ks, err)
			continue
		}
		l.Release()
	}
}

type failDestroy struct{ keystore.Backend }

func (failDestroy) Destroy(context.Context, string) error { return keystore.ErrUnavailable }

// A scheduled step failing at start is deferred (R4), not fatal.
func TestStartSurvivesFailedScheduledChange(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	m := scheduled(t, f, clock, nil)
	first := active(t, m, "as")
	if _, err := m.Rotate(context.Background(), "as", true); err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Hour) // drain over
	if err := m.Tick(context.Background()); err != nil {
		t.Fatal(err)
	}
	second := active(t, m, "as")
	f.restart(t)
	clock.Advance(24 * time.Hour) // retention over while keyd is down
	m2, err := rotation.New(context.Background(), rotation.Config{
		Backend: failDestroy{f.backend}, Store: f.store, Now: clock.Now, Monotonic: clock.Mono,
		KeySets: []rotation.KeySet{{Name: "as", Purpose: "client_assertion", Spec: keystore.KeySpec{Algorithm: keystore.ES256}, Schedule: sched, Prepublish: true}},
	})
	if err != nil {
		t.Fatalf("a failed destroy of retired key %s keeps the daemon from starting: %v", first.Kid, err)
	}
	if got := active(t, m2, "as"); got.Kid != second.Kid {
		t.Errorf("active %s, want %s", got.Kid, second.Kid)
	}
}

// Killed while Revoke makes the replacement; an old, unrelated lost version must not
// block the replacement at the next start (nor turn it into DATA_LOSS).
func TestCrashDuringRevokeReplacement(t *testing.T) {
	f := newFixture(t)
	m := f.manager(t, nil)
	first := active(t, m, "dpop")
	if _, err := m.Rotate(context.Background(), "dpop", true); err != nil {
		t.Fatal(err)
	}
	f.store.Close()
	f.backend.Close()
	if err := os.Remove(filepath.Join(f.dir, "keys", first.ID+".key")); err != nil { // the draining key is lost
		t.Fatal(err)
	}
	f.open(t)
	crash := false
	m = f.manager(t, func(name string) {
		if crash && name == "rotate.after_intent" {
			panic("killed at " + name)
		}
	})
	second := active(t, m, "dpop")
	crash = true
	func() {
		defer func() { recover() }()
		m.Revoke(context.Background(), second.Kid, "dpop")
		t.Fatal("no crash")
	}()
	f.restart(t)
	m = f.manager(t, nil)
	l, err := m.Acquire("dpop", "")
	if err != nil {
		t.Fatalf("after the restart the key set has no active key: %v", err)
	}
	l.Release()
}

// S1: a key file with loose permissions is refused when it is used
// (ErrInsecureStorage, FAILED_PRECONDITION at the edge), not at start: the
// daemon starts, the other keys sign, and the key is not recorded lost.
func TestStartWithInsecureKeyFile(t *testing.T) {
	f := newFixture(t)
	m := f.manager(t, nil)
	old := active(t, m, "dpop")
	f.restart(t)
	if err := os.Chmod(filepath.Join(f.dir, "keys", old.ID+".key"), 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := rotation.New(context.Background(), rotation.Config{Backend: f.backend, Store: f.store, KeySets: sets})
	if err != nil {
		t.Fatalf("a key file with mode 0644 keeps the whole daemon from starting: %v", err)
	}
	l, err := m.Acquire("dpop", "")
	if err != nil {
		t.Fatalf("Acquire(dpop) = %v; want the active key, which is not lost", err)
	}
	_, err = l.Sign(context.Background(), make([]byte, 32), crypto.SHA256)
	l.Release()
	if !errors.Is(err, keystore.ErrInsecureStorage) {
		t.Errorf("Sign with the mode 0644 key = %v; want ErrInsecureStorage", err)
	}
	l, err = m.Acquire("assert", "")
	if err != nil {
		t.Fatalf("key set assert: %v", err)
	}
	l.Release()

	// Fixed and restarted, the key signs again: it was never marked lost.
	if err := os.Chmod(filepath.Join(f.dir, "keys", old.ID+".key"), 0o600); err != nil {
		t.Fatal(err)
	}
	f.restart(t)
	m, err = rotation.New(context.Background(), rotation.Config{Backend: f.backend, Store: f.store, KeySets: sets})
	if err != nil {
		t.Fatal(err)
	}
	if got := active(t, m, "dpop"); got.Kid != old.Kid || got.State != rotation.Active {
		t.Errorf("after fixing the mode the active key is %s (%v), want %s active", got.Kid, got.State, old.Kid)
	}
}

// Killed while Revoke activates the pre-published next key in place of the
// revoked active one (the revocation is recorded, the activation is not):
// after the restart the key set signs with the next key, as Revoke would
// have made it do, not with nothing until the next key's activation time.
func TestCrashDuringRevokeActivationOfNext(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	crash := false
	m, err := rotation.New(context.Background(), rotation.Config{
		Backend: f.backend, Store: f.store, Now: clock.Now, Monotonic: clock.Mono,
		KeySets: []rotation.KeySet{{Name: "as", Purpose: "client_assertion", Spec: keystore.KeySpec{Algorithm: keystore.ES256}, Schedule: sched, Prepublish: true}},
		Failpoint: func(name string) {
			if crash && name == "activate.before_commit" {
				panic("killed at " + name)
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	first := active(t, m, "as")
	res, err := m.Rotate(context.Background(), "as", false)
	if err != nil || res.Next.Kid == "" {
		t.Fatalf("rotate: %+v, %v; want a next key", res, err)
	}
	crash = true
	func() {
		defer func() { recover() }()
		m.Revoke(context.Background(), first.Kid, "as")
		t.Fatal("no crash")
	}()
	f.restart(t)
	clock.Advance(time.Minute)
	m = scheduled(t, f, clock, nil)
	l, err := m.Acquire("as", "")
	if err != nil {
		t.Fatalf("after the restart (%v) the key set signs nothing until its next key activates at %v: %v", states(m), res.Next.ActivateAt, err)
	}
	l.Release()
	if l.Version.Kid != res.Next.Kid {
		t.Errorf("active %s, want the pre-published next key %s", l.Version.Kid, res.Next.Kid)
	}
	if _, err := m.Acquire("as", first.Kid); !errors.Is(err, rotation.ErrNotSignable) {
		t.Errorf("the revoked key: %v, want ErrNotSignable", err)
	}
}
