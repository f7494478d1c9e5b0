// Package keystoretest is the contract suite every keystore.Backend must pass:
// the soft backend always, and the PKCS#11 (SoftHSM2) and TPM (swtpm) backends
// wherever their devices are available.
//
// Run generates a key of every algorithm the backend lists, checks the public
// key it returns, signs and verifies each signature twice: with the standard
// library (VerifyDER, strict: a PS256 signature must use a salt as long as the
// hash, RFC 7518 §3.5) and as a compact JWS, with the DER ECDSA signature
// converted to fixed-width r||s by this package (not by keyd's JWS code) and
// verified by an independent JOSE implementation, go-jose v4. It then checks
// the error contract (IDs never reused or overwritten, invalid IDs, unknown
// keys, destroy, close, cancelled contexts) and concurrent use.
//
// The suite is meant to run under the race detector and to stay fast: it
// generates each RSA-3072 key once (RS256 and PS256) and uses the cheapest
// algorithm the backend lists for everything that is not about an algorithm.
package keystoretest

import (
	"context"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/keyd-dev/keyd/keystore"
)

// PrivateMaterialProber is an optional interface for a backend, or a test
// wrapper around one, that can check from the outside that the private half of
// key id cannot be read out: a soft key file's mode and owner, a PKCS#11
// object's CKA_SENSITIVE and CKA_EXTRACTABLE, a TPM key's sensitive area. Run
// calls it right after generating each key. The probe reports failures on t.
type PrivateMaterialProber interface {
	PrivateMaterialProbe(t *testing.T, id string)
}

// Run runs the contract suite against backends made by newBackend. newBackend
// is called once per subtest and must return a fresh, empty backend (it may
// register t.Cleanup, for example to Close it; Close after Close must not
// panic).
//
// Subtest names are stable, so a backend's tests can skip one with -skip or
// name it in a bug report:
//
//	Algorithms
//	Unsupported
//	Algorithm/{ES256,ES384,RS256-2048,RS256-3072,PS256-2048,PS256-3072,EdDSA}
//	AlreadyExists
//	InvalidID
//	NotFound
//	List
//	Destroy
//	GenerateAfterDestroy
//	Concurrent
//	Cancelled
//	Closed
//	SameID
//	SignOptions/{ES256,ES384,RS256,PS256,EdDSA}
//	CancelledOthers
//	CloseWhileSigning
//	Lost
//
// Where the contract allows two behaviours (generating an ID again after it
// was destroyed, finishing an operation whose context was cancelled, the
// result of a second Close), Run accepts both and logs which one the backend
// chose.
func Run(t *testing.T, newBackend func(t *testing.T) keystore.Backend) {
	t.Helper()
	s := &suite{newBackend: newBackend}
	t.Run("Algorithms", s.testAlgorithms)
	t.Run("Unsupported", s.testUnsupported)
	t.Run("Algorithm", func(t *testing.T) {
		for _, spec := range allSpecs() {
			t.Run(specName(spec), func(t *testing.T) { s.testAlgorithm(t, spec) })
		}
	})
	t.Run("AlreadyExists", s.testAlreadyExists)
	t.Run("InvalidID", s.testInvalidID)
	t.Run("NotFound", s.testNotFound)
	t.Run("List", s.testList)
	t.Run("Destroy", s.testDestroy)
	t.Run("GenerateAfterDestroy", s.testGenerateAfterDestroy)
	t.Run("Concurrent", s.testConcurrent)
	t.Run("Cancelled", s.testCancelled)
	t.Run("Closed", s.testClosed)
	t.Run("SameID", s.testSameID)
	t.Run("SignOptions", s.testSignOptions)
	t.Run("CancelledOthers", s.testCancelledOthers)
	t.Run("CloseWhileSigning", s.testCloseWhileSigning)
	t.Run("Lost", s.testLost)
}

type suite struct {
	newBackend func(t *testing.T) keystore.Backend
}

// backend makes a fresh backend and checks it is empty.
func (s *suite) backend(t *testing.T) keystore.Backend {
	t.Helper()
	b := s.newBackend(t)
	if b == nil {
		t.Fatal("newBackend returned nil")
	}
	ids, err := b.List(t.Context())
	if err != nil {
		t.Fatalf("List on a fresh backend: %v", err)
	}
	if len(ids) != 0 {
		t.Fatalf("newBackend must return an empty backend; List = %q", ids)
	}
	return b
}

// allSpecs is every key kind keyd knows, in a stable order.
func allSpecs() []keystore.KeySpec {
	var specs []keystore.KeySpec
	for _, alg := range keystore.Algorithms() {
		if alg.IsRSA() {
			specs = append(specs, keystore.KeySpec{Algorithm: alg, RSABits: 2048}, keystore.KeySpec{Algorithm: alg, RSABits: 3072})
			continue
		}
		specs = append(specs, keystore.KeySpec{Algorithm: alg})
	}
	return specs
}

// specName is a subtest name for spec: "ES256", "RS256-2048".
func specName(spec keystore.KeySpec) string {
	if spec.Algorithm.IsRSA() {
		return fmt.Sprintf("%s-%d", spec.Algorithm, spec.Bits())
	}
	return string(spec.Algorithm)
}

func supports(b keystore.Backend, alg keystore.Algorithm) bool {
	return slices.Contains(b.Algorithms(), alg)
}

// cheapSpec returns the fastest key to generate among those b supports, for
// subtests that are not about an algorithm.
func cheapSpec(t *testing.T, b keystore.Backend) keystore.KeySpec {
	t.Helper()
	for _, alg := range []keystore.Algorithm{keystore.ES256, keystore.EdDSA, keystore.ES384, keystore.RS256, keystore.PS256} {
		if supports(b, alg) {
			return keystore.KeySpec{Algorithm: alg}
		}
	}
	t.Fatalf("backend %s lists no algorithm keyd knows: %q", b.Name(), b.Algorithms())
	return keystore.KeySpec{}
}

func (s *suite) testAlgorithms(t *testing.T) {
	b := s.backend(t)
	if b.Name() == "" {
		t.Error("Name() is empty")
	}
	algs := b.Algorithms()
	if len(algs) == 0 {
		t.Fatalf("backend %s lists no algorithms", b.Name())
	}
	seen := map[keystore.Algorithm]bool{}
	for _, a := range algs {
		if _, err := keystore.ParseAlgorithm(string(a)); err != nil {
			t.Errorf("Algorithms() lists %q: %v", a, err)
		}
		if seen[a] {
			t.Errorf("Algorithms() lists %q twice", a)
		}
		seen[a] = true
	}
	for _, a := range keystore.Algorithms() {
		if !seen[a] {
			t.Logf("backend %s does not list %s: its keys are not tested, Generate must refuse it", b.Name(), a)
		}
	}
}

func (s *suite) testUnsupported(t *testing.T) {
	b := s.backend(t)
	ctx := t.Context()
	specs := []keystore.KeySpec{
		{Algorithm: "HS256"},
		{Algorithm: "ES512"},
		{Algorithm: "none"},
		{Algorithm: ""},
		{Algorithm: "es256"},
	}
	for _, alg := range keystore.Algorithms() {
		if !supports(b, alg) {
			specs = append(specs, keystore.KeySpec{Algorithm: alg})
		}
	}
	for _, alg := range []keystore.Algorithm{keystore.RS256, keystore.PS256} {
		if supports(b, alg) {
			specs = append(specs,
				keystore.KeySpec{Algorithm: alg, RSABits: 1024},
				keystore.KeySpec{Algorithm: alg, RSABits: 4096},
			)
		}
	}
	for i, spec := range specs {
		id := fmt.Sprintf("unsupported-%d", i)
		pub, err := b.Generate(ctx, id, spec)
		if !errors.Is(err, keystore.ErrUnsupportedAlgorithm) {
			t.Errorf("Generate(%q, %+v) = %T, %v; want ErrUnsupportedAlgorithm", id, spec, pub, err)
		}
	}
	expectList(t, b)
}

// testAlgorithm generates one key of spec and checks its public key, Public,
// Sign with the standard library and as a JWS.
func (s *suite) testAlgorithm(t *testing.T, spec keystore.KeySpec) {
	b := s.backend(t)
	if !supports(b, spec.Algorithm) {
		t.Logf("backend %s does not list %s; not tested (Unsupported checks Generate refuses it)", b.Name(), spec.Algorithm)
		return
	}
	ctx := t.Context()
	id := "alg-" + strings.ToLower(specName(spec))
	pub, err := b.Generate(ctx, id, spec)
	if err != nil {
		t.Fatalf("Generate(%q, %v): %v", id, spec, err)
	}
	if err := CheckPublicKey(spec, pub); err != nil {
		t.Fatalf("Generate(%q, %v): %v", id, spec, err)
	}
	if p, ok := b.(PrivateMaterialProber); ok {
		p.PrivateMaterialProbe(t, id)
	}

	got, err := b.Public(ctx, id)
	if err != nil {
		t.Fatalf("Public(%q): %v", id, err)
	}
	if err := CheckPublicKey(spec, got); err != nil {
		t.Fatalf("Public(%q): %v", id, err)
	}
	if !equalPublic(pub, got) {
		t.Fatalf("Public(%q) differs from the key Generate returned", id)
	}

	// ECDSA signatures vary in DER length; sign a few to exercise the r||s
	// conversion. RSA signing is slower and deterministic in length.
	rounds := 8
	if spec.Algorithm.IsRSA() {
		rounds = 2
	}
	for i := range rounds {
		msg := fmt.Appendf(nil, "keystoretest %s message %d", specName(spec), i)
		sig, err := b.Sign(ctx, id, Digest(spec.Algorithm, msg), spec.Algorithm.SignerOpts())
		if err != nil {
			t.Fatalf("Sign(%q, %s): %v", id, spec.Algorithm, err)
		}
		if err := VerifyDER(spec.Algorithm, pub, Digest(spec.Algorithm, msg), sig); err != nil {
			t.Fatalf("Sign(%q, %s) round %d: %v", id, spec.Algorithm, i, err)
		}
		// The signature must bind the message: a verifier that accepted
		// anything would make the check above worthless.
		other := slices.Concat(msg, []byte("!"))
		if err := VerifyDER(spec.Algorithm, pub, Digest(spec.Algorithm, other), sig); err == nil {
			t.Fatalf("signature over %q also verifies over %q", msg, other)
		}
		if err := checkJWS(ctx, t, b, id, spec.Algorithm, pub, i); err != nil {
			t.Fatalf("JWS round %d: %v", i, err)
		}
	}

	// The keys Generate and Public return are the caller's: changing them
	// changes nothing in the backend.
	want := x509Copy(t, pub)
	scribble(pub)
	scribble(got)
	again, err := b.Public(ctx, id)
	if err != nil {
		t.Fatalf("Public(%q): %v", id, err)
	}
	if !equalPublic(want, again) {
		t.Fatalf("Public(%q) changed when the caller changed the keys Generate and Public had returned", id)
	}
	msg := []byte("keystoretest after scribbling")
	sig, err := b.Sign(ctx, id, Digest(spec.Algorithm, msg), spec.Algorithm.SignerOpts())
	if err != nil {
		t.Fatalf("Sign(%q, %s): %v", id, spec.Algorithm, err)
	}
	if err := VerifyDER(spec.Algorithm, want, Digest(spec.Algorithm, msg), sig); err != nil {
		t.Fatalf("Sign(%q, %s) after the caller changed the returned keys: %v", id, spec.Algorithm, err)
	}
}

// x509Copy copies pub through its PKIX encoding, independently of the
// backends' keystore.ClonePublic.
func x509Copy(t *testing.T, pub crypto.PublicKey) crypto.PublicKey {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// scribble changes pub in place, as a careless caller could.
func scribble(pub crypto.PublicKey) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		k.X.Add(k.X, big.NewInt(1))
	case *rsa.PublicKey:
		k.N.Add(k.N, big.NewInt(2))
		k.E = 3
	case ed25519.PublicKey:
		k[0] ^= 0xff
	}
}

func (s *suite) testAlreadyExists(t *testing.T) {
	b := s.backend(t)
	ctx := t.Context()
	spec := cheapSpec(t, b)
	const id = "exists"
	pub := mustGenerate(t, b, id, spec)

	again := []keystore.KeySpec{spec}
	for _, alt := range []keystore.Algorithm{keystore.EdDSA, keystore.ES384, keystore.ES256} {
		if alt != spec.Algorithm && supports(b, alt) {
			again = append(again, keystore.KeySpec{Algorithm: alt})
			break
		}
	}
	for _, sp := range again {
		if p, err := b.Generate(ctx, id, sp); !errors.Is(err, keystore.ErrAlreadyExists) {
			t.Errorf("Generate(%q, %v) over an existing key = %T, %v; want ErrAlreadyExists", id, sp, p, err)
		}
	}
	got, err := b.Public(ctx, id)
	if err != nil {
		t.Fatalf("Public(%q) after a refused Generate: %v", id, err)
	}
	if !equalPublic(pub, got) {
		t.Fatalf("Public(%q) changed after a refused Generate: the key was overwritten", id)
	}
	mustSignVerify(t, b, id, spec.Algorithm, pub)
	expectList(t, b, id)
}

func (s *suite) testInvalidID(t *testing.T) {
	b := s.backend(t)
	ctx := t.Context()
	spec := cheapSpec(t, b)
	bad := []string{"", "../x", "a/b", strings.Repeat("a", 65), ".hidden", "..", "a b", "a\x00b", "é", `a\b`, "a:b"}
	for _, id := range bad {
		if p, err := b.Generate(ctx, id, spec); !errors.Is(err, keystore.ErrInvalidID) {
			t.Errorf("Generate(%q) = %T, %v; want ErrInvalidID", id, p, err)
		}
		// Lookups of an ID that cannot exist may say either.
		if _, err := b.Public(ctx, id); !errors.Is(err, keystore.ErrInvalidID) && !errors.Is(err, keystore.ErrNotFound) {
			t.Errorf("Public(%q) = %v; want ErrInvalidID or ErrNotFound", id, err)
		}
		if _, err := b.Sign(ctx, id, Digest(spec.Algorithm, []byte("m")), spec.Algorithm.SignerOpts()); !errors.Is(err, keystore.ErrInvalidID) && !errors.Is(err, keystore.ErrNotFound) {
			t.Errorf("Sign(%q) = %v; want ErrInvalidID or ErrNotFound", id, err)
		}
		if err := b.Destroy(ctx, id); !errors.Is(err, keystore.ErrInvalidID) && !errors.Is(err, keystore.ErrNotFound) {
			t.Errorf("Destroy(%q) = %v; want ErrInvalidID or ErrNotFound", id, err)
		}
	}
	expectList(t, b)

	// The longest and the most varied valid IDs work.
	good := []string{strings.Repeat("k", 64), "a.b_c-D9", "0"}
	for _, id := range good {
		pub := mustGenerate(t, b, id, spec)
		mustSignVerify(t, b, id, spec.Algorithm, pub)
	}
	expectList(t, b, good...)
}

func (s *suite) testNotFound(t *testing.T) {
	b := s.backend(t)
	ctx := t.Context()
	spec := cheapSpec(t, b)
	mustGenerate(t, b, "present", spec)
	const id = "absent"
	if p, err := b.Public(ctx, id); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Public(%q) = %T, %v; want ErrNotFound", id, p, err)
	}
	if _, err := b.Sign(ctx, id, Digest(spec.Algorithm, []byte("m")), spec.Algorithm.SignerOpts()); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Sign(%q) = %v; want ErrNotFound", id, err)
	}
	if err := b.Destroy(ctx, id); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Destroy(%q) = %v; want ErrNotFound", id, err)
	}
	expectList(t, b, "present")
}

func (s *suite) testList(t *testing.T) {
	b := s.backend(t)
	spec := cheapSpec(t, b)
	ids := []string{"list-a", "list-b", "list-c"}
	for i, id := range ids {
		mustGenerate(t, b, id, spec)
		expectList(t, b, ids[:i+1]...)
	}
}

func (s *suite) testDestroy(t *testing.T) {
	b := s.backend(t)
	ctx := t.Context()
	spec := cheapSpec(t, b)
	mustGenerate(t, b, "doomed", spec)
	keep := mustGenerate(t, b, "kept", spec)

	if err := b.Destroy(ctx, "doomed"); err != nil {
		t.Fatalf("Destroy(doomed): %v", err)
	}
	if p, err := b.Public(ctx, "doomed"); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Public after Destroy = %T, %v; want ErrNotFound", p, err)
	}
	if _, err := b.Sign(ctx, "doomed", Digest(spec.Algorithm, []byte("m")), spec.Algorithm.SignerOpts()); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Sign after Destroy = %v; want ErrNotFound", err)
	}
	expectList(t, b, "kept")
	if err := b.Destroy(ctx, "doomed"); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("second Destroy = %v; want ErrNotFound", err)
	}
	mustSignVerify(t, b, "kept", spec.Algorithm, keep)
}

func (s *suite) testGenerateAfterDestroy(t *testing.T) {
	b := s.backend(t)
	ctx := t.Context()
	spec := cheapSpec(t, b)
	const id = "reborn"
	old := mustGenerate(t, b, id, spec)
	if err := b.Destroy(ctx, id); err != nil {
		t.Fatalf("Destroy(%q): %v", id, err)
	}
	pub, err := b.Generate(ctx, id, spec)
	switch {
	case errors.Is(err, keystore.ErrAlreadyExists):
		t.Logf("backend %s refuses to generate a destroyed ID again (ErrAlreadyExists)", b.Name())
		if _, err := b.Public(ctx, id); !errors.Is(err, keystore.ErrNotFound) {
			t.Errorf("Public(%q) after the refused Generate = %v; want ErrNotFound", id, err)
		}
		expectList(t, b)
	case err == nil:
		t.Logf("backend %s generates a destroyed ID again, with a new key", b.Name())
		if err := CheckPublicKey(spec, pub); err != nil {
			t.Fatal(err)
		}
		if equalPublic(old, pub) {
			t.Fatalf("Generate(%q) after Destroy returned the destroyed key", id)
		}
		mustSignVerify(t, b, id, spec.Algorithm, pub)
		expectList(t, b, id)
	default:
		t.Fatalf("Generate(%q) after Destroy: %v; want success with a new key or ErrAlreadyExists", id, err)
	}
}

func (s *suite) testConcurrent(t *testing.T) {
	b := s.backend(t)
	ctx := t.Context()
	spec := cheapSpec(t, b)
	keys := []string{"conc-0", "conc-1"}
	pubs := []crypto.PublicKey{mustGenerate(t, b, keys[0], spec), mustGenerate(t, b, keys[1], spec)}

	const workers, signs = 16, 25
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range signs {
				k := (w + i) % len(keys)
				msg := fmt.Appendf(nil, "worker %d sign %d", w, i)
				d := Digest(spec.Algorithm, msg)
				sig, err := b.Sign(ctx, keys[k], d, spec.Algorithm.SignerOpts())
				if err != nil {
					t.Errorf("worker %d: Sign(%q): %v", w, keys[k], err)
					return
				}
				if err := VerifyDER(spec.Algorithm, pubs[k], d, sig); err != nil {
					t.Errorf("worker %d: Sign(%q): %v", w, keys[k], err)
					return
				}
			}
		})
	}
	// Meanwhile other keys come and go, and the key list is read.
	wg.Go(func() {
		for i := range 8 {
			id := fmt.Sprintf("churn-%d", i)
			if _, err := b.Generate(ctx, id, spec); err != nil {
				t.Errorf("Generate(%q) during signing: %v", id, err)
				return
			}
			if _, err := b.List(ctx); err != nil {
				t.Errorf("List during signing: %v", err)
				return
			}
			if err := b.Destroy(ctx, id); err != nil {
				t.Errorf("Destroy(%q) during signing: %v", id, err)
				return
			}
		}
	})
	// Concurrent lookups of the same new key.
	wg.Go(func() {
		for range 50 {
			if _, err := b.Public(ctx, keys[0]); err != nil {
				t.Errorf("Public(%q) during signing: %v", keys[0], err)
				return
			}
		}
	})
	wg.Wait()
	expectList(t, b, keys...)
}

func (s *suite) testCancelled(t *testing.T) {
	b := s.backend(t)
	spec := cheapSpec(t, b)
	pub := mustGenerate(t, b, "live", spec)

	ctx, cancel := context.WithCancel(t.Context())
	cancel()

	msg := []byte("cancelled")
	sig, err := b.Sign(ctx, "live", Digest(spec.Algorithm, msg), spec.Algorithm.SignerOpts())
	switch {
	case errors.Is(err, context.Canceled):
		t.Logf("backend %s: Sign with a cancelled context returns %v", b.Name(), err)
	case err == nil:
		t.Logf("backend %s: Sign with a cancelled context signs anyway", b.Name())
		if err := VerifyDER(spec.Algorithm, pub, Digest(spec.Algorithm, msg), sig); err != nil {
			t.Errorf("Sign with a cancelled context: %v", err)
		}
	default:
		t.Errorf("Sign with a cancelled context = %v; want an error wrapping context.Canceled, or a signature", err)
	}

	const id = "cancelled"
	p, err := b.Generate(ctx, id, spec)
	switch {
	case errors.Is(err, context.Canceled):
		t.Logf("backend %s: Generate with a cancelled context returns %v", b.Name(), err)
		// A refused Generate must not leave a key behind.
		expectList(t, b, "live")
		if _, err := b.Public(t.Context(), id); !errors.Is(err, keystore.ErrNotFound) {
			t.Errorf("Public(%q) after a cancelled Generate = %v; want ErrNotFound", id, err)
		}
	case err == nil:
		t.Logf("backend %s: Generate with a cancelled context generates anyway", b.Name())
		if err := CheckPublicKey(spec, p); err != nil {
			t.Error(err)
		}
		expectList(t, b, "live", id)
	default:
		t.Errorf("Generate with a cancelled context = %v; want an error wrapping context.Canceled, or a key", err)
	}
	// The backend still works with a live context.
	mustSignVerify(t, b, "live", spec.Algorithm, pub)
}

func (s *suite) testClosed(t *testing.T) {
	b := s.backend(t)
	ctx := t.Context()
	spec := cheapSpec(t, b)
	mustGenerate(t, b, "before-close", spec)
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	d := Digest(spec.Algorithm, []byte("m"))
	if p, err := b.Generate(ctx, "after-close", spec); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Generate after Close = %T, %v; want ErrClosed", p, err)
	}
	if p, err := b.Public(ctx, "before-close"); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Public after Close = %T, %v; want ErrClosed", p, err)
	}
	if _, err := b.Sign(ctx, "before-close", d, spec.Algorithm.SignerOpts()); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Sign after Close = %v; want ErrClosed", err)
	}
	if ids, err := b.List(ctx); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("List after Close = %q, %v; want ErrClosed", ids, err)
	}
	if err := b.Destroy(ctx, "before-close"); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Destroy after Close = %v; want ErrClosed", err)
	}
	switch err := b.Close(); {
	case err == nil:
		t.Logf("backend %s: second Close returns nil", b.Name())
	case errors.Is(err, keystore.ErrClosed):
		t.Logf("backend %s: second Close returns ErrClosed", b.Name())
	default:
		t.Errorf("second Close = %v; want nil or ErrClosed", err)
	}
}

// MustGenerate generates an ES256 key id in b for a test and returns its
// public key, failing the test if it cannot.
func MustGenerate(t testing.TB, b keystore.Backend, id string) crypto.PublicKey {
	t.Helper()
	pub, err := b.Generate(t.Context(), id, keystore.KeySpec{Algorithm: keystore.ES256})
	if err != nil {
		t.Fatalf("Generate(%q): %v", id, err)
	}
	return pub
}

// Digest returns what Sign takes for alg over msg: the alg.Hash() digest, or
// msg itself for EdDSA.
func Digest(alg keystore.Algorithm, msg []byte) []byte {
	h := alg.Hash()
	if h == 0 {
		return msg
	}
	hh := h.New()
	hh.Write(msg)
	return hh.Sum(nil)
}

// CheckPublicKey reports whether pub is a public key of the kind spec asks
// for: *ecdsa.PublicKey on the right curve (and on the curve), *rsa.PublicKey
// of spec.Bits() bits with exponent 65537, or a 32-byte ed25519.PublicKey. A
// private key, or anything that can sign or decrypt, is an error.
func CheckPublicKey(spec keystore.KeySpec, pub crypto.PublicKey) error {
	switch pub.(type) {
	case *ecdsa.PrivateKey, *rsa.PrivateKey, ed25519.PrivateKey, *ed25519.PrivateKey, *ecdh.PrivateKey:
		return fmt.Errorf("%v: got private key type %T, want only the public key", spec, pub)
	case crypto.Signer, crypto.Decrypter:
		return fmt.Errorf("%v: got %T, which holds private material (it can sign or decrypt)", spec, pub)
	}
	switch spec.Algorithm {
	case keystore.ES256, keystore.ES384:
		k, ok := pub.(*ecdsa.PublicKey)
		if !ok {
			return fmt.Errorf("%v: got public key type %T, want *ecdsa.PublicKey", spec, pub)
		}
		want := elliptic.P256()
		if spec.Algorithm == keystore.ES384 {
			want = elliptic.P384()
		}
		if k.Curve != want {
			return fmt.Errorf("%v: got curve %s, want %s", spec, curveName(k.Curve), want.Params().Name)
		}
		if _, err := k.ECDH(); err != nil {
			return fmt.Errorf("%v: public key is not a valid point: %v", spec, err)
		}
	case keystore.RS256, keystore.PS256:
		k, ok := pub.(*rsa.PublicKey)
		if !ok {
			return fmt.Errorf("%v: got public key type %T, want *rsa.PublicKey", spec, pub)
		}
		if k.N == nil || k.N.BitLen() != spec.Bits() {
			return fmt.Errorf("%v: got a %d-bit modulus, want %d", spec, bitLen(k), spec.Bits())
		}
		if k.E != 65537 {
			return fmt.Errorf("%v: got public exponent %d, want 65537", spec, k.E)
		}
	case keystore.EdDSA:
		k, ok := pub.(ed25519.PublicKey)
		if !ok {
			return fmt.Errorf("%v: got public key type %T, want ed25519.PublicKey", spec, pub)
		}
		if len(k) != ed25519.PublicKeySize {
			return fmt.Errorf("%v: got a %d-byte Ed25519 key, want %d", spec, len(k), ed25519.PublicKeySize)
		}
	default:
		return fmt.Errorf("%v: %w", spec, keystore.ErrUnsupportedAlgorithm)
	}
	return nil
}

func bitLen(k *rsa.PublicKey) int {
	if k.N == nil {
		return 0
	}
	return k.N.BitLen()
}

func curveName(c elliptic.Curve) string {
	if c == nil {
		return "<nil>"
	}
	return c.Params().Name
}

func equalPublic(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

func mustGenerate(t *testing.T, b keystore.Backend, id string, spec keystore.KeySpec) crypto.PublicKey {
	t.Helper()
	pub, err := b.Generate(t.Context(), id, spec)
	if err != nil {
		t.Fatalf("Generate(%q, %v): %v", id, spec, err)
	}
	if err := CheckPublicKey(spec, pub); err != nil {
		t.Fatalf("Generate(%q): %v", id, err)
	}
	return pub
}

func mustSignVerify(t *testing.T, b keystore.Backend, id string, alg keystore.Algorithm, pub crypto.PublicKey) {
	t.Helper()
	d := Digest(alg, []byte("keystoretest "+id))
	sig, err := b.Sign(t.Context(), id, d, alg.SignerOpts())
	if err != nil {
		t.Fatalf("Sign(%q): %v", id, err)
	}
	if err := VerifyDER(alg, pub, d, sig); err != nil {
		t.Fatalf("Sign(%q): %v", id, err)
	}
}

// expectList checks that List returns exactly want, in any order, once each.
func expectList(t *testing.T, b keystore.Backend, want ...string) {
	t.Helper()
	got, err := b.List(t.Context())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	g, w := slices.Clone(got), slices.Clone(want)
	slices.Sort(g)
	slices.Sort(w)
	if !slices.Equal(g, w) {
		t.Fatalf("List = %q, want %q", g, w)
	}
}

// testSameID races Generate calls for one ID, then Destroy calls for it:
// exactly one of each wins, the others fail with ErrAlreadyExists and
// ErrNotFound, and the key served is the winner's.
func (s *suite) testSameID(t *testing.T) {
	b := s.backend(t)
	ctx := t.Context()
	spec := cheapSpec(t, b)
	const id, racers = "contested", 6

	type result struct {
		pub crypto.PublicKey
		err error
	}
	results := make([]result, racers)
	var wg sync.WaitGroup
	for i := range racers {
		wg.Go(func() {
			pub, err := b.Generate(ctx, id, spec)
			results[i] = result{pub, err}
		})
	}
	wg.Wait()
	var winner crypto.PublicKey
	for i, r := range results {
		switch {
		case r.err == nil && winner == nil:
			winner = r.pub
		case r.err == nil:
			t.Errorf("Generate %d of %q also succeeded: two keys were made under one ID", i, id)
		case !errors.Is(r.err, keystore.ErrAlreadyExists):
			t.Errorf("Generate %d of %q lost the race with %v; want ErrAlreadyExists", i, id, r.err)
		}
	}
	if winner == nil {
		t.Fatalf("no concurrent Generate of %q succeeded", id)
	}
	got, err := b.Public(ctx, id)
	if err != nil {
		t.Fatalf("Public(%q): %v", id, err)
	}
	if !equalPublic(winner, got) {
		t.Fatalf("Public(%q) is not the key the winning Generate returned", id)
	}
	mustSignVerify(t, b, id, spec.Algorithm, winner)
	expectList(t, b, id)

	errs := make([]error, racers)
	for i := range racers {
		wg.Go(func() { errs[i] = b.Destroy(ctx, id) })
	}
	wg.Wait()
	ok := 0
	for i, err := range errs {
		switch {
		case err == nil:
			ok++
		case !errors.Is(err, keystore.ErrNotFound):
			t.Errorf("Destroy %d of %q = %v; want nil or ErrNotFound", i, id, err)
		}
	}
	if ok != 1 {
		t.Errorf("%d concurrent Destroy calls of %q succeeded, want exactly 1", ok, id)
	}
	if _, err := b.Public(ctx, id); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Public(%q) after Destroy = %v; want ErrNotFound", id, err)
	}
	expectList(t, b)
}

// testSignOptions checks that Sign refuses options and digests that do not
// fit the key, with crypto.Signer semantics, rather than signing something
// a verifier would read differently.
func (s *suite) testSignOptions(t *testing.T) {
	b := s.backend(t)
	ctx := t.Context()
	for _, alg := range b.Algorithms() {
		t.Run(string(alg), func(t *testing.T) {
			spec := keystore.KeySpec{Algorithm: alg}
			id := "opts-" + strings.ToLower(string(alg))
			pub := mustGenerate(t, b, id, spec)
			d := Digest(alg, []byte("opts"))
			type bad struct {
				name   string
				digest []byte
				opts   crypto.SignerOpts
			}
			var cases []bad
			switch alg {
			case keystore.ES256:
				cases = []bad{
					{"SHA-384 digest", Digest(keystore.ES384, []byte("opts")), crypto.SHA384},
					{"short digest", d[:20], crypto.SHA256},
					{"long digest", append(slices.Clone(d), 0), crypto.SHA256},
					{"no hash", d, crypto.Hash(0)},
				}
			case keystore.ES384:
				cases = []bad{
					{"SHA-256 digest", Digest(keystore.ES256, []byte("opts")), crypto.SHA256},
					{"short digest", d[:32], crypto.SHA384},
				}
			case keystore.RS256, keystore.PS256:
				cases = []bad{
					{"SHA-384 digest", Digest(keystore.ES384, []byte("opts")), crypto.SHA384},
					{"short digest", d[:20], crypto.SHA256},
					{"long digest", append(slices.Clone(d), 0), crypto.SHA256},
					{"no hash", d, crypto.Hash(0)},
					{"PSS short digest", d[:20], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}},
					{"PSS SHA-384", Digest(keystore.ES384, []byte("opts")), &rsa.PSSOptions{Hash: crypto.SHA384, SaltLength: rsa.PSSSaltLengthEqualsHash}},
				}
			case keystore.EdDSA:
				cases = []bad{
					{"SHA-256 digest", Digest(keystore.ES256, []byte("opts")), crypto.SHA256},
				}
			}
			// Options a caller may pass by mistake must fail, not
			// panic the daemon.
			cases = append(cases,
				bad{"nil options", d, nil},
				bad{"nil *rsa.PSSOptions", d, (*rsa.PSSOptions)(nil)},
				bad{"nil *ed25519.Options", d, (*ed25519.Options)(nil)},
			)
			if alg == keystore.PS256 {
				cases = append(cases, bad{"PSS maximum salt", d, &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthAuto}})
			}
			for _, c := range cases {
				sig, err := signNoPanic(ctx, b, id, c.digest, c.opts)
				if errors.Is(err, errPanicked) {
					t.Errorf("Sign(%q) with %s (%T): %v; want an error", id, c.name, c.opts, err)
				} else if err == nil {
					t.Errorf("Sign(%q) with %s (%T) = %d-byte signature, want an error", id, c.name, c.opts, len(sig))
				} else if errors.Is(err, keystore.ErrNotFound) || errors.Is(err, keystore.ErrKeyLost) {
					t.Errorf("Sign(%q) with %s = %v; the key is there, the options are wrong", id, c.name, err)
				}
			}
			// The key still signs with the right options.
			mustSignVerify(t, b, id, alg, pub)
		})
	}
}

// errPanicked is signNoPanic's error for a Sign that panicked: a failure
// of the backend, which the suite reports (a panic takes the daemon down
// with every caller), not a refusal.
var errPanicked = errors.New("Sign panicked")

// signNoPanic is b.Sign, with a panic turned into an error wrapping
// errPanicked.
func signNoPanic(ctx context.Context, b keystore.Backend, id string, digest []byte, opts crypto.SignerOpts) (sig []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			sig, err = nil, fmt.Errorf("%w: %v", errPanicked, r)
		}
	}()
	return b.Sign(ctx, id, digest, opts)
}

// testCancelledOthers: Public, List and Destroy with a cancelled context
// either fail with context.Canceled, changing nothing, or do their work.
func (s *suite) testCancelledOthers(t *testing.T) {
	b := s.backend(t)
	spec := cheapSpec(t, b)
	pub := mustGenerate(t, b, "live", spec)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()

	if p, err := b.Public(ctx, "live"); err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("Public with a cancelled context = %v; want context.Canceled or the key", err)
	} else if err == nil && !equalPublic(pub, p) {
		t.Errorf("Public with a cancelled context returned another key")
	}
	if ids, err := b.List(ctx); err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("List with a cancelled context = %v; want context.Canceled or the list", err)
	} else if err == nil && !slices.Equal(ids, []string{"live"}) {
		t.Errorf("List with a cancelled context = %q; want [live]", ids)
	}
	switch err := b.Destroy(ctx, "live"); {
	case errors.Is(err, context.Canceled):
		mustSignVerify(t, b, "live", spec.Algorithm, pub)
		expectList(t, b, "live")
	case err == nil:
		t.Logf("backend %s: Destroy with a cancelled context destroys anyway", b.Name())
		expectList(t, b)
	default:
		t.Errorf("Destroy with a cancelled context = %v; want context.Canceled or success", err)
	}
}

// testCloseWhileSigning closes the backend while signs and lookups run: each
// either works or fails with ErrClosed, and nothing panics or races.
func (s *suite) testCloseWhileSigning(t *testing.T) {
	b := s.backend(t)
	ctx := t.Context()
	spec := cheapSpec(t, b)
	pub := mustGenerate(t, b, "busy", spec)
	const workers, rounds = 4, 40
	start := make(chan struct{})
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			<-start
			for i := range rounds {
				d := Digest(spec.Algorithm, fmt.Appendf(nil, "close %d %d", w, i))
				sig, err := b.Sign(ctx, "busy", d, spec.Algorithm.SignerOpts())
				if errors.Is(err, keystore.ErrClosed) {
					return
				}
				if err != nil {
					t.Errorf("Sign racing Close = %v; want a signature or ErrClosed", err)
					return
				}
				if err := VerifyDER(spec.Algorithm, pub, d, sig); err != nil {
					t.Errorf("Sign racing Close: %v", err)
					return
				}
				if _, err := b.List(ctx); err != nil && !errors.Is(err, keystore.ErrClosed) {
					t.Errorf("List racing Close = %v; want ErrClosed", err)
					return
				}
			}
		})
	}
	close(start)
	if err := b.Close(); err != nil {
		t.Errorf("Close while signing: %v", err)
	}
	wg.Wait()
	if _, err := b.Sign(ctx, "busy", Digest(spec.Algorithm, []byte("m")), spec.Algorithm.SignerOpts()); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Sign after Close = %v; want ErrClosed", err)
	}
}

// KeyLoser is an optional interface for a test wrapper around a backend that
// can remove key id from the device behind the backend's back (delete its
// file, destroy its object with another session), as a failing disk, an
// operator or a restored backup would. The contract suite then checks that
// the backend reports the key lost, not a fresh one made in its place.
type KeyLoser interface {
	LoseKey(t *testing.T, id string)
}

// testLost: a key the backend knew that is gone from the device signs no
// more once destroyed, never with another key, and its ID is never reused.
// A backend may keep signing with a copy it had loaded (reported in the log)
// or fail with ErrKeyLost or ErrNotFound.
func (s *suite) testLost(t *testing.T) {
	b := s.backend(t)
	l, ok := b.(KeyLoser)
	if !ok {
		t.Skipf("backend %s has no KeyLoser wrapper", b.Name())
	}
	ctx := t.Context()
	spec := cheapSpec(t, b)
	pub := mustGenerate(t, b, "lost", spec)
	keep := mustGenerate(t, b, "kept", spec)
	mustSignVerify(t, b, "lost", spec.Algorithm, pub)
	l.LoseKey(t, "lost")

	d := Digest(spec.Algorithm, []byte("lost"))
	sig, err := b.Sign(ctx, "lost", d, spec.Algorithm.SignerOpts())
	switch {
	case errors.Is(err, keystore.ErrKeyLost), errors.Is(err, keystore.ErrNotFound):
		t.Logf("backend %s: Sign of a known key gone from the device = %v", b.Name(), err)
	case err == nil:
		t.Logf("backend %s: a loaded key gone from the device still signs", b.Name())
		if err := VerifyDER(spec.Algorithm, pub, d, sig); err != nil {
			t.Errorf("Sign of a key gone from the device: %v", err)
		}
	default:
		t.Errorf("Sign of a key gone from the device = %v; want ErrKeyLost, ErrNotFound or a signature by it", err)
	}
	if p, err := b.Public(ctx, "lost"); err == nil && !equalPublic(pub, p) {
		t.Errorf("Public of a key gone from the device returned another key")
	} else if err != nil && !errors.Is(err, keystore.ErrKeyLost) && !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Public of a key gone from the device = %v; want ErrKeyLost or ErrNotFound", err)
	}
	if p, err := b.Generate(ctx, "lost", spec); !errors.Is(err, keystore.ErrAlreadyExists) {
		t.Errorf("Generate of the ID of a known key gone from the device = %T, %v; want ErrAlreadyExists (IDs are never reused)", p, err)
	}
	if err := b.Destroy(ctx, "lost"); err != nil && !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Destroy of a key gone from the device = %v; want nil or ErrNotFound", err)
	}
	if _, err := b.Sign(ctx, "lost", d, spec.Algorithm.SignerOpts()); err == nil {
		t.Errorf("a key gone from the device still signs after Destroy")
	}
	expectList(t, b, "kept")
	mustSignVerify(t, b, "kept", spec.Algorithm, keep)
}
