package server_test

import (
	"encoding/json"
	"errors"
	"testing"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/keystore"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// jwksKids returns the kids of a JWK Set document.
func jwksKids(t *testing.T, raw []byte) map[string]string {
	t.Helper()
	var set struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(raw, &set); err != nil {
		t.Fatalf("JWK Set %s: %v", raw, err)
	}
	out := map[string]string{}
	for _, k := range set.Keys {
		var h struct {
			Kid string `json:"kid"`
		}
		if err := json.Unmarshal(k, &h); err != nil {
			t.Fatal(err)
		}
		out[h.Kid] = string(k)
	}
	return out
}

// ListKeys and WatchKeys agree with the JWK Set about a lost active key:
// it stays published (stale), so its KeyVersion carries its JWK, which is
// empty only once a key is unpublished.
func TestListAndWatchKeysCarryStaleJWK(t *testing.T) {
	e := newEnv(t, defaultSets[:1], envOpts{wrap: func(b keystore.Backend) keystore.Backend { return lostKeys{b} }})
	keys, c := rawKeys(t, e)
	watch, err := keys.WatchKeys(c, &keydv1.WatchKeysRequest{Keysets: []string{"dpop"}})
	if err != nil {
		t.Fatal(err)
	}
	for {
		ev, err := watch.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if ev.Type == keydv1.WatchKeysResponse_TYPE_SYNCED {
			break
		}
	}
	if _, err := e.cl.DPoP("dpop").Proof(c, "GET", "https://a.example/"); !errors.Is(err, client.ErrKeyLost) {
		t.Fatalf("proof with a lost key: %v, want DATA_LOSS", err)
	}
	ev, err := watch.Recv()
	if err != nil {
		t.Fatal(err)
	}
	jwks, err := keys.GetJWKS(c, &keydv1.GetJWKSRequest{Keysets: []string{"dpop"}})
	if err != nil {
		t.Fatal(err)
	}
	published := jwksKids(t, jwks.Jwks)
	if len(jwks.StaleKids) != 1 {
		t.Fatalf("stale kids %v", jwks.StaleKids)
	}
	kid := jwks.StaleKids[0]
	if ev.Key.GetKid() != kid || ev.Key.GetState() != keydv1.KeyState_KEY_STATE_LOST {
		t.Fatalf("watch event %v, want %s lost", ev, kid)
	}
	if len(ev.Key.Jwk) == 0 {
		t.Errorf("watch event for the stale key %s has no JWK; the JWK Set publishes %s", kid, published[kid])
	}
	list, err := keys.ListKeys(c, &keydv1.ListKeysRequest{Keysets: []string{"dpop"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range list.Keys {
		if _, pub := published[kv.Kid]; pub != (len(kv.Jwk) > 0) {
			t.Errorf("ListKeys: %s (%s) has jwk %q; in the JWK Set: %v", kv.Kid, kv.State, kv.Jwk, pub)
		}
	}
	// A new watcher's snapshot agrees as well.
	w2, err := keys.WatchKeys(c, &keydv1.WatchKeysRequest{Keysets: []string{"dpop"}})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 16; i++ {
		ev, err := w2.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if ev.Type == keydv1.WatchKeysResponse_TYPE_SYNCED {
			break
		}
		if _, pub := published[ev.Key.Kid]; pub != (len(ev.Key.Jwk) > 0) {
			t.Errorf("WatchKeys snapshot: %s (%s) has jwk %q; in the JWK Set: %v", ev.Key.Kid, ev.Key.State, ev.Key.Jwk, pub)
		}
	}
}
