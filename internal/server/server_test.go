package server_test

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	josejwt "github.com/go-jose/go-jose/v4/jwt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/audit"
	"github.com/keyd-dev/keyd/internal/authz"
	"github.com/keyd-dev/keyd/internal/listener"
	"github.com/keyd-dev/keyd/internal/metrics"
	"github.com/keyd-dev/keyd/internal/policy"
	"github.com/keyd-dev/keyd/internal/server"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/soft"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
	"github.com/keyd-dev/keyd/rotation"
)

// testKeySet is a key set for a test server.
type testKeySet struct {
	name    string
	purpose policy.Purpose
	spec    keystore.KeySpec
	uids    []int
	pol     policy.Policy
	sched   rotation.Schedule
}

type env struct {
	socket  string
	grpc    *grpc.Server
	srv     *server.Server
	mgr     *rotation.Manager
	cl      *client.Client
	audit   *memAudit
	backend keystore.Backend
	metrics *metrics.Metrics

	grpcOpts []grpc.ServerOption
}

// memAudit keeps records in memory and can be told to fail.
type memAudit struct {
	mu   sync.Mutex
	recs []audit.Record
	fail bool
}

func (a *memAudit) Record(r audit.Record) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.fail {
		return fmt.Errorf("%w: disk full", audit.ErrWrite)
	}
	a.recs = append(a.recs, r)
	return nil
}

func (a *memAudit) records() []audit.Record {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]audit.Record(nil), a.recs...)
}

// shortDir returns a directory whose path is short enough for a Unix socket.
func shortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "kd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

var defaultSets = []testKeySet{
	{name: "dpop", purpose: policy.DPoP, spec: keystore.KeySpec{Algorithm: keystore.ES256}},
	{name: "assert", purpose: policy.ClientAssertion, spec: keystore.KeySpec{Algorithm: keystore.ES256},
		pol: policy.Policy{ClientID: "0oa1example", Audience: "https://issuer.example.com"}},
	{name: "idt", purpose: policy.JWT, spec: keystore.KeySpec{Algorithm: keystore.RS256},
		pol: policy.Policy{Issuers: []string{"https://op.example.com"}, MaxLifetime: time.Hour}},
	{name: "forbidden", purpose: policy.DPoP, spec: keystore.KeySpec{Algorithm: keystore.ES256}, uids: []int{4242}},
}

type envOpts struct {
	signRate  float64
	signBurst int
	metrics   bool
	admins    []int
	wrap      func(keystore.Backend) keystore.Backend
	backend   keystore.Backend
	// grpcOpts are added to the gRPC server's options.
	grpcOpts []grpc.ServerOption
	// stop is the server's Config.Stop.
	stop <-chan struct{}
}

func newEnv(t testing.TB, sets []testKeySet, opts envOpts) *env {
	t.Helper()
	dir := shortDir(t)
	var backend keystore.Backend
	if opts.backend != nil {
		backend = opts.backend
	} else {
		b, err := soft.New(soft.Config{Dir: filepath.Join(dir, "keys")})
		if err != nil {
			t.Fatal(err)
		}
		backend = b
	}
	if opts.wrap != nil {
		backend = opts.wrap(backend)
	}
	store, err := rotation.OpenStore(filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	var rsets []rotation.KeySet
	policies := map[string]server.KeySet{}
	for _, s := range sets {
		rsets = append(rsets, rotation.KeySet{Name: s.name, Purpose: string(s.purpose), Spec: s.spec, Schedule: s.sched})
		uids := s.uids
		if uids == nil {
			uids = []int{os.Geteuid()}
		}
		allow, err := authz.NewList(authz.Spec{UIDs: uids}, nil)
		if err != nil {
			t.Fatal(err)
		}
		p := s.pol
		p.Purpose = s.purpose
		policies[s.name] = server.KeySet{Allow: allow, Policy: p}
	}
	mgr, err := rotation.New(context.Background(), rotation.Config{Backend: backend, Store: store, KeySets: rsets})
	if err != nil {
		t.Fatal(err)
	}
	admins := opts.admins
	if admins == nil {
		admins = []int{os.Geteuid()}
	}
	adminList, err := authz.NewList(authz.Spec{UIDs: admins}, nil)
	if err != nil {
		t.Fatal(err)
	}
	aud := &memAudit{}
	var m *metrics.Metrics
	if opts.metrics {
		m = metrics.New(backend.Name(), mgr)
	}
	srv, err := server.New(server.Config{Manager: mgr, KeySets: policies, Admins: adminList, Audit: aud,
		Metrics: m, SignRate: opts.signRate, SignBurst: opts.signBurst, Stop: opts.stop})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{socket: filepath.Join(dir, "k.sock"), srv: srv, mgr: mgr, audit: aud, backend: backend, metrics: m, grpcOpts: opts.grpcOpts}
	e.serve(t)
	cl, err := client.Dial(e.socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	e.cl = cl
	return e
}

// serveManager serves mgr's key sets (this test's uid allowed, audited in
// memory) on a socket in dir, and returns a client dialled to it.
func serveManager(t testing.TB, dir string, mgr *rotation.Manager, sets map[string]server.KeySet) *client.Client {
	t.Helper()
	srv, err := server.New(server.Config{Manager: mgr, Audit: &memAudit{}, KeySets: sets})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{socket: filepath.Join(dir, "k.sock"), srv: srv, mgr: mgr}
	e.serve(t)
	cl, err := client.Dial(e.socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// allowMe allows this test's uid.
func allowMe(t testing.TB) *authz.List {
	t.Helper()
	allow, err := authz.NewList(authz.Spec{UIDs: []int{os.Geteuid()}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return allow
}

// serve starts (or restarts) the gRPC server on the env's socket.
func (e *env) serve(t testing.TB) {
	t.Helper()
	lis, err := listener.Unix(e.socket, 0o600, -1)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(authz.PeerCredentials())}, e.grpcOpts...)...)
	e.srv.Register(g)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	e.grpc = g
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

var allAlgs = []jose.SignatureAlgorithm{jose.ES256, jose.ES384, jose.RS256, jose.PS256, jose.EdDSA}

// verify checks token with go-jose against the daemon's JWKS and returns
// the header and the claims.
func verify(t testing.TB, e *env, keyset, token string) (jose.Header, map[string]any) {
	t.Helper()
	raw, err := e.cl.JWKS(ctx(t), keyset)
	if err != nil {
		t.Fatal(err)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(raw, &set); err != nil {
		t.Fatal(err)
	}
	jws, err := jose.ParseSigned(token, allAlgs)
	if err != nil {
		t.Fatalf("go-jose cannot parse %s: %v", token, err)
	}
	h := jws.Signatures[0].Header
	var key *jose.JSONWebKey
	if h.JSONWebKey != nil {
		tp, err := h.JSONWebKey.Thumbprint(crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		kid := base64.RawURLEncoding.EncodeToString(tp)
		for i := range set.Keys {
			if set.Keys[i].KeyID == kid {
				key = &set.Keys[i]
			}
		}
		if key == nil {
			t.Fatalf("the proof's jwk (thumbprint %s) is not in the JWKS", kid)
		}
	} else {
		ks := set.Key(h.KeyID)
		if len(ks) != 1 {
			t.Fatalf("kid %q: %d keys in JWKS", h.KeyID, len(ks))
		}
		key = &ks[0]
	}
	tp, _ := key.Thumbprint(crypto.SHA256)
	if got := base64.RawURLEncoding.EncodeToString(tp); got != key.KeyID {
		t.Fatalf("JWKS kid %s is not the RFC 7638 thumbprint %s", key.KeyID, got)
	}
	payload, err := jws.Verify(key.Key)
	if err != nil {
		t.Fatalf("go-jose does not verify the token: %v", err)
	}
	var claims map[string]any
	if err := json.Unmarshal(payload, &claims); err != nil {
		t.Fatal(err)
	}
	return h, claims
}

func TestDPoPProof(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	p, err := e.cl.DPoP("dpop").Proof(ctx(t), "POST", "https://Server.Example.com:443/token?x=1#f",
		client.WithAccessToken("tok-123"), client.WithNonce("n-1"))
	if err != nil {
		t.Fatal(err)
	}
	h, claims := verify(t, e, "dpop", p.JWT)
	if h.ExtraHeaders["typ"] != "dpop+jwt" || h.Algorithm != "ES256" || h.KeyID != "" {
		t.Errorf("header: typ %v alg %v kid %q", h.ExtraHeaders["typ"], h.Algorithm, h.KeyID)
	}
	if !h.JSONWebKey.IsPublic() {
		t.Error("the proof's jwk is not public")
	}
	hb, _ := base64.RawURLEncoding.DecodeString(strings.Split(p.JWT, ".")[0])
	if strings.Contains(string(hb), `"d"`) {
		t.Errorf("private member in header %s", hb)
	}
	sum := sha256.Sum256([]byte("tok-123"))
	want := map[string]any{
		"htm":   "POST",
		"htu":   "https://server.example.com/token",
		"nonce": "n-1",
		"ath":   base64.RawURLEncoding.EncodeToString(sum[:]),
	}
	for k, v := range want {
		if claims[k] != v {
			t.Errorf("claim %s = %v, want %v", k, claims[k], v)
		}
	}
	if jti, _ := claims["jti"].(string); len(jti) < 16 {
		t.Errorf("jti %q", jti)
	}
	if iat, _ := claims["iat"].(float64); time.Since(time.Unix(int64(iat), 0)).Abs() > time.Minute {
		t.Errorf("iat %v", claims["iat"])
	}
	sig, _ := base64.RawURLEncoding.DecodeString(strings.Split(p.JWT, ".")[2])
	if len(sig) != 64 {
		t.Errorf("ES256 signature has %d bytes, want 64", len(sig))
	}
	// Every proof has a fresh jti.
	p2, err := e.cl.DPoP("dpop").Proof(ctx(t), "POST", "https://server.example.com/token")
	if err != nil {
		t.Fatal(err)
	}
	_, c2 := verify(t, e, "dpop", p2.JWT)
	if c2["jti"] == claims["jti"] {
		t.Error("jti reused")
	}
	if _, ok := c2["nonce"]; ok {
		t.Error("nonce set without one")
	}
}

func TestClientAssertion(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	tok, err := e.cl.ClientAssertion(ctx(t), "assert")
	if err != nil {
		t.Fatal(err)
	}
	h, claims := verify(t, e, "assert", tok)
	if h.ExtraHeaders["typ"] != "client-authentication+jwt" || h.KeyID == "" {
		t.Errorf("header typ %v kid %q", h.ExtraHeaders["typ"], h.KeyID)
	}
	if claims["iss"] != "0oa1example" || claims["sub"] != "0oa1example" {
		t.Errorf("iss %v sub %v", claims["iss"], claims["sub"])
	}
	if claims["aud"] != "https://issuer.example.com" {
		t.Errorf("aud %#v, want the issuer as a single string", claims["aud"])
	}
	iat, exp := claims["iat"].(float64), claims["exp"].(float64)
	if exp <= iat || exp-iat > 300 {
		t.Errorf("iat %v exp %v", iat, exp)
	}
	// RFC 7523 validation with go-jose's jwt package.
	parsed, err := josejwt.ParseSigned(tok, allAlgs)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := e.cl.JWKS(ctx(t), "assert")
	var set jose.JSONWebKeySet
	json.Unmarshal(raw, &set)
	var std josejwt.Claims
	if err := parsed.Claims(set.Keys[0].Key, &std); err != nil {
		t.Fatal(err)
	}
	if err := std.Validate(josejwt.Expected{Issuer: "0oa1example", Subject: "0oa1example", AnyAudience: josejwt.Audience{"https://issuer.example.com"}, Time: time.Now()}); err != nil {
		t.Errorf("go-jose rejects the assertion: %v", err)
	}
}

func TestEveryAlgorithm(t *testing.T) {
	specs := []keystore.KeySpec{
		{Algorithm: keystore.ES256}, {Algorithm: keystore.ES384},
		{Algorithm: keystore.RS256}, {Algorithm: keystore.PS256},
		{Algorithm: keystore.PS256, RSABits: 3072}, {Algorithm: keystore.EdDSA},
	}
	var sets []testKeySet
	for i, s := range specs {
		sets = append(sets, testKeySet{name: fmt.Sprintf("k%d", i), purpose: policy.JWT, spec: s,
			pol: policy.Policy{Issuers: []string{"https://op.example.com"}}})
	}
	e := newEnv(t, sets, envOpts{})
	for i, s := range specs {
		t.Run(s.String(), func(t *testing.T) {
			signed, err := e.cl.Sign(ctx(t), client.SignRequest{KeySet: fmt.Sprintf("k%d", i),
				Claims: map[string]any{"iss": "https://op.example.com", "sub": "u1", "exp": time.Now().Add(time.Minute).Unix()},
				Header: map[string]any{"typ": "JWT"}})
			if err != nil {
				t.Fatal(err)
			}
			h, _ := verify(t, e, fmt.Sprintf("k%d", i), signed.JWT)
			if h.Algorithm != string(s.Algorithm) || h.ExtraHeaders["typ"] != "JWT" {
				t.Errorf("header alg %s typ %v", h.Algorithm, h.ExtraHeaders["typ"])
			}
			if s.Algorithm == keystore.PS256 {
				// RFC 7518 §3.5: salt length = hash length, checked strictly.
				parts := strings.Split(signed.JWT, ".")
				sig, _ := base64.RawURLEncoding.DecodeString(parts[2])
				raw, _ := e.cl.JWKS(ctx(t), fmt.Sprintf("k%d", i))
				var set jose.JSONWebKeySet
				json.Unmarshal(raw, &set)
				d := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
				pub := set.Keys[0].Key.(*rsa.PublicKey)
				if pub.N.BitLen() != s.Bits() {
					t.Errorf("modulus %d bits, want %d", pub.N.BitLen(), s.Bits())
				}
				if err := rsa.VerifyPSS(pub, crypto.SHA256, d[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}); err != nil {
					t.Errorf("PS256 salt is not the hash length: %v", err)
				}
			}
		})
	}
}

func code(err error) codes.Code { return status.Code(err) }

func TestPolicyViolations(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	exp := time.Now().Add(time.Minute).Unix()
	cases := []struct {
		name  string
		req   client.SignRequest
		claim string
	}{
		{"dpop without htm", client.SignRequest{KeySet: "dpop", Claims: map[string]any{"htu": "https://a.example/"}}, "htm"},
		{"dpop htu with query", client.SignRequest{KeySet: "dpop", Claims: map[string]any{"htm": "GET", "htu": "https://a.example/?q=1"}}, "htu"},
		{"dpop relative htu", client.SignRequest{KeySet: "dpop", Claims: map[string]any{"htm": "GET", "htu": "/token"}}, "htu"},
		{"dpop bad ath", client.SignRequest{KeySet: "dpop", Claims: map[string]any{"htm": "GET", "htu": "https://a.example/", "ath": "short"}}, "ath"},
		{"dpop stale iat", client.SignRequest{KeySet: "dpop", Claims: map[string]any{"htm": "GET", "htu": "https://a.example/", "iat": time.Now().Add(-time.Hour).Unix()}}, "iat"},
		{"dpop header alg", client.SignRequest{KeySet: "dpop", Claims: map[string]any{"htm": "GET", "htu": "https://a.example/"}, Header: map[string]any{"alg": "none"}}, "alg"},
		{"dpop signs an assertion", client.SignRequest{KeySet: "dpop", Claims: map[string]any{"iss": "x", "aud": "y"}}, ""},
		{"assertion audience injection", client.SignRequest{KeySet: "assert", Claims: map[string]any{"aud": "https://attacker.example"}}, "aud"},
		{"assertion audience array", client.SignRequest{KeySet: "assert", Claims: map[string]any{"aud": []string{"https://issuer.example.com"}}}, "aud"},
		{"assertion other client", client.SignRequest{KeySet: "assert", Claims: map[string]any{"iss": "someone-else"}}, "iss"},
		{"assertion long-lived", client.SignRequest{KeySet: "assert", Claims: map[string]any{"exp": time.Now().Add(time.Hour).Unix()}}, "exp"},
		{"assertion with htm", client.SignRequest{KeySet: "assert", Claims: map[string]any{"htm": "GET"}}, "htm"},
		{"jwt foreign issuer", client.SignRequest{KeySet: "idt", Claims: map[string]any{"iss": "https://evil.example", "exp": exp}}, "iss"},
		{"jwt header kid", client.SignRequest{KeySet: "idt", Claims: map[string]any{"iss": "https://op.example.com", "exp": exp}, Header: map[string]any{"kid": "x"}}, "kid"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.cl.Sign(ctx(t), tc.req)
			if !errors.Is(err, client.ErrInvalidArgument) {
				t.Fatalf("err = %v, want InvalidArgument", err)
			}
			if tc.claim != "" && !strings.Contains(err.Error(), tc.claim) {
				t.Errorf("message %q does not name %q", err, tc.claim)
			}
		})
	}
	// No backend call was made for any of them: every refusal is audited
	// without a kid-signature pair leaving.
	for _, r := range e.audit.records() {
		if r.Outcome != "InvalidArgument" {
			t.Errorf("audit outcome %q", r.Outcome)
		}
	}
	if n := len(e.audit.records()); n != len(cases) {
		t.Errorf("%d audit records for %d decisions", n, len(cases))
	}
}

func TestPurposeMismatchNamed(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	_, err := e.cl.ClientAssertion(ctx(t), "dpop")
	if !errors.Is(err, client.ErrInvalidArgument) || !strings.Contains(err.Error(), "purpose dpop") {
		t.Fatalf("err = %v", err)
	}
	_, err = e.cl.DPoP("assert").Proof(ctx(t), "GET", "https://a.example/")
	if !errors.Is(err, client.ErrInvalidArgument) || !strings.Contains(err.Error(), "purpose client_assertion") {
		t.Fatalf("err = %v", err)
	}
}

func TestPermissionDeniedIsUniform(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	msg := func(keyset string) string {
		_, err := e.cl.DPoP(keyset).Proof(ctx(t), "GET", "https://a.example/")
		if !errors.Is(err, client.ErrPermissionDenied) {
			t.Fatalf("%s: err = %v, want PermissionDenied", keyset, err)
		}
		return strings.ReplaceAll(err.Error(), keyset, "NAME")
	}
	if a, b := msg("forbidden"), msg("no-such-set"); a != b {
		t.Errorf("forbidden and unknown key sets answer differently:\n%s\n%s", a, b)
	}
	for _, call := range []func() error{
		func() error { _, err := e.cl.JWKS(ctx(t), "forbidden"); return err },
		func() error { _, err := e.cl.ListKeys(ctx(t), "forbidden"); return err },
	} {
		if err := call(); !errors.Is(err, client.ErrPermissionDenied) {
			t.Errorf("err = %v, want PermissionDenied", err)
		}
	}
	// Without naming key sets, a caller sees only its own.
	keys, err := e.cl.ListKeys(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.KeySet == "forbidden" {
			t.Error("ListKeys shows a key set the caller may not use")
		}
	}
	recs := e.audit.records()
	if len(recs) != 2 || recs[0].Outcome != "PermissionDenied" {
		t.Errorf("audit: %+v", recs)
	}
}

func TestAdminOnly(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{admins: []int{4242}})
	if _, err := e.cl.Rotate(ctx(t), "dpop", false); !errors.Is(err, client.ErrPermissionDenied) {
		t.Errorf("rotate: %v", err)
	}
	keys, _ := e.cl.ListKeys(ctx(t), "dpop")
	if _, err := e.cl.Revoke(ctx(t), keys[0].Kid, ""); !errors.Is(err, client.ErrPermissionDenied) {
		t.Errorf("revoke: %v", err)
	}
}

func TestRotateDrainRevoke(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	p1, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/")
	if err != nil {
		t.Fatal(err)
	}
	rot, err := e.cl.Rotate(ctx(t), "dpop", false)
	active, prev := rot.Active, rot.Previous
	if err != nil {
		t.Fatal(err)
	}
	if prev.Kid != p1.Kid || prev.State != "draining" || active.State != "active" || active.Kid == prev.Kid {
		t.Fatalf("rotate: active %+v previous %+v", active, prev)
	}
	// New proofs use the new key; the draining key still signs when named.
	p2, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/")
	if err != nil || p2.Kid != active.Kid {
		t.Fatalf("after rotate: %v kid %s", err, p2.Kid)
	}
	p3, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/", client.WithKid(prev.Kid))
	if err != nil || p3.Kid != prev.Kid {
		t.Fatalf("draining kid: %v kid %s", err, p3.Kid)
	}
	verify(t, e, "dpop", p3.JWT)
	raw, _ := e.cl.JWKS(ctx(t), "dpop")
	if !strings.Contains(string(raw), prev.Kid) || !strings.Contains(string(raw), active.Kid) {
		t.Errorf("JWKS lacks a published key: %s", raw)
	}

	rk, err := e.cl.Revoke(ctx(t), prev.Kid, "dpop")
	if err != nil || rk.State != "revoked" {
		t.Fatalf("revoke: %v %+v", err, rk)
	}
	if _, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/", client.WithKid(prev.Kid)); !errors.Is(err, client.ErrFailedPrecondition) {
		t.Errorf("revoked kid signs: %v", err)
	}
	raw, _ = e.cl.JWKS(ctx(t), "dpop")
	if strings.Contains(string(raw), prev.Kid) {
		t.Errorf("revoked key still published: %s", raw)
	}
	if _, err := e.cl.Revoke(ctx(t), "no-such-kid", ""); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("revoke unknown: %v", err)
	}
	if _, err := e.cl.Revoke(ctx(t), active.Kid, "assert"); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("revoke with the wrong key set: %v", err)
	}
	if _, err := e.cl.Rotate(ctx(t), "no-such-set", false); !errors.Is(err, client.ErrPermissionDenied) {
		t.Errorf("rotate unknown: %v", err)
	}

	// Revoking the active key makes a new active key at once.
	rk, err = e.cl.Revoke(ctx(t), active.Kid, "")
	if err != nil {
		t.Fatal(err)
	}
	now, err := e.cl.ActiveKey(ctx(t), "dpop")
	if err != nil || now.Kid == active.Kid {
		t.Fatalf("after revoking the active key: %v %+v", err, now)
	}
	if _, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/"); err != nil {
		t.Errorf("sign after revoking the active key: %v", err)
	}
}

func TestAuditFailureFailsClosed(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	e.audit.mu.Lock()
	e.audit.fail = true
	e.audit.mu.Unlock()
	_, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/")
	if !errors.Is(err, client.ErrUnavailable) || !strings.Contains(err.Error(), "audit") {
		t.Fatalf("err = %v, want Unavailable naming the audit log", err)
	}
}

func TestAuditRecord(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	if _, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/x?secret=1", client.WithAccessToken("very-secret-token")); err != nil {
		t.Fatal(err)
	}
	recs := e.audit.records()
	if len(recs) != 1 {
		t.Fatalf("%d records", len(recs))
	}
	r := recs[0]
	if r.Outcome != "ok" || r.KeySet != "dpop" || r.Purpose != "dpop" || r.Htm != "GET" || r.Htu != "https://a.example/x" ||
		r.Jti == "" || r.Kid == "" || r.UID != uint32(os.Geteuid()) || r.PID != int32(os.Getpid()) || r.Ath == "" {
		t.Errorf("record %+v", r)
	}
	b, _ := json.Marshal(r)
	if strings.Contains(string(b), "very-secret-token") || strings.Contains(string(b), "secret=1") {
		t.Errorf("audit record leaks the token or query: %s", b)
	}
}

func TestUnauthenticated(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	// A call that did not come through the peer-credential handshake.
	_, err := e.srv.Sign(context.Background(), &keydv1.SignRequest{Keyset: "dpop"})
	if code(err) != codes.Unauthenticated {
		t.Fatalf("err = %v, want Unauthenticated", err)
	}
}

func TestPeerCredentialsRequired(t *testing.T) {
	// A TCP connection has no SO_PEERCRED: the handshake refuses it, never
	// treating it as uid 0.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := net.Dial("tcp", l.Addr().String())
		if err == nil {
			defer c.Close()
			time.Sleep(100 * time.Millisecond)
		}
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, _, err := authz.PeerCredentials().ServerHandshake(c); !errors.Is(err, authz.ErrNoCredentials) {
		t.Fatalf("err = %v, want ErrNoCredentials", err)
	}
}

func TestOpaqueSignerWithGoJose(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	signer, err := e.cl.OpaqueSigner(ctx(t), "idt")
	if err != nil {
		t.Fatal(err)
	}
	js, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: signer}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tok, err := josejwt.Signed(js).Claims(josejwt.Claims{
		Issuer: "https://op.example.com", Subject: "alice", Audience: josejwt.Audience{"rp"},
		IssuedAt: josejwt.NewNumericDate(now), Expiry: josejwt.NewNumericDate(now.Add(5 * time.Minute)), ID: "id-1",
	}).Serialize()
	if err != nil {
		t.Fatalf("go-jose with keyd's OpaqueSigner: %v", err)
	}
	h, claims := verify(t, e, "idt", tok)
	if h.KeyID != signer.Public().KeyID || claims["sub"] != "alice" {
		t.Errorf("header %+v claims %v", h, claims)
	}
	// The policy still applies to tokens built elsewhere.
	bad, err := josejwt.Signed(js).Claims(josejwt.Claims{Issuer: "https://evil.example", Expiry: josejwt.NewNumericDate(now.Add(time.Minute)), IssuedAt: josejwt.NewNumericDate(now), ID: "x"}).Serialize()
	if err == nil || !errors.Is(err, client.ErrInvalidArgument) {
		t.Errorf("foreign issuer signed through the OpaqueSigner: %v %s", err, bad)
	}
}

func TestWatchKeys(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	c, cancel := context.WithCancel(ctx(t))
	defer cancel()
	events := make(chan client.KeyEvent, 16)
	go func() {
		for ev, err := range e.cl.Watch(c, "dpop") {
			if err != nil {
				close(events)
				return
			}
			events <- ev
		}
		close(events)
	}()
	next := func() client.KeyEvent {
		select {
		case ev := <-events:
			return ev
		case <-time.After(10 * time.Second):
			t.Fatal("no event")
		}
		return client.KeyEvent{}
	}
	if ev := next(); ev.Type != "snapshot" || ev.Key.State != "active" {
		t.Fatalf("first event %+v", ev)
	}
	if ev := next(); ev.Type != "synced" {
		t.Fatalf("second event %+v", ev)
	}
	rot, err := e.cl.Rotate(ctx(t), "dpop", false)
	active, prev := rot.Active, rot.Previous
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]client.KeyEvent{}
	for range 2 {
		ev := next()
		got[ev.Key.Kid] = ev
	}
	if ev := got[prev.Kid]; ev.Type != "changed" || ev.Key.State != "draining" || ev.Previous != "active" {
		t.Errorf("old key event %+v", ev)
	}
	if ev := got[active.Kid]; ev.Key.State != "active" || ev.Previous != "" {
		t.Errorf("new key event %+v", ev)
	}
}

// slowBackend blocks signatures until released, to revoke a key mid-sign.
type slowBackend struct {
	keystore.Backend
	entered chan struct{}
	release chan struct{}
}

func (b *slowBackend) Sign(ctx context.Context, id string, d []byte, o crypto.SignerOpts) ([]byte, error) {
	b.entered <- struct{}{}
	<-b.release
	return b.Backend.Sign(ctx, id, d, o)
}

// A key revoked while a signature with it is inside the backend: the
// signature is discarded (FAILED_PRECONDITION). Revocation is enforced here,
// above the backend, never by a token logout (RELIABILITY P5).
func TestRevokedWhileSigningIsDiscarded(t *testing.T) {
	sb := &slowBackend{entered: make(chan struct{}, 1), release: make(chan struct{})}
	e := newEnv(t, defaultSets[:1], envOpts{wrap: func(b keystore.Backend) keystore.Backend { sb.Backend = b; return sb }})
	keys, _ := e.cl.ListKeys(ctx(t), "dpop")
	errc := make(chan error, 1)
	go func() {
		_, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/")
		errc <- err
	}()
	<-sb.entered
	if _, err := e.mgr.Revoke(ctx(t), keys[0].Kid, ""); err != nil {
		t.Fatal(err)
	}
	close(sb.release)
	if err := <-errc; !errors.Is(err, client.ErrFailedPrecondition) {
		t.Fatalf("signature by a key revoked mid-sign: err = %v", err)
	}
}

// R2: a draining key leaves the JWK Set at its retire time; a token it
// signs (a caller names its kid) must expire by then, or verifiers refuse
// it before its exp. The active key signs the same claims.
func TestDrainingKeyTokenOutlivesIt(t *testing.T) {
	idt := defaultSets[2]
	idt.sched = rotation.Schedule{Drain: 30 * time.Second, Retain: time.Hour}
	e := newEnv(t, []testKeySet{idt}, envOpts{})
	old, err := e.cl.Sign(ctx(t), client.SignRequest{KeySet: "idt", Claims: map[string]any{"iss": "https://op.example.com", "exp": time.Now().Add(time.Minute).Unix()}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.Rotate(ctx(t), "idt", true); err != nil {
		t.Fatal(err)
	}
	// The old key drains for 30 s: a token of 20 s it may sign, one of a
	// minute it may not.
	short := map[string]any{"iss": "https://op.example.com", "exp": time.Now().Add(20 * time.Second).Unix()}
	if _, err := e.cl.Sign(ctx(t), client.SignRequest{KeySet: "idt", Kid: old.Kid, Claims: short}); err != nil {
		t.Errorf("token expiring before its draining key retires: %v", err)
	}
	claims := map[string]any{"iss": "https://op.example.com", "exp": time.Now().Add(time.Minute).Unix()}
	_, err = e.cl.Sign(ctx(t), client.SignRequest{KeySet: "idt", Kid: old.Kid, Claims: claims})
	if !errors.Is(err, client.ErrFailedPrecondition) || !strings.Contains(err.Error(), "leaves the JWK Set") {
		t.Errorf("token outliving its draining key: %v, want FAILED_PRECONDITION", err)
	}
	if _, err := e.cl.Sign(ctx(t), client.SignRequest{KeySet: "idt", Claims: claims}); err != nil {
		t.Errorf("the active key: %v", err)
	}
}
