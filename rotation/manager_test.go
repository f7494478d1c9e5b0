package rotation_test

import (
	"context"
	"crypto"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/soft"
	"github.com/keyd-dev/keyd/rotation"
)

type fixture struct {
	dir     string
	backend *soft.Backend
	store   *rotation.Store
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{dir: t.TempDir()}
	f.open(t)
	return f
}

// open (re)opens backend and store, as a restarted daemon does.
func (f *fixture) open(t *testing.T) {
	t.Helper()
	b, err := soft.New(soft.Config{Dir: filepath.Join(f.dir, "keys")})
	if err != nil {
		t.Fatal(err)
	}
	s, err := rotation.OpenStore(filepath.Join(f.dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	f.backend, f.store = b, s
	t.Cleanup(func() { s.Close(); b.Close() })
}

func (f *fixture) restart(t *testing.T) {
	t.Helper()
	f.store.Close()
	f.backend.Close()
	f.open(t)
}

var sets = []rotation.KeySet{
	{Name: "dpop", Purpose: "dpop", Spec: keystore.KeySpec{Algorithm: keystore.ES256}},
	{Name: "assert", Purpose: "client_assertion", Spec: keystore.KeySpec{Algorithm: keystore.EdDSA}},
}

func (f *fixture) manager(t *testing.T, failpoint func(string)) *rotation.Manager {
	t.Helper()
	m, err := rotation.New(context.Background(), rotation.Config{Backend: f.backend, Store: f.store, KeySets: sets, Failpoint: failpoint})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func active(t *testing.T, m *rotation.Manager, keyset string) rotation.Version {
	t.Helper()
	l, err := m.Acquire(keyset, "")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	return l.Version
}

func TestFirstStartCreatesActiveKeys(t *testing.T) {
	f := newFixture(t)
	m := f.manager(t, nil)
	vs := m.Versions()
	if len(vs) != 2 {
		t.Fatalf("%d versions", len(vs))
	}
	for _, v := range vs {
		if v.State != rotation.Active || v.Kid == "" || len(v.JWK) == 0 || v.ActivatedAt.IsZero() {
			t.Errorf("version %+v", v)
		}
	}
	kid := active(t, m, "dpop").Kid
	f.restart(t)
	m = f.manager(t, nil)
	if got := active(t, m, "dpop").Kid; got != kid {
		t.Errorf("restart changed the active key: %s → %s", kid, got)
	}
	if n := len(m.Versions()); n != 2 {
		t.Errorf("restart made keys: %d versions", n)
	}
}

func TestSecondDaemonRefused(t *testing.T) {
	f := newFixture(t)
	if _, err := rotation.OpenStore(filepath.Join(f.dir, "state")); !errors.Is(err, rotation.ErrLocked) {
		t.Fatalf("second open: %v, want ErrLocked", err)
	}
}

func TestRotateAndAcquire(t *testing.T) {
	f := newFixture(t)
	m := f.manager(t, nil)
	old := active(t, m, "dpop")
	res, err := m.Rotate(context.Background(), "dpop", true)
	nv, prev := res.Active, res.Previous
	if err != nil {
		t.Fatal(err)
	}
	if prev.Kid != old.Kid || prev.State != rotation.Draining || nv.State != rotation.Active {
		t.Fatalf("rotate: %+v %+v", nv, prev)
	}
	if l, err := m.Acquire("dpop", old.Kid); err != nil {
		t.Errorf("draining key not signable by kid: %v", err)
	} else {
		l.Release()
	}
	if _, err := m.Acquire("assert", old.Kid); !errors.Is(err, rotation.ErrNotSignable) {
		t.Errorf("kid of another key set: %v", err)
	}
	if _, err := m.Acquire("nope", ""); !errors.Is(err, rotation.ErrUnknownKeySet) {
		t.Errorf("unknown key set: %v", err)
	}
	if _, err := m.Rotate(context.Background(), "nope", true); !errors.Is(err, rotation.ErrUnknownKeySet) {
		t.Errorf("rotate unknown: %v", err)
	}
	// The state survives a restart.
	f.restart(t)
	m = f.manager(t, nil)
	if got := active(t, m, "dpop").Kid; got != nv.Kid {
		t.Errorf("active after restart %s, want %s", got, nv.Kid)
	}
	l, err := m.Acquire("dpop", old.Kid)
	if err != nil {
		t.Fatalf("draining after restart: %v", err)
	}
	l.Release()
}

func TestRevoke(t *testing.T) {
	f := newFixture(t)
	m := f.manager(t, nil)
	old := active(t, m, "dpop")
	m.Rotate(context.Background(), "dpop", true)
	v, err := m.Revoke(context.Background(), old.Kid, "dpop")
	if err != nil || v.State != rotation.Revoked {
		t.Fatalf("revoke: %v %+v", err, v)
	}
	if _, err := m.Acquire("dpop", old.Kid); !errors.Is(err, rotation.ErrNotSignable) {
		t.Errorf("revoked key: %v", err)
	}
	if _, err := m.Revoke(context.Background(), "nope", ""); !errors.Is(err, rotation.ErrUnknownKid) {
		t.Errorf("unknown kid: %v", err)
	}
	if _, err := m.Revoke(context.Background(), active(t, m, "dpop").Kid, "assert"); !errors.Is(err, rotation.ErrUnknownKid) {
		t.Errorf("kid of another key set: %v", err)
	}
	f.restart(t)
	m = f.manager(t, nil)
	if _, err := m.Acquire("dpop", old.Kid); !errors.Is(err, rotation.ErrNotSignable) {
		t.Errorf("revoked key signable after restart: %v", err)
	}
}

// Revoke makes the key unusable at once, even while another lifecycle
// change holds the manager (here a rotation of another key set stuck in
// its key generation): the key being revoked does not go on signing until
// that change is done.
func TestRevokeWhileBusy(t *testing.T) {
	f := newFixture(t)
	var hold sync.Once
	holding := false
	entered, release := make(chan struct{}), make(chan struct{})
	var mu sync.Mutex
	m := f.manager(t, func(name string) {
		mu.Lock()
		h := holding
		mu.Unlock()
		if h && name == "rotate.after_intent" {
			hold.Do(func() {
				close(entered)
				<-release
			})
		}
	})
	victim := active(t, m, "dpop")
	mu.Lock()
	holding = true
	mu.Unlock()
	rotated := make(chan error, 1)
	go func() {
		_, err := m.Rotate(context.Background(), "assert", true)
		rotated <- err
	}()
	<-entered
	revoked := make(chan error, 1)
	go func() {
		_, err := m.Revoke(context.Background(), victim.Kid, "dpop")
		revoked <- err
	}()
	stillSigns := func(kid string) bool {
		l, err := m.Acquire("dpop", kid)
		if err != nil {
			return false
		}
		defer l.Release()
		return l.Version.Kid == victim.Kid
	}
	deadline := time.Now().Add(2 * time.Second)
	for stillSigns(victim.Kid) || stillSigns("") {
		if time.Now().After(deadline) {
			close(release)
			<-rotated
			<-revoked
			t.Fatal("the key being revoked still signed 2 s after Revoke, while another change held the manager")
		}
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case err := <-revoked:
		close(release)
		<-rotated
		t.Fatalf("Revoke returned (%v) while the other change still held the manager", err)
	default:
	}
	close(release)
	if err := <-rotated; err != nil {
		t.Fatalf("rotate: %v", err)
	}
	if err := <-revoked; err != nil {
		t.Fatalf("revoke: %v", err)
	}
	if got := active(t, m, "dpop"); got.Kid == victim.Kid {
		t.Error("the revoked key is still the active one")
	}
}

// A crash at each step of a rotation leaves the old key active, the JWKS
// unchanged, and no unrecorded key in the backend after the restart.
func TestCrashDuringRotation(t *testing.T) {
	for _, point := range []string{"rotate.after_intent", "rotate.after_generate"} {
		t.Run(point, func(t *testing.T) {
			f := newFixture(t)
			crash := false
			m := f.manager(t, func(name string) {
				if crash && name == point {
					panic("crash at " + name)
				}
			})
			old := active(t, m, "dpop")
			crash = true
			func() {
				defer func() { recover() }()
				m.Rotate(context.Background(), "dpop", true)
				t.Fatal("no crash")
			}()
			f.restart(t)
			m = f.manager(t, nil)
			if got := active(t, m, "dpop"); got.Kid != old.Kid {
				t.Errorf("active after crash %s, want the old %s", got.Kid, old.Kid)
			}
			ids, _ := f.backend.List(context.Background())
			if len(ids) != 2 {
				t.Errorf("backend holds %d keys after reconciliation, want 2: %v", len(ids), ids)
			}
			for _, v := range m.Versions() {
				if v.State == rotation.Pending {
					t.Errorf("pending intent left: %+v", v)
				}
			}
			// And the next rotation works.
			if _, err := m.Rotate(context.Background(), "dpop", true); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("rotate.after_commit", func(t *testing.T) {
		f := newFixture(t)
		crash := false
		m := f.manager(t, func(name string) {
			if crash && name == "rotate.after_commit" {
				panic("crash")
			}
		})
		crash = true
		func() {
			defer func() { recover() }()
			m.Rotate(context.Background(), "dpop", true)
		}()
		f.restart(t)
		m = f.manager(t, nil)
		states := map[rotation.State]int{}
		for _, v := range m.Versions("dpop") {
			states[v.State]++
		}
		if states[rotation.Active] != 1 || states[rotation.Draining] != 1 {
			t.Errorf("after a crash past the commit: %v", states)
		}
	})
}

// A key that vanished from the backend is lost: DATA_LOSS, never replaced.
func TestLostKeyIsNeverReplaced(t *testing.T) {
	f := newFixture(t)
	m := f.manager(t, nil)
	v := active(t, m, "dpop")
	f.store.Close()
	f.backend.Close()
	if err := os.Remove(filepath.Join(f.dir, "keys", v.ID+".key")); err != nil {
		t.Fatal(err)
	}
	f.open(t)
	m = f.manager(t, nil)
	if _, err := m.Acquire("dpop", ""); !errors.Is(err, rotation.ErrKeyLost) {
		t.Fatalf("acquire: %v, want ErrKeyLost", err)
	}
	for _, x := range m.Versions("dpop") {
		if x.State != rotation.Lost {
			t.Errorf("version %s is %s; no replacement may appear", x.Kid, x.State)
		}
	}
	// An explicit rotation is the operator's way out.
	if _, err := m.Rotate(context.Background(), "dpop", true); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Acquire("dpop", ""); err != nil {
		t.Errorf("after rotate: %v", err)
	}
}

func TestWatch(t *testing.T) {
	f := newFixture(t)
	m := f.manager(t, nil)
	snap, events, cancel := m.Watch("dpop")
	defer cancel()
	if len(snap) != 1 {
		t.Fatalf("snapshot %d", len(snap))
	}
	res, err := m.Rotate(context.Background(), "dpop", true)
	if err != nil {
		t.Fatal(err)
	}
	nv := res.Active
	m.Rotate(context.Background(), "assert", true) // filtered out
	got := []rotation.Event{<-events, <-events}
	if got[0].Version.Kid != snap[0].Kid || got[0].Version.State != rotation.Draining || got[0].Previous != rotation.Active {
		t.Errorf("event 0: %+v", got[0])
	}
	if got[1].Version.Kid != nv.Kid || got[1].Version.State != rotation.Active {
		t.Errorf("event 1: %+v", got[1])
	}
	select {
	case ev := <-events:
		t.Errorf("event of an unwatched key set: %+v", ev)
	case <-time.After(50 * time.Millisecond):
	}
	cancel()
	if _, ok := <-events; ok {
		t.Error("channel open after cancel")
	}
}

func TestSlowWatcherIsDropped(t *testing.T) {
	f := newFixture(t)
	m := f.manager(t, nil)
	_, events, cancel := m.Watch()
	defer cancel()
	for range 40 {
		if _, err := m.Rotate(context.Background(), "assert", true); err != nil {
			t.Fatal(err)
		}
	}
	n := 0
	for range events {
		n++
	}
	if n != 64 {
		t.Errorf("received %d events before the drop, want the buffer of 64", n)
	}
}

// Many signers while rotating: every lease is of a version that was
// published when taken, and leases never block rotation.
func TestConcurrentSignAndRotate(t *testing.T) {
	f := newFixture(t)
	m := f.manager(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				l, err := m.Acquire("dpop", "")
				if err != nil {
					continue // between revoke and replacement there may be no active key
				}
				if _, err := l.Sign(context.Background(), make([]byte, 32), keystore.ES256.SignerOpts()); err != nil {
					t.Error(err)
				}
				l.Release()
			}
		}()
	}
	for ctx.Err() == nil {
		if _, err := m.Rotate(context.Background(), "dpop", true); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	wg.Wait()
	for _, v := range m.Versions("dpop") {
		if n := m.InFlight(v.Kid); n != 0 {
			t.Errorf("kid %s: %d leases still held", v.Kid, n)
		}
	}
}

func TestCorruptStateIsReported(t *testing.T) {
	f := newFixture(t)
	f.manager(t, nil)
	f.store.Close()
	os.WriteFile(filepath.Join(f.dir, "state", "keys.json"), []byte("{not json"), 0o600)
	s, err := rotation.OpenStore(filepath.Join(f.dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Load(); !errors.Is(err, rotation.ErrCorruptState) {
		t.Fatalf("load: %v", err)
	}
}

// wiped answers every signature as if the device had lost the key.
type wiped struct{ keystore.Backend }

func (wiped) Sign(context.Context, string, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, keystore.ErrNotFound
}

// A key that vanishes while the daemon runs is found at sign time, marked
// lost (persisted), and not replaced.
func TestKeyLostAtSignTime(t *testing.T) {
	f := newFixture(t)
	m, err := rotation.New(context.Background(), rotation.Config{Backend: wiped{f.backend}, Store: f.store, KeySets: sets})
	if err != nil {
		t.Fatal(err)
	}
	l, err := m.Acquire("dpop", "")
	if err != nil {
		t.Fatal(err)
	}
	_, err = l.Sign(context.Background(), make([]byte, 32), keystore.ES256.SignerOpts())
	l.Release()
	if !errors.Is(err, rotation.ErrKeyLost) {
		t.Fatalf("sign: %v, want ErrKeyLost", err)
	}
	if _, err := m.Acquire("dpop", ""); !errors.Is(err, rotation.ErrKeyLost) {
		t.Errorf("acquire after loss: %v", err)
	}
	f.restart(t)
	m = f.manager(t, nil)
	for _, v := range m.Versions("dpop") {
		if v.State != rotation.Lost {
			t.Errorf("after restart %s is %s, want lost", v.Kid, v.State)
		}
	}
}

// leaseKid keeps TestAcquireAllocatesNothing's lease alive past the call.
var leaseKid string

// TestAcquireAllocatesNothing: a lease is taken per signature; it is a value
// (a copy of the version), not a heap object the daemon's garbage collector
// has to reclaim under load.
func TestAcquireAllocatesNothing(t *testing.T) {
	m := newFixture(t).manager(t, nil)
	a := testing.AllocsPerRun(100, func() {
		l, err := m.Acquire("dpop", "")
		if err != nil {
			t.Fatal(err)
		}
		leaseKid = l.Version.Kid
		l.Release()
	})
	if a != 0 {
		t.Errorf("Acquire and Release: %v allocations, want 0", a)
	}
}
