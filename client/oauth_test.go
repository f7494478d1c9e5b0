package client_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/keyd-dev/keyd/client"
)

func newOAuth(t *testing.T, f *fakeAS, mod func(*client.OAuthConfig)) (*client.OAuth, *client.Client) {
	t.Helper()
	kc := startKeyd(t, f.url())
	cfg := client.OAuthConfig{Issuer: f.url(), ClientID: "c1", AssertionKeySet: "assert", DPoPKeySet: "dpop", Scopes: []string{"s1", "s2"}}
	if mod != nil {
		mod(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	o, err := kc.OAuth(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return o, kc
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

// The first token request carries no nonce; the server's use_dpop_nonce
// is answered with exactly one retry with its nonce, a new proof and a new
// assertion (new jtis: servers consume the assertion's jti on the 400).
// The nonce is remembered for the next request.
func TestClientCredentialsNonceRetry(t *testing.T) {
	f := newFakeAS(t)
	f.set(func(f *fakeAS) { f.requireNonce = true })
	o, _ := newOAuth(t, f, nil)

	tok, err := o.ClientCredentialsToken(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	seen := f.seen()
	if len(seen) != 2 {
		t.Fatalf("%d token requests, want 2 (the first and one retry): %+v", len(seen), seen)
	}
	initial, retry := seen[0], seen[1]
	if initial.status != 400 || retry.status != 200 {
		t.Errorf("statuses %d, %d; want 400, 200", initial.status, retry.status)
	}
	if initial.proof.nonce != "" {
		t.Errorf("first proof has nonce %q, want none", initial.proof.nonce)
	}
	if retry.proof.nonce != "as-nonce-1" {
		t.Errorf("retry proof nonce %q, want the server's as-nonce-1", retry.proof.nonce)
	}
	if initial.proof.jti == "" || initial.proof.jti == retry.proof.jti {
		t.Errorf("proof jtis %q, %q: want two different ones", initial.proof.jti, retry.proof.jti)
	}
	if initial.assertionJTI == "" || initial.assertionJTI == retry.assertionJTI {
		t.Errorf("assertion jtis %q, %q: want two different ones", initial.assertionJTI, retry.assertionJTI)
	}
	for _, a := range seen {
		if a.proof.htm != "POST" || a.proof.htu != f.url()+"/token" || a.proof.ath != "" {
			t.Errorf("proof htm %q htu %q ath %q", a.proof.htm, a.proof.htu, a.proof.ath)
		}
		if got := a.form["client_assertion_type"]; len(got) != 1 || got[0] != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
			t.Errorf("client_assertion_type %q", got)
		}
		if first(a.form["client_id"]) != "c1" || first(a.form["grant_type"]) != "client_credentials" || first(a.form["scope"]) != "s1 s2" {
			t.Errorf("form %v", a.form)
		}
	}
	if tok.AccessToken != "at-1" || tok.TokenType != "DPoP" || tok.Expiry.IsZero() || tok.ExpiresIn != 3600 {
		t.Errorf("token %+v", tok)
	}
	if got := client.BoundKid(tok); got != retry.proof.jkt || got == "" {
		t.Errorf("BoundKid %q, want the proof key's thumbprint %q", got, retry.proof.jkt)
	}
	if tok.Extra("scope") != "s1 s2" {
		t.Errorf("Extra(scope) = %v", tok.Extra("scope"))
	}

	// The nonce is remembered: the next request needs no retry.
	if _, err := o.ClientCredentialsToken(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if seen := f.seen(); len(seen) != 3 || seen[2].proof.nonce != "as-nonce-1" || seen[2].status != 200 {
		t.Errorf("after the first token: %d requests, last %+v", len(seen), seen[len(seen)-1])
	}
}

// A second use_dpop_nonce after the retry is an error, and there is no
// third request.
func TestSecondNonceChallengeIsError(t *testing.T) {
	f := newFakeAS(t)
	f.set(func(f *fakeAS) { f.requireNonce, f.rotateNonce = true, true })
	o, _ := newOAuth(t, f, nil)

	_, err := o.ClientCredentialsToken(ctx(t))
	if !errors.Is(err, client.ErrRepeatedNonceChallenge) {
		t.Fatalf("err = %v, want ErrRepeatedNonceChallenge", err)
	}
	var rerr *oauth2.RetrieveError
	if !errors.As(err, &rerr) || rerr.ErrorCode != "use_dpop_nonce" {
		t.Errorf("err = %v, want it to wrap the server's use_dpop_nonce", err)
	}
	seen := f.seen()
	if len(seen) != 2 {
		t.Fatalf("%d requests, want exactly 2", len(seen))
	}
	if seen[1].proof.nonce != "as-0" || seen[0].proof.jti == seen[1].proof.jti || seen[0].assertionJTI == seen[1].assertionJTI {
		t.Errorf("retry %+v", seen[1])
	}
}

// A nonce on a successful response replaces the remembered one.
func TestNonceRefreshedFromEveryResponse(t *testing.T) {
	f := newFakeAS(t)
	f.set(func(f *fakeAS) { f.requireNonce, f.nonceOn200 = true, "as-nonce-2" })
	o, _ := newOAuth(t, f, nil)
	for range 2 {
		if _, err := o.ClientCredentialsToken(ctx(t)); err != nil {
			t.Fatal(err)
		}
	}
	seen := f.seen()
	if len(seen) != 3 || seen[2].proof.nonce != "as-nonce-2" || seen[2].status != 200 {
		t.Fatalf("requests %+v", seen)
	}
}

// Other errors are *oauth2.RetrieveError and are not retried.
func TestTokenErrorNotRetried(t *testing.T) {
	f := newFakeAS(t)
	o, _ := newOAuth(t, f, func(c *client.OAuthConfig) { c.TokenURL = f.url() + "/nope"; c.Issuer = "" })
	_, err := o.ClientCredentialsToken(ctx(t))
	var rerr *oauth2.RetrieveError
	if !errors.As(err, &rerr) || rerr.ErrorCode != "not_found" || rerr.Response.StatusCode != 404 {
		t.Fatalf("err = %v", err)
	}
	if n := len(f.seen()); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}
}

// A Bearer answer is an error by default; with AllowBearer it is a
// warning, and the transport sends the token as a bearer token.
func TestBearerAnswer(t *testing.T) {
	f := newFakeAS(t)
	f.set(func(f *fakeAS) { f.tokenType = "Bearer" })
	o, _ := newOAuth(t, f, nil)
	if _, err := o.ClientCredentialsToken(ctx(t)); !errors.Is(err, client.ErrNotDPoPBound) {
		t.Fatalf("err = %v, want ErrNotDPoPBound", err)
	}

	var logs bytes.Buffer
	o2, _ := newOAuth(t, f, func(c *client.OAuthConfig) {
		c.AllowBearer = true
		c.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	tok, err := o2.ClientCredentialsToken(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if client.BoundKid(tok) != "" {
		t.Errorf("a bearer token has BoundKid %q", client.BoundKid(tok))
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "not DPoP-bound") {
		t.Errorf("log: %s", logs.String())
	}
	resp, err := o2.Client(oauth2.StaticTokenSource(tok)).Get(f.url() + "/api")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	seen := f.seen()
	if last := seen[len(seen)-1]; last.authz != "Bearer "+tok.AccessToken || last.proof.err != "no DPoP proof" {
		t.Errorf("resource request: Authorization %q, proof %+v", last.authz, last.proof)
	}
}

// The client_id must be the assertion key set's: a mismatch is refused
// before anything is sent. An empty ClientID is learned from the key set.
func TestClientIDMismatch(t *testing.T) {
	f := newFakeAS(t)
	o, _ := newOAuth(t, f, func(c *client.OAuthConfig) { c.ClientID = "someone-else" })
	_, err := o.ClientCredentialsToken(ctx(t))
	if !errors.Is(err, client.ErrInvalidArgument) || !strings.Contains(err.Error(), `client_id "someone-else" does not match key set assert, whose assertions are for client_id "c1"`) {
		t.Fatalf("err = %v", err)
	}
	if n := len(f.seen()); n != 0 {
		t.Errorf("%d requests were sent", n)
	}

	o2, _ := newOAuth(t, f, func(c *client.OAuthConfig) { c.ClientID = "" })
	if _, err := o2.ClientCredentialsToken(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if seen := f.seen(); first(seen[0].form["client_id"]) != "c1" {
		t.Errorf("client_id %q", seen[0].form["client_id"])
	}
}

// A server whose clock is 30s ahead rejects iat; the client learns the
// offset from the Date header and retries once with iat (proof and
// assertion) on the server's clock, and keeps using it. 120s is beyond
// keyd's iat_skew (60s): the daemon refuses, and the error says why.
func TestClockSkew(t *testing.T) {
	f := newFakeAS(t)
	f.set(func(f *fakeAS) { f.clock, f.checkIat = 30*time.Second, true })
	o, _ := newOAuth(t, f, nil)
	if _, err := o.ClientCredentialsToken(ctx(t)); err != nil {
		t.Fatal(err)
	}
	seen := f.seen()
	if len(seen) != 2 || seen[0].status != 400 || seen[1].status != 200 {
		t.Fatalf("requests %+v", seen)
	}
	skew := seen[1].proof.iat - time.Now().Unix()
	if skew < 28 || skew > 32 {
		t.Errorf("retry proof iat is %ds from now, want about 30", skew)
	}
	if d := seen[1].assertionIat - seen[1].proof.iat; d < -1 || d > 1 {
		t.Errorf("assertion iat %d, proof iat %d", seen[1].assertionIat, seen[1].proof.iat)
	}
	if seen[1].assertionExp-seen[1].assertionIat != 60 {
		t.Errorf("assertion exp - iat = %d", seen[1].assertionExp-seen[1].assertionIat)
	}
	if seen[0].proof.jti == seen[1].proof.jti || seen[0].assertionJTI == seen[1].assertionJTI {
		t.Error("the skew retry reused a jti")
	}
	// The offset is remembered: one request.
	if _, err := o.ClientCredentialsToken(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if n := len(f.seen()); n != 3 {
		t.Errorf("%d requests, want 3", n)
	}

	// The resource server (same origin, same clock) gets proofs on its clock.
	ts := o.ClientCredentials(ctx(t))
	resp, err := o.Client(ts).Get(f.url() + "/api")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("resource: %s", resp.Status)
	}

	far := newFakeAS(t)
	far.set(func(f *fakeAS) { f.clock, f.checkIat = 120*time.Second, true })
	o2, _ := newOAuth(t, far, nil)
	_, err = o2.ClientCredentialsToken(ctx(t))
	if !errors.Is(err, client.ErrInvalidArgument) || !strings.Contains(err.Error(), "iat_skew") {
		t.Fatalf("err = %v, want keyd's refusal of an iat 120s away", err)
	}
	if n := len(far.seen()); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}
}

// The token source caches until shortly before expiry; Invalidate drops
// the token.
func TestClientCredentialsCache(t *testing.T) {
	f := newFakeAS(t)
	o, _ := newOAuth(t, f, nil)
	ts := o.ClientCredentials(ctx(t))
	t1, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	t2, _ := ts.Token()
	if t1 != t2 || len(f.seen()) != 1 {
		t.Fatalf("not cached: %d requests", len(f.seen()))
	}
	ts.Invalidate(t1)
	t3, _ := ts.Token()
	if t3.AccessToken == t1.AccessToken || len(f.seen()) != 2 {
		t.Errorf("Invalidate: %q after %q", t3.AccessToken, t1.AccessToken)
	}

	// The margin is at most half the lifetime: a 20s token is kept with a
	// 15s margin, a 1s token is replaced after half a second.
	f.set(func(f *fakeAS) { f.expiresIn = 20 })
	o2, _ := newOAuth(t, f, func(c *client.OAuthConfig) { c.ExpiryMargin = 15 * time.Second })
	ts2 := o2.ClientCredentials(ctx(t))
	a, _ := ts2.Token()
	b, _ := ts2.Token()
	if a != b {
		t.Errorf("a token 20s from expiry was not cached")
	}
	f.set(func(f *fakeAS) { f.expiresIn = 1 })
	ts2.Invalidate(b)
	a, _ = ts2.Token()
	time.Sleep(600 * time.Millisecond)
	b, _ = ts2.Token()
	if a == b || a.AccessToken == b.AccessToken {
		t.Errorf("a token past its margin was reused")
	}
}

// Authorization code with PKCE, refresh, and revocation use the same
// client authentication and DPoP.
func TestCodeRefreshRevoke(t *testing.T) {
	f := newFakeAS(t)
	f.set(func(f *fakeAS) { f.requireNonce, f.refresh = true, "rt-1" })
	o, _ := newOAuth(t, f, func(c *client.OAuthConfig) { c.RedirectURL = "http://127.0.0.1/cb" })

	verifier := oauth2.GenerateVerifier()
	authURL, err := o.AuthCodeURL("st", verifier, url.Values{"prompt": {"consent"}})
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(authURL)
	q := u.Query()
	if u.Path != "/authorize" || q.Get("response_type") != "code" || q.Get("client_id") != "c1" || q.Get("state") != "st" ||
		q.Get("code_challenge") != oauth2.S256ChallengeFromVerifier(verifier) || q.Get("code_challenge_method") != "S256" ||
		q.Get("redirect_uri") != "http://127.0.0.1/cb" || q.Get("scope") != "s1 s2" || q.Get("prompt") != "consent" {
		t.Errorf("AuthCodeURL %s", authURL)
	}

	tok, err := o.Exchange(ctx(t), "code-1", verifier)
	if err != nil {
		t.Fatal(err)
	}
	seen := f.seen()
	ex := seen[len(seen)-1]
	if first(ex.form["grant_type"]) != "authorization_code" || first(ex.form["code"]) != "code-1" ||
		first(ex.form["code_verifier"]) != verifier || first(ex.form["redirect_uri"]) != "http://127.0.0.1/cb" {
		t.Errorf("exchange form %v", ex.form)
	}
	if tok.RefreshToken != "rt-1" {
		t.Fatalf("token %+v", tok)
	}

	// The server stops rotating refresh tokens: the source keeps rt-1.
	f.set(func(f *fakeAS) { f.refresh = "" })
	ts := o.TokenSource(ctx(t), tok)
	ts.Invalidate(tok)
	next, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	seen = f.seen()
	rf := seen[len(seen)-1]
	if first(rf.form["grant_type"]) != "refresh_token" || first(rf.form["refresh_token"]) != "rt-1" || rf.proof.nonce != "as-nonce-1" {
		t.Errorf("refresh %+v", rf)
	}
	if next.AccessToken == tok.AccessToken || next.RefreshToken != "rt-1" {
		t.Errorf("refreshed token %+v", next)
	}

	if err := o.Revoke(ctx(t), "rt-1", "refresh_token"); err != nil {
		t.Fatal(err)
	}
	seen = f.seen()
	rv := seen[len(seen)-1]
	if rv.path != "/revoke" || first(rv.form["token"]) != "rt-1" || first(rv.form["token_type_hint"]) != "refresh_token" ||
		rv.assertionJTI == "" || rv.proof.htu != f.url()+"/revoke" || rv.proof.nonce != "as-nonce-1" {
		t.Errorf("revocation %+v", rv)
	}

	if _, err := o.Refresh(ctx(t), ""); !errors.Is(err, client.ErrNoRefreshToken) {
		t.Errorf("Refresh without a token: %v", err)
	}
	if _, err := o.TokenSource(ctx(t), &oauth2.Token{AccessToken: "x", Expiry: time.Unix(1, 0)}).Token(); !errors.Is(err, client.ErrNoRefreshToken) {
		t.Errorf("expired token without refresh token: %v", err)
	}
}

// The resource server's nonce challenge is answered with one retry that
// replays the body, with a new jti and the token's ath; a second
// challenge is returned to the caller as it is.
func TestTransportNonce(t *testing.T) {
	f := newFakeAS(t)
	f.set(func(f *fakeAS) { f.rsNonce = "rs-nonce-1" })
	o, _ := newOAuth(t, f, nil)
	ts := o.ClientCredentials(ctx(t))
	hc := o.Client(ts)

	resp, err := hc.Post(f.url()+"/api?x=1", "text/plain", strings.NewReader("hello"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"body":"hello"`) {
		t.Fatalf("%s %s", resp.Status, b)
	}
	tok, _ := ts.Token()
	var api []attempt
	for _, a := range f.seen() {
		if a.path == "/api" {
			api = append(api, a)
		}
	}
	if len(api) != 2 {
		t.Fatalf("%d resource requests, want 2", len(api))
	}
	for i, a := range api {
		if a.authz != "DPoP "+tok.AccessToken || a.proof.ath != ath(tok.AccessToken) || a.proof.htm != "POST" ||
			a.proof.htu != f.url()+"/api" || a.body != "hello" || a.proof.jkt != client.BoundKid(tok) {
			t.Errorf("resource request %d: %+v", i, a)
		}
	}
	if api[0].proof.nonce != "" || api[1].proof.nonce != "rs-nonce-1" || api[0].proof.jti == api[1].proof.jti {
		t.Errorf("nonces %q, %q; jtis %q, %q", api[0].proof.nonce, api[1].proof.nonce, api[0].proof.jti, api[1].proof.jti)
	}
	// The authorization server's nonce store is separate.
	for _, a := range f.seen() {
		if a.path == "/token" && a.proof.nonce == "rs-nonce-1" {
			t.Error("a token request carried the resource server's nonce")
		}
	}

	// Remembered: one request.
	n := len(f.seen())
	resp, err = hc.Get(f.url() + "/api")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || len(f.seen()) != n+1 {
		t.Errorf("%s after %d requests", resp.Status, len(f.seen())-n)
	}

	// A body that cannot be replayed: the 401 comes back, nonce remembered.
	f.set(func(f *fakeAS) { f.rsNonce = "rs-nonce-2" })
	n = len(f.seen())
	req, _ := http.NewRequest("POST", f.url()+"/api", io.NopCloser(strings.NewReader("once")))
	resp, err = hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 || len(f.seen()) != n+1 {
		t.Errorf("unreplayable body: %s, %d requests", resp.Status, len(f.seen())-n)
	}
	resp, err = hc.Get(f.url() + "/api")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("the next request did not use the remembered nonce: %s", resp.Status)
	}

	// A server that challenges again: exactly one retry, then its 401.
	f.set(func(f *fakeAS) { f.rsRotate = true })
	n = len(f.seen())
	resp, err = hc.Get(f.url() + "/api")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 || len(f.seen()) != n+2 {
		t.Errorf("second challenge: %s after %d requests, want 401 after 2", resp.Status, len(f.seen())-n)
	}
}

// The transport proves with the key the token is bound to, not the
// active key of the key set.
func TestTransportProvesWithBoundKid(t *testing.T) {
	f := newFakeAS(t)
	o, kc := newOAuth(t, f, nil)
	tok, err := o.ClientCredentialsToken(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	bound := client.BoundKid(tok)
	if _, err := kc.Rotate(ctx(t), "dpop", true); err != nil {
		t.Fatal(err)
	}
	resp, err := o.Client(oauth2.StaticTokenSource(tok)).Get(f.url() + "/api")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	seen := f.seen()
	if got := seen[len(seen)-1].proof.jkt; got != bound {
		t.Errorf("proof key %s, want the bound (now draining) key %s", got, bound)
	}
	next, err := o.ClientCredentialsToken(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if client.BoundKid(next) == bound {
		t.Error("a new token is bound to the old key")
	}
}

func TestTransportErrors(t *testing.T) {
	var tr client.Transport
	if _, err := tr.RoundTrip(&http.Request{URL: &url.URL{Scheme: "http", Host: "x"}}); !errors.Is(err, client.ErrInvalidArgument) {
		t.Errorf("zero Transport: %v", err)
	}
	f := newFakeAS(t)
	o, _ := newOAuth(t, f, nil)
	_, err := o.Client(oauth2.StaticTokenSource(&oauth2.Token{AccessToken: "x", TokenType: "Bearer"})).Get(f.url() + "/api")
	if !errors.Is(err, client.ErrNotDPoPBound) {
		t.Errorf("bearer token without AllowBearer: %v", err)
	}
}

// The client follows redirects within the origin only: the token is not
// sent elsewhere.
// A Transport used in an http.Client of the caller's own, which follows
// every redirect, does not send the access token (nor a proof for it) to
// another origin: as net/http drops an Authorization header it was given
// when a redirect leaves the origin.
func TestTransportCrossOriginRedirect(t *testing.T) {
	f := newFakeAS(t)
	o, _ := newOAuth(t, f, nil)
	var gotAuth, gotDPoP atomic.Value
	gotAuth.Store("unset")
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth.Store(r.Header.Get("Authorization"))
		gotDPoP.Store(r.Header.Get("DPoP"))
	}))
	defer other.Close()
	mux := http.NewServeMux()
	mux.HandleFunc("/away", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.URL+"/api", http.StatusFound)
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	hc := &http.Client{Transport: o.Transport(o.ClientCredentials(ctx(t)), nil)}
	resp, err := hc.Get(srv.URL + "/away")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if a := gotAuth.Load().(string); a != "" {
		t.Errorf("the other origin received Authorization %.20q…", a)
	}
	if d, _ := gotDPoP.Load().(string); d != "" {
		t.Error("the other origin received a DPoP proof")
	}
}

func TestClientRedirects(t *testing.T) {
	other := newFakeAS(t)
	f := newFakeAS(t)
	o, _ := newOAuth(t, f, nil)
	mux := http.NewServeMux()
	mux.HandleFunc("/away", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.url()+"/api", http.StatusFound)
	})
	mux.HandleFunc("/here", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/there", http.StatusFound) })
	mux.HandleFunc("/there", func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.Header.Get("Authorization"), "DPoP ") || r.Header.Get("DPoP") == "" {
			w.WriteHeader(401)
		}
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	hc := o.Client(o.ClientCredentials(ctx(t)))
	resp, err := hc.Get(srv.URL + "/away")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusFound || len(other.seen()) != 0 {
		t.Errorf("cross-origin redirect: %s, %d requests reached the other server", resp.Status, len(other.seen()))
	}
	resp, err = hc.Get(srv.URL + "/here")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("same-origin redirect: %s", resp.Status)
	}
}

// RFC 8707: a resource indicator is an absolute URI without a fragment; an
// OAuthConfig with another is refused before any request. A scope given
// twice is requested once.
func TestResourcesAndScopesChecked(t *testing.T) {
	f := newFakeAS(t)
	kc := startKeyd(t, f.url())
	for _, bad := range []string{"api", "/relative", "https://rs.example/api#frag", "https://rs.example/#"} {
		_, err := kc.OAuth(ctx(t), client.OAuthConfig{TokenURL: f.url() + "/token", ClientID: "c1", AssertionKeySet: "assert", DPoPKeySet: "dpop", Resources: []string{bad}})
		if !errors.Is(err, client.ErrInvalidArgument) || !strings.Contains(err.Error(), "RFC 8707") {
			t.Errorf("resource %q: %v, want refused", bad, err)
		}
	}
	if n := len(f.seen()); n != 0 {
		t.Errorf("%d requests made with a bad resource", n)
	}
	o, _ := newOAuth(t, f, func(c *client.OAuthConfig) {
		c.Scopes = []string{"s1", "s2", "s1"}
		c.Resources = []string{"https://rs.example/api"}
	})
	if _, err := o.ClientCredentialsToken(ctx(t)); err != nil {
		t.Fatal(err)
	}
	seen := f.seen()
	if got := seen[len(seen)-1].form["scope"]; len(got) != 1 || got[0] != "s1 s2" {
		t.Errorf("scope sent %q, want \"s1 s2\"", got)
	}
}
