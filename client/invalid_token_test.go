package client_test

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"golang.org/x/oauth2"
)

// A resource server that answers 401 error="invalid_token" (the token was
// revoked, or the server forgot it) gets the request again, once, with a
// new token; the refused one is dropped from the source. With a source
// that cannot be renewed, the 401 comes back as it is.
func TestTransportRenewsRefusedToken(t *testing.T) {
	f := newFakeAS(t)
	o, _ := newOAuth(t, f, nil)
	ts := o.ClientCredentials(ctx(t))
	hc := o.Client(ts)
	old, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	f.set(func(f *fakeAS) { f.revoked = append(f.revoked, old.AccessToken) })

	n := len(f.seen())
	resp, err := hc.Post(f.url()+"/api", "text/plain", strings.NewReader("again"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("request with a revoked token: %s %s; want it renewed and 200", resp.Status, b)
	}
	var api []attempt
	tokens := 0
	for _, a := range f.seen()[n:] {
		switch a.path {
		case "/api":
			api = append(api, a)
		case "/token":
			tokens++
		}
	}
	tok, _ := ts.Token()
	if len(api) != 2 || tokens != 1 || tok.AccessToken == old.AccessToken {
		t.Fatalf("%d resource requests and %d token requests, token renewed: %v; want 2, 1, true", len(api), tokens, tok.AccessToken != old.AccessToken)
	}
	if api[0].authz != "DPoP "+old.AccessToken || api[1].authz != "DPoP "+tok.AccessToken || api[1].proof.ath != ath(tok.AccessToken) || api[1].body != "again" {
		t.Errorf("retry: %+v after %+v", api[1], api[0])
	}

	// A static source: nothing to renew, the 401 is the answer.
	static := &http.Client{Transport: o.Transport(oauth2.StaticTokenSource(old), nil)}
	n = len(f.seen())
	resp, err = static.Get(f.url() + "/api")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 || len(f.seen()) != n+1 {
		t.Errorf("static source: %s after %d requests; want 401 after 1", resp.Status, len(f.seen())-n)
	}
}
