package rotation_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/rotation"
)

// R5 with P1: the active key is lost, the wall clock goes back a day, and
// the operator rotates. The new key replaces the lost one: the lost key
// leaves the JWK Set and is no longer reported stale, now and after a
// restart with the clock still behind.
func TestRotateLostKeyAfterClockBack(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	open := func(b keystore.Backend) *rotation.Manager {
		t.Helper()
		m, err := rotation.New(context.Background(), rotation.Config{Backend: b, Store: f.store, KeySets: sets, Now: clock.Now, Monotonic: clock.Mono})
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	m := open(wiped{f.backend})
	lost := active(t, m, "dpop")
	clock.Advance(time.Hour)
	signWithLost(t, m, "dpop", "")
	clock.Jump(-24 * time.Hour)
	res, err := m.Rotate(context.Background(), "dpop", true)
	if err != nil {
		t.Fatal(err)
	}
	check := func(when string, m *rotation.Manager) {
		t.Helper()
		vs := m.Versions("dpop")
		if got := kidsOf(rotation.Published(vs)); !slices.Equal(got, []string{res.Active.Kid}) {
			t.Errorf("%s: published %v, want only the new key %s (lost %s)", when, got, res.Active.Kid, lost.Kid)
		}
		if got := rotation.StaleKids(vs); len(got) != 0 {
			t.Errorf("%s: stale %v after the operator rotated", when, got)
		}
	}
	check("after rotate", m)
	clock.Advance(time.Minute)
	f.restart(t)
	check("after a restart", open(f.backend))
}

// Revoking the lost active key (stale in the JWK Set) is, like revoking an
// active key, a decision to replace it: the key set signs again at once,
// not only after the next scheduled tick.
func TestRevokeLostActiveKeyReplacesIt(t *testing.T) {
	f := newFixture(t)
	m, err := rotation.New(context.Background(), rotation.Config{Backend: wiped{f.backend}, Store: f.store, KeySets: sets})
	if err != nil {
		t.Fatal(err)
	}
	lost := active(t, m, "dpop")
	signWithLost(t, m, "dpop", "")
	if _, err := m.Revoke(context.Background(), lost.Kid, "dpop"); err != nil {
		t.Fatal(err)
	}
	l, err := m.Acquire("dpop", "")
	if err != nil {
		t.Fatalf("after revoking the lost active key: %v", err)
	}
	l.Release()
	if l.Version.Kid == lost.Kid {
		t.Fatalf("the revoked key %s is still the active one", lost.Kid)
	}
}

// Two lost active keys in a row (the first replaced by a rotation, the
// replacement lost too): revoking the older one replaces nothing, the
// newer loss still blocks a silent replacement; revoking that one does.
func TestRevokeOlderLostKeyKeepsBlocking(t *testing.T) {
	f := newFixture(t)
	m, err := rotation.New(context.Background(), rotation.Config{Backend: wiped{f.backend}, Store: f.store, KeySets: sets})
	if err != nil {
		t.Fatal(err)
	}
	first := active(t, m, "dpop")
	signWithLost(t, m, "dpop", "")
	if _, err := m.Rotate(context.Background(), "dpop", true); err != nil {
		t.Fatal(err)
	}
	second := active(t, m, "dpop")
	signWithLost(t, m, "dpop", "")
	if _, err := m.Revoke(context.Background(), first.Kid, "dpop"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Acquire("dpop", ""); !errors.Is(err, rotation.ErrKeyLost) {
		t.Fatalf("after revoking the older lost key: %v, want ErrKeyLost (%s is still lost)", err, second.Kid)
	}
	if _, err := m.Revoke(context.Background(), second.Kid, "dpop"); err != nil {
		t.Fatal(err)
	}
	l, err := m.Acquire("dpop", "")
	if err != nil {
		t.Fatalf("after revoking both lost keys: %v", err)
	}
	l.Release()
}
