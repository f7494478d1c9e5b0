package server_test

import (
	"context"
	"testing"

	"google.golang.org/grpc/peer"

	"github.com/keyd-dev/keyd/internal/authz"
	"github.com/keyd-dev/keyd/internal/policy"
	"github.com/keyd-dev/keyd/internal/server"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// A client certificate may carry several identities (a SPIFFE ID and a DNS
// name, say), and any one of them may be the one a key set allows. The
// audit record of a signature names the identity the key set's allow list
// admitted: the record of a payments signature must not name only the
// certificate's billing identity, which payments' list does not have.
func TestAuditNamesTheIdentityThatWasAllowed(t *testing.T) {
	e := newEnv(t, defaultSets[:1], envOpts{})
	allow, err := authz.NewList(authz.Spec{Identities: []string{"payments.example.org"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	aud := &memAudit{}
	srv, err := server.New(server.Config{Manager: e.mgr, Audit: aud,
		KeySets: map[string]server.KeySet{"dpop": {Allow: allow, Policy: policy.Policy{Purpose: policy.DPoP}}}})
	if err != nil {
		t.Fatal(err)
	}
	caller := authz.Caller{Transport: authz.TransportMTLS, Identities: []string{"spiffe://example.org/billing/api", "payments.example.org"}}
	c := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: authz.MTLSAuthInfo{Caller: caller}})
	if _, err := srv.Sign(c, &keydv1.SignRequest{Keyset: "dpop", Claims: []byte(`{"htm":"GET","htu":"https://a.example/"}`)}); err != nil {
		t.Fatal(err)
	}
	recs := aud.records()
	if len(recs) != 1 || recs[0].Outcome != "ok" {
		t.Fatalf("audit records %+v, want one ok", recs)
	}
	if recs[0].Identity != "payments.example.org" {
		t.Errorf("the audit record names identity %q; the key set allowed the caller as %q", recs[0].Identity, "payments.example.org")
	}
}
