package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/policy"
	"github.com/keyd-dev/keyd/internal/server"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/soft"
	"github.com/keyd-dev/keyd/rotation"
)

// stepClock is a schedule clock that only the rotating goroutine moves:
// a logical time that orders what the signers saw against the lifecycle.
type stepClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *stepClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *stepClock) Mono() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now.Sub(time.Unix(0, 0))
}

func (c *stepClock) Advance(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

// R1 as the row states it: 64 signers while the key set rotates every
// 10 ms (its old keys draining, retiring and being destroyed on the
// schedule's clock), some signers naming a kid from the JWK Set they
// fetched. Every proof returned verifies with a key of the JWK Set served
// at some instant of its call: the snapshot taken before the call, the one
// taken after it, or, for a key both created and unpublished during the
// call, its recorded key. No proof comes from a key retired before the
// call began.
func TestSignDuringRotationMatchesJWKSSnapshot(t *testing.T) {
	dir := shortDir(t)
	b, err := soft.New(soft.Config{Dir: filepath.Join(dir, "keys")})
	if err != nil {
		t.Fatal(err)
	}
	store, err := rotation.OpenStore(filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	clock := &stepClock{now: time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)}
	sched := rotation.Schedule{Drain: 20 * time.Millisecond, Retain: 200 * time.Millisecond}
	mgr, err := rotation.New(context.Background(), rotation.Config{Backend: b, Store: store, Now: clock.Now, Monotonic: clock.Mono,
		KeySets: []rotation.KeySet{{Name: "d", Purpose: "dpop", Spec: keystore.KeySpec{Algorithm: keystore.ES256}, Schedule: sched}}})
	if err != nil {
		t.Fatal(err)
	}
	cl := serveManager(t, dir, mgr, map[string]server.KeySet{"d": {Allow: allowMe(t), Policy: policy.Policy{Purpose: policy.DPoP}}})

	// snapshot returns the JWK Set served now, and the schedule's time
	// just before and just after it was taken.
	snapshot := func() (map[string]jose.JSONWebKey, time.Time, time.Time) {
		from := clock.Now()
		raw, err := server.JWKS(mgr.Versions("d"))
		to := clock.Now()
		if err != nil {
			t.Error(err)
		}
		var set jose.JSONWebKeySet
		if err := json.Unmarshal(raw, &set); err != nil {
			t.Error(err)
		}
		out := map[string]jose.JSONWebKey{}
		for _, k := range set.Keys {
			out[k.KeyID] = k
		}
		return out, from, to
	}

	// 40 rotations, 10 ms apart; the deadline only bounds a stuck run.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var rotations atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer cancel()
		for n := 0; n < 40 && ctx.Err() == nil; n++ {
			if _, err := mgr.Rotate(context.Background(), "d", true); err != nil {
				t.Error(err)
				return
			}
			rotations.Add(1)
			clock.Advance(10 * time.Millisecond)
			if err := mgr.Tick(context.Background()); err != nil {
				t.Error(err)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	var signed, named, refused, inWindow, gone atomic.Int64
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var seen map[string]jose.JSONWebKey // the JWK Set after the previous call
			for ctx.Err() == nil {
				before, t0, _ := snapshot()
				var opts []client.ProofOption
				unpublished := ""
				switch i % 4 {
				case 0: // a token bound to a key that may be draining
					for kid := range before {
						opts = append(opts, client.WithKid(kid))
						break
					}
				case 1: // a token bound to a key unpublished before the call
					for kid := range seen {
						if _, ok := before[kid]; !ok {
							unpublished = kid
							opts = append(opts, client.WithKid(kid))
							break
						}
					}
				}
				c, cancelSign := context.WithTimeout(context.Background(), 10*time.Second)
				p, err := cl.DPoP("d").Proof(c, "GET", "https://a.example/", opts...)
				cancelSign()
				after, _, t1 := snapshot()
				seen = after
				if unpublished != "" {
					if err == nil {
						t.Errorf("kid %s, unpublished before the call, signed a proof", unpublished)
						return
					}
					if !errors.Is(err, client.ErrFailedPrecondition) {
						t.Errorf("proof with an unpublished kid: %v, want FAILED_PRECONDITION", err)
						return
					}
					gone.Add(1)
					continue
				}
				if err != nil {
					if len(opts) == 0 || !errors.Is(err, client.ErrFailedPrecondition) {
						if len(opts) == 0 {
							t.Errorf("proof with the active key: %v", err)
						} else {
							t.Errorf("proof with a named kid: %v, want it signed or FAILED_PRECONDITION", err)
						}
						return
					}
					refused.Add(1)
					continue
				}
				key, ok := before[p.Kid]
				if !ok {
					key, ok = after[p.Kid]
				}
				if !ok {
					// Neither snapshot has it: it must have been made and
					// unpublished between them.
					v, found := findVersion(mgr, p.Kid)
					if !found || v.State == rotation.Revoked || v.CreatedAt.Before(t0) || (v.State == rotation.Retired && v.ChangedAt.After(t1)) {
						t.Errorf("kid %s (%+v) was not in the JWK Set at any instant of the call [%v, %v]", p.Kid, v, t0, t1)
						return
					}
					if err := json.Unmarshal(v.JWK, &key); err != nil {
						t.Error(err)
						return
					}
					inWindow.Add(1)
				}
				jws, err := jose.ParseSigned(p.JWT, []jose.SignatureAlgorithm{jose.ES256})
				if err != nil {
					t.Error(err)
					return
				}
				if _, err := jws.Verify(key.Key); err != nil {
					t.Errorf("proof by %s does not verify with its published key: %v", p.Kid, err)
					return
				}
				signed.Add(1)
				if len(opts) > 0 {
					named.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	destroyed := 0
	for _, v := range mgr.Versions("d") {
		if v.State == rotation.Destroyed {
			destroyed++
		}
	}
	t.Logf("%d rotations, %d proofs verified (%d by a named kid, %d by a key made and unpublished during the call), %d refused, %d refused for an unpublished kid, %d destroyed",
		rotations.Load(), signed.Load(), named.Load(), inWindow.Load(), refused.Load(), gone.Load(), destroyed)
	if signed.Load() < 64 || named.Load() == 0 || gone.Load() == 0 || rotations.Load() < 40 || destroyed == 0 {
		t.Errorf("too little happened: %d signed (%d named), %d rotations, %d destroyed", signed.Load(), named.Load(), rotations.Load(), destroyed)
	}
}

func findVersion(m *rotation.Manager, kid string) (rotation.Version, bool) {
	for _, v := range m.Versions() {
		if v.Kid == kid {
			return v, true
		}
	}
	return rotation.Version{}, false
}
