package keystoretest

import (
	"bytes"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/asn1"
	"errors"
	"io"
	"math/big"
	"strings"
	"sync"
	"testing"

	"github.com/keyd-dev/keyd/keystore"
)

// The test keys are generated once: RSA keygen is slow under -race.
var (
	rsaKey = sync.OnceValue(func() *rsa.PrivateKey {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			panic(err)
		}
		return k
	})
	p256Key = sync.OnceValue(func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			panic(err)
		}
		return k
	})
	p384Key = sync.OnceValue(func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
		if err != nil {
			panic(err)
		}
		return k
	})
)

// P14: a PS256 signature must use a salt as long as the hash. crypto.Signer's
// default (rsa.PSSSaltLengthAuto when signing) is the maximum salt, which lax
// verifiers (go-jose among them) accept.
func TestVerifyDERPSSSalt(t *testing.T) {
	k := rsaKey()
	d := Digest(keystore.PS256, []byte("m"))
	for _, tt := range []struct {
		salt int
		ok   bool
	}{
		{rsa.PSSSaltLengthEqualsHash, true},
		{32, true},
		{rsa.PSSSaltLengthAuto, false}, // maximum salt
		{20, false},
		{64, false},
	} {
		sig, err := rsa.SignPSS(rand.Reader, k, crypto.SHA256, d, &rsa.PSSOptions{SaltLength: tt.salt})
		if err != nil {
			t.Fatal(err)
		}
		err = VerifyDER(keystore.PS256, &k.PublicKey, d, sig)
		if (err == nil) != tt.ok {
			t.Errorf("salt length %d: VerifyDER = %v, want ok=%v", tt.salt, err, tt.ok)
		}
	}
	// Neither RSA scheme passes for the other.
	pkcs, err := rsa.SignPKCS1v15(nil, k, crypto.SHA256, d)
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifyDER(keystore.PS256, &k.PublicKey, d, pkcs); err == nil {
		t.Error("an RS256 signature verifies as PS256")
	}
	if err := VerifyDER(keystore.RS256, &k.PublicKey, d, pkcs); err != nil {
		t.Errorf("RS256: %v", err)
	}
	pss, _ := rsa.SignPSS(rand.Reader, k, crypto.SHA256, d, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
	if err := VerifyDER(keystore.RS256, &k.PublicKey, d, pss); err == nil {
		t.Error("a PS256 signature verifies as RS256")
	}
}

func TestVerifyDERMismatch(t *testing.T) {
	d256 := Digest(keystore.ES256, []byte("m"))
	d384 := Digest(keystore.ES384, []byte("m"))
	sig, err := ecdsa.SignASN1(rand.Reader, p256Key(), d256)
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifyDER(keystore.ES256, &p256Key().PublicKey, d256, sig); err != nil {
		t.Fatalf("ES256: %v", err)
	}
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	for name, err := range map[string]error{
		"ES384 with a P-256 key":   VerifyDER(keystore.ES384, &p256Key().PublicKey, d384, sig),
		"ES256 with a P-384 key":   VerifyDER(keystore.ES256, &p384Key().PublicKey, d256, sig),
		"ES256 with an RSA key":    VerifyDER(keystore.ES256, &rsaKey().PublicKey, d256, sig),
		"ES256 with a private key": VerifyDER(keystore.ES256, p256Key(), d256, sig),
		"ES256 short digest":       VerifyDER(keystore.ES256, &p256Key().PublicKey, d256[:31], sig),
		"ES256 raw r||s":           VerifyDER(keystore.ES256, &p256Key().PublicKey, d256, mustJOSE(t, keystore.ES256, sig)),
		"EdDSA with a private key": VerifyDER(keystore.EdDSA, priv, []byte("m"), ed25519.Sign(priv, []byte("m"))),
		"EdDSA other message":      VerifyDER(keystore.EdDSA, pub, []byte("n"), ed25519.Sign(priv, []byte("m"))),
		"HS256":                    VerifyDER("HS256", pub, []byte("m"), nil),
	} {
		if err == nil {
			t.Errorf("%s: VerifyDER succeeded", name)
		}
	}
	if err := VerifyDER(keystore.EdDSA, pub, []byte("m"), ed25519.Sign(priv, []byte("m"))); err != nil {
		t.Errorf("EdDSA: %v", err)
	}
}

func mustJOSE(t *testing.T, alg keystore.Algorithm, der []byte) []byte {
	t.Helper()
	raw, err := joseSignature(alg, der)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func derSig(t *testing.T, r, s *big.Int) []byte {
	t.Helper()
	der, err := asn1.Marshal(struct{ R, S *big.Int }{r, s})
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// P12: r and s are left-padded to the curve size.
func TestJOSESignaturePadding(t *testing.T) {
	raw := mustJOSE(t, keystore.ES256, derSig(t, big.NewInt(1), big.NewInt(0x0102)))
	want := make([]byte, 64)
	want[31], want[62], want[63] = 1, 1, 2
	if !bytes.Equal(raw, want) {
		t.Errorf("ES256 r=1 s=0x0102: got %x, want %x", raw, want)
	}
	raw = mustJOSE(t, keystore.ES384, derSig(t, big.NewInt(7), big.NewInt(9)))
	if len(raw) != 96 || raw[47] != 7 || raw[95] != 9 {
		t.Errorf("ES384: got %x", raw)
	}
	// A full-width r whose DER has a leading 0x00 (high bit set).
	top := new(big.Int).Lsh(big.NewInt(1), 255)
	raw = mustJOSE(t, keystore.ES256, derSig(t, top, big.NewInt(1)))
	if raw[0] != 0x80 {
		t.Errorf("ES256 r=2^255: got %x", raw)
	}

	bad := map[string][]byte{
		"r too wide":     derSig(t, new(big.Int).Lsh(big.NewInt(1), 256), big.NewInt(1)),
		"negative s":     derSig(t, big.NewInt(1), big.NewInt(-1)),
		"zero r":         derSig(t, big.NewInt(0), big.NewInt(1)),
		"trailing bytes": append(derSig(t, big.NewInt(1), big.NewInt(1)), 0),
		"not DER":        {0x01, 0x02},
		"raw":            make([]byte, 64),
	}
	for name, der := range bad {
		if raw, err := joseSignature(keystore.ES256, der); err == nil {
			t.Errorf("%s: converted to %x", name, raw)
		}
	}
}

// P12: real signatures whose r or s has a leading zero byte convert and verify
// (about one signature in 256 has one).
func TestJWSLeadingZero(t *testing.T) {
	for _, tc := range []struct {
		alg keystore.Algorithm
		key *ecdsa.PrivateKey
	}{{keystore.ES256, p256Key()}, {keystore.ES384, p384Key()}} {
		size := ecSize(tc.alg)
		for which := range 2 {
			// sign re-signs the same digest until the wanted half is short.
			sign := func(digest []byte) ([]byte, error) {
				for range 20000 {
					der, err := ecdsa.SignASN1(rand.Reader, tc.key, digest)
					if err != nil {
						return nil, err
					}
					var rs struct{ R, S *big.Int }
					if _, err := asn1.Unmarshal(der, &rs); err != nil {
						return nil, err
					}
					if []*big.Int{rs.R, rs.S}[which].BitLen() <= 8*(size-1) {
						return der, nil
					}
				}
				return nil, errors.New("no signature with a leading zero byte in 20000 tries")
			}
			if err := checkJWSWith(t, tc.alg, &tc.key.PublicKey, which, sign); err != nil {
				t.Errorf("%s, %c with a leading zero: %v", tc.alg, "rs"[which], err)
			}
		}
	}
}

// The JWS checks catch a bad signature, both the standard library path and
// the go-jose one.
func TestJWSCatchesBadSignature(t *testing.T) {
	k := p256Key()
	corrupt := func(digest []byte) ([]byte, error) {
		d := bytes.Clone(digest)
		d[0] ^= 1
		return ecdsa.SignASN1(rand.Reader, k, d)
	}
	if err := checkJWSWith(t, keystore.ES256, &k.PublicKey, 0, corrupt); err == nil {
		t.Error("a signature over another digest passed the JWS check")
	}

	d := Digest(keystore.ES256, []byte("x"))
	der, _ := ecdsa.SignASN1(rand.Reader, k, d)
	compact := b64.EncodeToString([]byte(`{"alg":"ES256"}`)) + "." + b64.EncodeToString([]byte("x")) + "." + b64.EncodeToString(mustJOSE(t, keystore.ES256, der))
	if err := verifyGoJOSE(keystore.ES256, &k.PublicKey, compact, []byte("x")); err == nil {
		t.Error("go-jose accepted a signature over another signing input")
	}
	// And accepts a good one, under a header it parses.
	input := b64.EncodeToString([]byte(`{"alg":"ES256"}`)) + "." + b64.EncodeToString([]byte("x"))
	der, _ = ecdsa.SignASN1(rand.Reader, k, Digest(keystore.ES256, []byte(input)))
	if err := verifyGoJOSE(keystore.ES256, &k.PublicKey, input+"."+b64.EncodeToString(mustJOSE(t, keystore.ES256, der)), []byte("x")); err != nil {
		t.Errorf("go-jose rejected a good signature: %v", err)
	}
	// go-jose does not check the PSS salt length: VerifyDER must.
	maxSalt := func(digest []byte) ([]byte, error) {
		return rsa.SignPSS(rand.Reader, rsaKey(), crypto.SHA256, digest, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
	}
	if err := checkJWSWith(t, keystore.PS256, &rsaKey().PublicKey, 0, maxSalt); err == nil {
		t.Error("a PS256 JWS with the maximum salt passed the JWS check")
	}
}

func TestCheckPublicKey(t *testing.T) {
	_, edPriv, _ := ed25519.GenerateKey(rand.Reader)
	x, _ := ecdh.P256().GenerateKey(rand.Reader)
	ok := []struct {
		spec keystore.KeySpec
		pub  crypto.PublicKey
	}{
		{keystore.KeySpec{Algorithm: keystore.ES256}, &p256Key().PublicKey},
		{keystore.KeySpec{Algorithm: keystore.ES384}, &p384Key().PublicKey},
		{keystore.KeySpec{Algorithm: keystore.RS256}, &rsaKey().PublicKey},
		{keystore.KeySpec{Algorithm: keystore.PS256, RSABits: 2048}, &rsaKey().PublicKey},
		{keystore.KeySpec{Algorithm: keystore.EdDSA}, edPriv.Public()},
	}
	for _, tt := range ok {
		if err := CheckPublicKey(tt.spec, tt.pub); err != nil {
			t.Errorf("%v: %v", tt.spec, err)
		}
	}
	bad := []struct {
		spec keystore.KeySpec
		pub  crypto.PublicKey
		want string
	}{
		{keystore.KeySpec{Algorithm: keystore.ES256}, p256Key(), "private"},
		{keystore.KeySpec{Algorithm: keystore.RS256}, rsaKey(), "private"},
		{keystore.KeySpec{Algorithm: keystore.EdDSA}, edPriv, "private"},
		{keystore.KeySpec{Algorithm: keystore.EdDSA}, &edPriv, "private"},
		{keystore.KeySpec{Algorithm: keystore.ES256}, x, "private"},
		{keystore.KeySpec{Algorithm: keystore.ES256}, signerOnly{}, "private material"},
		{keystore.KeySpec{Algorithm: keystore.ES256}, &p384Key().PublicKey, "curve"},
		{keystore.KeySpec{Algorithm: keystore.ES256}, x.PublicKey(), "want *ecdsa.PublicKey"},
		{keystore.KeySpec{Algorithm: keystore.RS256, RSABits: 3072}, &rsaKey().PublicKey, "2048-bit"},
		{keystore.KeySpec{Algorithm: keystore.RS256}, &rsa.PublicKey{N: rsaKey().N, E: 3}, "exponent"},
		{keystore.KeySpec{Algorithm: keystore.EdDSA}, ed25519.PublicKey(make([]byte, 31)), "31-byte"},
		{keystore.KeySpec{Algorithm: "HS256"}, &p256Key().PublicKey, "not supported"},
	}
	for _, tt := range bad {
		err := CheckPublicKey(tt.spec, tt.pub)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%v %T: CheckPublicKey = %v, want an error saying %q", tt.spec, tt.pub, err, tt.want)
		}
	}
}

// signerOnly is a "public key" that can sign: it holds private material.
type signerOnly struct{}

func (signerOnly) Public() crypto.PublicKey { return nil }
func (signerOnly) Sign(_ io.Reader, _ []byte, _ crypto.SignerOpts) ([]byte, error) {
	return nil, nil
}
