package rotation_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/rotation"
)

func kidsOf(vs []rotation.Version) []string {
	var kids []string
	for _, v := range vs {
		kids = append(kids, v.Kid)
	}
	return kids
}

// signWithLost signs with kid of keyset (its active key if kid is empty),
// which the backend says it lost.
func signWithLost(t *testing.T, m *rotation.Manager, keyset, kid string) {
	t.Helper()
	l, err := m.Acquire(keyset, kid)
	if err != nil {
		t.Fatal(err)
	}
	_, err = l.Sign(context.Background(), make([]byte, 32), keystore.ES256.SignerOpts())
	l.Release()
	if !errors.Is(err, rotation.ErrKeyLost) {
		t.Fatalf("sign with a lost key: %v, want ErrKeyLost", err)
	}
}

// P1: the active key lost from the backend while keyd runs can no longer
// sign, but its last-known public key stays published, stale, across a
// restart, until the operator rotates; then the new key alone is
// published.
func TestLostActiveKeyStaysPublishedStale(t *testing.T) {
	f := newFixture(t)
	m, err := rotation.New(context.Background(), rotation.Config{Backend: wiped{f.backend}, Store: f.store, KeySets: sets})
	if err != nil {
		t.Fatal(err)
	}
	v := active(t, m, "dpop")
	signWithLost(t, m, "dpop", "")
	check := func(when string, m *rotation.Manager) {
		t.Helper()
		vs := m.Versions("dpop")
		if got := kidsOf(rotation.Published(vs)); !slices.Equal(got, []string{v.Kid}) {
			t.Errorf("%s: published %v, want the lost key %s", when, got, v.Kid)
		}
		if got := rotation.StaleKids(vs); !slices.Equal(got, []string{v.Kid}) {
			t.Errorf("%s: stale %v, want %s", when, got, v.Kid)
		}
		if vs[0].State != rotation.Lost || vs[0].LostFrom != rotation.Active {
			t.Errorf("%s: state %s lost from %s, want lost from active", when, vs[0].State, vs[0].LostFrom)
		}
	}
	check("after the loss", m)

	f.restart(t)
	m = f.manager(t, nil)
	check("after a restart", m)

	_, events, cancel := m.Watch("dpop")
	defer cancel()
	res, err := m.Rotate(context.Background(), "dpop", true)
	if err != nil {
		t.Fatal(err)
	}
	// A watcher hears that the lost key left the JWK Set: its state is
	// unchanged, so only an event for it says so.
	heard := false
	for len(events) > 0 {
		ev := <-events
		if ev.Version.Kid == v.Kid {
			heard = ev.Version.State == rotation.Lost && ev.Previous == rotation.Lost
		}
	}
	if !heard {
		t.Errorf("no event for the lost key %s when the rotation unpublished it", v.Kid)
	}
	vs := m.Versions("dpop")
	if got := kidsOf(rotation.Published(vs)); !slices.Equal(got, []string{res.Active.Kid}) {
		t.Errorf("after rotate: published %v, want only the new key %s", got, res.Active.Kid)
	}
	if got := rotation.StaleKids(vs); len(got) != 0 {
		t.Errorf("after rotate: stale %v", got)
	}
}

// The same when the lost active key is replaced by a pre-published next
// key that activates: watchers hear that the lost key left the JWK Set.
func TestNextKeyReplacingLostKeyUnpublishesIt(t *testing.T) {
	f := newFixture(t)
	set := rotation.KeySet{Name: "a", Purpose: "client_assertion", Spec: keystore.KeySpec{Algorithm: keystore.ES256},
		Prepublish: true, Schedule: rotation.Schedule{Prepublish: time.Hour}}
	m, err := rotation.New(context.Background(), rotation.Config{Backend: wiped{f.backend}, Store: f.store, KeySets: []rotation.KeySet{set}})
	if err != nil {
		t.Fatal(err)
	}
	v := active(t, m, "a")
	res, err := m.Rotate(context.Background(), "a", false)
	if err != nil || res.Next.Kid == "" {
		t.Fatalf("rotate: %+v, %v; want a next key", res, err)
	}
	signWithLost(t, m, "a", "")
	if got := rotation.StaleKids(m.Versions("a")); !slices.Equal(got, []string{v.Kid}) {
		t.Fatalf("stale %v, want %s", got, v.Kid)
	}
	_, events, cancel := m.Watch("a")
	defer cancel()
	if _, err := m.Rotate(context.Background(), "a", true); err != nil {
		t.Fatal(err)
	}
	heard := false
	for len(events) > 0 {
		if ev := <-events; ev.Version.Kid == v.Kid {
			heard = ev.Version.State == rotation.Lost && ev.Previous == rotation.Lost
		}
	}
	if !heard {
		t.Errorf("no event for the lost key %s when the next key's activation unpublished it", v.Kid)
	}
	if got := rotation.StaleKids(m.Versions("a")); len(got) != 0 {
		t.Errorf("stale %v after the next key activated", got)
	}
}

// A key found missing at start (the token wiped while keyd was down) is
// published stale as well.
func TestKeyMissingAtStartStaysPublishedStale(t *testing.T) {
	f := newFixture(t)
	m := f.manager(t, nil)
	v := active(t, m, "dpop")
	f.restart(t)
	if _, err := f.backend.List(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := f.backend.Destroy(context.Background(), v.ID); err != nil {
		t.Fatal(err)
	}
	m = f.manager(t, nil)
	vs := m.Versions("dpop")
	if got := rotation.StaleKids(vs); !slices.Equal(got, []string{v.Kid}) {
		t.Errorf("stale %v, want %s", got, v.Kid)
	}
	if got := kidsOf(rotation.Published(vs)); !slices.Equal(got, []string{v.Kid}) {
		t.Errorf("published %v, want %s", got, v.Kid)
	}
	if _, err := m.Revoke(context.Background(), v.Kid, "dpop"); err != nil {
		t.Fatal(err)
	}
	for _, x := range rotation.Published(m.Versions("dpop")) {
		if x.Kid == v.Kid {
			t.Errorf("revoked lost key %s still published", v.Kid)
		}
	}
}

// A draining key that is lost stays published, stale, until its retire
// time, as it would have (what it signed while draining still verifies);
// then it leaves the JWK Set, and stays out after a restart.
func TestLostDrainingKeyStaysUntilItsRetireTime(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	m := scheduled(t, f, clock, wiped{f.backend})
	old := active(t, m, "as")
	res, err := m.Rotate(context.Background(), "as", true)
	if err != nil {
		t.Fatal(err)
	}
	signWithLost(t, m, "as", old.Kid)
	vs := m.Versions("as")
	if got := kidsOf(rotation.Published(vs)); !slices.Equal(got, []string{old.Kid, res.Active.Kid}) {
		t.Errorf("published %v, want the lost draining %s and the active %s", got, old.Kid, res.Active.Kid)
	}
	if got := rotation.StaleKids(vs); !slices.Equal(got, []string{old.Kid}) {
		t.Errorf("stale %v, want %s", got, old.Kid)
	}

	clock.Advance(sched.Drain + time.Second)
	if err := m.Tick(context.Background()); err != nil {
		t.Fatal(err)
	}
	check := func(when string, m *rotation.Manager) {
		t.Helper()
		vs := m.Versions("as")
		if got := kidsOf(rotation.Published(vs)); !slices.Equal(got, []string{res.Active.Kid}) {
			t.Errorf("%s: published %v, want only the active %s", when, got, res.Active.Kid)
		}
		if got := rotation.StaleKids(vs); len(got) != 0 {
			t.Errorf("%s: stale %v", when, got)
		}
		if vs[0].State != rotation.Lost || vs[0].LostFrom != rotation.Retired {
			t.Errorf("%s: %s is %s from %s, want lost from retired", when, vs[0].Kid, vs[0].State, vs[0].LostFrom)
		}
	}
	check("after its retire time", m)
	f.restart(t)
	check("after a restart", scheduled(t, f, clock, nil))
}

// Revoking a lost draining key unpublishes it and leaves the active key
// alone: only a lost active key is replaced on revocation.
func TestRevokeLostDrainingKeyKeepsActive(t *testing.T) {
	f := newFixture(t)
	m, err := rotation.New(context.Background(), rotation.Config{Backend: wiped{f.backend}, Store: f.store, KeySets: sets})
	if err != nil {
		t.Fatal(err)
	}
	old := active(t, m, "dpop")
	res, err := m.Rotate(context.Background(), "dpop", true)
	if err != nil {
		t.Fatal(err)
	}
	signWithLost(t, m, "dpop", old.Kid)
	if _, err := m.Revoke(context.Background(), old.Kid, "dpop"); err != nil {
		t.Fatal(err)
	}
	vs := m.Versions("dpop")
	if got := kidsOf(rotation.Published(vs)); !slices.Equal(got, []string{res.Active.Kid}) {
		t.Errorf("published %v, want only the active %s", got, res.Active.Kid)
	}
	if len(vs) != 2 {
		t.Errorf("%d versions after revoking a lost draining key; want 2: no new key", len(vs))
	}
}

func TestStaleKids(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	lost := func(keyset, kid string, from rotation.State, activated time.Time) rotation.Version {
		return rotation.Version{KeySet: keyset, Kid: kid, State: rotation.Lost, LostFrom: from, ActivatedAt: activated}
	}
	ver := func(keyset, kid string, st rotation.State, activated time.Time) rotation.Version {
		return rotation.Version{KeySet: keyset, Kid: kid, State: st, ActivatedAt: activated}
	}
	for _, tc := range []struct {
		name string
		vs   []rotation.Version
		want []string
	}{
		{"lost active", []rotation.Version{lost("a", "k1", rotation.Active, t0)}, []string{"k1"}},
		{"record without lost_from", []rotation.Version{lost("a", "k1", rotation.Pending, t0)}, nil},
		{"lost next", []rotation.Version{ver("a", "k0", rotation.Active, t0), lost("a", "k1", rotation.Next, time.Time{})}, nil},
		{"lost draining", []rotation.Version{lost("a", "k0", rotation.Draining, t0), ver("a", "k1", rotation.Active, t0.Add(time.Hour))}, []string{"k0"}},
		{"lost draining, retired since", []rotation.Version{lost("a", "k0", rotation.Retired, t0), ver("a", "k1", rotation.Active, t0.Add(time.Hour))}, nil},
		{"lost revoked", []rotation.Version{lost("a", "k1", rotation.Revoked, t0)}, nil},
		{"replaced", []rotation.Version{lost("a", "k1", rotation.Active, t0), ver("a", "k2", rotation.Active, t0.Add(time.Hour))}, nil},
		{"replaced then revoked", []rotation.Version{lost("a", "k1", rotation.Active, t0), ver("a", "k2", rotation.Revoked, t0.Add(time.Hour))}, nil},
		{"other key set's activation", []rotation.Version{lost("a", "k1", rotation.Active, t0), ver("b", "k2", rotation.Active, t0.Add(time.Hour))}, []string{"k1"}},
		{"older loss", []rotation.Version{lost("a", "k1", rotation.Active, t0), lost("a", "k2", rotation.Active, t0.Add(time.Hour))}, []string{"k1", "k2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := rotation.StaleKids(tc.vs); !slices.Equal(got, tc.want) {
				t.Errorf("StaleKids = %v, want %v", got, tc.want)
			}
		})
	}
}

// lost_from is recorded, and a record without it reads as unknown.
func TestLostFromRoundTrip(t *testing.T) {
	b, err := json.Marshal(rotation.Version{State: rotation.Lost, LostFrom: rotation.Active})
	if err != nil {
		t.Fatal(err)
	}
	var v rotation.Version
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	if v.LostFrom != rotation.Active {
		t.Errorf("lost_from %s after a round trip of %s", v.LostFrom, b)
	}
	b, err = json.Marshal(rotation.Version{State: rotation.Active})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "lost_from") {
		t.Errorf("lost_from written for a version not lost: %s", b)
	}
}
