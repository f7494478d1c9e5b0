package server_test

import (
	"context"
	"crypto"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/authz"
	"github.com/keyd-dev/keyd/internal/policy"
	"github.com/keyd-dev/keyd/internal/server"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/soft"
	"github.com/keyd-dev/keyd/rotation"
)

// R1: many signers while the key rotates every few milliseconds and old
// keys drain, retire and are destroyed: every token's kid is in the JWK Set
// served at that moment (taken under the same instant from the manager),
// and the signature verifies with it. Run under -race.
func TestSignDuringRapidRotation(t *testing.T) {
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
	sched := rotation.Schedule{Drain: 20 * time.Millisecond, Retain: 20 * time.Millisecond}
	mgr, err := rotation.New(context.Background(), rotation.Config{Backend: b, Store: store,
		KeySets: []rotation.KeySet{{Name: "d", Purpose: "dpop", Spec: keystore.KeySpec{Algorithm: keystore.ES256}, Schedule: sched}}})
	if err != nil {
		t.Fatal(err)
	}
	allow, _ := authz.NewList(authz.Spec{UIDs: []int{os.Geteuid()}}, nil)
	srv, err := server.New(server.Config{Manager: mgr, KeySets: map[string]server.KeySet{"d": {Allow: allow, Policy: policy.Policy{Purpose: policy.DPoP}}}, Audit: &memAudit{}})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{socket: filepath.Join(dir, "k.sock"), srv: srv, mgr: mgr}
	e.serve(t)
	cl, err := client.Dial(e.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // rotate every few ms, and run the schedule
		defer wg.Done()
		for ctx.Err() == nil {
			if _, err := mgr.Rotate(context.Background(), "d", true); err != nil {
				t.Error(err)
				return
			}
			mgr.Tick(context.Background())
			time.Sleep(3 * time.Millisecond)
		}
	}()
	var signed, refused atomic.Int64
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				c, cancelSign := context.WithTimeout(context.Background(), 5*time.Second)
				p, err := cl.DPoP("d").Proof(c, "GET", "https://a.example/")
				cancelSign()
				// The JWK Set served at this moment.
				raw, jerr := server.JWKS(mgr.Versions("d"))
				if err != nil {
					refused.Add(1)
					continue
				}
				if jerr != nil {
					t.Error(jerr)
					return
				}
				if !strings.Contains(string(raw), `"kid":"`+p.Kid+`"`) {
					// It may have been retired in the microseconds since the
					// response: only a kid that never was published fails.
					if _, found := findVersion(mgr, p.Kid); !found {
						t.Errorf("kid %s was never a version", p.Kid)
					}
					continue
				}
				var set jose.JSONWebKeySet
				json.Unmarshal(raw, &set)
				jws, err := jose.ParseSigned(p.JWT, []jose.SignatureAlgorithm{jose.ES256})
				if err != nil {
					t.Error(err)
					return
				}
				hdr := jws.Signatures[0].Header
				tp, _ := hdr.JSONWebKey.Thumbprint(crypto.SHA256)
				if base64.RawURLEncoding.EncodeToString(tp) != p.Kid {
					t.Errorf("proof jwk thumbprint is not its kid %s", p.Kid)
				}
				if _, err := jws.Verify(set.Key(p.Kid)[0].Key); err != nil {
					t.Errorf("verify with the published key: %v", err)
				}
				signed.Add(1)
			}
		}()
	}
	wg.Wait()
	vs := mgr.Versions("d")
	destroyed := 0
	for _, v := range vs {
		if v.State == rotation.Destroyed {
			destroyed++
		}
	}
	t.Logf("%d proofs verified, %d refused, %d versions, %d destroyed", signed.Load(), refused.Load(), len(vs), destroyed)
	if signed.Load() < 100 || destroyed == 0 {
		t.Errorf("too little happened: %d signed, %d destroyed", signed.Load(), destroyed)
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
