package rotation_test

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/rotation"
)

// slowGenerate holds Generate, once armed, until release is closed or the
// call's context ends: a slow or hung HSM during a rotation.
type slowGenerate struct {
	keystore.Backend
	armed   atomic.Bool
	entered chan struct{}
	release chan struct{}
}

func (b *slowGenerate) Generate(ctx context.Context, id string, s keystore.KeySpec) (crypto.PublicKey, error) {
	if b.armed.CompareAndSwap(true, false) {
		b.entered <- struct{}{}
		select {
		case <-b.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return b.Backend.Generate(ctx, id, s)
}

// slowGenerateManager returns a manager of the key sets sets on a fresh
// fixture whose backend is a slowGenerate, not armed yet.
func slowGenerateManager(t *testing.T) (*rotation.Manager, *slowGenerate) {
	t.Helper()
	f := newFixture(t)
	b := &slowGenerate{Backend: f.backend, entered: make(chan struct{}, 1), release: make(chan struct{})}
	m, err := rotation.New(context.Background(), rotation.Config{Backend: b, Store: f.store, KeySets: sets})
	if err != nil {
		t.Fatal(err)
	}
	return m, b
}

// hungRotation starts an immediate rotation of "dpop" on m and returns once
// it is inside b's held Generate (holding the lifecycle lock); its outcome
// comes on the channel after b.release is closed.
func hungRotation(m *rotation.Manager, b *slowGenerate) <-chan error {
	b.armed.Store(true)
	rotated := make(chan error, 1)
	go func() {
		_, err := m.Rotate(context.Background(), "dpop", true)
		rotated <- err
	}()
	<-b.entered
	return rotated
}

// TestLifecycleCallsKeepTheirDeadline: a Rotate or Revoke that waits behind
// another lifecycle change (here a rotation whose key generation hangs)
// returns at its deadline, and what it asked for is not carried out later
// behind the caller's back: an operator who retries a timed-out rotation
// must not get two rotations. A revocation that timed out still takes the
// key out of signing at once and is recorded once the other change ends,
// as one that could not be saved is.
func TestLifecycleCallsKeepTheirDeadline(t *testing.T) {
	m, b := slowGenerateManager(t)
	first := active(t, m, "dpop")
	assertKid := active(t, m, "assert").Kid

	rotated := hungRotation(m, b)

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	start := time.Now()
	_, err := m.Rotate(ctx, "dpop", true)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Errorf("Rotate behind a hung rotation = %v after %v, want DeadlineExceeded at its 100ms deadline", err, time.Since(start))
	}

	ctx, cancel = context.WithTimeout(context.Background(), 100*time.Millisecond)
	start = time.Now()
	_, err = m.Revoke(ctx, assertKid, "assert")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Errorf("Revoke behind a hung rotation = %v after %v, want DeadlineExceeded at its 100ms deadline", err, time.Since(start))
	}
	if _, err := m.Acquire("assert", assertKid); err == nil {
		t.Error("the key whose revocation timed out still signs")
	}

	close(b.release)
	if err := <-rotated; err != nil {
		t.Fatalf("the first rotation: %v", err)
	}
	// Whatever a caller that timed out could have left running is done
	// by now (it would run as soon as the first rotation let go).
	if err := m.Tick(context.Background()); err != nil {
		t.Fatal(err)
	}
	var dpop int
	for _, v := range m.Versions("dpop") {
		dpop++
		if v.Kid != first.Kid && v.State != rotation.Active {
			t.Errorf("dpop version %s is %s", v.Kid, v.State)
		}
	}
	if dpop != 2 {
		t.Errorf("dpop has %d versions after one rotation that went through and one that timed out, want 2: %+v", dpop, m.Versions("dpop"))
	}
	var revoked bool
	for _, v := range m.Versions("assert") {
		if v.Kid == assertKid {
			revoked = v.State == rotation.Revoked
		}
	}
	if !revoked {
		t.Errorf("the revocation that timed out was not recorded after the rotation ended: %+v", m.Versions("assert"))
	}
}

// TestRevokeAgainRetriesTheReplacement: the revocation of the active key is
// recorded but its replacement cannot be made (the backend is down); the
// caller is told so. Revoking the key again, once the backend is back, makes
// the replacement, as a retry of the same request should, rather than
// answer "revoked" and leave the key set without an active key.
func TestRevokeAgainRetriesTheReplacement(t *testing.T) {
	f := newFixture(t)
	b := &flaky{Backend: f.backend}
	m, err := rotation.New(context.Background(), rotation.Config{Backend: b, Store: f.store, KeySets: sets})
	if err != nil {
		t.Fatal(err)
	}
	old := active(t, m, "dpop")
	b.setDown(true)
	if _, err := m.Revoke(t.Context(), old.Kid, "dpop"); err == nil {
		t.Fatal("Revoke with the backend down reported no failure to make the replacement")
	}
	if _, err := m.Acquire("dpop", ""); err == nil {
		t.Fatal("a key set whose only key was revoked still signs")
	}
	b.setDown(false)
	v, err := m.Revoke(t.Context(), old.Kid, "dpop")
	if err != nil || v.State != rotation.Revoked {
		t.Fatalf("Revoke again = %v, %v", v.State, err)
	}
	l, err := m.Acquire("dpop", "")
	if err != nil {
		t.Fatalf("no active key after revoking again with the backend back: %v", err)
	}
	defer l.Release()
	if l.Version.Kid == old.Kid {
		t.Error("the revoked key is active again")
	}
}

// TestRotateWithEndedContextChangesNothing: a Rotate whose caller has gone
// (its context ended before the call got the lifecycle lock, free or not)
// changes nothing, not even the activation of a published next key, which
// calls no backend that would notice the context; the caller was told it
// failed, and may retry.
func TestRotateWithEndedContextChangesNothing(t *testing.T) {
	f := newFixture(t)
	m := scheduled(t, f, newClock(), nil)
	if _, err := m.Rotate(t.Context(), "as", false); err != nil { // publishes a next key
		t.Fatal(err)
	}
	before := states(m)
	if len(before[rotation.Next]) != 1 {
		t.Fatalf("no next key to activate: %v", before)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := m.Rotate(ctx, "as", true); !errors.Is(err, context.Canceled) {
		t.Errorf("Rotate with an ended context = %v, want Canceled", err)
	}
	if after := states(m); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("Rotate with an ended context changed the key set: %v → %v", before, after)
	}
}

// hungDestroy's Destroy, while hung, returns only when its context ends:
// a token that stopped answering during a scheduled destroy.
type hungDestroy struct {
	keystore.Backend
	hung atomic.Bool
}

func (b *hungDestroy) Destroy(ctx context.Context, id string) error {
	if b.hung.Load() {
		<-ctx.Done()
		return ctx.Err()
	}
	return b.Backend.Destroy(ctx, id)
}

// TestHungScheduledDestroyFreesTheLock: a scheduled destroy that the device
// does not answer ends at Config.DestroyTimeout, so the tick lets go of the
// lifecycle lock and a rotation goes through; once the device answers, a
// later tick destroys the key.
func TestHungScheduledDestroyFreesTheLock(t *testing.T) {
	f := newFixture(t)
	clock := newClock()
	b := &hungDestroy{Backend: f.backend}
	m, err := rotation.New(context.Background(), rotation.Config{
		Backend: b, Store: f.store, Now: clock.Now, Monotonic: clock.Mono, DestroyTimeout: 100 * time.Millisecond,
		KeySets: []rotation.KeySet{{Name: "as", Purpose: "dpop", Spec: keystore.KeySpec{Algorithm: keystore.ES256},
			Schedule: rotation.Schedule{Drain: 2 * time.Hour, Retain: time.Hour}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	first := active(t, m, "as")
	if _, err := m.Rotate(t.Context(), "as", true); err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Hour) // the first key retires
	if err := m.Tick(t.Context()); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Hour) // its destroy is due
	b.hung.Store(true)
	ticked := make(chan error, 1)
	go func() { ticked <- m.Tick(context.Background()) }()
	select {
	case err := <-ticked:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("tick with the destroy hung = %v, want DeadlineExceeded", err)
		}
	case <-time.After(5 * time.Second):
		b.hung.Store(false)
		t.Fatal("the tick still waits for a destroy the device does not answer, holding the lifecycle lock")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if _, err := m.Rotate(ctx, "as", true); err != nil {
		t.Errorf("rotation after the hung destroy gave up: %v", err)
	}
	b.hung.Store(false)
	if err := m.Tick(t.Context()); err != nil {
		t.Fatal(err)
	}
	if s := states(m); len(s[rotation.Destroyed]) != 1 || s[rotation.Destroyed][0] != first.Kid {
		t.Errorf("after the device answered again: %v, want %s destroyed", s, first.Kid)
	}
}
