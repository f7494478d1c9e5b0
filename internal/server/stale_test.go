package server_test

import (
	"context"
	"crypto"
	"encoding/base64"
	"encoding/json"
	"errors"
	"slices"
	"testing"

	"github.com/go-jose/go-jose/v4"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/keystore"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// lostKeys answers every signature as a token that lost the key does.
type lostKeys struct{ keystore.Backend }

func (lostKeys) Sign(context.Context, string, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, keystore.ErrNotFound
}

// P1: once the active key is found lost, a Sign is DATA_LOSS, and the JWK
// Set still publishes the key's last-known public key, named stale.
func TestJWKSKeepsLostActiveKeyStale(t *testing.T) {
	e := newEnv(t, defaultSets[:1], envOpts{wrap: func(b keystore.Backend) keystore.Backend { return lostKeys{b} }})
	keys, c := rawKeys(t, e)
	before, err := keys.GetJWKS(c, &keydv1.GetJWKSRequest{Keysets: []string{"dpop"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(before.StaleKids) != 0 {
		t.Fatalf("stale kids %v before any loss", before.StaleKids)
	}

	_, err = e.cl.DPoP("dpop").Proof(c, "GET", "https://a.example/")
	if !errors.Is(err, client.ErrKeyLost) {
		t.Fatalf("proof with a lost key: %v, want DATA_LOSS", err)
	}

	after, err := keys.GetJWKS(c, &keydv1.GetJWKSRequest{Keysets: []string{"dpop"}})
	if err != nil {
		t.Fatal(err)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(after.Jwks, &set); err != nil {
		t.Fatalf("JWK Set %s: %v", after.Jwks, err)
	}
	if len(set.Keys) != 1 {
		t.Fatalf("JWK Set after the loss has %d keys, want the lost one: %s", len(set.Keys), after.Jwks)
	}
	if string(after.Jwks) != string(before.Jwks) {
		t.Errorf("JWK Set changed with the loss:\n%s\n%s", before.Jwks, after.Jwks)
	}
	tp, err := set.Keys[0].Thumbprint(crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	kid := base64.RawURLEncoding.EncodeToString(tp)
	if !slices.Equal(after.StaleKids, []string{kid}) {
		t.Errorf("stale kids %v, want [%s]", after.StaleKids, kid)
	}
}
