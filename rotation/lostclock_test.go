package rotation_test

import (
	"context"
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
	signWithLost(t, m, "")
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
