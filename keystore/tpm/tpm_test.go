package tpm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	crand "crypto/rand"
	"crypto/rsa"
	"encoding/asn1"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/internal/swtpmtest"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// probed adds the private-material probe for the contract suite.
type probed struct{ *Backend }

// PrivateMaterialProbe checks that key id is stored only as TPM blobs, in a
// 0600 file, and that its public area makes it a fixedTPM, fixedParent,
// TPM-generated, noDA signing key: the TPM never releases its private part.
func (p probed) PrivateMaterialProbe(t *testing.T, id string) {
	t.Helper()
	path := p.keyPath(id)
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != 0o600 {
		t.Errorf("%s has mode %v, want 0600", path, fi.Mode())
	}
	if n := fi.Sys().(*syscall.Stat_t).Nlink; n != 1 {
		t.Errorf("%s has %d links, want 1", path, n)
	}
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), id+keySuffix+".") {
			t.Errorf("stray file %s next to key %s", e.Name(), id)
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blob, err := decodeKey(data)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](blob.pub)
	if err != nil {
		t.Fatal(err)
	}
	a := pub.ObjectAttributes
	if !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin || !a.NoDA || a.Decrypt || !a.SignEncrypt {
		t.Errorf("key %s has attributes %+v; want fixedTPM, fixedParent, sensitiveDataOrigin, noDA, sign, not decrypt", id, a)
	}
	for _, s := range []string{"PRIVATE KEY-----", "RSA PRIVATE", "EC PRIVATE"} {
		if strings.Contains(string(data), "BEGIN "+s) {
			t.Errorf("%s holds a software private key (%s)", path, s)
		}
	}
}

func TestContract(t *testing.T) {
	s := swtpmtest.Start(t)
	keystoretest.Run(t, func(t *testing.T) keystore.Backend {
		return probed{newTestBackend(t, s, Config{})}
	})
}

func TestAlgorithms(t *testing.T) {
	s := swtpmtest.Start(t)
	b := newTestBackend(t, s, Config{})
	want := []keystore.Algorithm{keystore.ES256, keystore.ES384, keystore.RS256, keystore.PS256}
	if got := b.Algorithms(); !slices.Equal(got, want) {
		t.Errorf("Algorithms() = %v, want %v on swtpm", got, want)
	}
	if !b.rsa3072 {
		t.Error("swtpm accepts RSA-3072, but the probe says no")
	}
	if b.pssProbe != "external key" {
		t.Errorf("PS256 self-test ran with %q, want the external key", b.pssProbe)
	}
	_, err := b.Generate(t.Context(), "ed", keystore.KeySpec{Algorithm: keystore.EdDSA})
	if !errors.Is(err, keystore.ErrUnsupportedAlgorithm) || !strings.Contains(err.Error(), "Ed25519") {
		t.Errorf("Generate EdDSA = %v, want ErrUnsupportedAlgorithm saying TPMs have no Ed25519", err)
	}
}

// TestPSSSelfTest makes the self-test see a maximum-salt RSA-PSS signature,
// as many hardware TPMs give: PS256 must be refused with a clear message,
// while RS256 keys keep working; and checks the fallback to a TPM-generated
// self-test key when the TPM refuses TPM2_LoadExternal.
func TestPSSSelfTest(t *testing.T) {
	s := swtpmtest.Start(t)

	t.Run("MaxSalt", func(t *testing.T) {
		var forged int
		hook := func(cmd []byte) ([]byte, bool, error) {
			if tpm2.TPMCC(commandCode(cmd)) != tpm2.TPMCCSign || forged > 0 {
				return nil, false, nil
			}
			forged++
			key, err := selfTestKey()
			if err != nil {
				return nil, true, err
			}
			// The digest ends the command but for inScheme (4 bytes) and
			// the validation ticket (8).
			const tail = 4 + 8
			digest := cmd[len(cmd)-tail-32 : len(cmd)-tail]
			sig, err := rsa.SignPSS(crand.Reader, key, crypto.SHA256, digest, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
			if err != nil {
				return nil, true, err
			}
			return signResponse(tpm2.TPMTSignature{
				SigAlg:    tpm2.TPMAlgRSAPSS,
				Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgRSAPSS, &tpm2.TPMSSignatureRSA{Hash: tpm2.TPMAlgSHA256, Sig: tpm2.TPM2BPublicKeyRSA{Buffer: sig}}),
			}), true, nil
		}
		b, err := newTestBackendErr(t, s, Config{}, hook)
		if err != nil {
			t.Fatal(err)
		}
		if forged != 1 {
			t.Fatalf("the hook forged %d signatures, want 1 (the self-test's)", forged)
		}
		if slices.Contains(b.Algorithms(), keystore.PS256) {
			t.Fatalf("Algorithms() = %v lists PS256 after a maximum-salt self-test", b.Algorithms())
		}
		_, err = b.Generate(t.Context(), "pss", keystore.KeySpec{Algorithm: keystore.PS256})
		if !errors.Is(err, keystore.ErrUnsupportedAlgorithm) || !strings.Contains(err.Error(), "salt") {
			t.Errorf("Generate PS256 = %v, want ErrUnsupportedAlgorithm explaining the salt", err)
		}
		pub, err := b.Generate(t.Context(), "rs", keystore.KeySpec{Algorithm: keystore.RS256})
		if err != nil {
			t.Fatal(err)
		}
		d := keystoretest.Digest(keystore.RS256, []byte("m"))
		if _, err := b.Sign(t.Context(), "rs", d, keystore.PS256.SignerOpts()); !errors.Is(err, keystore.ErrUnsupportedAlgorithm) {
			t.Errorf("Sign with PSS options on an RSA key = %v, want ErrUnsupportedAlgorithm", err)
		}
		sig, err := b.Sign(t.Context(), "rs", d, keystore.RS256.SignerOpts())
		if err != nil {
			t.Fatal(err)
		}
		if err := keystoretest.VerifyDER(keystore.RS256, pub, d, sig); err != nil {
			t.Error(err)
		}
	})

	t.Run("NoLoadExternal", func(t *testing.T) {
		hook := func(cmd []byte) ([]byte, bool, error) {
			if tpm2.TPMCC(commandCode(cmd)) == tpm2.TPMCCLoadExternal {
				return errorResponse(uint32(tpm2.TPMRCCommandCode)), true, nil
			}
			return nil, false, nil
		}
		b, err := newTestBackendErr(t, s, Config{}, hook)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(b.Algorithms(), keystore.PS256) || b.pssProbe != "TPM-generated key" {
			t.Errorf("Algorithms() = %v, self-test with %q; want PS256 from a TPM-generated key", b.Algorithms(), b.pssProbe)
		}
		checkFootprint(t, b, inspect(t, b))
	})
}

// signResponse is a TPM2_Sign response carrying sig, with the password
// session's response area.
func signResponse(sig tpm2.TPMTSignature) []byte {
	body := tpm2.Marshal(sig)
	out := []byte{0x80, 0x02, 0, 0, 0, 0, 0, 0, 0, 0}
	out = append(out, byte(len(body)>>24), byte(len(body)>>16), byte(len(body)>>8), byte(len(body)))
	out = append(out, body...)
	out = append(out, 0, 0, 1, 0, 0) // nonce, continueSession, hmac
	n := len(out)
	out[2], out[3], out[4], out[5] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
	return out
}

// errorResponse is a bare TPM response with code rc.
func errorResponse(rc uint32) []byte {
	return []byte{0x80, 0x01, 0, 0, 0, 10, byte(rc >> 24), byte(rc >> 16), byte(rc >> 8), byte(rc)}
}

// TestRetry (T5): TPM_RC_RETRY, _YIELDED and _TESTING are retried at one
// place, at most three times, then reported as ErrUnavailable.
func TestRetry(t *testing.T) {
	_, in, b := hookedBackend(t)
	base := inspect(t, b)
	g0, _ := baseline()
	pub := keystoretest.MustGenerate(t, b, "k")
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	for _, tc := range []struct {
		code    tpm2.TPMRC
		n       int
		wantErr error
		sent    int
	}{
		{tpm2.TPMRCRetry, 2, nil, 2},
		{tpm2.TPMRCYielded, 3, nil, 3},
		{tpm2.TPMRCTesting, 1, nil, 1},
		{tpm2.TPMRCRetry, 10, keystore.ErrUnavailable, 4},
	} {
		in.arm(tpm2.TPMCCSign, uint32(tc.code), tc.n)
		sig, err := b.Sign(t.Context(), "k", d, crypto.SHA256)
		if got := in.count(); got != tc.sent {
			t.Errorf("%v ×%d: the TPM saw TPM2_Sign answered with it %d times, want %d", tc.code, tc.n, got, tc.sent)
		}
		if tc.wantErr != nil {
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("%v ×%d: Sign = %v, want %v", tc.code, tc.n, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%v ×%d: Sign: %v", tc.code, tc.n, err)
			continue
		}
		if err := keystoretest.VerifyDER(keystore.ES256, pub, d, sig); err != nil {
			t.Error(err)
		}
	}
	in.arm(0, 0, 0)
	checkFootprint(t, b, base)
	if g, _ := settle(g0); g > g0 {
		t.Errorf("goroutines %d → %d", g0, g)
	}
}

// TestFrozen (T1): a SIGSTOPped swtpm makes calls fail with ErrUnavailable
// within the per-command timeout, without a goroutine pile-up; after
// SIGCONT the backend recovers by itself with every key and slot intact.
func TestFrozen(t *testing.T) {
	s := swtpmtest.Start(t)
	const timeout = time.Second
	b := newTestBackend(t, s, Config{CommandTimeout: timeout})
	ctx := t.Context()
	base := inspect(t, b)
	pub := keystoretest.MustGenerate(t, b, "k")
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k", keystore.ES256, pub, d)
	g0, th0 := baseline()

	s.Signal(t, syscall.SIGSTOP)
	start := time.Now()
	_, err := b.Sign(ctx, "k", d, crypto.SHA256)
	elapsed := time.Since(start)
	if !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("Sign on a stopped TPM = %v, want ErrUnavailable", err)
	}
	if elapsed < timeout/2 || elapsed > timeout+time.Second {
		t.Errorf("Sign on a stopped TPM failed after %v, want about the command timeout %v", elapsed, timeout)
	}
	t.Logf("stopped TPM: Sign failed after %v: %v", elapsed, err)

	// Many callers meanwhile: each fails fast or within its own deadline;
	// none waits for more than two command timeouts.
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, 3*timeout)
			defer cancel()
			st := time.Now()
			_, err := b.Sign(cctx, "k", d, crypto.SHA256)
			if !errors.Is(err, keystore.ErrUnavailable) && !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("caller %d on a stopped TPM: %v, want ErrUnavailable", i, err)
			}
			if e := time.Since(st); e > 3*timeout+time.Second {
				t.Errorf("caller %d waited %v", i, e)
			}
		})
	}
	wg.Wait()
	if err := b.Health(ctx); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("Health on a stopped TPM = %v, want ErrUnavailable", err)
	}
	// Past the fail-fast window, a call reconnects (the kernel accepts the
	// connection for the stopped process) and times out again.
	time.Sleep(b.cooldown)
	start = time.Now()
	if _, err := b.Sign(ctx, "k", d, crypto.SHA256); !errors.Is(err, keystore.ErrUnavailable) || time.Since(start) > timeout+time.Second {
		t.Errorf("Sign on a stopped TPM after the fail-fast window = %v after %v, want ErrUnavailable within %v", err, time.Since(start), timeout)
	}

	s.Signal(t, syscall.SIGCONT)
	recoverSign(t, b, "k", keystore.ES256, pub, 10*time.Second)
	if err := b.Health(ctx); err != nil {
		t.Errorf("Health after SIGCONT: %v", err)
	}
	if ids, err := b.List(ctx); err != nil || !slices.Equal(ids, []string{"k"}) {
		t.Errorf("List after the freeze = %q, %v; want [k]", ids, err)
	}
	checkFootprint(t, b, base)
	if g, th := settle(g0); g > g0 || th > th0+4 {
		t.Errorf("goroutines %d → %d, threads %d → %d after the freeze", g0, g, th0, th)
	}
}

// TestRestart (T2, T7): swtpm killed (SIGKILL, five times) and started
// again on the same state, once without TPM2_Startup: keys reload under the
// re-created SRK and sign; a call while swtpm is down fails fast with
// ErrUnavailable.
func TestRestart(t *testing.T) {
	s := swtpmtest.Start(t)
	log, logged := testLogger(t)
	b := newTestBackend(t, s, Config{CommandTimeout: 2 * time.Second, Logger: log})
	ctx := t.Context()
	base := inspect(t, b)
	keys := map[string]keystore.Algorithm{"ec": keystore.ES256, "rsa": keystore.RS256}
	pubs := map[string]crypto.PublicKey{}
	for id, alg := range keys {
		pub, err := b.Generate(ctx, id, keystore.KeySpec{Algorithm: alg})
		if err != nil {
			t.Fatal(err)
		}
		pubs[id] = pub
		mustSign(t, b, id, alg, pub, keystoretest.Digest(alg, []byte(id)))
	}
	g0, th0 := baseline()
	const rounds = 5 // RELIABILITY.md's T7
	for round := range rounds {
		if round == 0 {
			// While swtpm is down: a refused connection, at once.
			s.Kill()
			st := time.Now()
			_, err := b.Sign(ctx, "ec", keystoretest.Digest(keystore.ES256, []byte("down")), crypto.SHA256)
			if !errors.Is(err, keystore.ErrUnavailable) || time.Since(st) > time.Second {
				t.Errorf("Sign with swtpm down = %v after %v, want ErrUnavailable at once", err, time.Since(st))
			}
			s.Restart(t)
			time.Sleep(b.cooldown) // the fail-fast window after the refusal
		} else {
			// The last restart leaves the TPM unstarted, as after a
			// power-on: keyd must send TPM2_Startup(CLEAR) itself.
			s.NoStartup = round == rounds-1
			s.Restart(t)
		}
		// The first call after the restart must succeed: the broken
		// connection is noticed at once, and the call runs again.
		for id, alg := range keys {
			mustSign(t, b, id, alg, pubs[id], keystoretest.Digest(alg, fmt.Appendf(nil, "round %d", round)))
		}
	}
	if !strings.Contains(logged(), "TPM2_Startup") {
		t.Error("keyd never sent TPM2_Startup to the unstarted TPM (no log line)")
	}
	checkFootprint(t, b, base)
	if g, th := settle(g0); g > g0 || th > th0+4 {
		t.Errorf("goroutines %d → %d, threads %d → %d after restarts", g0, g, th0, th)
	}
}

// TestReset (T2): a TPM reset (swtpm_ioctl -i, as a reboot does) while keyd
// runs: the next call sees TPM_RC_INITIALIZE, keyd sends TPM2_Startup,
// re-creates the SRK and reloads the key, and the call succeeds.
func TestReset(t *testing.T) {
	s := swtpmtest.Start(t)
	b := newTestBackend(t, s, Config{})
	ctx := t.Context()
	base := inspect(t, b)
	g0, _ := baseline()
	pub, err := b.Generate(ctx, "k", keystore.KeySpec{Algorithm: keystore.ES384})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		mustSign(t, b, "k", keystore.ES384, pub, keystoretest.Digest(keystore.ES384, []byte("before")))
		s.Reset(t)
		mustSign(t, b, "k", keystore.ES384, pub, keystoretest.Digest(keystore.ES384, fmt.Appendf(nil, "after reset %d", i)))
	}
	s.Reset(t)
	if err := b.Health(ctx); err != nil {
		t.Errorf("Health after a reset: %v", err)
	}
	// A key generated after a reset is under the same (re-created) SRK.
	pub2 := keystoretest.MustGenerate(t, b, "k2")
	s.Reset(t)
	mustSign(t, b, "k2", keystore.ES256, pub2, keystoretest.Digest(keystore.ES256, []byte("k2")))
	checkFootprint(t, b, base)
	if g, _ := settle(g0); g > g0 {
		t.Errorf("goroutines %d → %d", g0, g)
	}
}

// TestChurn (T3, T9): many signatures and generate/destroy cycles leave the
// TPM's transient objects as after New (only the SRK), never hit
// TPM_RC_OBJECT_MEMORY, and every ECDSA signature verifies, including those
// whose r or s is shorter than the curve size.
func TestChurn(t *testing.T) {
	s := swtpmtest.Start(t)
	b := newTestBackend(t, s, Config{})
	ctx := t.Context()
	base := inspect(t, b)
	if len(base.transients) != 1 {
		t.Fatalf("after New the TPM holds %#x; want only the SRK", base.transients)
	}
	pubs := map[string]crypto.PublicKey{}
	ids := []string{"a", "b", "c"}
	for _, id := range ids {
		pub, err := b.Generate(ctx, id, keystore.KeySpec{Algorithm: keystore.ES256})
		if err != nil {
			t.Fatal(err)
		}
		pubs[id] = pub
	}
	const signs, cycles = 2000, 50
	short := 0
	start := time.Now()
	for i := range signs {
		// Mostly one key, as in production, with switches that reload.
		id := ids[0]
		if i%10 == 9 {
			id = ids[1+i%2]
		}
		d := keystoretest.Digest(keystore.ES256, fmt.Appendf(nil, "churn %d", i))
		sig, err := b.Sign(ctx, id, d, crypto.SHA256)
		if err != nil {
			t.Fatalf("sign %d: %v", i, err)
		}
		raw, isShort, err := rawECDSA(sig, 32)
		if err != nil {
			t.Fatalf("sign %d: %v", i, err)
		}
		if isShort {
			short++
		}
		k := pubs[id].(*ecdsa.PublicKey)
		if !ecdsa.Verify(k, d, new(big.Int).SetBytes(raw[:32]), new(big.Int).SetBytes(raw[32:])) {
			t.Fatalf("sign %d: padded r||s does not verify", i)
		}
	}
	signTime := time.Since(start)
	start = time.Now()
	for i := range cycles {
		id := fmt.Sprintf("cycle-%d", i)
		pub, err := b.Generate(ctx, id, keystore.KeySpec{Algorithm: keystore.ES256})
		if err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		mustSign(t, b, id, keystore.ES256, pub, keystoretest.Digest(keystore.ES256, []byte(id)))
		if err := b.Destroy(ctx, id); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if info := inspect(t, b); len(info.transients) != 1 {
			t.Fatalf("cycle %d: after destroying the loaded key the TPM holds %#x; want only the SRK", i, info.transients)
		}
	}
	t.Logf("%d ES256 signs in %v (%v each, -race); %d generate/sign/destroy cycles in %v; %d signatures had a short r or s",
		signs, signTime, signTime/signs, cycles, time.Since(start), short)
	if short == 0 {
		t.Errorf("no signature out of %d had a short r or s (expected about %d): the padding path went untested", signs, signs*2/256)
	}
	checkFootprint(t, b, base)
	if ids2, err := b.List(ctx); err != nil || !slices.Equal(ids2, ids) {
		t.Errorf("List = %q, %v; want %q", ids2, err, ids)
	}
}

// rawECDSA converts a DER signature into r||s left-padded to size each, and
// reports whether r or s was shorter than size.
func rawECDSA(der []byte, size int) ([]byte, bool, error) {
	var rs struct{ R, S *big.Int }
	if rest, err := asn1.Unmarshal(der, &rs); err != nil || len(rest) != 0 {
		return nil, false, fmt.Errorf("bad DER signature: %v", err)
	}
	out := make([]byte, 2*size)
	rs.R.FillBytes(out[:size])
	rs.S.FillBytes(out[size:])
	short := (rs.R.BitLen()+7)/8 < size || (rs.S.BitLen()+7)/8 < size
	return out, short, nil
}

// TestConcurrent64 (T8): 64 goroutines sign with three keys while keys come
// and go; every command goes through the one connection.
func TestConcurrent64(t *testing.T) {
	s := swtpmtest.Start(t)
	b := newTestBackend(t, s, Config{})
	ctx := t.Context()
	base := inspect(t, b)
	g0, _ := baseline()
	specs := map[string]keystore.Algorithm{"p256": keystore.ES256, "p384": keystore.ES384, "rsa": keystore.RS256}
	pubs := map[string]crypto.PublicKey{}
	for id, alg := range specs {
		pub, err := b.Generate(ctx, id, keystore.KeySpec{Algorithm: alg})
		if err != nil {
			t.Fatal(err)
		}
		pubs[id] = pub
	}
	ids := slices.Sorted(func(yield func(string) bool) {
		for id := range specs {
			if !yield(id) {
				return
			}
		}
	})
	var wg sync.WaitGroup
	for w := range 64 {
		wg.Go(func() {
			for i := range 4 {
				id := ids[(w+i)%len(ids)]
				alg := specs[id]
				d := keystoretest.Digest(alg, fmt.Appendf(nil, "w%d i%d", w, i))
				sig, err := b.Sign(ctx, id, d, alg.SignerOpts())
				if err != nil {
					t.Errorf("worker %d: %v", w, err)
					return
				}
				if err := keystoretest.VerifyDER(alg, pubs[id], d, sig); err != nil {
					t.Errorf("worker %d: %v", w, err)
					return
				}
			}
		})
	}
	wg.Go(func() {
		for i := range 5 {
			id := fmt.Sprintf("churn-%d", i)
			if _, err := b.Generate(ctx, id, keystore.KeySpec{Algorithm: keystore.ES256}); err != nil {
				t.Error(err)
				return
			}
			if err := b.Destroy(ctx, id); err != nil {
				t.Error(err)
				return
			}
		}
	})
	wg.Wait()
	checkFootprint(t, b, base)
	if g, _ := settle(g0); g > g0 {
		t.Errorf("goroutines %d → %d", g0, g)
	}
}

// TestFuzzedRequests (T4): a random stream of requests — bad IDs, unknown
// keys, wrong digests and signer options, unsupported algorithms,
// cancelled contexts — gets only the errors the contract names, and leaves
// the TPM's lockout counter at 0: no request can reach TPM authorization.
func TestFuzzedRequests(t *testing.T) {
	s := swtpmtest.Start(t)
	b := newTestBackend(t, s, Config{})
	base := inspect(t, b)
	g0, _ := baseline()
	if base.lockout != 0 {
		t.Fatalf("lockout counter %d before the test", base.lockout)
	}
	r := rand.New(rand.NewPCG(1, 2))
	// Keys that exist, so that well-formed requests reach the TPM.
	keys := map[string]keystore.Algorithm{"e256": keystore.ES256, "e384": keystore.ES384, "rsa": keystore.RS256}
	for id, alg := range keys {
		if _, err := b.Generate(t.Context(), id, keystore.KeySpec{Algorithm: alg}); err != nil {
			t.Fatal(err)
		}
	}
	ids := []string{"e256", "e384", "rsa", "new-0", "new-1", "new-2", "", "../x", "a b", strings.Repeat("z", 65), "absent", ".hidden", "é"}
	algs := append(keystore.Algorithms(), "HS256", "none", "")
	opts := []crypto.SignerOpts{nil, crypto.SHA256, crypto.SHA384, crypto.SHA512, crypto.Hash(0), crypto.MD5,
		&rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash},
		&rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthAuto},
		&rsa.PSSOptions{Hash: crypto.SHA384, SaltLength: 48}}
	allowed := []error{keystore.ErrNotFound, keystore.ErrAlreadyExists, keystore.ErrUnsupportedAlgorithm,
		keystore.ErrInvalidID, context.Canceled}
	const n = 600
	succeeded := map[string]int{}
	for i := range n {
		ctx := t.Context()
		if r.IntN(20) == 0 {
			c, cancel := context.WithCancel(ctx)
			cancel()
			ctx = c
		}
		id := ids[r.IntN(len(ids))]
		var err error
		var what, op string
		switch r.IntN(6) {
		case 0:
			op = "Generate"
			spec := keystore.KeySpec{Algorithm: algs[r.IntN(len(algs))], RSABits: []int{0, 1024, 2048, 4096}[r.IntN(4)]}
			if spec.Algorithm.IsRSA() && spec.RSABits != 1024 && spec.RSABits != 4096 && r.IntN(3) != 0 {
				spec.Algorithm = keystore.ES256 // keep TPM RSA keygen rare
			}
			what = fmt.Sprintf("Generate(%q, %v)", id, spec)
			_, err = b.Generate(ctx, id, spec)
		case 1, 2, 3:
			op = "Sign"
			var digest []byte
			var o crypto.SignerOpts
			if alg, ok := keys[id]; ok && r.IntN(2) == 0 {
				// Well-formed, sometimes with PS256 options on the RSA key.
				if alg == keystore.RS256 && r.IntN(2) == 0 {
					alg = keystore.PS256
				}
				digest, o = keystoretest.Digest(alg, fmt.Appendf(nil, "%d", i)), alg.SignerOpts()
			} else {
				digest = make([]byte, []int{0, 1, 20, 32, 48, 64, 1000}[r.IntN(7)])
				for j := range digest {
					digest[j] = byte(r.Uint32())
				}
				o = opts[r.IntN(len(opts))]
			}
			what = fmt.Sprintf("Sign(%q, %d bytes, %T %v)", id, len(digest), o, o)
			_, err = b.Sign(ctx, id, digest, o)
			if err != nil && strings.Contains(err.Error(), "digest is") {
				continue // wrong digest length: a caller error the API reports plainly
			}
		case 4:
			op = "Public"
			what = fmt.Sprintf("Public(%q)", id)
			_, err = b.Public(ctx, id)
		case 5:
			if r.IntN(4) != 0 {
				op, what = "List", "List"
				_, err = b.List(ctx)
			} else {
				op, what = "Destroy", fmt.Sprintf("Destroy(%q)", id)
				err = b.Destroy(ctx, id)
			}
		}
		if err == nil {
			succeeded[op]++
			continue
		}
		ok := false
		for _, a := range allowed {
			ok = ok || errors.Is(err, a)
		}
		if !ok {
			t.Errorf("request %d %s: %v (not an error the contract allows here)", i, what, err)
		}
	}
	t.Logf("successful requests: %v", succeeded)
	if succeeded["Sign"] == 0 || succeeded["Generate"] == 0 {
		t.Errorf("the stream never reached the TPM: successes %v", succeeded)
	}
	info := inspect(t, b)
	if info.lockout != 0 {
		t.Errorf("TPM_PT_LOCKOUT_COUNTER = %d after %d fuzzed requests, want 0", info.lockout, n)
	}
	checkFootprint(t, b, base)
	if g, _ := settle(g0); g > g0 {
		t.Errorf("goroutines %d → %d", g0, g)
	}
}

// TestCleared (T6): TPM2_Clear (tpm2_clear through the lockout hierarchy)
// changes the owner seed and so the SRK: New and, for a running backend,
// Sign, Generate and Health fail with ErrKeyLost; no key is replaced and
// the files and public keys stay.
func TestCleared(t *testing.T) {
	s := swtpmtest.Start(t)
	dir := filepath.Join(t.TempDir(), "state")
	ctx := t.Context()
	b := newTestBackend(t, s, Config{StateDir: dir})
	pub := keystoretest.MustGenerate(t, b, "k")
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k", keystore.ES256, pub, d)

	// swtpm serves one connection: let tpm2_clear in.
	disconnect(t, b)
	s.Tool(t, "tpm2_clear", "-c", "l")

	for _, f := range []struct {
		name string
		call func() error
	}{
		{"Sign", func() error { _, err := b.Sign(ctx, "k", d, crypto.SHA256); return err }},
		{"Sign again", func() error { _, err := b.Sign(ctx, "k", d, crypto.SHA256); return err }},
		{"Generate", func() error {
			_, err := b.Generate(ctx, "new", keystore.KeySpec{Algorithm: keystore.ES256})
			return err
		}},
		{"Health", func() error { return b.Health(ctx) }},
	} {
		if err := f.call(); !errors.Is(err, keystore.ErrKeyLost) {
			t.Errorf("%s after TPM2_Clear = %v, want ErrKeyLost", f.name, err)
		} else if f.name == "Sign" {
			t.Logf("Sign after TPM2_Clear: %v", err)
		}
	}
	if got, err := b.Public(ctx, "k"); err != nil || !pub.(*ecdsa.PublicKey).Equal(got) {
		t.Errorf("Public after TPM2_Clear = %v, %v; want the last-known key", got, err)
	}
	if ids, err := b.List(ctx); err != nil || !slices.Equal(ids, []string{"k"}) {
		t.Errorf("List after TPM2_Clear = %q, %v; want [k] (no key lost from disk, none added)", ids, err)
	}
	b.Close()

	_, err := newTestBackendErr(t, s, Config{StateDir: dir}, nil)
	if !errors.Is(err, keystore.ErrKeyLost) {
		t.Fatalf("New after TPM2_Clear = %v, want ErrKeyLost", err)
	}
	t.Logf("New after TPM2_Clear: %v", err)
	if _, err := os.Stat(filepath.Join(dir, "k"+keySuffix)); err != nil {
		t.Errorf("key file gone after a refused New: %v", err)
	}
	// The refused New flushed what it created: the TPM has no transient
	// objects left (tpm2_getcap can connect, and lists none).
	if out := s.Tool(t, "tpm2_getcap", "handles-transient"); strings.TrimSpace(out) != "" {
		t.Errorf("transient objects left after a refused New: %s", out)
	}
}

// TestPin (T6): the pinned SRK name is checked at start.
func TestPin(t *testing.T) {
	s := swtpmtest.Start(t)
	ctx := t.Context()
	for _, tc := range []struct {
		name   string
		tamper func(t *testing.T, dir string)
	}{
		{"OtherName", func(t *testing.T, dir string) {
			p := pin{template: srkTemplateID, name: append([]byte{0, 0xb}, make([]byte, 32)...)}
			writeFile(t, filepath.Join(dir, pinFile), p.encode(), 0o600)
		}},
		{"OtherTemplate", func(t *testing.T, dir string) {
			data, err := os.ReadFile(filepath.Join(dir, pinFile))
			if err != nil {
				t.Fatal(err)
			}
			data = []byte(strings.Replace(string(data), srkTemplateID, "tcg-rsa-2048-srk", 1))
			writeFile(t, filepath.Join(dir, pinFile), data, 0o600)
		}},
		{"Missing", func(t *testing.T, dir string) {
			if err := os.Remove(filepath.Join(dir, pinFile)); err != nil {
				t.Fatal(err)
			}
		}},
		{"Garbled", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, pinFile), []byte("name=zz\n"), 0o600)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "state")
			b := newTestBackend(t, s, Config{StateDir: dir})
			if _, err := b.Generate(ctx, "k", keystore.KeySpec{Algorithm: keystore.ES256}); err != nil {
				t.Fatal(err)
			}
			b.Close()
			tc.tamper(t, dir)
			if _, err := newTestBackendErr(t, s, Config{StateDir: dir}, nil); !errors.Is(err, keystore.ErrKeyLost) {
				t.Fatalf("New = %v, want ErrKeyLost", err)
			} else {
				t.Logf("New: %v", err)
			}
		})
	}
	t.Run("Reopen", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "state")
		b := newTestBackend(t, s, Config{StateDir: dir})
		pub, err := b.Generate(ctx, "k", keystore.KeySpec{Algorithm: keystore.RS256})
		if err != nil {
			t.Fatal(err)
		}
		b.Close()
		b = newTestBackend(t, s, Config{StateDir: dir})
		mustSign(t, b, "k", keystore.RS256, pub, keystoretest.Digest(keystore.RS256, []byte("reopened")))
	})
}

// TestOwnerAuth: the owner hierarchy's authorization comes from a file; a
// wrong one is ErrLocked, at once, without touching the lockout counter.
func TestOwnerAuth(t *testing.T) {
	s := swtpmtest.Start(t)
	s.Tool(t, "tpm2_changeauth", "-c", "o", "hunter2")
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	bad := filepath.Join(dir, "bad")
	writeFile(t, good, []byte("hunter2\n"), 0o600)
	writeFile(t, bad, []byte("hunter3\n"), 0o600)

	_, err := newTestBackendErr(t, s, Config{}, nil)
	if !errors.Is(err, keystore.ErrLocked) {
		t.Errorf("New without the owner auth = %v, want ErrLocked", err)
	}
	for range 5 {
		_, err = newTestBackendErr(t, s, Config{OwnerAuthFile: bad}, nil)
		if !errors.Is(err, keystore.ErrLocked) {
			t.Fatalf("New with a wrong owner auth = %v, want ErrLocked", err)
		}
	}
	t.Logf("wrong owner auth: %v", err)
	b := newTestBackend(t, s, Config{OwnerAuthFile: good})
	pub := keystoretest.MustGenerate(t, b, "k")
	mustSign(t, b, "k", keystore.ES256, pub, keystoretest.Digest(keystore.ES256, []byte("m")))
	if info := inspect(t, b); info.lockout != 0 {
		t.Errorf("lockout counter %d after wrong owner auths, want 0", info.lockout)
	}

	loose := filepath.Join(dir, "loose")
	writeFile(t, loose, []byte("hunter2"), 0o644)
	if _, err := New(t.Context(), Config{Address: s.Addr(), StateDir: t.TempDir(), OwnerAuthFile: loose}); !errors.Is(err, keystore.ErrInsecureStorage) {
		t.Errorf("New with a world-readable owner auth file = %v, want ErrInsecureStorage", err)
	}
	if _, err := New(t.Context(), Config{Address: s.Addr(), StateDir: t.TempDir(), OwnerAuthFile: filepath.Join(dir, "missing")}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("New with a missing owner auth file = %v, want fs.ErrNotExist", err)
	}
}

// TestStorage (S1, S2): unsafe or altered key files are refused with the
// right sentinel; an interrupted write leaves no key; one process per
// state directory.
func TestStorage(t *testing.T) {
	s := swtpmtest.Start(t)
	ctx := t.Context()
	dir := filepath.Join(t.TempDir(), "state")
	b := newTestBackend(t, s, Config{StateDir: dir})
	spec := keystore.KeySpec{Algorithm: keystore.ES256}
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	gen := func(id string) []byte {
		t.Helper()
		if _, err := b.Generate(ctx, id, spec); err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(b.keyPath(id))
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	reopen := func() {
		t.Helper()
		b.Close()
		b = newTestBackend(t, s, Config{StateDir: dir})
	}

	if _, err := New(ctx, Config{Address: s.Addr(), StateDir: dir}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second New on one state directory = %v, want an in-use error", err)
	}

	gen("loose")
	gen("link")
	data := gen("corrupt")
	blob, err := decodeKey(data)
	if err != nil {
		t.Fatal(err)
	}
	blob.priv = slices.Clone(blob.priv)
	blob.priv[len(blob.priv)-1] ^= 1
	corrupted, _ := encodeKey(blob)
	data = gen("weak")
	blob, _ = decodeKey(data)
	pub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](blob.pub)
	pub.ObjectAttributes.NoDA = false
	blob.pub = tpm2.Marshal(*pub)
	weak, _ := encodeKey(blob)
	reopen()

	if err := os.Chmod(b.keyPath("loose"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(b.keyPath("link"), filepath.Join(dir, "elsewhere")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(dir, "elsewhere"), b.keyPath("link")); err != nil {
		t.Fatal(err)
	}
	writeFile(t, b.keyPath("corrupt"), corrupted, 0o600)
	writeFile(t, b.keyPath("weak"), weak, 0o600)
	writeFile(t, b.keyPath("garbage"), []byte("not a key"), 0o600)
	for id, want := range map[string]error{
		"loose":   keystore.ErrInsecureStorage,
		"link":    keystore.ErrInsecureStorage,
		"weak":    keystore.ErrInsecureStorage,
		"corrupt": keystore.ErrKeyLost,
		"garbage": keystore.ErrKeyLost,
	} {
		if _, err := b.Sign(ctx, id, d, crypto.SHA256); !errors.Is(err, want) {
			t.Errorf("Sign(%s) = %v, want %v", id, err, want)
		} else {
			t.Logf("Sign(%s): %v", id, err)
		}
	}

	// A write that fails half-way leaves no key and no temporary file, and
	// the ID stays free.
	b.failpoint = func(stage string) error {
		if stage == "written" {
			return errors.New("disk full")
		}
		return nil
	}
	if _, err := b.Generate(ctx, "interrupted", spec); err == nil {
		t.Fatal("Generate with a failing write succeeded")
	}
	b.failpoint = nil
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), "interrupted") {
			t.Errorf("left behind: %s", e.Name())
		}
	}
	pubKey, err := b.Generate(ctx, "interrupted", spec)
	if err != nil {
		t.Fatalf("Generate after an interrupted write: %v", err)
	}
	mustSign(t, b, "interrupted", keystore.ES256, pubKey, d)

	// A temporary file left by a crash is removed at start.
	writeFile(t, filepath.Join(dir, "crashed"+keySuffix+tempInfix+"123"), []byte("x"), 0o600)
	reopen()
	if _, err := os.Stat(filepath.Join(dir, "crashed"+keySuffix+tempInfix+"123")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("leftover temporary file not removed: %v", err)
	}

	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	b.Close()
	if _, err := New(ctx, Config{Address: s.Addr(), StateDir: dir}); !errors.Is(err, keystore.ErrInsecureStorage) {
		t.Errorf("New on a 0777 state directory = %v, want ErrInsecureStorage", err)
	}
	os.Chmod(dir, 0o700)
}

// TestConfig checks the endpoint syntax and required fields.
func TestConfig(t *testing.T) {
	for _, tc := range []struct {
		device, address string
		want            endpoint
		bad             bool
	}{
		{"", "", endpoint{"device", "/dev/tpmrm0"}, false},
		{"/dev/tpm0", "", endpoint{"device", "/dev/tpm0"}, false},
		{"", "tcp://127.0.0.1:2321", endpoint{"tcp", "127.0.0.1:2321"}, false},
		{"", "127.0.0.1:2321", endpoint{"tcp", "127.0.0.1:2321"}, false},
		{"", "unix:///run/swtpm.sock", endpoint{"unix", "/run/swtpm.sock"}, false},
		{"", "unix:/run/swtpm.sock", endpoint{"unix", "/run/swtpm.sock"}, false},
		{"/dev/tpmrm0", "tcp://127.0.0.1:2321", endpoint{}, true},
		{"", "http://x:1", endpoint{}, true},
		{"", "tcp://nohost", endpoint{}, true},
		{"", "unix://", endpoint{}, true},
		{"", "unix:relative/swtpm.sock", endpoint{}, true},
		{"", "unix://relative/swtpm.sock", endpoint{}, true},
		{"", "127.0.0.1:swtpm", endpoint{}, true},
		{"", "tcp://127.0.0.1:0", endpoint{}, true},
		{"", "tcp://127.0.0.1:65536", endpoint{}, true},
		{"", "tcp://[::1]:2321", endpoint{"tcp", "[::1]:2321"}, false},
	} {
		got, err := parseEndpoint(tc.device, tc.address)
		if tc.bad != (err != nil) || got != tc.want {
			t.Errorf("parseEndpoint(%q, %q) = %v, %v; want %v, error %v", tc.device, tc.address, got, err, tc.want, tc.bad)
		}
	}
	if _, err := New(t.Context(), Config{}); err == nil {
		t.Error("New without StateDir succeeded")
	}
	err := Config{Device: "/dev/tpmrm0", Address: "tcp://127.0.0.1:1", CommandTimeout: -1, KeygenTimeout: -1}.Validate()
	for _, want := range []string{"state_dir", "not both", "command_timeout", "keygen_timeout"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate = %v; want every problem reported, %q among them", err, want)
		}
	}
	// The device path: not a device, and a character device that is no
	// TPM (/dev/null answers nothing).
	notDevice := filepath.Join(t.TempDir(), "tpm")
	writeFile(t, notDevice, nil, 0o600)
	for _, dev := range []string{notDevice, "/dev/null"} {
		_, err := New(t.Context(), Config{Device: dev, StateDir: t.TempDir(), CommandTimeout: time.Second})
		if !errors.Is(err, keystore.ErrUnavailable) {
			t.Errorf("New with device %s = %v, want ErrUnavailable", dev, err)
		} else {
			t.Logf("device %s: %v", dev, err)
		}
	}
	// Nothing listens: ErrUnavailable, not a hang.
	port, err := swtpmtest.FreePortPair()
	if err != nil {
		t.Fatal(err)
	}
	_, err = New(t.Context(), Config{Address: fmt.Sprintf("tcp://127.0.0.1:%d", port), StateDir: t.TempDir(), CommandTimeout: time.Second})
	if !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("New with nothing listening = %v, want ErrUnavailable", err)
	}
}

func writeFile(t *testing.T, path string, data []byte, mode fs.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

func mustSign(t *testing.T, b *Backend, id string, alg keystore.Algorithm, pub crypto.PublicKey, d []byte) {
	t.Helper()
	sig, err := b.Sign(t.Context(), id, d, alg.SignerOpts())
	if err != nil {
		t.Fatalf("Sign(%q): %v", id, err)
	}
	if err := keystoretest.VerifyDER(alg, pub, d, sig); err != nil {
		t.Fatalf("Sign(%q): %v", id, err)
	}
}

// recoverSign signs until it works, within limit; only ErrUnavailable may
// come before.
func recoverSign(t *testing.T, b *Backend, id string, alg keystore.Algorithm, pub crypto.PublicKey, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	d := keystoretest.Digest(alg, []byte("recovered"))
	for {
		sig, err := b.Sign(t.Context(), id, d, alg.SignerOpts())
		if err == nil {
			if err := keystoretest.VerifyDER(alg, pub, d, sig); err != nil {
				t.Fatal(err)
			}
			return
		}
		if !errors.Is(err, keystore.ErrUnavailable) {
			t.Fatalf("Sign while recovering = %v, want ErrUnavailable or success", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery within %v: %v", limit, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestDeadlines: callers waiting for the TPM, or for a command in flight,
// get their context's error at their deadline; the command finishes in the
// background and its result is dropped (a generated key is not stored).
func TestDeadlines(t *testing.T) {
	s := swtpmtest.Start(t)
	hold := newCreateHold(t)
	b, err := newTestBackendErr(t, s, Config{}, hold.hook)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	base := inspect(t, b)
	k := keystoretest.MustGenerate(t, b, "k")
	g0, _ := baseline()

	hold.on.Store(true)
	type result struct {
		err  error
		took time.Duration
	}
	gen := make(chan result, 1)
	go func() {
		gctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		st := time.Now()
		_, err := b.Generate(gctx, "slow", keystore.KeySpec{Algorithm: keystore.ES256})
		gen <- result{err, time.Since(st)}
	}()
	<-hold.entered // TPM2_Create is in flight, holding the TPM

	sctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	st := time.Now()
	_, err = b.Sign(sctx, "k", keystoretest.Digest(keystore.ES256, []byte("m")), crypto.SHA256)
	took := time.Since(st)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || took > 600*time.Millisecond {
		t.Errorf("Sign queued behind a stuck command = %v after %v, want DeadlineExceeded after ≈100ms", err, took)
	}
	if r := <-gen; !errors.Is(r.err, context.DeadlineExceeded) || r.took > 800*time.Millisecond {
		t.Errorf("Generate whose command is stuck = %v after %v, want DeadlineExceeded after ≈300ms", r.err, r.took)
	}
	hold.release() // the command completes in the background
	mustSign(t, b, "k", keystore.ES256, k, keystoretest.Digest(keystore.ES256, []byte("after")))
	if ids, err := b.List(ctx); err != nil || !slices.Equal(ids, []string{"k"}) {
		t.Errorf("List = %q, %v; want [k]: a generate whose caller gave up must not store a key", ids, err)
	}
	checkFootprint(t, b, base)
	if g, _ := settle(g0); g > g0 {
		t.Errorf("goroutines %d → %d", g0, g)
	}
}

// LoseKey removes the key file of id behind the backend's back.
func (p probed) LoseKey(t *testing.T, id string) {
	t.Helper()
	if err := os.Remove(p.keyPath(id)); err != nil {
		t.Fatal(err)
	}
}

// RSA key generation takes a hardware TPM seconds to tens of seconds, with
// every signature waiting: the log says so when it begins, not only once
// it is done. EC keys are quick and say nothing before.
func TestRSAGenerationAnnounced(t *testing.T) {
	s := swtpmtest.Start(t)
	log, logged := testLogger(t)
	b := newTestBackend(t, s, Config{Logger: log})
	defer b.Close()
	const announce = "generating an RSA key in the TPM"
	if _, err := b.Generate(t.Context(), "ec", keystore.KeySpec{Algorithm: keystore.ES256}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logged(), announce) {
		t.Errorf("an EC key's generation was announced:\n%s", logged())
	}
	if _, err := b.Generate(t.Context(), "rs", keystore.KeySpec{Algorithm: keystore.RS256}); err != nil {
		t.Fatal(err)
	}
	out := logged()
	i, j := strings.Index(out, announce), strings.LastIndex(out, "key generated")
	if i < 0 || i > j || !strings.Contains(out[i:], "id=rs") {
		t.Errorf("the RSA key's generation was not announced before it ended:\n%s", out)
	}
}
