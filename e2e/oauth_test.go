package e2e

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"golang.org/x/oauth2"

	"github.com/keyd-dev/keyd/client"
)

const (
	clientID     = "keyd-e2e"     // an RFC 7523bis client: assertion aud = issuer
	oktaClientID = "0oa-okta-e2e" // an Okta-style client: assertion aud = token endpoint
	resourcePath = "/api/v1/users"
)

// env is one authorization server, one keyd and a client of it.
type env struct {
	issuer   string
	tokenURL string
	resource string
	as       *nodeServer
	keyd     *keydProc
	bin      string
	kc       *client.Client
	rec      *recorder
	http     *http.Client
	testKey  *ecdsa.PrivateKey // registered at the server beside keyd's keys
}

const testKid = "e2e-test-owned-key"

func newEnv(t *testing.T) *env {
	node := needNode(t)
	bin := keydBinary(t)
	as := startNode(t, node)
	e := &env{issuer: as.url, tokenURL: as.url + "/oauth2/v1/token", resource: as.url + resourcePath, as: as, bin: bin}

	dir, err := os.MkdirTemp("", "kde2e")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	allow := fmt.Sprintf("allow: {uids: [%d]}", os.Geteuid())
	cfg := fmt.Sprintf(`socket: %[1]s/keyd.sock
socket_mode: "0600"
state_dir: %[1]s/state
backend: {soft: {}}
keysets:
  - {name: dpop, purpose: dpop, alg: ES256, %[2]s}
  - {name: dpop-other, purpose: dpop, alg: ES256, %[2]s}
  - {name: assert, purpose: client_assertion, alg: ES256, client_id: %[3]s, audience: %[5]q, %[2]s}
  - {name: assert-token-endpoint, purpose: client_assertion, alg: ES256, client_id: %[3]s, audience: %[6]q, %[2]s}
  - {name: wrong-aud, purpose: client_assertion, alg: ES256, client_id: %[3]s, audience: "https://wrong.example.com", %[2]s}
  - {name: okta-dpop, purpose: dpop, alg: PS256, %[2]s}
  - {name: okta-assert, purpose: client_assertion, alg: RS256, client_id: %[4]s, audience: %[6]q, %[2]s}
  - {name: okta-assert-issuer, purpose: client_assertion, alg: ES256, client_id: %[4]s, audience: %[5]q, %[2]s}
`, dir, allow, clientID, oktaClientID, e.issuer, e.tokenURL)
	e.keyd = startKeyd(t, bin, dir, cfg)
	if e.kc, err = client.Dial(e.keyd.socket); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.kc.Close() })

	// Register the clients with static JWK Sets fetched from keyd's
	// GetJWKS (keyd's HTTP jwks_uri listener is not used here), plus a key
	// the test owns, to hand-build assertions keyd would refuse to sign.
	e.testKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	jwks := func(extra []jose.JSONWebKey, sets ...string) json.RawMessage {
		b, err := e.kc.JWKS(context.Background(), sets...)
		if err != nil {
			t.Fatal(err)
		}
		var set jose.JSONWebKeySet
		if err := json.Unmarshal(b, &set); err != nil {
			t.Fatal(err)
		}
		set.Keys = append(set.Keys, extra...)
		out, err := json.Marshal(set)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	testJWK := jose.JSONWebKey{Key: e.testKey.Public(), KeyID: testKid, Algorithm: "ES256", Use: "sig"}
	as.configure(t, map[string]any{"clients": []map[string]any{
		{
			"client_id":          clientID,
			"jwks":               jwks([]jose.JSONWebKey{testJWK}, "assert", "assert-token-endpoint", "wrong-aud"),
			"grant_types":        []string{"client_credentials", "authorization_code", "refresh_token"},
			"redirect_uris":      []string{e.issuer + "/cb"},
			"assertion_audience": "issuer",
		},
		{
			"client_id":          oktaClientID,
			"jwks":               jwks(nil, "okta-assert", "okta-assert-issuer"),
			"grant_types":        []string{"client_credentials"},
			"assertion_audience": "token_endpoint",
		},
	}})
	e.rec = &recorder{base: http.DefaultTransport}
	e.http = &http.Client{Transport: e.rec, Timeout: 10 * time.Second}
	return e
}

func (e *env) oauth(t *testing.T, cfg client.OAuthConfig) *client.OAuth {
	t.Helper()
	if cfg.Issuer == "" && cfg.TokenURL == "" {
		cfg.Issuer = e.issuer
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = e.http
	}
	o, err := e.kc.OAuth(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestOAuth(t *testing.T) {
	start := time.Now()
	e := newEnv(t)
	t.Logf("authorization server and keyd up in %v", time.Since(start).Round(time.Millisecond))

	t.Run("ClientCredentials", e.testClientCredentials)
	t.Run("AuthorizationCode", e.testAuthorizationCode)
	t.Run("OktaStyle", e.testOktaStyle)
	t.Run("WrongHTM", e.testWrongHTM)
	t.Run("ReplayedJTI", e.testReplayedJTI)
	t.Run("ProofFromAnotherKey", e.testProofFromAnotherKey)
	t.Run("AssertionAudience", e.testAssertionAudience)
	t.Run("ExpiredAssertion", e.testExpiredAssertion)
	t.Run("DPoPRequired", e.testDPoPRequired)
	t.Run("CLI", e.testCLI)
}

// The client gets a token (the server demands a nonce: exactly one retry,
// with new jtis), calls the resource (which demands its own nonce: one
// retry), and the server sees the token bound to keyd's key; then it
// revokes the token and the resource refuses it.
func (e *env) testClientCredentials(t *testing.T) {
	o := e.oauth(t, client.OAuthConfig{ClientID: clientID, AssertionKeySet: "assert", DPoPKeySet: "dpop", Scopes: []string{"api:read"}})
	if o.TokenURL() != e.tokenURL || o.Metadata() == nil || o.Metadata().Issuer != e.issuer {
		t.Fatalf("discovered %+v", o.Metadata())
	}
	m := e.rec.mark()
	ts := o.ClientCredentials(testCtx(t))
	tok, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	seen := e.rec.since(m)
	if len(seen) != 2 {
		t.Fatalf("%d token requests, want 2", len(seen))
	}
	if seen[0].status != 400 || seen[0].nonce == "" || seen[0].dpop["nonce"] != nil {
		t.Errorf("first request: %+v, want a 400 use_dpop_nonce with a DPoP-Nonce for a proof without nonce", seen[0])
	}
	if seen[1].status != 200 || seen[1].dpop["nonce"] != seen[0].nonce {
		t.Errorf("retry: %+v, want a 200 for a proof with the server's nonce %q", seen[1], seen[0].nonce)
	}
	if seen[0].dpop["jti"] == seen[1].dpop["jti"] || seen[0].assertion["jti"] == seen[1].assertion["jti"] || seen[1].assertion["jti"] == nil {
		t.Errorf("jtis: proofs %v %v, assertions %v %v: every attempt needs new ones", seen[0].dpop["jti"], seen[1].dpop["jti"], seen[0].assertion["jti"], seen[1].assertion["jti"])
	}
	if seen[1].assertion["aud"] != e.issuer || seen[1].assertion["iss"] != clientID {
		t.Errorf("assertion %v", seen[1].assertion)
	}
	active := activeKid(t, e.kc, "dpop")
	if tok.TokenType != "DPoP" || client.BoundKid(tok) != active {
		t.Fatalf("token type %q bound to %q, want DPoP bound to %s", tok.TokenType, client.BoundKid(tok), active)
	}
	if again, _ := ts.Token(); again != tok {
		t.Error("the token source did not cache the token")
	}

	hc := o.Client(ts)
	m = e.rec.mark()
	got := getJSON(t, hc, e.resource, 200)
	if got["client_id"] != clientID || got["cnf"].(map[string]any)["jkt"] != active || got["token_kind"] != "ClientCredentials" {
		t.Errorf("resource answered %v", got)
	}
	seen = e.rec.since(m)
	if len(seen) != 2 || seen[0].status != 401 || !strings.Contains(seen[0].challenge, `error="use_dpop_nonce"`) ||
		seen[1].status != 200 || seen[1].dpop["nonce"] != seen[0].nonce || seen[1].dpop["ath"] != client.AccessTokenHash(tok.AccessToken) {
		t.Errorf("resource exchanges %+v: want a nonce challenge and one retry with its nonce and ath", seen)
	}
	// The resource server's nonce is remembered.
	m = e.rec.mark()
	post := doJSON(t, hc, "POST", e.resource, "name=ada", 200)
	if post["body"] != "name=ada" || post["method"] != "POST" || len(e.rec.since(m)) != 1 {
		t.Errorf("POST answered %v after %d requests", post, len(e.rec.since(m)))
	}

	// A revoked token: the resource server says invalid_token, and the
	// transport retries once with a new token.
	if err := o.Revoke(testCtx(t), tok.AccessToken, "access_token"); err != nil {
		t.Fatal(err)
	}
	mark := e.as.mark()
	m = e.rec.mark()
	getJSON(t, hc, e.resource, 200)
	e.as.expectRejection(t, mark, "resource.error", "invalid_token", "not active")
	seen = e.rec.since(m)
	if len(seen) < 2 || seen[0].status != 401 || !strings.Contains(seen[0].challenge, `error="invalid_token"`) || seen[len(seen)-1].status != 200 {
		t.Errorf("resource exchanges after revocation %+v: want invalid_token, then a retry with a new token", seen)
	}
	if renewed, err := ts.Token(); err != nil || renewed.AccessToken == tok.AccessToken {
		t.Errorf("after invalid_token the source still holds the revoked token (err %v)", err)
	}
}

// Authorization code with PKCE (a headless login), then the resource and
// oidc-provider's own DPoP-protected userinfo, a refresh, and revocation
// of the refresh token, which ends the grant.
func (e *env) testAuthorizationCode(t *testing.T) {
	o := e.oauth(t, client.OAuthConfig{ClientID: clientID, AssertionKeySet: "assert", DPoPKeySet: "dpop",
		Scopes: []string{"openid"}, RedirectURL: e.issuer + "/cb"})
	verifier := oauth2.GenerateVerifier()
	authURL, err := o.AuthCodeURL("st-1", verifier, nil)
	if err != nil {
		t.Fatal(err)
	}
	code := e.authorize(t, authURL, "st-1")
	tok, err := o.Exchange(testCtx(t), code, verifier)
	if err != nil {
		t.Fatal(err)
	}
	if tok.TokenType != "DPoP" || tok.RefreshToken == "" || client.BoundKid(tok) != activeKid(t, e.kc, "dpop") {
		t.Fatalf("exchange gave %+v (bound to %q)", tok, client.BoundKid(tok))
	}

	ts := o.TokenSource(testCtx(t), tok)
	hc := o.Client(ts)
	if got := getJSON(t, hc, e.resource, 200); got["sub"] != "alice" || got["token_kind"] != "AccessToken" {
		t.Errorf("resource answered %v", got)
	}
	if got := getJSON(t, hc, e.issuer+"/oauth2/v1/userinfo", 200); got["sub"] != "alice" {
		t.Errorf("userinfo answered %v", got)
	}

	next, err := o.Refresh(testCtx(t), tok.RefreshToken)
	if err != nil {
		t.Fatal(err)
	}
	if next.AccessToken == tok.AccessToken || next.TokenType != "DPoP" {
		t.Fatalf("refresh gave %+v", next)
	}
	rt := tok.RefreshToken
	if next.RefreshToken != "" {
		rt = next.RefreshToken
	}
	hc2 := o.Client(oauth2.StaticTokenSource(next))
	getJSON(t, hc2, e.resource, 200)

	if err := o.Revoke(testCtx(t), rt, "refresh_token"); err != nil {
		t.Fatal(err)
	}
	mark := e.as.mark()
	_, err = o.Refresh(testCtx(t), rt)
	var rerr *oauth2.RetrieveError
	if !errors.As(err, &rerr) || rerr.ErrorCode != "invalid_grant" {
		t.Fatalf("refresh after revocation: %v, want invalid_grant", err)
	}
	e.as.expectRejection(t, mark, "grant.error", "invalid_grant", "refresh token not found")
	// Revoking the refresh token revoked its grant's access tokens.
	mark = e.as.mark()
	getJSON(t, hc2, e.resource, 401)
	e.as.expectRejection(t, mark, "resource.error", "invalid_token", "not active")
}

// authorize follows the authorization request through the server's
// (headless) login and consent to the redirect with the code.
func (e *env) authorize(t *testing.T, authURL, state string) string {
	t.Helper()
	jar, _ := cookiejar.New(nil)
	redirect := e.issuer + "/cb"
	var location string
	hc := &http.Client{Jar: jar, Timeout: 10 * time.Second, CheckRedirect: func(req *http.Request, via []*http.Request) error {
		if len(via) > 10 {
			return errors.New("too many redirects")
		}
		if strings.HasPrefix(req.URL.String(), redirect) {
			location = req.URL.String()
			return http.ErrUseLastResponse
		}
		return nil
	}}
	resp, err := hc.Get(authURL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if location == "" {
		t.Fatalf("no redirect to %s: %s %s", redirect, resp.Status, body)
	}
	u, _ := url.Parse(location)
	q := u.Query()
	if q.Get("state") != state || q.Get("iss") != e.issuer || q.Get("code") == "" {
		t.Fatalf("redirect %s", location)
	}
	return q.Get("code")
}

// The Okta flow by configuration alone: the org authorization server's
// /oauth2/v1/token, an assertion whose audience is the token endpoint (RS256),
// PS256 DPoP proofs, and a management API call with ath. The same client
// with an issuer-audience key set is refused.
func (e *env) testOktaStyle(t *testing.T) {
	o := e.oauth(t, client.OAuthConfig{ClientID: oktaClientID, AssertionKeySet: "okta-assert", DPoPKeySet: "okta-dpop", Scopes: []string{"okta.users.read"}})
	ts := o.ClientCredentials(testCtx(t))
	tok, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	if tok.TokenType != "DPoP" || tok.Extra("scope") != "okta.users.read" {
		t.Fatalf("token %+v scope %v", tok, tok.Extra("scope"))
	}
	got := getJSON(t, o.Client(ts), e.resource, 200)
	if got["client_id"] != oktaClientID || got["scope"] != "okta.users.read" || got["cnf"].(map[string]any)["jkt"] != activeKid(t, e.kc, "okta-dpop") {
		t.Errorf("management API answered %v", got)
	}

	mark := e.as.mark()
	o2 := e.oauth(t, client.OAuthConfig{ClientID: oktaClientID, AssertionKeySet: "okta-assert-issuer", DPoPKeySet: "okta-dpop"})
	_, err = o2.ClientCredentialsToken(testCtx(t))
	expectOAuthError(t, err, "invalid_client")
	e.as.expectRejection(t, mark, "grant.error", "invalid_client", "audience (aud) must be "+e.tokenURL+" for client "+oktaClientID)
}

// rawToken posts a client credentials request with the given proof and
// assertion, bypassing the client's own checks.
func (e *env) rawToken(t *testing.T, proof, assertion string) (*http.Response, map[string]any) {
	t.Helper()
	form := url.Values{"grant_type": {"client_credentials"}, "client_id": {clientID},
		"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}, "client_assertion": {assertion}}
	req, _ := http.NewRequest("POST", e.tokenURL, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if proof != "" {
		req.Header.Set("DPoP", proof)
	}
	resp, err := e.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body map[string]any
	json.NewDecoder(resp.Body).Decode(&body)
	return resp, body
}

func (e *env) assertion(t *testing.T, keyset string) string {
	t.Helper()
	a, err := e.kc.ClientAssertion(testCtx(t), keyset)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func (e *env) proof(t *testing.T, keyset, method, target string, opts ...client.ProofOption) string {
	t.Helper()
	p, err := e.kc.DPoP(keyset).Proof(testCtx(t), method, target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return p.JWT
}

// asNonce gets a fresh nonce from the token endpoint.
func (e *env) asNonce(t *testing.T) string {
	t.Helper()
	resp, body := e.rawToken(t, e.proof(t, "dpop", "POST", e.tokenURL, client.WithNonce("")), e.assertion(t, "assert"))
	n := resp.Header.Get("DPoP-Nonce")
	if resp.StatusCode != 400 || body["error"] != "use_dpop_nonce" || n == "" {
		t.Fatalf("no nonce challenge: %s %v", resp.Status, body)
	}
	return n
}

// resourceCall calls the resource with a token and a proof the test made.
func (e *env) resourceCall(t *testing.T, method, token, proof string) (*http.Response, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest(method, e.resource, nil)
	req.Header.Set("Authorization", "DPoP "+token)
	req.Header.Set("DPoP", proof)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body map[string]any
	json.NewDecoder(resp.Body).Decode(&body)
	return resp, body
}

// rsNonce gets the resource server's current nonce.
func (e *env) rsNonce(t *testing.T, token string) string {
	t.Helper()
	resp, _ := e.resourceCall(t, "GET", token, e.proof(t, "dpop", "GET", e.resource, client.WithAccessToken(token), client.WithNonce("")))
	if resp.StatusCode != 401 || resp.Header.Get("DPoP-Nonce") == "" {
		t.Fatalf("no nonce challenge from the resource: %s", resp.Status)
	}
	return resp.Header.Get("DPoP-Nonce")
}

func (e *env) token(t *testing.T, dpopKeySet string) *oauth2.Token {
	t.Helper()
	o := e.oauth(t, client.OAuthConfig{ClientID: clientID, AssertionKeySet: "assert", DPoPKeySet: dpopKeySet})
	tok, err := o.ClientCredentialsToken(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// A proof signed by keyd for GET, sent with a POST: both servers refuse it.
func (e *env) testWrongHTM(t *testing.T) {
	nonce := e.asNonce(t)
	mark := e.as.mark()
	resp, body := e.rawToken(t, e.proof(t, "dpop", "GET", e.tokenURL, client.WithNonce(nonce)), e.assertion(t, "assert"))
	if resp.StatusCode != 400 || body["error"] != "invalid_dpop_proof" {
		t.Errorf("token endpoint: %s %v, want 400 invalid_dpop_proof", resp.Status, body)
	}
	e.as.expectRejection(t, mark, "grant.error", "invalid_dpop_proof", "DPoP proof htm mismatch")

	tok := e.token(t, "dpop")
	rn := e.rsNonce(t, tok.AccessToken)
	mark = e.as.mark()
	resp, _ = e.resourceCall(t, "GET", tok.AccessToken, e.proof(t, "dpop", "POST", e.resource, client.WithAccessToken(tok.AccessToken), client.WithNonce(rn)))
	if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_dpop_proof"`) {
		t.Errorf("resource: %s %s", resp.Status, resp.Header.Get("WWW-Authenticate"))
	}
	e.as.expectRejection(t, mark, "resource.error", "invalid_dpop_proof", "htm mismatch")
}

// A proof that was accepted once is refused the second time, by the
// authorization server (with a fresh assertion) and by the resource.
func (e *env) testReplayedJTI(t *testing.T) {
	nonce := e.asNonce(t)
	p := e.proof(t, "dpop", "POST", e.tokenURL, client.WithNonce(nonce))
	if resp, body := e.rawToken(t, p, e.assertion(t, "assert")); resp.StatusCode != 200 || body["token_type"] != "DPoP" {
		t.Fatalf("first use: %s %v", resp.Status, body)
	}
	mark := e.as.mark()
	resp, body := e.rawToken(t, p, e.assertion(t, "assert"))
	if resp.StatusCode != 400 || body["error"] != "invalid_grant" {
		t.Errorf("replay at the token endpoint: %s %v, want 400 invalid_grant", resp.Status, body)
	}
	e.as.expectRejection(t, mark, "grant.error", "invalid_grant", "DPoP proof JWT Replay detected")

	tok := e.token(t, "dpop")
	rn := e.rsNonce(t, tok.AccessToken)
	rp := e.proof(t, "dpop", "GET", e.resource, client.WithAccessToken(tok.AccessToken), client.WithNonce(rn))
	if resp, body := e.resourceCall(t, "GET", tok.AccessToken, rp); resp.StatusCode != 200 {
		t.Fatalf("first use at the resource: %s %v", resp.Status, body)
	}
	mark = e.as.mark()
	if resp, _ := e.resourceCall(t, "GET", tok.AccessToken, rp); resp.StatusCode != 401 {
		t.Errorf("replay at the resource: %s", resp.Status)
	}
	e.as.expectRejection(t, mark, "resource.error", "invalid_dpop_proof", "jti replayed")
}

// A token bound to one keyd key, proven with another: the resource's
// cnf.jkt check and oidc-provider's userinfo both refuse.
func (e *env) testProofFromAnotherKey(t *testing.T) {
	tok := e.token(t, "dpop")
	rn := e.rsNonce(t, tok.AccessToken)
	other := activeKid(t, e.kc, "dpop-other")
	mark := e.as.mark()
	resp, _ := e.resourceCall(t, "GET", tok.AccessToken, e.proof(t, "dpop-other", "GET", e.resource, client.WithAccessToken(tok.AccessToken), client.WithNonce(rn)))
	if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
		t.Errorf("resource: %s %s", resp.Status, resp.Header.Get("WWW-Authenticate"))
	}
	e.as.expectRejection(t, mark, "resource.error", "invalid_token",
		fmt.Sprintf("DPoP proof key %s does not match the access token's cnf.jkt %s", other, client.BoundKid(tok)))

	// The same at the authorization server's userinfo, through a client
	// whose transport proves with the other key set.
	o := e.oauth(t, client.OAuthConfig{ClientID: clientID, AssertionKeySet: "assert", DPoPKeySet: "dpop-other", Scopes: []string{"openid"}, RedirectURL: e.issuer + "/cb"})
	verifier := oauth2.GenerateVerifier()
	authURL, _ := o.AuthCodeURL("st-2", verifier, nil)
	code := e.authorize(t, authURL, "st-2")
	utok, err := o.Exchange(testCtx(t), code, verifier)
	if err != nil {
		t.Fatal(err)
	}
	// A client proving with the dpop key set, handed the token without its
	// bound kid, proves with dpop's active key.
	wrong := e.oauth(t, client.OAuthConfig{ClientID: clientID, AssertionKeySet: "assert", DPoPKeySet: "dpop"})
	stripped := utok.WithExtra(map[string]any{})
	mark = e.as.mark()
	getJSON(t, wrong.Client(oauth2.StaticTokenSource(stripped)), e.issuer+"/oauth2/v1/userinfo", 401)
	e.as.expectRejection(t, mark, "userinfo.error", "invalid_token", "failed jkt verification")
}

// Assertions for other audiences are refused: one for a server keyd's
// configuration does not name, and one for the token endpoint at a client
// that takes only the issuer.
func (e *env) testAssertionAudience(t *testing.T) {
	for _, tc := range []struct{ keyset, reason string }{
		{"wrong-aud", "audience (aud) must equal the endpoint url, issuer identifier or token endpoint url"},
		{"assert-token-endpoint", "audience (aud) must be " + e.issuer + " for client " + clientID},
	} {
		mark := e.as.mark()
		o := e.oauth(t, client.OAuthConfig{ClientID: clientID, AssertionKeySet: tc.keyset, DPoPKeySet: "dpop"})
		_, err := o.ClientCredentialsToken(testCtx(t))
		expectOAuthError(t, err, "invalid_client")
		e.as.expectRejection(t, mark, "grant.error", "invalid_client", tc.reason)
	}
}

// keyd will not sign an expired assertion, so the test builds one with its
// own registered key (go-jose): the same assertion, unexpired, works.
func (e *env) testExpiredAssertion(t *testing.T) {
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: e.testKey},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader(jose.HeaderKey("kid"), testKid))
	if err != nil {
		t.Fatal(err)
	}
	build := func(iat time.Time) string {
		jti := make([]byte, 16)
		rand.Read(jti)
		s, err := jwt.Signed(signer).Claims(jwt.Claims{
			Issuer: clientID, Subject: clientID, Audience: jwt.Audience{e.issuer},
			ID: base64.RawURLEncoding.EncodeToString(jti), IssuedAt: jwt.NewNumericDate(iat), Expiry: jwt.NewNumericDate(iat.Add(60 * time.Second)),
		}).Serialize()
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	nonce := e.asNonce(t)
	if resp, body := e.rawToken(t, e.proof(t, "dpop", "POST", e.tokenURL, client.WithNonce(nonce)), build(time.Now())); resp.StatusCode != 200 {
		t.Fatalf("a fresh hand-built assertion: %s %v", resp.Status, body)
	}
	mark := e.as.mark()
	resp, body := e.rawToken(t, e.proof(t, "dpop", "POST", e.tokenURL, client.WithNonce(nonce)), build(time.Now().Add(-10*time.Minute)))
	if resp.StatusCode != 401 || body["error"] != "invalid_client" {
		t.Errorf("expired assertion: %s %v, want 401 invalid_client", resp.Status, body)
	}
	e.as.expectRejection(t, mark, "grant.error", "invalid_client", "jwt expired")
}

// The client is registered with dpop_bound_access_tokens: no proof, no
// token.
func (e *env) testDPoPRequired(t *testing.T) {
	mark := e.as.mark()
	resp, body := e.rawToken(t, "", e.assertion(t, "assert"))
	if resp.StatusCode != 400 || body["error"] != "invalid_grant" {
		t.Errorf("no proof: %s %v", resp.Status, body)
	}
	e.as.expectRejection(t, mark, "grant.error", "invalid_grant", "DPoP proof JWT not provided")
}

// keyd token and keyd request, the real binary against the real server.
func (e *env) testCLI(t *testing.T) {
	common := []string{"--socket", e.keyd.socket, "--issuer", e.issuer, "--dpop-keyset", "dpop"}
	std := append(append([]string(nil), common...), "--client-id", clientID, "--assertion-keyset", "assert")

	out, errOut, status := runKeyd(t, e.bin, append([]string{"token", "--scope", "api:read", "--resource", e.resource}, std...)...)
	if status != 0 {
		t.Fatalf("keyd token: exit %d: %s", status, errOut)
	}
	var tok map[string]any
	if err := json.Unmarshal([]byte(out), &tok); err != nil {
		t.Fatalf("keyd token printed %q: %v", out, err)
	}
	if tok["token_type"] != "DPoP" || tok["access_token"] == "" || tok[client.ExtraBoundKid] != activeKid(t, e.kc, "dpop") || tok["scope"] != "api:read" {
		t.Errorf("keyd token printed %v", tok)
	}

	out, errOut, status = runKeyd(t, e.bin, append([]string{"request"}, append(std, e.resource)...)...)
	var got map[string]any
	if status != 0 || json.Unmarshal([]byte(out), &got) != nil || got["client_id"] != clientID || got["method"] != "GET" {
		t.Errorf("keyd request: exit %d, stdout %q, stderr %q", status, out, errOut)
	}

	out, errOut, status = runKeyd(t, e.bin, append([]string{"request", "-X", "PUT", "-d", "a=1&b=2", "-H", "X-Keyd-Test: yes"}, append(std, e.resource)...)...)
	got = nil
	if status != 0 || json.Unmarshal([]byte(out), &got) != nil || got["method"] != "PUT" || got["body"] != "a=1&b=2" ||
		got["x_keyd_test"] != "yes" || got["content_type"] != "application/x-www-form-urlencoded" {
		t.Errorf("keyd request -X PUT -d: exit %d, stdout %q, stderr %q", status, out, errOut)
	}

	out, errOut, status = runKeyd(t, e.bin, append([]string{"request"}, append(std, e.resource+"/nobody")...)...)
	if status != 1 || !strings.Contains(out, `"error":"not_found"`) || !strings.Contains(errOut, "keyd: GET "+e.resource+"/nobody: HTTP 404 Not Found") {
		t.Errorf("keyd request for a missing resource: exit %d, stdout %q, stderr %q", status, out, errOut)
	}

	// The Okta flow by configuration.
	okta := append(append([]string(nil), "--socket", e.keyd.socket, "--issuer", e.issuer, "--dpop-keyset", "okta-dpop",
		"--client-id", oktaClientID, "--assertion-keyset", "okta-assert", "--scope", "okta.users.read"), e.resource)
	out, errOut, status = runKeyd(t, e.bin, append([]string{"request"}, okta...)...)
	got = nil
	if status != 0 || json.Unmarshal([]byte(out), &got) != nil || got["client_id"] != oktaClientID || got["scope"] != "okta.users.read" {
		t.Errorf("keyd request (Okta style): exit %d, stdout %q, stderr %q", status, out, errOut)
	}

	// --client-id must be the key set's.
	_, errOut, status = runKeyd(t, e.bin, append([]string{"token"}, append(common, "--client-id", clientID, "--assertion-keyset", "okta-assert")...)...)
	if status != 1 || !strings.Contains(errOut, `client_id "keyd-e2e" does not match key set okta-assert, whose assertions are for client_id "0oa-okta-e2e"`) {
		t.Errorf("mismatched --client-id: exit %d, stderr %q", status, errOut)
	}
	// A server error is one line.
	_, errOut, status = runKeyd(t, e.bin, append([]string{"token"}, append(common, "--client-id", clientID, "--assertion-keyset", "wrong-aud")...)...)
	if status != 1 || errOut != "keyd: oauth2: \"invalid_client\" \"client authentication failed\"\n" {
		t.Errorf("refused client: exit %d, stderr %q", status, errOut)
	}
}

func activeKid(t *testing.T, kc *client.Client, keyset string) string {
	t.Helper()
	k, err := kc.ActiveKey(testCtx(t), keyset)
	if err != nil {
		t.Fatal(err)
	}
	return k.Kid
}

func getJSON(t *testing.T, hc *http.Client, target string, status int) map[string]any {
	t.Helper()
	return doJSON(t, hc, "GET", target, "", status)
}

func doJSON(t *testing.T, hc *http.Client, method, target, body string, status int) map[string]any {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(testCtx(t), method, target, r)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != status {
		t.Fatalf("%s %s: %s %s (WWW-Authenticate: %s), want %d", method, target, resp.Status, b, resp.Header.Get("WWW-Authenticate"), status)
	}
	var m map[string]any
	json.Unmarshal(b, &m)
	return m
}

func expectOAuthError(t *testing.T, err error, code string) {
	t.Helper()
	var rerr *oauth2.RetrieveError
	if !errors.As(err, &rerr) || rerr.ErrorCode != code {
		t.Fatalf("err = %v, want the server's %s", err, code)
	}
}

func jwtClaims(compact string) map[string]any {
	parts := strings.Split(compact, ".")
	if len(parts) != 3 {
		return nil
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return nil
	}
	var m map[string]any
	json.Unmarshal(b, &m)
	return m
}

func parseQuery(s string) (url.Values, error) { return url.ParseQuery(s) }

// jwtHeader returns the protected header of a compact JWS (unverified).
func jwtHeader(compact string) map[string]any {
	h, _, ok := strings.Cut(compact, ".")
	if !ok {
		return nil
	}
	b, err := base64.RawURLEncoding.DecodeString(h)
	if err != nil {
		return nil
	}
	var m map[string]any
	json.Unmarshal(b, &m)
	return m
}

// proofJKT returns the RFC 7638 thumbprint of a DPoP proof's jwk header
// (the key that signed it, for a proof that verifies), or "".
func proofJKT(proof string) string {
	raw, err := json.Marshal(jwtHeader(proof)["jwk"])
	if err != nil {
		return ""
	}
	var k jose.JSONWebKey
	if k.UnmarshalJSON(raw) != nil {
		return ""
	}
	tp, err := k.Thumbprint(crypto.SHA256)
	if err != nil {
		return ""
	}
	return base64.RawURLEncoding.EncodeToString(tp)
}
