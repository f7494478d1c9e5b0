package rotation_test

import (
	"context"
	"crypto"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/rotation"
)

// generatedThenFailed makes the key, then reports failure (session lost after C_GenerateKeyPair).

type generatedThenFailed struct {
	keystore.Backend
	fail atomic.Bool
}

func (b *generatedThenFailed) Generate(ctx context.Context, id string, s keystore.KeySpec) (crypto.PublicKey, error) {
	pub, err := b.Backend.Generate(ctx, id, s)
	if err == nil && b.fail.Load() {
		return nil, keystore.ErrUnavailable
	}
	return pub, err
}

// A failed generation leaves no unrecorded key, now or after a restart (P10).
func TestFailedGenerateLeavesNoOrphan(t *testing.T) {
	f := newFixture(t)
	b := &generatedThenFailed{Backend: f.backend}
	m, err := rotation.New(context.Background(), rotation.Config{Backend: b, Store: f.store, KeySets: sets})
	if err != nil {
		t.Fatal(err)
	}
	b.fail.Store(true)
	if _, err := m.Rotate(context.Background(), "dpop", true); !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("rotate: %v", err)
	}
	f.restart(t)
	m = f.manager(t, nil)
	known := map[string]bool{}
	for _, v := range m.Versions() {
		known[v.ID] = true
	}
	ids, err := f.backend.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if !known[id] {
			t.Errorf("backend key %s has no record: an orphan kept forever", id)
		}
	}
}

// Without prepublish (DPoP default) one tick at the deadline rotates.
func TestScheduledRotationWithoutPrepublish(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	m, err := rotation.New(context.Background(), rotation.Config{
		Backend: f.backend, Store: f.store, Now: clock.Now, Monotonic: clock.Mono,
		KeySets: []rotation.KeySet{{Name: "as", Purpose: "dpop", Spec: keystore.KeySpec{Algorithm: keystore.ES256},
			Schedule: rotation.Schedule{Period: 24 * time.Hour, Drain: time.Hour, Retain: time.Hour}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	first := active(t, m, "as")
	clock.Advance(24 * time.Hour)
	if err := m.Tick(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := active(t, m, "as"); got.Kid == first.Kid {
		t.Errorf("at the deadline the old key still signs: %v (NextTick zero: %v)", states(m), m.NextTick().IsZero())
	}
}

// The wall clock goes back a day, a rotation happens, the clock is corrected.
func TestClockBackThenCorrected(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	m := scheduled(t, f, clock, nil)
	first := active(t, m, "as")
	clock.Advance(time.Hour)
	clock.Jump(-24 * time.Hour)
	res, err := m.Rotate(context.Background(), "as", true)
	if err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Minute)
	clock.Jump(24 * time.Hour)
	if err := m.Tick(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !published(m)[first.Kid] {
		t.Errorf("the draining key %s was unpublished after 1 minute of its 2 h drain", first.Kid)
	}
	if s := states(m); active(t, m, "as").Kid != res.Active.Kid || len(s[rotation.Next]) != 0 {
		t.Errorf("a second rotation started 1 minute after the first: %v", s)
	}
}

// The wall clock jumps forward a day, a rotation happens, keyd restarts a minute later.
func TestClockForwardThenRestart(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	m := scheduled(t, f, clock, nil)
	first := active(t, m, "as")
	clock.Jump(24 * time.Hour)
	if _, err := m.Rotate(context.Background(), "as", true); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Minute)
	f.restart(t)
	m = scheduled(t, f, clock, nil)
	if !published(m)[first.Kid] {
		t.Errorf("the draining key %s was unpublished at restart, 1 minute into its 2 h drain", first.Kid)
	}
}
