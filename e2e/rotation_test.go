package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/keyd-dev/keyd/client"
)

// Clients of the rotation tests, each with its own assertion key set.
const (
	rotClientID      = "keyd-rot"            // DPoP key set on a schedule of seconds; JWK Set registered statically
	uriClientID      = "keyd-jwks-uri"       // registered by jwks_uri; oidc-provider's own JWKS caching
	uriExactClientID = "keyd-jwks-uri-exact" // registered by jwks_uri; oidc-provider caches for max-age exactly
	rotTokenTTL      = 4                     // seconds: the access tokens of rotClientID, = dpop-rot's token_lifetime
	dpopDrain        = 5 * time.Second       // dpop-rot's drain: token_lifetime + 1s
	assertPrepublish = 2 * time.Second       // assert-uri*'s prepublish; their jwks_cache (max-age) is 1s
	assertPeriod     = 3 * time.Second       // assert-uri*'s period
)

// rotEnv is an authorization server and a keyd whose key sets rotate every
// few seconds, with keyd's HTTP JWK Set listener on.
type rotEnv struct {
	issuer, tokenURL, resource string
	jwksURL                    string // keyd's http listener, http://127.0.0.1:PORT
	as                         *nodeServer
	kc                         *client.Client
}

func newRotEnv(t *testing.T) *rotEnv {
	node := needNode(t)
	bin := keydBinary(t)
	as := startNode(t, node)
	e := &rotEnv{issuer: as.url, tokenURL: as.url + "/oauth2/v1/token", resource: as.url + resourcePath, as: as}

	dir, err := os.MkdirTemp("", "kde2r")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	httpAddr := l.Addr().String()
	l.Close()
	e.jwksURL = "http://" + httpAddr
	allow := fmt.Sprintf("allow: {uids: [%d]}", os.Geteuid())
	// The assertion key sets rotate every 3s and publish the next key 2s
	// before it signs, with max-age 1s; an assertion lives 5s (max_lifetime),
	// and a replaced key stays published for 8s (≥ max_lifetime + iat_skew).
	assertSchedule := fmt.Sprintf("max_lifetime: 5s, iat_skew: 2s, jwks_cache: 1s, rotation: {period: %v, prepublish: %v, drain: 8s, retain: 1s}", assertPeriod, assertPrepublish)
	cfg := fmt.Sprintf(`socket: %[1]s/keyd.sock
socket_mode: "0600"
state_dir: %[1]s/state
http: {listen: %[3]s}
backend: {soft: {}}
keysets:
  - {name: dpop, purpose: dpop, alg: ES256, %[2]s}
  - {name: dpop-rot, purpose: dpop, alg: ES256, token_lifetime: %[9]ds, rotation: {period: 2s, drain: %[10]v, retain: 1s}, %[2]s}
  - {name: assert-rot, purpose: client_assertion, alg: ES256, client_id: %[5]s, audience: %[4]q, %[2]s}
  - {name: assert-uri, purpose: client_assertion, alg: ES256, client_id: %[6]s, audience: %[4]q, %[8]s, %[2]s}
  - {name: assert-uri-exact, purpose: client_assertion, alg: ES256, client_id: %[7]s, audience: %[4]q, %[8]s, %[2]s}
`, dir, allow, httpAddr, e.issuer, rotClientID, uriClientID, uriExactClientID, assertSchedule, rotTokenTTL, dpopDrain)
	k := startKeyd(t, bin, dir, cfg)
	if e.kc, err = client.Dial(k.socket); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.kc.Close() })

	staticJWKS, err := e.kc.JWKS(testCtx(t), "assert-rot")
	if err != nil {
		t.Fatal(err)
	}
	as.configure(t, map[string]any{"clients": []map[string]any{
		{"client_id": rotClientID, "jwks": json.RawMessage(staticJWKS), "access_token_ttl": rotTokenTTL},
		{"client_id": uriClientID, "jwks_uri": e.jwksURL + "/jwks/assert-uri.json"},
		{"client_id": uriExactClientID, "jwks_uri": e.jwksURL + "/jwks/assert-uri-exact.json", "jwks_uri_max_age_exact": true},
	}})
	return e
}

func (e *rotEnv) oauth(t *testing.T, cfg client.OAuthConfig) (*client.OAuth, *recorder) {
	t.Helper()
	rec := &recorder{base: http.DefaultTransport}
	cfg.Issuer, cfg.HTTPClient = e.issuer, &http.Client{Transport: rec, Timeout: 10 * time.Second}
	o, err := e.kc.OAuth(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return o, rec
}

// watch follows key sets with a KeyWatcher of its own, until the test ends.
func (e *rotEnv) watch(t *testing.T, keysets []string, opts ...client.WatchOption) *client.KeyWatcher {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	w := e.kc.WatchKeys(ctx, keysets, opts...)
	if err := w.Synced(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	return w
}

// waitView waits (up to d) until cond holds of a watcher's view (fed by
// WatchKeys: the daemon is not polled).
func waitView(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("after %v: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func stateOf(w *client.KeyWatcher, kid string) string {
	k, _ := w.Key(kid)
	return k.State
}

// jwksFetch is one fetch of a jwks_uri that the authorization server logged.
type jwksFetch struct {
	URL    string   `json:"url"`
	Status int      `json:"status"`
	Kids   []string `json:"kids"`
	At     int64    `json:"at"` // ms since the epoch
}

func (e *rotEnv) jwksFetches(t *testing.T, url string) []jwksFetch {
	t.Helper()
	var out []jwksFetch
	for _, line := range e.as.logLines(0) {
		var f struct {
			Event string `json:"event"`
			jwksFetch
		}
		if json.Unmarshal([]byte(line), &f) == nil && f.Event == "jwks_uri.fetch" && f.URL == url {
			out = append(out, f.jwksFetch)
		}
	}
	return out
}

// rejections returns the rejections the server logged for event and
// error, for requests of client clientID.
func (e *rotEnv) rejections(event, errCode, clientID string) []string {
	var out []string
	for _, line := range e.as.logLines(0) {
		var se struct {
			serverError
			ClientID string `json:"client_id"`
		}
		if json.Unmarshal([]byte(line), &se) == nil && se.Event == event && se.Error == errCode && se.ClientID == clientID {
			out = append(out, line)
		}
	}
	return out
}

// TestRotation runs the client against oidc-provider while keyd rotates on
// a schedule of seconds: a DPoP key set (token binding across rotation),
// and client assertion key sets registered at the server by jwks_uri
// pointing at keyd's HTTP JWK Set.
func TestRotation(t *testing.T) {
	start := time.Now()
	e := newRotEnv(t)
	t.Logf("authorization server and keyd up in %v", time.Since(start).Round(time.Millisecond))
	t.Run("DPoPTokenAcrossRotation", e.testDPoPTokenAcrossRotation)
	t.Run("JWKSURIPrepublished", e.testJWKSURIPrepublished)
	t.Run("JWKSURIMaxAge", e.testJWKSURIMaxAge)
}

// An access token bound to DPoP key A, obtained shortly after A became
// active, keeps working at the resource after A is rotated out: every call
// proves with A (the draining key, named by kid) until the token expires;
// after its expiry the resource refuses it (the token, not the key, ended
// it: A is still draining). The client's token source, following the key
// set over WatchKeys, uses it across the rotation and then gets a token
// bound to the key active at that time. No call fails.
func (e *rotEnv) testDPoPTokenAcrossRotation(t *testing.T) {
	t.Parallel()
	// ExpiryMargin 1.5s: oidc-provider counts a token's 4s from its iat in
	// whole seconds, so it may end up to 1s before expires_in says.
	o, rec := e.oauth(t, client.OAuthConfig{ClientID: rotClientID, AssertionKeySet: "assert-rot", DPoPKeySet: "dpop-rot", ExpiryMargin: 1500 * time.Millisecond})
	wctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	w := o.WatchKeys(wctx)
	if err := w.Synced(testCtx(t)); err != nil {
		t.Fatal(err)
	}

	// Start 1s into a key's 2s period.
	first, _ := w.Active("dpop-rot")
	waitView(t, 5*time.Second, "no rotation of dpop-rot", func() bool { k, _ := w.Active("dpop-rot"); return k.Kid != first.Kid })
	time.Sleep(time.Second)

	ts := o.ClientCredentials(testCtx(t))
	hc := o.Client(ts)
	tok1, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	a := client.BoundKid(tok1)
	if active, _ := w.Active("dpop-rot"); a == "" || a != active.Kid || tok1.ExpiresIn != rotTokenTTL {
		t.Fatalf("first token bound to %q (active %q), expires_in %d", a, active.Kid, tok1.ExpiresIn)
	}
	t.Logf("token 1 bound to %s, expires at +%v", a, time.Until(tok1.Expiry).Round(time.Millisecond))
	direct := o.Client(oauth2.StaticTokenSource(tok1)) // tok1 itself, whatever the source does

	var sourceDraining, directDraining, directCalls int
	expiredChecked := false
	for time.Now().Before(tok1.Expiry.Add(time.Second)) {
		// Through the token source: every call succeeds.
		before := stateOf(w, a)
		got := getJSON(t, hc, e.resource, 200)
		if cur, _ := ts.Token(); cur == tok1 && before == "draining" && stateOf(w, a) == "draining" {
			if jkt := got["cnf"].(map[string]any)["jkt"]; jkt != a {
				t.Fatalf("tok1 at the resource: cnf.jkt %v, want %s", jkt, a)
			}
			sourceDraining++
		}

		// With tok1 itself, until shortly before it expires, then once after.
		switch left := time.Until(tok1.Expiry); {
		case left > 1500*time.Millisecond:
			before := stateOf(w, a)
			m := rec.mark()
			got := getJSON(t, direct, e.resource, 200)
			directCalls++
			if jkt := got["cnf"].(map[string]any)["jkt"]; jkt != a {
				t.Fatalf("tok1 at the resource: cnf.jkt %v, want %s", jkt, a)
			}
			for _, x := range rec.since(m) {
				if x.dpopJKT != a {
					t.Fatalf("a proof for tok1 signed by %s, want %s", x.dpopJKT, a)
				}
			}
			if before == "draining" && stateOf(w, a) == "draining" {
				directDraining++
			}
		case left < -200*time.Millisecond && !expiredChecked:
			expiredChecked = true
			if st := stateOf(w, a); st != "draining" {
				t.Fatalf("A is %s %v after tok1 expired; want it still draining", st, -left)
			}
			mark := e.as.mark()
			getJSON(t, direct, e.resource, 401)
			e.as.expectRejection(t, mark, "resource.error", "invalid_token", "not active (it expired at")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !expiredChecked {
		t.Error("tok1 was not tried after its expiry")
	}
	if sourceDraining < 3 || directDraining < 3 {
		t.Errorf("calls with tok1 proven by the draining key: %d through the token source, %d direct (of %d); want ≥ 3 each", sourceDraining, directDraining, directCalls)
	}

	// The source's next token: bound to the key that was active when it was
	// requested, and used from then on.
	tok2, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	b := client.BoundKid(tok2)
	var req2 *exchange
	for _, x := range rec.since(0) {
		if x.url == e.tokenURL && x.status == 200 {
			req2 = &x
		}
	}
	kb, ok := w.Key(b)
	if b == a || !ok || req2 == nil || req2.dpopJKT != b || kb.ActivatedAt.After(req2.sent) {
		t.Fatalf("token 2 bound to %s (%+v), requested with %+v; want a key other than %s, active when requested", b, kb, req2, a)
	}
	if kb.State == "draining" && kb.RetireAt.Add(-dpopDrain).Before(req2.sent) {
		t.Errorf("token 2 requested at %v with %s, which had stopped being active at %v", req2.sent, b, kb.RetireAt.Add(-dpopDrain))
	}
	// Every resource call carried a proof from its token's key.
	bound := map[string]string{"DPoP " + tok1.AccessToken: a, "DPoP " + tok2.AccessToken: b}
	for _, x := range rec.since(0) {
		if x.url == e.resource && x.status == 200 && bound[x.authz] != "" && x.dpopJKT != bound[x.authz] {
			t.Errorf("a resource call with the token bound to %s was proven by %s", bound[x.authz], x.dpopJKT)
		}
	}
	t.Logf("tok1 proven by draining %s: %d calls via the source, %d direct; tok2 bound to %s", a, sourceDraining, directDraining, b)
}

// A client registered by jwks_uri = keyd's /jwks/assert-uri.json, with
// oidc-provider's own caching: it fetches the JWK Set on first use and
// keeps it for at least 60 s whatever max-age says, refetching for an
// unknown kid only once that is over. Token requests made from the moment
// keyd published the next assertion key keep succeeding across its
// activation: the one fetch already had it. The key after that, published
// and activated within the 60 s, is refused: keyd's jwks_cache must be at
// least the server's real cache time (60 s for oidc-provider).
func (e *rotEnv) testJWKSURIPrepublished(t *testing.T) {
	t.Parallel()
	o, rec := e.oauth(t, client.OAuthConfig{ClientID: uriClientID, AssertionKeySet: "assert-uri", DPoPKeySet: "dpop"})
	published := make(chan string, 16)
	w := e.watch(t, []string{"assert-uri"}, client.OnKeyChange(func(ev client.KeyEvent) {
		if ev.Key.State == "next" {
			published <- ev.Key.Kid
		}
	}))
	// The next key: one already published, or the next one to be.
	var next string
	keys, err := e.kc.ListKeys(testCtx(t), "assert-uri")
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if stateOf(w, k.Kid) == "next" {
			next = k.Kid
		}
	}
	if next == "" {
		select {
		case next = <-published:
		case <-time.After(2 * assertPeriod):
			t.Fatal("no next key published in assert-uri")
		}
	}
	cur, _ := w.Active("assert-uri")

	// Requests every 250ms until three were signed by the next key.
	var byNext int
	deadline := time.Now().Add(assertPeriod + 2*time.Second)
	for byNext < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("%d requests signed by the next key %s by the deadline", byNext, next)
		}
		m := rec.mark()
		if _, err := o.ClientCredentialsToken(testCtx(t)); err != nil {
			t.Fatalf("token request (active key %s): %v", stateOf(w, next), err)
		}
		if x := rec.since(m); x[len(x)-1].assertionKid == next {
			byNext++
		}
		time.Sleep(250 * time.Millisecond)
	}
	fetches := e.jwksFetches(t, e.jwksURL+"/jwks/assert-uri.json")
	if len(fetches) != 1 || fetches[0].Status != 200 || !slices.Contains(fetches[0].Kids, cur.Kid) || !slices.Contains(fetches[0].Kids, next) {
		t.Fatalf("jwks_uri fetches %+v: want one, listing the active key %s and the next key %s", fetches, cur.Kid, next)
	}
	kn, _ := w.Key(next)
	for _, x := range rec.since(0) {
		if x.url == e.tokenURL && x.status == 200 && x.assertionKid == next && x.sent.Before(kn.ActivatedAt) {
			t.Errorf("an assertion signed by %s at %v, before it activated at %v", next, x.sent, kn.ActivatedAt)
		}
	}
	if r := e.rejections("grant.error", "invalid_client", uriClientID); len(r) > 0 {
		t.Fatalf("the server refused client authentication: %s", r)
	}

	// The key after next: published after the server's one fetch, which it
	// keeps for 60 s.
	waitView(t, 2*assertPeriod, "no rotation after the next key", func() bool { k, _ := w.Active("assert-uri"); return k.Kid != next })
	after, _ := w.Active("assert-uri")
	mark := e.as.mark()
	_, err = o.ClientCredentialsToken(testCtx(t))
	expectOAuthError(t, err, "invalid_client")
	e.as.expectRejection(t, mark, "grant.error", "invalid_client", "no applicable key found in the JSON Web Key Set")
	if r := e.rejections("grant.error", "invalid_client", uriClientID); len(r) != 1 {
		t.Errorf("rejections of %s: %s", uriClientID, r)
	}
	if n := len(e.jwksFetches(t, e.jwksURL+"/jwks/assert-uri.json")); n != 1 {
		t.Errorf("%d jwks_uri fetches, want still 1 (cached ≥ 60 s)", n)
	}
	t.Logf("one jwks_uri fetch listing %s (active) and %s (next): %d requests signed by the latter succeeded; %s, published after that fetch, was refused",
		cur.Kid, next, byNext, after.Kid)
}

// The same with the server caching keyd's JWK Set for exactly its max-age
// (1s; oidc-provider's 60 s floor lowered for this client, see server.js):
// token requests every 250ms keep succeeding across two rotations of the
// assertion key. The server refetches the JWK Set when it meets a kid it
// does not know and its copy is older than max-age (oidc-provider's rule),
// once per new key; every assertion's kid was in the last JWK Set it
// fetched before answering, and keyd published each new key at least
// max-age before it signed.
func (e *rotEnv) testJWKSURIMaxAge(t *testing.T) {
	t.Parallel()
	o, rec := e.oauth(t, client.OAuthConfig{ClientID: uriExactClientID, AssertionKeySet: "assert-uri-exact", DPoPKeySet: "dpop"})
	w := e.watch(t, []string{"assert-uri-exact"})
	startAt := time.Now()
	first, _ := w.Active("assert-uri-exact")

	var kids []string // in order of first use
	deadline := time.Now().Add(3*assertPeriod + 2*time.Second)
	for len(kids) < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("assertion keys used by the deadline: %v; want 3 (two rotations)", kids)
		}
		m := rec.mark()
		if _, err := o.ClientCredentialsToken(testCtx(t)); err != nil {
			t.Fatalf("token request after %v (keys used so far %v): %v", time.Since(startAt).Round(time.Millisecond), kids, err)
		}
		if x := rec.since(m); !slices.Contains(kids, x[len(x)-1].assertionKid) {
			kids = append(kids, x[len(x)-1].assertionKid)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if r := e.rejections("grant.error", "invalid_client", uriExactClientID); len(r) > 0 {
		t.Fatalf("the server refused client authentication: %s", r)
	}

	fetches := e.jwksFetches(t, e.jwksURL+"/jwks/assert-uri-exact.json")
	// Three keys signed; the first fetch had the first (and maybe the
	// second, pre-published); every later key needs a refetch that may
	// carry two keys at once: at least two fetches, whatever the timing.
	if len(fetches) < 2 {
		t.Errorf("%d jwks_uri fetches in %v; want the server to have refetched", len(fetches), time.Since(startAt))
	}
	var checked int
	for _, x := range rec.since(0) {
		if x.url != e.tokenURL || x.status != 200 {
			continue
		}
		var last *jwksFetch
		for i := range fetches {
			if fetches[i].At <= x.done.UnixMilli() {
				last = &fetches[i]
			}
		}
		if last == nil || !slices.Contains(last.Kids, x.assertionKid) {
			t.Errorf("an assertion signed by %s succeeded, but the server's last JWK Set before its answer was %+v", x.assertionKid, last)
		}
		k, _ := w.Key(x.assertionKid)
		if x.sent.Before(k.ActivatedAt) {
			t.Errorf("an assertion signed by %s at %v, before it activated at %v", x.assertionKid, x.sent, k.ActivatedAt)
		}
		checked++
	}
	for _, kid := range kids {
		if kid == first.Kid {
			continue // the key active when keyd started signs at once
		}
		k, _ := w.Key(kid)
		if pre := k.ActivatedAt.Sub(k.CreatedAt); pre < time.Second+500*time.Millisecond {
			t.Errorf("%s was published %v before it activated; want ≥ max-age (1s) plus margin", kid, pre)
		}
	}
	t.Logf("%d token requests over %v with assertion keys %s; %d jwks_uri fetches", checked, time.Since(startAt).Round(time.Millisecond), strings.Join(kids, ", "), len(fetches))
}
