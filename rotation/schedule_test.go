package rotation_test

import (
	"context"
	"crypto"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/rotation"
)

// fakeClock has a wall clock that can jump and a monotonic clock that
// cannot.
type fakeClock struct {
	mu   sync.Mutex
	wall time.Time
	mono time.Duration
}

func newClock() *fakeClock {
	return &fakeClock{wall: time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.wall
}

func (c *fakeClock) Mono() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mono
}

// Advance lets time pass.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.wall = c.wall.Add(d)
	c.mono += d
	c.mu.Unlock()
}

// Jump moves only the wall clock.
func (c *fakeClock) Jump(d time.Duration) {
	c.mu.Lock()
	c.wall = c.wall.Add(d)
	c.mu.Unlock()
}

var sched = rotation.Schedule{Period: 24 * time.Hour, Prepublish: time.Hour, Drain: 2 * time.Hour, Retain: 24 * time.Hour}

// flaky fails Generate while down, and Destroy too if destroyDown.
type flaky struct {
	keystore.Backend
	mu          sync.Mutex
	down        bool
	destroyDown bool
}

func (b *flaky) Destroy(ctx context.Context, id string) error {
	b.mu.Lock()
	down := b.down && b.destroyDown
	b.mu.Unlock()
	if down {
		return keystore.ErrUnavailable
	}
	return b.Backend.Destroy(ctx, id)
}

func (b *flaky) setDown(v bool) { b.mu.Lock(); b.down = v; b.mu.Unlock() }

func (b *flaky) Generate(ctx context.Context, id string, s keystore.KeySpec) (crypto.PublicKey, error) {
	b.mu.Lock()
	down := b.down
	b.mu.Unlock()
	if down {
		return nil, keystore.ErrUnavailable
	}
	return b.Backend.Generate(ctx, id, s)
}

func scheduled(t *testing.T, f *fixture, clock *fakeClock, b keystore.Backend) *rotation.Manager {
	t.Helper()
	if b == nil {
		b = f.backend
	}
	m, err := rotation.New(context.Background(), rotation.Config{
		Backend: b, Store: f.store, Now: clock.Now, Monotonic: clock.Mono,
		KeySets: []rotation.KeySet{{Name: "as", Purpose: "client_assertion", Spec: keystore.KeySpec{Algorithm: keystore.ES256}, Schedule: sched, Prepublish: true}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func states(m *rotation.Manager) map[rotation.State][]string {
	out := map[rotation.State][]string{}
	for _, v := range m.Versions("as") {
		out[v.State] = append(out[v.State], v.Kid)
	}
	return out
}

func published(m *rotation.Manager) map[string]bool {
	out := map[string]bool{}
	for _, v := range m.Versions("as") {
		if v.State.Published() {
			out[v.Kid] = true
		}
	}
	return out
}

// R2: a new key is published Prepublish before it signs; the old one stays
// published Drain after it stopped signing; then it is unpublished, and
// destroyed after Retain.
func TestScheduleTimeline(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	m := scheduled(t, f, clock, nil)
	first := active(t, m, "as")
	if !first.DeactivateAt.Equal(clock.Now().Add(24 * time.Hour)) {
		t.Fatalf("deactivate at %v", first.DeactivateAt)
	}
	step := func(d time.Duration) {
		t.Helper()
		clock.Advance(d)
		if err := m.Tick(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	step(23*time.Hour - time.Second)
	if s := states(m); len(s[rotation.Next]) != 0 {
		t.Fatalf("next published early: %v", s)
	}
	step(time.Second) // 23h: prepublish
	s := states(m)
	if len(s[rotation.Next]) != 1 || active(t, m, "as").Kid != first.Kid {
		t.Fatalf("at 23h: %v", s)
	}
	next := s[rotation.Next][0]
	if !published(m)[next] {
		t.Fatal("next key not published")
	}
	if _, err := m.Acquire("as", next); !errors.Is(err, rotation.ErrNotSignable) {
		t.Errorf("next key signs before activation: %v", err)
	}
	step(time.Hour - time.Second)
	if active(t, m, "as").Kid != first.Kid {
		t.Fatal("activated early")
	}
	step(time.Second) // 24h: activation
	if got := active(t, m, "as").Kid; got != next {
		t.Fatalf("at 24h active %s, want %s", got, next)
	}
	if s := states(m); len(s[rotation.Draining]) != 1 || s[rotation.Draining][0] != first.Kid {
		t.Fatalf("at 24h: %v", s)
	}
	step(2*time.Hour - time.Second)
	if !published(m)[first.Kid] {
		t.Fatal("drained early")
	}
	l, err := m.Acquire("as", first.Kid)
	if err != nil {
		t.Fatalf("draining key does not sign by kid: %v", err)
	}
	l.Release()
	step(time.Second) // 26h: retire
	if published(m)[first.Kid] {
		t.Fatal("still published after drain")
	}
	if _, err := m.Acquire("as", first.Kid); !errors.Is(err, rotation.ErrNotSignable) {
		t.Errorf("retired key signs: %v", err)
	}
	step(24*time.Hour - time.Second)
	if s := states(m); len(s[rotation.Retired]) != 1 {
		t.Fatalf("destroyed early: %v", s)
	}
	step(time.Second) // 50h: destroy
	if s := states(m); len(s[rotation.Destroyed]) != 1 {
		t.Fatalf("at 50h: %v", s)
	}
	if _, err := f.backend.Public(context.Background(), first.ID); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("destroyed key still in the backend: %v", err)
	}
}

// R2: a draining key stops signing at its retire time even when the tick
// that unpublishes it is late (held up by a slow backend call, or a tick
// interval longer than the remaining drain).
func TestDrainingKeyStopsAtRetireTimeWithoutTick(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	m := scheduled(t, f, clock, nil)
	first := active(t, m, "as")
	for _, d := range []time.Duration{23 * time.Hour, time.Hour} { // prepublish, activation
		clock.Advance(d)
		if err := m.Tick(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if s := states(m); len(s[rotation.Draining]) != 1 || s[rotation.Draining][0] != first.Kid {
		t.Fatalf("after the rotation: %v", s)
	}
	clock.Advance(2*time.Hour - time.Second)
	l, err := m.Acquire("as", first.Kid)
	if err != nil {
		t.Fatalf("draining key before its retire time: %v", err)
	}
	l.Release()
	clock.Advance(time.Second) // its retire time; no tick
	if _, err := m.Acquire("as", first.Kid); !errors.Is(err, rotation.ErrNotSignable) {
		t.Errorf("draining key at its retire time, the tick not run yet: %v; want ErrNotSignable", err)
	}
}

// R4: the backend is down when a rotation is due: it is deferred, the active
// key is unchanged, no half state is left, and it happens once the backend
// is back.
func TestScheduleBackendDown(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	b := &flaky{Backend: f.backend}
	m := scheduled(t, f, clock, b)
	first := active(t, m, "as")
	b.setDown(true)
	clock.Advance(23 * time.Hour)
	if err := m.Tick(context.Background()); !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("tick with the backend down: %v", err)
	}
	if got := active(t, m, "as"); got.Kid != first.Kid {
		t.Fatal("active key changed")
	}
	if s := states(m); len(s) != 1 || m.Failures() != 1 {
		t.Fatalf("half state: %v, failures %d", s, m.Failures())
	}
	ids, _ := f.backend.List(context.Background())
	if len(ids) != 1 {
		t.Fatalf("backend holds %d keys", len(ids))
	}
	clock.Advance(2 * time.Hour) // the deadline passed while down
	m.Tick(context.Background())
	if active(t, m, "as").Kid != first.Kid {
		t.Fatal("active key changed while down")
	}
	b.setDown(false)
	clock.Advance(time.Minute)
	if err := m.Tick(context.Background()); err != nil {
		t.Fatal(err)
	}
	s := states(m)
	if len(s[rotation.Next]) != 1 || active(t, m, "as").Kid != first.Kid {
		t.Fatalf("after recovery: %v", s)
	}
	// Still pre-published for the full Prepublish before it signs.
	clock.Advance(time.Hour - time.Second)
	m.Tick(context.Background())
	if active(t, m, "as").Kid != first.Kid {
		t.Fatal("activated before the full prepublish")
	}
	clock.Advance(time.Second)
	m.Tick(context.Background())
	if active(t, m, "as").Kid == first.Kid {
		t.Fatal("not activated after prepublish")
	}
}

// R5: the wall clock jumps a day forward or back: no double rotation, no
// skipped drain.
func TestScheduleClockJumps(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	m := scheduled(t, f, clock, nil)
	first := active(t, m, "as")
	// Rotate once by the schedule.
	clock.Advance(24 * time.Hour)
	m.Tick(context.Background()) // next
	clock.Advance(time.Hour)
	m.Tick(context.Background()) // active
	second := active(t, m, "as")
	if second.Kid == first.Kid {
		t.Fatal("no rotation")
	}

	// Forward a day: the draining key must still drain its full 2h.
	clock.Jump(24 * time.Hour)
	for range 10 {
		m.Tick(context.Background())
	}
	if !published(m)[first.Kid] {
		t.Fatal("a forward clock jump skipped the drain")
	}
	if active(t, m, "as").Kid != second.Kid || len(states(m)[rotation.Next]) != 0 {
		t.Fatalf("a forward clock jump rotated: %v", states(m))
	}
	clock.Advance(2 * time.Hour)
	m.Tick(context.Background())
	if published(m)[first.Kid] {
		t.Fatal("not retired after the real drain time")
	}

	// Back a day: nothing happens twice.
	clock.Jump(-48 * time.Hour)
	for range 10 {
		clock.Advance(time.Minute)
		m.Tick(context.Background())
	}
	s := states(m)
	if active(t, m, "as").Kid != second.Kid || len(s[rotation.Next]) != 0 || len(s[rotation.Draining]) != 0 {
		t.Fatalf("a backward clock jump changed keys: %v", s)
	}
}

// Destroy waits for signatures in flight; a key retired mid-sign discards
// the signature.
func TestDestroyWaitsForLeases(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	m := scheduled(t, f, clock, nil)
	first := active(t, m, "as")
	if _, err := m.Rotate(context.Background(), "as", true); err != nil {
		t.Fatal(err)
	}
	l, err := m.Acquire("as", first.Kid) // a signature in flight
	if err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Hour) // drain over
	m.Tick(context.Background())
	if l.Valid() {
		t.Error("a lease on a retired key is still valid: its signature would be released")
	}
	clock.Advance(24 * time.Hour) // retain over
	done := make(chan error, 1)
	go func() { done <- m.Tick(context.Background()) }()
	select {
	case <-done:
		t.Fatal("destroyed under a signature in flight")
	case <-time.After(100 * time.Millisecond):
	}
	if _, err := f.backend.Public(context.Background(), first.ID); err != nil {
		t.Fatal("key gone while leased")
	}
	l.Release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := f.backend.Public(context.Background(), first.ID); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("not destroyed after release: %v", err)
	}
}

// Manual rotation of a key set that pre-publishes: next first, unless now.
func TestManualRotatePrepublishes(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	m := scheduled(t, f, clock, nil)
	first := active(t, m, "as")
	res, err := m.Rotate(context.Background(), "as", false)
	if err != nil {
		t.Fatal(err)
	}
	if res.Next.Kid == "" || res.Active.Kid != first.Kid || !res.Next.ActivateAt.Equal(clock.Now().Add(time.Hour)) {
		t.Fatalf("rotate: %+v", res)
	}
	// Asking again returns the same pending next key.
	again, _ := m.Rotate(context.Background(), "as", false)
	if again.Next.Kid != res.Next.Kid {
		t.Errorf("second rotate made another next key")
	}
	// --now activates it.
	now, err := m.Rotate(context.Background(), "as", true)
	if err != nil || now.Active.Kid != res.Next.Kid || now.Previous.Kid != first.Kid || now.Previous.State != rotation.Draining {
		t.Fatalf("rotate now: %+v %v", now, err)
	}
}

// P11: a key recorded destroyed that is back in the backend (a delete that
// left the object behind, as SoftHSM does when it cannot unlink the file; a
// restored backup) is destroyed again at the next start, and its version
// stays destroyed.
func TestResurrectedKeyIsDestroyedAgain(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	m := scheduled(t, f, clock, nil)
	first := active(t, m, "as")
	keyFile := filepath.Join(f.dir, "keys", first.ID+".key")
	saved, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Rotate(context.Background(), "as", true); err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Hour) // drain over
	if err := m.Tick(context.Background()); err != nil {
		t.Fatal(err)
	}
	clock.Advance(24 * time.Hour) // retain over
	if err := m.Tick(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := states(m)[rotation.Destroyed]; len(got) != 1 || got[0] != first.Kid {
		t.Fatalf("destroyed versions %v, want [%s]", got, first.Kid)
	}

	// The key comes back while keyd is down, from a backup older than
	// its destroy (a key file beside its tombstone is a destroy the
	// backend itself finishes at start).
	f.store.Close()
	f.backend.Close()
	if err := os.WriteFile(keyFile, saved, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(strings.TrimSuffix(keyFile, ".key") + ".destroyed"); err != nil {
		t.Fatal(err)
	}
	f.open(t)
	if _, err := f.backend.Public(context.Background(), first.ID); err != nil {
		t.Fatalf("the restored key is not in the backend: %v", err)
	}
	m = scheduled(t, f, clock, nil)
	if _, err := f.backend.Public(context.Background(), first.ID); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("the resurrected key is still in the backend after the start: %v", err)
	}
	if got := states(m)[rotation.Destroyed]; len(got) != 1 || got[0] != first.Kid {
		t.Errorf("destroyed versions after the start %v, want [%s]", got, first.Kid)
	}
	if _, err := m.Acquire("as", first.Kid); !errors.Is(err, rotation.ErrNotSignable) {
		t.Errorf("acquire the resurrected key: %v, want ErrNotSignable", err)
	}
}

// R4 with a backend that cannot destroy either: each failed generation
// leaves its intent recorded (its key might exist). Once the backend is
// back, the next tick removes them, rather than keeping one record per
// tick of the outage until the next start.
func TestIntentsOfOutageSweptAtNextTick(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	b := &flaky{Backend: f.backend, destroyDown: true}
	m := scheduled(t, f, clock, b)
	first := active(t, m, "as")
	pending := func() int {
		t.Helper()
		vs, err := f.store.Load()
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, v := range vs {
			if v.State == rotation.Pending {
				n++
			}
		}
		return n
	}
	b.setDown(true)
	clock.Advance(23 * time.Hour)
	for range 5 {
		m.Tick(context.Background())
		clock.Advance(30 * time.Second)
	}
	if n := pending(); n == 0 {
		t.Fatal("no intent recorded while the backend could not destroy")
	}
	b.setDown(false)
	if err := m.Tick(context.Background()); err != nil {
		t.Fatalf("tick once the backend is back: %v", err)
	}
	if n := pending(); n != 0 {
		t.Errorf("%d intents of failed generations still recorded after the backend came back", n)
	}
	if s := states(m); len(s) != 2 {
		t.Errorf("states %v, want the active key and its pre-published successor", s)
	}
	if active(t, m, "as").Kid != first.Kid {
		t.Error("active key changed")
	}
}

// The records of destroyed keys are dropped 30 days after their destroy
// (rotation.DestroyedKeep): the state file does not grow with every
// rotation for ever.
func TestDestroyedRecordsPruned(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	m := scheduled(t, f, clock, nil)
	first := active(t, m, "as")
	for range 60 * 4 { // 60 days in 6-hour steps: one rotation a day
		clock.Advance(6 * time.Hour)
		if err := m.Tick(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	vs, err := f.store.Load()
	if err != nil {
		t.Fatal(err)
	}
	destroyed := 0
	for _, v := range vs {
		if v.Kid == first.Kid {
			t.Errorf("the first key's record (%s since %v) is still kept after 60 days", v.State, v.ChangedAt)
		}
		if v.State == rotation.Destroyed {
			destroyed++
			if age := clock.Now().Sub(v.ChangedAt); age > rotation.DestroyedKeep {
				t.Errorf("a record destroyed %v ago is kept", age)
			}
		}
	}
	if destroyed == 0 || destroyed > 31 {
		t.Errorf("%d destroyed records kept, want those of the last 30 days", destroyed)
	}
}

// R4 with R2: a backend that signs but can neither generate nor destroy
// (a token that went read-only) fails the destroy of an old retired key.
// That must not keep a draining key past its drain: the retire needs no
// backend, and a draining key still published and signable long after its
// retire time is one verifiers were told is gone.
func TestFailedDestroyDoesNotBlockRetire(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	b := &flaky{Backend: f.backend, destroyDown: true}
	m, err := rotation.New(context.Background(), rotation.Config{
		Backend: b, Store: f.store, Now: clock.Now, Monotonic: clock.Mono,
		KeySets: []rotation.KeySet{{Name: "as", Purpose: "dpop", Spec: keystore.KeySpec{Algorithm: keystore.ES256},
			Schedule: rotation.Schedule{Drain: 2 * time.Hour, Retain: 24 * time.Hour}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	first := active(t, m, "as")
	if _, err := m.Rotate(context.Background(), "as", true); err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Hour) // the first key retires
	if err := m.Tick(context.Background()); err != nil {
		t.Fatal(err)
	}
	clock.Advance(23 * time.Hour)
	res, err := m.Rotate(context.Background(), "as", true) // the second key drains until 27h
	if err != nil {
		t.Fatal(err)
	}
	second := res.Previous
	b.setDown(true)
	clock.Advance(2 * time.Hour) // 27h: the first key's destroy (due at 26h) and the second's retire
	if err := m.Tick(context.Background()); !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("tick: %v, want the failed destroy of %s", err, first.Kid)
	}
	if published(m)[second.Kid] {
		t.Errorf("draining key %s still published after its drain, because the destroy of %s failed: %v", second.Kid, first.Kid, states(m))
	}
	if l, err := m.Acquire("as", second.Kid); err == nil {
		l.Release()
		t.Errorf("draining key %s still signs after its drain, because the destroy of %s failed", second.Kid, first.Kid)
	}
	b.setDown(false)
	if err := m.Tick(context.Background()); err != nil {
		t.Fatalf("tick once the backend is back: %v", err)
	}
	if s := states(m); len(s[rotation.Destroyed]) != 1 || s[rotation.Destroyed][0] != first.Kid {
		t.Errorf("after recovery: %v, want %s destroyed", s, first.Kid)
	}
}

// breakSaves makes the store's saves fail (the state file's name is taken
// by a directory, so the rename fails) until the returned func is called.
func breakSaves(t *testing.T, f *fixture) (restore func()) {
	t.Helper()
	path := filepath.Join(f.dir, "state", "keys.json")
	saved, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(path, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	return func() {
		t.Helper()
		if err := os.RemoveAll(path); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, saved, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// unrecordedNextRevoke makes a scheduled key set with a pre-published next
// key whose Revoke failed to save (it signs nothing, but is still Next in
// the state); saves work again afterwards. It returns the clock, the
// manager, the active version and the next one.
func unrecordedNextRevoke(t *testing.T) (*fakeClock, *rotation.Manager, rotation.Version, rotation.Version) {
	t.Helper()
	f := newFixture(t)
	clock := newClock()
	m := scheduled(t, f, clock, nil)
	first := active(t, m, "as")
	res, err := m.Rotate(context.Background(), "as", false)
	if err != nil || res.Next.Kid == "" {
		t.Fatalf("rotate: %+v, %v; want a next key", res, err)
	}
	restore := breakSaves(t, f)
	if _, err := m.Revoke(context.Background(), res.Next.Kid, "as"); err == nil {
		t.Fatal("revoke recorded with a state file that cannot be written")
	}
	restore()
	return clock, m, first, res.Next
}

// R4 with a failing save: the revocation of a pre-published next key
// cannot be recorded. The key signs nothing more (Revoke says so), so its
// scheduled activation, once saves work again, must not make it the key
// set's active key: every sign without a kid would fail. The tick records
// the revocation instead, and the key set keeps a key that signs.
func TestUnrecordedRevokeOfNextKeyNotActivated(t *testing.T) {
	clock, m, first, next := unrecordedNextRevoke(t)
	clock.Advance(time.Hour) // the next key's activation time
	if err := m.Tick(context.Background()); err != nil {
		t.Fatalf("tick: %v", err)
	}
	l, err := m.Acquire("as", "")
	if err != nil {
		t.Fatalf("after the tick (%v) the key set signs nothing: %v", states(m), err)
	}
	l.Release()
	if l.Version.Kid == next.Kid {
		t.Errorf("the key being revoked, %s, is the active key", next.Kid)
	}
	if l.Version.Kid != first.Kid {
		t.Errorf("active %s, want %s still", l.Version.Kid, first.Kid)
	}
	if s := states(m); len(s[rotation.Revoked]) != 1 || s[rotation.Revoked][0] != next.Kid {
		t.Errorf("states %v, want %s revoked", s, next.Kid)
	}
}

// The same unrecorded revocation of a next key, then a Revoke of the active
// key (or an immediate rotation) before any tick: the replacement must not
// be the next key being revoked, which signs nothing.
func TestRevokingNextKeyNotTakenAsReplacement(t *testing.T) {
	for name, replace := range map[string]func(m *rotation.Manager, activeKid string) error{
		"revoke the active key": func(m *rotation.Manager, kid string) error {
			_, err := m.Revoke(context.Background(), kid, "as")
			return err
		},
		"immediate rotation": func(m *rotation.Manager, _ string) error {
			_, err := m.Rotate(context.Background(), "as", true)
			return err
		},
	} {
		t.Run(name, func(t *testing.T) {
			_, m, first, next := unrecordedNextRevoke(t)
			if err := replace(m, first.Kid); err != nil {
				t.Fatal(err)
			}
			l, err := m.Acquire("as", "")
			if err != nil {
				t.Fatalf("after the replacement (%v) the key set signs nothing: %v", states(m), err)
			}
			l.Release()
			if l.Version.Kid == next.Kid || l.Version.Kid == first.Kid {
				t.Errorf("active %s; want a new key (not %s, being revoked, nor %s)", l.Version.Kid, next.Kid, first.Kid)
			}
		})
	}
}
