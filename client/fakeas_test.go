package client_test

import (
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/config"
	"github.com/keyd-dev/keyd/internal/daemon"
)

// startKeyd runs a real keyd daemon in this process, on the soft keystore,
// with key sets "dpop" and "dpop2" (dpop, ES256), "dpop-short" (dpop,
// ES256, tokens of 1s and a drain of 1.5s) and "assert" (client_assertion
// for client_id "c1", audience aud), and returns a client of it. The test
// is an admin (it runs as the daemon's uid). The daemon and the client are stopped at cleanup.
func startKeyd(t *testing.T, aud string) *client.Client {
	t.Helper()
	dir, err := os.MkdirTemp("", "kd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "k.sock")
	uid := os.Geteuid()
	yaml := fmt.Sprintf(`socket: %s
socket_mode: "0600"
state_dir: %s
backend: {soft: {}}
keysets:
  - {name: dpop, purpose: dpop, alg: ES256, allow: {uids: [%[3]d]}}
  - {name: dpop2, purpose: dpop, alg: ES256, allow: {uids: [%[3]d]}}
  - {name: dpop-short, purpose: dpop, alg: ES256, token_lifetime: 1s, rotation: {period: 1h, drain: 1500ms}, allow: {uids: [%[3]d]}}
  - {name: assert, purpose: client_assertion, alg: ES256, client_id: c1, audience: %q, allow: {uids: [%[3]d]}}
`, socket, filepath.Join(dir, "state"), uid, aud)
	cfg, err := config.Parse([]byte(yaml), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := daemon.New(ctx, cfg, daemon.Options{})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("keyd: %v", err)
		}
	})
	kc, err := client.Dial(socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kc.Close() })
	return kc
}

// attempt is what the fake authorization server saw of one request.
type attempt struct {
	path         string
	form         map[string][]string
	proof        proofSeen
	assertionJTI string
	assertionIat int64
	assertionExp int64
	status       int
	body         string
	authz        string
}

type proofSeen struct {
	jti, htm, htu, nonce, ath string
	iat                       int64
	jkt                       string
	err                       string // why the proof did not verify
}

// fakeAS is an authorization server and resource server in one, enough to
// watch the client's requests: it verifies DPoP proofs with go-jose, reads
// the client assertion (unverified), and answers as its fields say.
type fakeAS struct {
	t   *testing.T
	srv *httptest.Server

	mu sync.Mutex
	// requireNonce makes the token endpoint demand asNonce.
	requireNonce bool
	asNonce      string
	// rotateNonce issues a new nonce with every challenge, and rejects
	// every nonce: the client never gets through.
	rotateNonce bool
	// nonceOn200 is sent as DPoP-Nonce on successful token responses.
	nonceOn200 string
	// rsNonce is the nonce the resource (/api) demands, "" for none;
	// rsRotate makes it demand a new one every time.
	rsNonce  string
	rsRotate bool
	// clock is how far the server's clock is ahead of ours; proofs and
	// assertions whose iat is more than 5s from it are rejected.
	clock     time.Duration
	checkIat  bool
	tokenType string
	expiresIn int
	refresh   string // refresh_token to issue
	tokens    int    // tokens issued
	attempts  []attempt
	revoked   []string
}

func newFakeAS(t *testing.T) *fakeAS {
	f := &fakeAS{t: t, asNonce: "as-nonce-1", tokenType: "DPoP", expiresIn: 3600}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeAS) url() string { return f.srv.URL }

func (f *fakeAS) seen() []attempt {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]attempt(nil), f.attempts...)
}

func (f *fakeAS) set(fn func(f *fakeAS)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakeAS) serve(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now().Add(f.clock)
	w.Header().Set("Date", now.UTC().Format(http.TimeFormat))
	body, _ := io.ReadAll(r.Body)
	a := attempt{path: r.URL.Path, authz: r.Header.Get("Authorization"), body: string(body)}
	a.proof = verifyProof(r.Header.Get("DPoP"))
	reply := func(status int, v any) {
		a.status = status
		f.attempts = append(f.attempts, a)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(v)
	}
	oauthErr := func(code, desc string) map[string]string {
		return map[string]string{"error": code, "error_description": desc}
	}

	switch r.URL.Path {
	case "/.well-known/oauth-authorization-server": // not recorded
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{
			"issuer":                 f.srv.URL,
			"token_endpoint":         f.srv.URL + "/token",
			"authorization_endpoint": f.srv.URL + "/authorize",
			"revocation_endpoint":    f.srv.URL + "/revoke",
		})
		return
	case "/api":
		if a.proof.err != "" {
			w.Header().Set("WWW-Authenticate", `DPoP error="invalid_dpop_proof", error_description="`+a.proof.err+`"`)
			reply(401, oauthErr("invalid_dpop_proof", a.proof.err))
			return
		}
		if f.checkIat && abs(now.Unix()-a.proof.iat) > 5 {
			w.Header().Set("WWW-Authenticate", `DPoP error="invalid_dpop_proof", error_description="iat is not recent"`)
			reply(401, oauthErr("invalid_dpop_proof", "iat is not recent"))
			return
		}
		if slices.Contains(f.revoked, strings.TrimPrefix(a.authz, "DPoP ")) {
			w.Header().Set("WWW-Authenticate", `DPoP error="invalid_token", error_description="The access token is revoked"`)
			reply(401, oauthErr("invalid_token", "revoked"))
			return
		}
		if f.rsNonce != "" && (f.rsRotate || a.proof.nonce != f.rsNonce) {
			if f.rsRotate {
				f.rsNonce = fmt.Sprintf("rs-%d", len(f.attempts))
			}
			w.Header().Set("WWW-Authenticate", `DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof"`)
			w.Header().Set("DPoP-Nonce", f.rsNonce)
			reply(401, oauthErr("use_dpop_nonce", "nonce"))
			return
		}
		reply(200, map[string]string{"ok": "yes", "body": string(body)})
		return
	}

	// Token and revocation endpoints: form, assertion, proof.
	form, _ := parseForm(string(body))
	a.form = form
	if as := first(form["client_assertion"]); as != "" {
		claims := jwtClaims(as)
		a.assertionJTI, _ = claims["jti"].(string)
		a.assertionIat = int64(num(claims["iat"]))
		a.assertionExp = int64(num(claims["exp"]))
	}
	if a.proof.err != "" {
		reply(400, oauthErr("invalid_dpop_proof", a.proof.err))
		return
	}
	if f.checkIat && (abs(now.Unix()-a.proof.iat) > 5 || abs(now.Unix()-a.assertionIat) > 5) {
		reply(400, oauthErr("invalid_dpop_proof", "DPoP proof iat is not recent enough"))
		return
	}
	if f.requireNonce && (f.rotateNonce || a.proof.nonce != f.asNonce) {
		if f.rotateNonce {
			f.asNonce = fmt.Sprintf("as-%d", len(f.attempts))
		}
		w.Header().Set("DPoP-Nonce", f.asNonce)
		reply(400, oauthErr("use_dpop_nonce", "Authorization server requires nonce in DPoP proof"))
		return
	}
	if f.nonceOn200 != "" {
		w.Header().Set("DPoP-Nonce", f.nonceOn200)
		f.asNonce = f.nonceOn200
	}
	switch r.URL.Path {
	case "/revoke":
		f.revoked = append(f.revoked, first(form["token"]))
		a.status = 200
		f.attempts = append(f.attempts, a)
		w.WriteHeader(200)
		return
	case "/token":
		f.tokens++
		resp := map[string]any{
			"access_token": fmt.Sprintf("at-%d", f.tokens),
			"token_type":   f.tokenType,
			"scope":        first(form["scope"]),
		}
		if f.expiresIn > 0 {
			resp["expires_in"] = f.expiresIn
		}
		if f.refresh != "" {
			resp["refresh_token"] = f.refresh
		}
		reply(200, resp)
		return
	}
	reply(404, oauthErr("not_found", r.URL.Path))
}

func abs(n int64) int64 {
	if n < 0 {
		return -n
	}
	return n
}

func first(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

func num(v any) float64 {
	n, _ := v.(float64)
	return n
}

func parseForm(s string) (map[string][]string, error) {
	req, _ := http.NewRequest("POST", "/", strings.NewReader(s))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	err := req.ParseForm()
	return req.PostForm, err
}

func jwtClaims(jwt string) map[string]any {
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return nil
	}
	b, _ := base64.RawURLEncoding.DecodeString(parts[1])
	var m map[string]any
	json.Unmarshal(b, &m)
	return m
}

// verifyProof checks a DPoP proof's signature with its embedded key and
// returns its claims.
func verifyProof(proof string) proofSeen {
	if proof == "" {
		return proofSeen{err: "no DPoP proof"}
	}
	jws, err := jose.ParseSigned(proof, []jose.SignatureAlgorithm{jose.ES256, jose.ES384, jose.RS256, jose.PS256, jose.EdDSA})
	if err != nil {
		return proofSeen{err: err.Error()}
	}
	h := jws.Signatures[0].Protected
	if h.JSONWebKey == nil || h.ExtraHeaders["typ"] != "dpop+jwt" {
		return proofSeen{err: "not a dpop+jwt with a jwk"}
	}
	payload, err := jws.Verify(h.JSONWebKey)
	if err != nil {
		return proofSeen{err: err.Error()}
	}
	var c struct {
		JTI   string `json:"jti"`
		HTM   string `json:"htm"`
		HTU   string `json:"htu"`
		Nonce string `json:"nonce"`
		ATH   string `json:"ath"`
		IAT   int64  `json:"iat"`
	}
	if err := json.Unmarshal(payload, &c); err != nil {
		return proofSeen{err: err.Error()}
	}
	tp, _ := h.JSONWebKey.Thumbprint(crypto.SHA256)
	return proofSeen{jti: c.JTI, htm: c.HTM, htu: c.HTU, nonce: c.Nonce, ath: c.ATH, iat: c.IAT, jkt: base64.RawURLEncoding.EncodeToString(tp)}
}

func ath(token string) string {
	sum := sha256.Sum256([]byte(token))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}
