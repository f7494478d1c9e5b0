package jws

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"math/big"
	"strings"
	"testing"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/keyd-dev/keyd/keystore"
)

// signer is a private key together with the public key and algorithm it
// serves, as a backend would hold it.
type signer struct {
	alg  keystore.Algorithm
	priv crypto.Signer
	pub  crypto.PublicKey
}

// testSigners returns one key per algorithm keyd supports.
// ecdsaSignature is the ASN.1 form of an ECDSA signature (RFC 3279 §2.2.3,
// SEC 1 §C.8) for encoding/asn1: SEQUENCE { r INTEGER, s INTEGER }; the
// tests build and check DER with it (the package decodes with
// internal/ecdsasig).
type ecdsaSignature struct {
	R, S *big.Int
}

func testSigners(t testing.TB) []signer {
	t.Helper()
	p256, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	edPub, edPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return []signer{
		{keystore.ES256, p256, &p256.PublicKey},
		{keystore.ES384, p384, &p384.PublicKey},
		{keystore.RS256, rsaKey, &rsaKey.PublicKey},
		{keystore.PS256, rsaKey, &rsaKey.PublicKey},
		{keystore.EdDSA, edPriv, edPub},
	}
}

// stdSign signs digest with the standard library's algorithm-specific
// functions, the way a software backend would.
func stdSign(t testing.TB, s signer, digest []byte) []byte {
	t.Helper()
	var sig []byte
	var err error
	switch k := s.priv.(type) {
	case *ecdsa.PrivateKey:
		sig, err = ecdsa.SignASN1(rand.Reader, k, digest)
	case *rsa.PrivateKey:
		if s.alg == keystore.PS256 {
			sig, err = rsa.SignPSS(rand.Reader, k, crypto.SHA256, digest, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		} else {
			sig, err = rsa.SignPKCS1v15(rand.Reader, k, crypto.SHA256, digest)
		}
	case ed25519.PrivateKey:
		sig = ed25519.Sign(k, digest)
	default:
		t.Fatalf("key type %T", s.priv)
	}
	if err != nil {
		t.Fatal(err)
	}
	return sig
}

// signJWS builds a compact JWS over claims with s, the way keyd does: header,
// signing input, digest, backend signature, JOSE encoding.
func signJWS(t testing.TB, s signer, claims []byte, sign func(signer, []byte) []byte) (signingInput, jwsSig []byte, token string) {
	t.Helper()
	signingInput = SigningInput([]byte(`{"alg":"`+string(s.alg)+`","typ":"JWT"}`), claims)
	digest, err := Digest(s.alg, signingInput)
	if err != nil {
		t.Fatal(err)
	}
	jwsSig, err = EncodeSignature(s.alg, s.pub, sign(s, digest))
	if err != nil {
		t.Fatalf("EncodeSignature: %v", err)
	}
	return signingInput, jwsSig, Compact(signingInput, jwsSig)
}

// joseVerify verifies a compact JWS with go-jose, an independent verifier.
func joseVerify(token string, alg keystore.Algorithm, pub crypto.PublicKey) ([]byte, error) {
	obj, err := jose.ParseSigned(token, []jose.SignatureAlgorithm{jose.SignatureAlgorithm(alg)})
	if err != nil {
		return nil, err
	}
	return obj.Verify(pub)
}

// sigLen is the JWS signature length for s.
func sigLen(s signer) int {
	switch s.alg {
	case keystore.ES256:
		return 64
	case keystore.ES384:
		return 96
	case keystore.EdDSA:
		return 64
	}
	return s.pub.(*rsa.PublicKey).Size()
}

func TestSignAndVerifyEveryAlgorithm(t *testing.T) {
	for _, s := range testSigners(t) {
		t.Run(string(s.alg), func(t *testing.T) {
			claims := []byte(`{"sub":"alice","n":` + string(s.alg[1]) + `0}`)
			sign := func(s signer, d []byte) []byte { return stdSign(t, s, d) }
			in, sig, token := signJWS(t, s, claims, sign)
			if len(sig) != sigLen(s) {
				t.Errorf("signature of %d bytes, want %d", len(sig), sigLen(s))
			}
			payload, err := joseVerify(token, s.alg, s.pub)
			if err != nil {
				t.Fatalf("go-jose: %v", err)
			}
			if !bytes.Equal(payload, claims) {
				t.Errorf("go-jose payload %s, want %s", payload, claims)
			}
			if err := Verify(s.alg, s.pub, in, sig); err != nil {
				t.Errorf("Verify: %v", err)
			}

			// The same through crypto.Signer with the algorithm's SignerOpts,
			// which is exactly what keystore.Backend.Sign promises.
			viaSigner := func(s signer, d []byte) []byte {
				sig, err := s.priv.Sign(rand.Reader, d, s.alg.SignerOpts())
				if err != nil {
					t.Fatal(err)
				}
				return sig
			}
			in, sig, token = signJWS(t, s, claims, viaSigner)
			if _, err := joseVerify(token, s.alg, s.pub); err != nil {
				t.Errorf("go-jose (crypto.Signer): %v", err)
			}
			if err := Verify(s.alg, s.pub, in, sig); err != nil {
				t.Errorf("Verify (crypto.Signer): %v", err)
			}

			// Tampering is caught.
			tampered := bytes.Clone(in)
			tampered[len(tampered)-1] ^= 1
			if err := Verify(s.alg, s.pub, tampered, sig); !errors.Is(err, ErrBadSignature) {
				t.Errorf("Verify(tampered input) = %v, want ErrBadSignature", err)
			}
			bad := bytes.Clone(sig)
			bad[len(bad)/2] ^= 0x40
			if err := Verify(s.alg, s.pub, in, bad); !errors.Is(err, ErrBadSignature) {
				t.Errorf("Verify(tampered signature) = %v, want ErrBadSignature", err)
			}
			if err := Verify(s.alg, s.pub, in, sig[:len(sig)-1]); !errors.Is(err, ErrBadSignature) {
				t.Errorf("Verify(short signature) = %v, want ErrBadSignature", err)
			}
			if err := Verify(s.alg, s.pub, in, append(bytes.Clone(sig), 0)); !errors.Is(err, ErrBadSignature) {
				t.Errorf("Verify(long signature) = %v, want ErrBadSignature", err)
			}
		})
	}
}

// TestES256Padding signs until r and s of both sizes have been seen and
// checks every signature is exactly 64 bytes and verifies with go-jose: the
// 1-in-128 case where r or s is shorter than 32 bytes is the classic ES256
// bug.
func TestES256Padding(t *testing.T) {
	s := testSigners(t)[0]
	if s.alg != keystore.ES256 {
		t.Fatal("first test signer is not ES256")
	}
	const minSigs, maxSigs, wantShort = 300, 20000, 3
	sign := func(s signer, d []byte) []byte { return stdSign(t, s, d) }
	short, signed := 0, 0
	for signed < minSigs || short < wantShort {
		if signed == maxSigs {
			t.Fatalf("only %d signatures with a short r or s in %d", short, maxSigs)
		}
		signed++
		claims := []byte(`{"i":` + big.NewInt(int64(signed)).String() + `}`)
		in, sig, token := signJWS(t, s, claims, sign)
		if len(sig) != 64 {
			t.Fatalf("signature %d is %d bytes", signed, len(sig))
		}
		if sig[0] == 0 || sig[32] == 0 {
			short++
		}
		if _, err := joseVerify(token, s.alg, s.pub); err != nil {
			t.Fatalf("signature %d (%x): go-jose: %v", signed, sig, err)
		}
		if err := Verify(s.alg, s.pub, in, sig); err != nil {
			t.Fatalf("signature %d (%x): Verify: %v", signed, sig, err)
		}
	}
	t.Logf("%d signatures, %d with a leading zero byte in r or s", signed, short)
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestEncodeSignatureECDSADER(t *testing.T) {
	keys := testKeys(t)
	p256, p384 := keys["P-256"], keys["P-384"]
	order256 := elliptic.P256().Params().N
	order384 := elliptic.P384().Params().N
	der := func(r, s *big.Int) []byte {
		b, err := asn1.Marshal(ecdsaSignature{r, s})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	one := big.NewInt(1)
	high := new(big.Int).SetBytes(mustHex(t, "80"+strings.Repeat("11", 31)))
	ff := strings.Repeat("ff", 32)

	tests := []struct {
		name    string
		alg     keystore.Algorithm
		der     []byte
		want    []byte
		wantErr error
	}{
		{
			// r has its high bit set, so DER adds a 0x00 sign byte (33
			// content bytes); s is three bytes long.
			name: "sign byte and short s",
			alg:  keystore.ES256,
			der:  mustHex(t, "30 28 0221 00"+"80"+strings.Repeat("11", 31)+" 0203 010203"),
			want: mustHex(t, "80"+strings.Repeat("11", 31)+strings.Repeat("00", 29)+"010203"),
		},
		{
			name: "short r",
			alg:  keystore.ES256,
			der:  mustHex(t, "30 25 021e "+strings.Repeat("22", 30)+" 0203 00ffff"),
			want: mustHex(t, "0000"+strings.Repeat("22", 30)+strings.Repeat("00", 30)+"ffff"),
		},
		{"r = 1, s = n-1", keystore.ES256, der(one, new(big.Int).Sub(order256, one)),
			append(append(make([]byte, 31), 1), new(big.Int).Sub(order256, one).FillBytes(make([]byte, 32))...), nil},
		{"P-384 short", keystore.ES384, der(big.NewInt(5), high),
			append(append(make([]byte, 47), 5), high.FillBytes(make([]byte, 48))...), nil},

		{"empty", keystore.ES256, nil, nil, ErrBadSignature},
		{"raw r||s", keystore.ES256, mustHex(t, "31"+strings.Repeat("11", 63)), nil, ErrBadSignature},
		{"raw r||s starting 0x30", keystore.ES256, mustHex(t, "30"+strings.Repeat("11", 63)), nil, ErrBadSignature},
		{"trailing data", keystore.ES256, append(der(high, one), 0), nil, ErrBadSignature},
		{"extra element in sequence", keystore.ES256, mustHex(t, "30 09 020101 020101 020101"), nil, ErrBadSignature},
		{"r = 0", keystore.ES256, der(big.NewInt(0), one), nil, ErrBadSignature},
		{"s = 0", keystore.ES256, der(one, big.NewInt(0)), nil, ErrBadSignature},
		{"r negative", keystore.ES256, der(big.NewInt(-1), one), nil, ErrBadSignature},
		{"s negative", keystore.ES256, mustHex(t, "30 25 020101 0220 80"+strings.Repeat("11", 31)), nil, ErrBadSignature},
		{"r = n", keystore.ES256, der(order256, one), nil, ErrBadSignature},
		{"s = n", keystore.ES256, der(one, order256), nil, ErrBadSignature},
		{"r > n", keystore.ES256, der(new(big.Int).SetBytes(mustHex(t, ff)), one), nil, ErrBadSignature},
		{"r longer than the curve", keystore.ES256, der(new(big.Int).Lsh(one, 256), one), nil, ErrBadSignature},
		{"P-384 r = n", keystore.ES384, der(order384, one), nil, ErrBadSignature},
		{"P-384 s from P-256 in range but too long DER", keystore.ES256, der(order384, order384), nil, ErrBadSignature},
		{"non-minimal integer", keystore.ES256, mustHex(t, "30 07 02020001 020101"), nil, ErrBadSignature},
		{"non-minimal length", keystore.ES256, mustHex(t, "30 8106 020101 020101"), nil, ErrBadSignature},
		{"indefinite length", keystore.ES256, mustHex(t, "30 80 020101 020101 0000"), nil, ErrBadSignature},
		{"wrong tag", keystore.ES256, mustHex(t, "31 06 020101 020101"), nil, ErrBadSignature},
		{"truncated", keystore.ES256, der(high, high)[:40], nil, ErrBadSignature},
		{"only r", keystore.ES256, mustHex(t, "30 03 020101"), nil, ErrBadSignature},
		{"bit string instead of integer", keystore.ES256, mustHex(t, "30 06 030101 020101"), nil, ErrBadSignature},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pub := p256
			if tt.alg == keystore.ES384 {
				pub = p384
			}
			got, err := EncodeSignature(tt.alg, pub, tt.der)
			if !errors.Is(err, tt.wantErr) || (err != nil) != (tt.wantErr != nil) {
				t.Fatalf("EncodeSignature(%x) = %x, %v; want %v", tt.der, got, err, tt.wantErr)
			}
			if !bytes.Equal(got, tt.want) {
				t.Errorf("EncodeSignature(%x) =\n%x\nwant\n%x", tt.der, got, tt.want)
			}
		})
	}
}

// TestEncodeSignatureDoesNotAlias checks the result is a fresh slice for
// every algorithm.
func TestEncodeSignatureDoesNotAlias(t *testing.T) {
	for _, s := range testSigners(t) {
		in := SigningInput([]byte(`{}`), []byte(`{}`))
		d, err := Digest(s.alg, in)
		if err != nil {
			t.Fatal(err)
		}
		sig := stdSign(t, s, d)
		out, err := EncodeSignature(s.alg, s.pub, sig)
		if err != nil {
			t.Fatal(err)
		}
		if len(out) > 0 && len(sig) > 0 && &out[0] == &sig[0] {
			t.Errorf("%s: EncodeSignature aliases its input", s.alg)
		}
	}
}

func TestEncodeSignatureErrors(t *testing.T) {
	signers := testSigners(t)
	keys := map[keystore.Algorithm]crypto.PublicKey{}
	for _, s := range signers {
		keys[s.alg] = s.pub
	}
	rsaPub := keys[keystore.RS256].(*rsa.PublicKey)
	tests := []struct {
		name    string
		alg     keystore.Algorithm
		pub     crypto.PublicKey
		sig     []byte
		wantErr error
	}{
		{"RS256 short", keystore.RS256, rsaPub, make([]byte, rsaPub.Size()-1), ErrBadSignature},
		{"RS256 long", keystore.RS256, rsaPub, make([]byte, rsaPub.Size()+1), ErrBadSignature},
		{"PS256 empty", keystore.PS256, rsaPub, nil, ErrBadSignature},
		{"EdDSA 63", keystore.EdDSA, keys[keystore.EdDSA], make([]byte, 63), ErrBadSignature},
		{"EdDSA 65", keystore.EdDSA, keys[keystore.EdDSA], make([]byte, 65), ErrBadSignature},
		{"ES384 DER for ES256 key", keystore.ES384, keys[keystore.ES256], mustHex(t, "3006020101020101"), ErrUnsupportedKey},
		{"ES256 with RSA key", keystore.ES256, rsaPub, mustHex(t, "3006020101020101"), ErrUnsupportedKey},
		{"RS256 with EC key", keystore.RS256, keys[keystore.ES256], make([]byte, 256), ErrUnsupportedKey},
		{"EdDSA with EC key", keystore.EdDSA, keys[keystore.ES256], make([]byte, 64), ErrUnsupportedKey},
		{"ES256 with nil key", keystore.ES256, nil, mustHex(t, "3006020101020101"), ErrUnsupportedKey},
		{"ES256 with private key", keystore.ES256, signers[0].priv, mustHex(t, "3006020101020101"), ErrUnsupportedKey},
		{"unknown alg", "ES512", keys[keystore.ES256], mustHex(t, "3006020101020101"), keystore.ErrUnsupportedAlgorithm},
		{"none", "none", keys[keystore.ES256], nil, keystore.ErrUnsupportedAlgorithm},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := EncodeSignature(tt.alg, tt.pub, tt.sig); !errors.Is(err, tt.wantErr) {
				t.Errorf("EncodeSignature = %v, want %v", err, tt.wantErr)
			}
			if err := Verify(tt.alg, tt.pub, []byte("a.b"), tt.sig); !errors.Is(err, tt.wantErr) {
				t.Errorf("Verify = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

// TestPS256MaximumSalt: crypto.Signer with rsa.PSSSaltLengthAuto (what
// go-jose's cryptosigner does) uses the maximum salt, which RFC 7518 §3.5
// does not allow. Verify must refuse it even though lenient verifiers accept
// it.
func TestPS256MaximumSalt(t *testing.T) {
	var s signer
	for _, c := range testSigners(t) {
		if c.alg == keystore.PS256 {
			s = c
		}
	}
	in := SigningInput([]byte(`{"alg":"PS256"}`), []byte(`{}`))
	d, err := Digest(keystore.PS256, in)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		salt int
	}{
		{"maximum salt", rsa.PSSSaltLengthAuto},
		{"salt of 20", 20},
		{"salt of 64", 64},
	} {
		t.Run(tt.name, func(t *testing.T) {
			raw, err := rsa.SignPSS(rand.Reader, s.priv.(*rsa.PrivateKey), crypto.SHA256, d, &rsa.PSSOptions{SaltLength: tt.salt})
			if err != nil {
				t.Fatal(err)
			}
			sig, err := EncodeSignature(keystore.PS256, s.pub, raw)
			if err != nil {
				t.Fatalf("EncodeSignature: %v", err)
			}
			if err := Verify(keystore.PS256, s.pub, in, sig); !errors.Is(err, ErrBadSignature) {
				t.Errorf("Verify = %v, want ErrBadSignature", err)
			}
			// The signature is otherwise valid: a verifier that guesses the
			// salt length accepts it.
			if err := rsa.VerifyPSS(s.pub.(*rsa.PublicKey), crypto.SHA256, d, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto}); err != nil {
				t.Errorf("auto-salt verify: %v", err)
			}
		})
	}
}

// TestVerifyCrossAlgorithm checks an RS256 signature is not a PS256 one and
// the other way round.
func TestVerifyCrossAlgorithm(t *testing.T) {
	signers := testSigners(t)
	var rs, ps signer
	for _, s := range signers {
		switch s.alg {
		case keystore.RS256:
			rs = s
		case keystore.PS256:
			ps = s
		}
	}
	sign := func(s signer, d []byte) []byte { return stdSign(t, s, d) }
	in, sig, _ := signJWS(t, rs, []byte(`{}`), sign)
	if err := Verify(keystore.PS256, rs.pub, in, sig); !errors.Is(err, ErrBadSignature) {
		t.Errorf("RS256 signature as PS256: %v, want ErrBadSignature", err)
	}
	in, sig, _ = signJWS(t, ps, []byte(`{}`), sign)
	if err := Verify(keystore.RS256, ps.pub, in, sig); !errors.Is(err, ErrBadSignature) {
		t.Errorf("PS256 signature as RS256: %v, want ErrBadSignature", err)
	}
}

// TestVerifyRejectsOutOfRangeRS checks raw ES256 signatures whose r or s is
// 0 or not below the order are refused, not reduced.
func TestVerifyRejectsOutOfRangeRS(t *testing.T) {
	s := testSigners(t)[0]
	in, sig, _ := signJWS(t, s, []byte(`{}`), func(s signer, d []byte) []byte { return stdSign(t, s, d) })
	n := elliptic.P256().Params().N
	rPlusN := new(big.Int).Add(new(big.Int).SetBytes(sig[:32]), n)
	zero := make([]byte, 32)
	tests := map[string][]byte{
		"r = 0":   append(bytes.Clone(zero), sig[32:]...),
		"s = 0":   append(bytes.Clone(sig[:32]), zero...),
		"r = n":   append(n.FillBytes(make([]byte, 32)), sig[32:]...),
		"r all 1": append(bytes.Repeat([]byte{0xff}, 32), sig[32:]...),
	}
	if rPlusN.BitLen() <= 256 {
		tests["r + n"] = append(rPlusN.FillBytes(make([]byte, 32)), sig[32:]...)
	}
	for name, bad := range tests {
		if err := Verify(keystore.ES256, s.pub, in, bad); !errors.Is(err, ErrBadSignature) {
			t.Errorf("%s: Verify = %v, want ErrBadSignature", name, err)
		}
	}
}

// A SignatureEncoder gives EncodeSignature's answers; the zero value refuses.
func TestSignatureEncoder(t *testing.T) {
	for _, s := range testSigners(t) {
		digest, err := Digest(s.alg, []byte("eyJhbGciOiJFUzI1NiJ9.e30"))
		if err != nil {
			t.Fatal(err)
		}
		sig := stdSign(t, s, digest)
		enc, err := NewSignatureEncoder(s.alg, s.pub)
		if err != nil {
			t.Fatal(err)
		}
		got, err := enc.Encode(sig)
		want, werr := EncodeSignature(s.alg, s.pub, sig)
		if err != nil || werr != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: Encode = %x, %v; EncodeSignature = %x, %v", s.alg, got, err, want, werr)
		}
		if _, err := enc.Encode(sig[1:]); !errors.Is(err, ErrBadSignature) {
			t.Errorf("%s: short signature: %v", s.alg, err)
		}
	}
	if _, err := (SignatureEncoder{}).Encode(make([]byte, 64)); !errors.Is(err, ErrUnsupportedKey) {
		t.Errorf("zero SignatureEncoder: %v", err)
	}
	if _, err := NewSignatureEncoder(keystore.ES256, nil); !errors.Is(err, ErrUnsupportedKey) {
		t.Errorf("nil key: %v", err)
	}
}
