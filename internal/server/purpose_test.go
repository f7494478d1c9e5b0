package server_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/policy"
	"github.com/keyd-dev/keyd/internal/server"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/soft"
	"github.com/keyd-dev/keyd/rotation"
)

// A key version records the purpose it was made for, and a key of one
// purpose must never sign for another (A6). When the configuration gives an
// existing key set another purpose (dpop -> client_assertion here), the key
// made and published as a DPoP key stays active until the next rotation,
// but refuses to sign client assertions (FAILED_PRECONDITION).
func TestKeyOfAnotherPurposeDoesNotSign(t *testing.T) {
	dir := shortDir(t)
	backend, err := soft.New(soft.Config{Dir: filepath.Join(dir, "keys")})
	if err != nil {
		t.Fatal(err)
	}
	spec := keystore.KeySpec{Algorithm: keystore.ES256}
	open := func(purpose policy.Purpose) (*rotation.Manager, *rotation.Store) {
		store, err := rotation.OpenStore(filepath.Join(dir, "state"))
		if err != nil {
			t.Fatal(err)
		}
		mgr, err := rotation.New(context.Background(), rotation.Config{Backend: backend, Store: store,
			KeySets: []rotation.KeySet{{Name: "billing", Purpose: string(purpose), Spec: spec}}})
		if err != nil {
			store.Close()
			t.Fatal(err)
		}
		return mgr, store
	}
	// The daemon ran with billing as a dpop key set: its key is a DPoP key.
	mgr, store := open(policy.DPoP)
	dpopKey := mgr.Versions("billing")[0]
	store.Close()
	if dpopKey.Purpose != string(policy.DPoP) {
		t.Fatalf("version purpose %q", dpopKey.Purpose)
	}

	// Restarted with billing as a client_assertion key set.
	mgr, store = open(policy.ClientAssertion)
	t.Cleanup(func() { store.Close() })
	cl := serveManager(t, dir, mgr, map[string]server.KeySet{
		"billing": {Allow: allowMe(t), Policy: policy.Policy{Purpose: policy.ClientAssertion, ClientID: "c1", Audience: "https://as.example"}},
	})
	s, err := cl.Sign(ctx(t), client.SignRequest{KeySet: "billing", Purpose: "client_assertion"})
	if err == nil {
		var v rotation.Version
		for _, x := range mgr.Versions("billing") {
			if x.Kid == s.Kid {
				v = x
			}
		}
		t.Fatalf("a client assertion was signed with kid %s, a key made for purpose %q (the DPoP key: %v)", s.Kid, v.Purpose, s.Kid == dpopKey.Kid)
	}
	if !errors.Is(err, client.ErrFailedPrecondition) {
		t.Errorf("err = %v, want FAILED_PRECONDITION", err)
	}
}
