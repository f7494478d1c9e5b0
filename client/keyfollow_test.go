package client_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/client"
)

// waitUntil polls cond (a local view or a fake server's record, never the
// daemon) until it holds or d passes.
func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func attemptsAt(f *fakeAS, path string) []attempt {
	var out []attempt
	for _, a := range f.seen() {
		if a.path == path {
			out = append(out, a)
		}
	}
	return out
}

func keyState(w *client.KeyWatcher, kid string) string {
	k, _ := w.Key(kid)
	return k.State
}

func getAPI(t *testing.T, hc *http.Client, f *fakeAS) {
	t.Helper()
	resp, err := hc.Get(f.url() + "/api")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("resource: %s", resp.Status)
	}
}

// watched starts following the OAuth's DPoP key set and waits for the
// watcher's first snapshot.
func watched(t *testing.T, o *client.OAuth) *client.KeyWatcher {
	t.Helper()
	wctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	w := o.WatchKeys(wctx)
	if err := w.Synced(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if o.WatchKeys(wctx) != w {
		t.Error("a second WatchKeys started a second watcher")
	}
	return w
}

// R3 with a revocation: a token bound to kid A keeps proving with A after
// a rotation has made A a draining key; once A is revoked, the source drops
// the token as the stream reports it and gets one bound to the active key
// B in the background, before the next request, which uses it. No
// resource request fails or is retried.
func TestWatchKeysReplacesTokenOfRevokedKey(t *testing.T) {
	f := newFakeAS(t)
	o, kc := newOAuth(t, f, nil)
	w := watched(t, o)
	ts := o.ClientCredentials(ctx(t))
	hc := o.Client(ts)

	getAPI(t, hc, f)
	tok1, _ := ts.Token()
	a := client.BoundKid(tok1)
	if active, _ := w.Active("dpop"); a == "" || a != active.Kid {
		t.Fatalf("first token bound to %q, want the active key %q", a, active.Kid)
	}

	rot, err := kc.Rotate(ctx(t), "dpop", false)
	if err != nil {
		t.Fatal(err)
	}
	b := rot.Active.Kid
	if b == a || rot.Previous.Kid != a {
		t.Fatalf("rotation %+v", rot)
	}
	waitUntil(t, 5*time.Second, "the watcher did not see A draining", func() bool { return keyState(w, a) == "draining" })
	getAPI(t, hc, f)
	if tok, _ := ts.Token(); tok != tok1 {
		t.Errorf("the token bound to the draining key was replaced (%s, bound to %s)", tok.AccessToken, client.BoundKid(tok))
	}

	if _, err := kc.Revoke(ctx(t), a, "dpop"); err != nil {
		t.Fatal(err)
	}
	// No request is made: the stream's event alone gets the new token.
	waitUntil(t, 5*time.Second, "no token request after the bound key was revoked",
		func() bool { return len(attemptsAt(f, "/token")) == 2 })
	tokReq := attemptsAt(f, "/token")[1]
	if tokReq.status != 200 || tokReq.proof.jkt != b {
		t.Errorf("background token request: status %d, proof by %s; want 200 by the active key %s", tokReq.status, tokReq.proof.jkt, b)
	}
	tok2, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	if tok2.AccessToken != "at-2" || client.BoundKid(tok2) != b {
		t.Errorf("after the revocation: %s bound to %s, want at-2 bound to %s", tok2.AccessToken, client.BoundKid(tok2), b)
	}
	getAPI(t, hc, f)

	api := attemptsAt(f, "/api")
	want := []struct{ token, jkt string }{{"at-1", a}, {"at-1", a}, {"at-2", b}}
	if len(api) != len(want) {
		t.Fatalf("%d resource requests, want %d (none failed, none retried): %+v", len(api), len(want), api)
	}
	for i, x := range want {
		if api[i].status != 200 || api[i].authz != "DPoP "+x.token || api[i].proof.jkt != x.jkt || api[i].proof.ath != ath(x.token) {
			t.Errorf("resource request %d: %d, %q, proof by %s; want 200, %s, proof by %s", i, api[i].status, api[i].authz, api[i].proof.jkt, x.token, x.jkt)
		}
	}
	if n := len(attemptsAt(f, "/token")); n != 2 {
		t.Errorf("%d token requests, want 2", n)
	}
}

// A draining key that retires while its token still lives (the server's
// tokens outlive the key set's drain): the source replaces the token when
// the stream reports the retirement, before the next request.
func TestWatchKeysReplacesTokenOfRetiredKey(t *testing.T) {
	f := newFakeAS(t) // tokens of 1h; dpop-short drains for 1.5s
	o, kc := newOAuth(t, f, func(c *client.OAuthConfig) { c.DPoPKeySet, c.ExpiryMargin = "dpop-short", 100*time.Millisecond })
	w := watched(t, o)
	ts := o.ClientCredentials(ctx(t))
	hc := o.Client(ts)

	getAPI(t, hc, f)
	tok1, _ := ts.Token()
	a := client.BoundKid(tok1)
	rot, err := kc.Rotate(ctx(t), "dpop-short", false)
	if err != nil {
		t.Fatal(err)
	}
	b := rot.Active.Kid
	waitUntil(t, 5*time.Second, "the watcher did not see A draining", func() bool { return keyState(w, a) == "draining" })
	k, _ := w.Key(a)
	if d := time.Until(k.RetireAt); d < time.Second || d > 1500*time.Millisecond {
		t.Fatalf("A retires in %v, want about 1.5s", d)
	}
	getAPI(t, hc, f) // still at-1, proven by the draining A

	waitUntil(t, 5*time.Second, "the watcher did not see A retire", func() bool { return keyState(w, a) == "retired" })
	waitUntil(t, 5*time.Second, "no token request after the bound key retired",
		func() bool { return len(attemptsAt(f, "/token")) == 2 })
	if p := attemptsAt(f, "/token")[1].proof.jkt; p != b {
		t.Errorf("the new token was requested with %s, want the active key %s", p, b)
	}
	getAPI(t, hc, f)

	api := attemptsAt(f, "/api")
	want := []struct{ token, jkt string }{{"at-1", a}, {"at-1", a}, {"at-2", b}}
	if len(api) != len(want) {
		t.Fatalf("%d resource requests, want %d: %+v", len(api), len(want), api)
	}
	for i, x := range want {
		if api[i].status != 200 || api[i].authz != "DPoP "+x.token || api[i].proof.jkt != x.jkt {
			t.Errorf("resource request %d: %d, %q, proof by %s; want 200, %s, proof by %s", i, api[i].status, api[i].authz, api[i].proof.jkt, x.token, x.jkt)
		}
	}
}

// A draining key that retires within ExpiryMargin counts as the token's
// expiry: Token replaces the token at once.
func TestTokenReplacedWhenBoundKeyRetiresWithinMargin(t *testing.T) {
	f := newFakeAS(t)
	o, kc := newOAuth(t, f, func(c *client.OAuthConfig) { c.DPoPKeySet, c.ExpiryMargin = "dpop-short", 5*time.Second })
	w := watched(t, o)
	ts := o.ClientCredentials(ctx(t))
	tok1, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	a := client.BoundKid(tok1)
	rot, err := kc.Rotate(ctx(t), "dpop-short", false)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "the watcher did not see A draining", func() bool { return keyState(w, a) == "draining" })
	tok2, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	if tok2 == tok1 || client.BoundKid(tok2) != rot.Active.Kid {
		t.Errorf("token %s bound to %s, want a new one bound to %s", tok2.AccessToken, client.BoundKid(tok2), rot.Active.Kid)
	}
}

// Without WatchKeys, the transport recovers when keyd refuses to prove
// with a revoked key: it drops the token, gets one bound to the active key
// and sends the request once, with it; nothing is sent with the old token.
func TestTransportReplacesTokenOfRevokedKeyWithoutWatcher(t *testing.T) {
	f := newFakeAS(t)
	o, kc := newOAuth(t, f, nil)
	ts := o.ClientCredentials(ctx(t))
	hc := o.Client(ts)
	getAPI(t, hc, f)
	tok1, _ := ts.Token()
	a := client.BoundKid(tok1)
	if _, err := kc.Revoke(ctx(t), a, "dpop"); err != nil {
		t.Fatal(err)
	}
	active, err := kc.ActiveKey(ctx(t), "dpop")
	if err != nil {
		t.Fatal(err)
	}
	getAPI(t, hc, f)
	api := attemptsAt(f, "/api")
	if len(api) != 2 || api[1].authz != "DPoP at-2" || api[1].proof.jkt != active.Kid || api[1].status != 200 {
		t.Errorf("resource requests %+v: want the second with at-2, proven by the new active key %s", api, active.Kid)
	}
}
