package tpm

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"encoding/binary"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/internal/swtpmtest"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// signDigest returns the digest of a hand-encoded TPM2_Sign command (after
// the header, the key handle and the password authorization area).
func signDigest(t *testing.T, cmd []byte) []byte {
	const at = headerSize + 4 + 4 + pwAuthSize
	if len(cmd) < at+2 {
		t.Errorf("TPM2_Sign command of %d bytes", len(cmd))
		return nil
	}
	n := int(binary.BigEndian.Uint16(cmd[at:]))
	return cmd[at+2 : at+2+n]
}

// forger is a test hook that answers TPM2_Sign with a signature by another
// P-256 key when told to: forge after a TPM2_Load, or a forgery of its own
// making for the next TPM2_Sign.
type forger struct {
	t         *testing.T
	key       *ecdsa.PrivateKey
	mu        sync.Mutex
	afterLoad int // forge this many TPM2_Sign right after a TPM2_Load
	next      func(digest []byte) []byte
	armed     bool // a TPM2_Load was seen and no TPM2_Sign since
	loads     int
	forged    int
}

func newForger(t *testing.T) *forger {
	k, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &forger{t: t, key: k}
}

// wrong is a well-formed ES256 signature of digest by the wrong key.
func (f *forger) wrong(digest []byte) []byte {
	r, s, err := ecdsa.Sign(crand.Reader, f.key, digest)
	if err != nil {
		f.t.Error(err)
	}
	return signResponse(ecdsaSig(tpm2.TPMAlgSHA256, r.FillBytes(make([]byte, 32)), s.FillBytes(make([]byte, 32))))
}

func (f *forger) hook(cmd []byte) ([]byte, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch tpm2.TPMCC(commandCode(cmd)) {
	case tpm2.TPMCCLoad:
		f.loads++
		f.armed = true
	case tpm2.TPMCCSign:
		armed := f.armed
		f.armed = false
		if next := f.next; next != nil {
			f.next = nil
			f.forged++
			return next(signDigest(f.t, cmd)), true, nil
		}
		if armed && f.afterLoad > 0 {
			f.afterLoad--
			f.forged++
			return f.wrong(signDigest(f.t, cmd)), true, nil
		}
	}
	return nil, false, nil
}

func (f *forger) set(fn func(*forger)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *forger) counts() (loads, forged int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.loads, f.forged
}

// TestVerifyAfterLoad: the first signature after each TPM2_Load is verified
// against the stored public key. A wrong one there (the handle names
// another object) is caught: keyd re-creates the SRK, reloads the key and
// signs again, once; if that is wrong too, Sign fails. Signatures by the
// same loaded handle afterwards get only the structural checks.
func TestVerifyAfterLoad(t *testing.T) {
	s := swtpmtest.Start(t)
	f := newForger(t)
	log, logged := testLogger(t)
	b, err := newTestBackendErr(t, s, Config{Logger: log}, f.hook)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	base := inspect(t, b)
	pub := keystoretest.MustGenerate(t, b, "k")
	pub2 := keystoretest.MustGenerate(t, b, "k2")
	d := keystoretest.Digest(keystore.ES256, []byte("m"))

	// The first signature after the first load is wrong: caught, and
	// the second attempt (a fresh SRK, a fresh load) signs.
	f.set(func(f *forger) { f.afterLoad = 1 })
	mustSign(t, b, "k", keystore.ES256, pub, d)
	if loads, forged := f.counts(); loads != 2 || forged != 1 {
		t.Errorf("after a wrong first signature: %d loads, %d forged; want 2 loads (the retry reloads), 1 forged", loads, forged)
	}
	if !strings.Contains(logged(), "does not verify") {
		t.Error("the wrong signature was not logged")
	}

	// Wrong after every load: Sign fails, after two attempts.
	f.set(func(f *forger) { f.afterLoad = 2 })
	_, err = b.Sign(ctx, "k2", d, crypto.SHA256)
	if err == nil || !strings.Contains(err.Error(), "do not verify") {
		t.Errorf("Sign with wrong signatures after every load = %v, want a verification failure", err)
	}
	f.set(func(f *forger) { f.afterLoad = 0 })
	mustSign(t, b, "k2", keystore.ES256, pub2, d)

	// A TPM reset: the key is reloaded, and the first signature after
	// the reload is verified again.
	s.Reset(t)
	f.set(func(f *forger) { f.afterLoad = 1 })
	loads0, forged0 := f.counts()
	mustSign(t, b, "k2", keystore.ES256, pub2, d)
	if loads, forged := f.counts(); loads-loads0 != 2 || forged-forged0 != 1 {
		t.Errorf("after a reset: %d loads, %d forged; want 2 and 1", loads-loads0, forged-forged0)
	}

	// The handle is now verified: further signatures by it are not
	// verified (by design: nothing else can be at that handle while the
	// connection lives), so a forged one would pass; the structural
	// checks still catch malformed ones, without a retry.
	f.set(func(f *forger) { f.next = f.wrong })
	if sig, err := b.Sign(ctx, "k2", d, crypto.SHA256); err != nil {
		t.Errorf("Sign by a verified handle: %v", err)
	} else if keystoretest.VerifyDER(keystore.ES256, pub2, d, sig) == nil {
		t.Error("the forged signature verifies?")
	}
	r32 := make([]byte, 32)
	r32[0] = 1
	for _, tc := range []struct {
		name string
		rsp  []byte
		want string
	}{
		{"r zero", signResponse(ecdsaSig(tpm2.TPMAlgSHA256, make([]byte, 32), r32)), "zero"},
		{"s long", signResponse(ecdsaSig(tpm2.TPMAlgSHA256, r32, make([]byte, 33))), "longer"},
		{"hash", signResponse(ecdsaSig(tpm2.TPMAlgSHA384, r32, r32)), "hash"},
		{"rsa", signResponse(rsaSig(tpm2.TPMAlgRSASSA, tpm2.TPMAlgSHA256, r32)), "scheme"},
		{"garbage", []byte{0x80, 0x02, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0}, "malformed"},
	} {
		f.set(func(f *forger) { f.next = func([]byte) []byte { return tc.rsp } })
		loads0, _ := f.counts()
		if _, err := b.Sign(ctx, "k2", d, crypto.SHA256); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Sign = %v, want an error with %q", tc.name, err, tc.want)
		} else {
			t.Logf("%s: %v", tc.name, err)
		}
		if loads, _ := f.counts(); loads != loads0 {
			t.Errorf("%s: the key was reloaded", tc.name)
		}
	}
	if _, forged := f.counts(); forged != 10 {
		t.Errorf("%d signatures forged, want 10", forged)
	}
	mustSign(t, b, "k2", keystore.ES256, pub2, d)
	mustSign(t, b, "k", keystore.ES256, pub, d)
	checkFootprint(t, b, base)
}

// TestVerifySig: verifySig refuses a signature by another key, for every
// algorithm.
func TestVerifySig(t *testing.T) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	other, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	blob := &keyBlob{kind: kindP256, key: &k.PublicKey}
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	good, _ := ecdsa.SignASN1(crand.Reader, k, d)
	bad, _ := ecdsa.SignASN1(crand.Reader, other, d)
	if err := verifySig(blob, d, tpm2.TPMAlgECDSA, good); err != nil {
		t.Error(err)
	}
	if err := verifySig(blob, d, tpm2.TPMAlgECDSA, bad); err == nil {
		t.Error("a signature by another key verifies")
	}
}

// TestMalformedSignatureUnavailable: a signature the structural checks
// refuse (the TPM answered TPM2_Sign with something keyd did not ask for)
// fails Sign with ErrUnavailable, as Sign's contract lists, not with a bare
// error the server can only answer as an internal error.
func TestMalformedSignatureUnavailable(t *testing.T) {
	s := swtpmtest.Start(t)
	f := newForger(t)
	b, err := newTestBackendErr(t, s, Config{}, f.hook)
	if err != nil {
		t.Fatal(err)
	}
	pub := keystoretest.MustGenerate(t, b, "k")
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k", keystore.ES256, pub, d)
	r32 := make([]byte, 32)
	r32[0] = 1
	for _, tc := range []struct {
		name string
		rsp  []byte
	}{
		{"r zero", signResponse(ecdsaSig(tpm2.TPMAlgSHA256, make([]byte, 32), r32))},
		{"s long", signResponse(ecdsaSig(tpm2.TPMAlgSHA256, r32, make([]byte, 33)))},
		{"hash", signResponse(ecdsaSig(tpm2.TPMAlgSHA384, r32, r32))},
		{"rsa", signResponse(rsaSig(tpm2.TPMAlgRSASSA, tpm2.TPMAlgSHA256, r32))},
		{"hmac", signResponse(tpm2.TPMTSignature{
			SigAlg:    tpm2.TPMAlgHMAC,
			Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgHMAC, &tpm2.TPMTHA{HashAlg: tpm2.TPMAlgSHA256, Digest: r32}),
		})},
	} {
		f.set(func(f *forger) { f.next = func([]byte) []byte { return tc.rsp } })
		if _, err := b.Sign(t.Context(), "k", d, crypto.SHA256); !errors.Is(err, keystore.ErrUnavailable) {
			t.Errorf("%s: Sign = %v, want ErrUnavailable", tc.name, err)
		}
	}
	mustSign(t, b, "k", keystore.ES256, pub, d)
}
