package client_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
)

// A request whose Host differs from its URL's host (a virtual host
// reached through an address) has the target URI of its Host (RFC 9110
// §7.1), and that is what the resource server checks htu against; its
// nonce challenge is answered for that target too.
func TestTransportProofForRequestHost(t *testing.T) {
	f := newFakeAS(t)
	o, _ := newOAuth(t, f, nil)
	var htu, host string
	rs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := verifyProof(r.Header.Get("DPoP"))
		htu, host = p.htu, r.Host
		if p.nonce != "vh-nonce" {
			w.Header().Set("WWW-Authenticate", `DPoP error="use_dpop_nonce"`)
			w.Header().Set("DPoP-Nonce", "vh-nonce")
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		if htu != "http://"+r.Host+r.URL.Path {
			w.Header().Set("WWW-Authenticate", `DPoP error="invalid_dpop_proof", error_description="htu mismatch"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		json.NewEncoder(w).Encode(map[string]string{"ok": "yes"})
	}))
	defer rs.Close()

	req, _ := http.NewRequest("GET", rs.URL+"/api?q=1", nil)
	req.Host = "rs.example.test"
	resp, err := o.Client(o.ClientCredentials(ctx(t))).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("%s: the server got Host %q and a proof for %q", resp.Status, host, htu)
	}
}
