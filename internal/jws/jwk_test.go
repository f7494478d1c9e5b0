package jws

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math/big"
	"slices"
	"strings"
	"testing"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/keyd-dev/keyd/keystore"
)

// RFC 7638 §3.1: the example RSA key and its SHA-256 thumbprint.
const (
	rfc7638N = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
	rfc7638E = "AQAB"
	rfc7638T = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

	// RFC 8037 Appendix A.2 and A.3: an Ed25519 public key and its thumbprint.
	rfc8037X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
	rfc8037T = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
)

func TestThumbprintRFC7638(t *testing.T) {
	// The JWK exactly as RFC 7638 §3.1 shows it, with kid and alg, which do
	// not enter the thumbprint.
	doc := `{
      "kty": "RSA",
      "n": "` + rfc7638N + `",
      "e": "` + rfc7638E + `",
      "alg": "RS256",
      "kid": "2011-04-29"
     }`
	var k JWK
	if err := json.Unmarshal([]byte(doc), &k); err != nil {
		t.Fatalf("Unmarshal: %v", err)
	}
	got, err := k.Thumbprint()
	if err != nil {
		t.Fatalf("JWK.Thumbprint: %v", err)
	}
	if got != rfc7638T {
		t.Errorf("JWK.Thumbprint = %s, want %s", got, rfc7638T)
	}
	pub, err := k.PublicKey()
	if err != nil {
		t.Fatalf("PublicKey: %v", err)
	}
	if got, err := Thumbprint(pub); err != nil || got != rfc7638T {
		t.Errorf("Thumbprint(pub) = %s, %v; want %s", got, err, rfc7638T)
	}
	back, err := PublicJWK(pub)
	if err != nil {
		t.Fatalf("PublicJWK: %v", err)
	}
	if back.N != rfc7638N || back.E != rfc7638E {
		t.Errorf("PublicJWK n/e = %s / %s, want the RFC's", back.N, back.E)
	}
}

func TestThumbprintRFC8037(t *testing.T) {
	k := JWK{Kty: "OKP", Crv: "Ed25519", X: rfc8037X}
	got, err := k.Thumbprint()
	if err != nil {
		t.Fatalf("Thumbprint: %v", err)
	}
	if got != rfc8037T {
		t.Errorf("Thumbprint = %s, want %s", got, rfc8037T)
	}
}

// joseThumbprint is the independent RFC 7638 implementation of go-jose.
func joseThumbprint(t *testing.T, pub crypto.PublicKey) string {
	t.Helper()
	tp, err := (&jose.JSONWebKey{Key: pub}).Thumbprint(crypto.SHA256)
	if err != nil {
		t.Fatalf("go-jose Thumbprint: %v", err)
	}
	return base64.RawURLEncoding.EncodeToString(tp)
}

// ecKeyWithLeadingZero generates P-256 keys until the x (coord 0) or y
// (coord 1) coordinate has a leading zero byte, which big.Int.Bytes would
// drop.
func ecKeyWithLeadingZero(t *testing.T, coord int) *ecdsa.PublicKey {
	t.Helper()
	for range 20000 {
		priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		b, err := priv.PublicKey.Bytes()
		if err != nil {
			t.Fatal(err)
		}
		if b[1+32*coord] == 0 {
			return &priv.PublicKey
		}
	}
	t.Fatal("no P-256 key with a leading zero coordinate in 20000 tries")
	return nil
}

// RELIABILITY P13: EC coordinates with a leading zero byte stay 32 bytes in
// the JWK and in the RFC 7638 thumbprint.
func TestThumbprintLeadingZeroCoordinates(t *testing.T) {
	for coord, name := range []string{"x", "y"} {
		t.Run(name, func(t *testing.T) {
			pub := ecKeyWithLeadingZero(t, coord)
			k, err := PublicJWK(pub)
			if err != nil {
				t.Fatalf("PublicJWK: %v", err)
			}
			for _, v := range []string{k.X, k.Y} {
				if len(v) != 43 {
					t.Errorf("coordinate %q is %d base64url chars, want 43", v, len(v))
				}
			}
			value := k.X
			if coord == 1 {
				value = k.Y
			}
			if raw, err := base64.RawURLEncoding.DecodeString(value); err != nil || len(raw) != 32 || raw[0] != 0 {
				t.Errorf("%s = %s, want 32 bytes with a leading zero byte", name, value)
			}
			got, err := Thumbprint(pub)
			if err != nil {
				t.Fatalf("Thumbprint: %v", err)
			}
			if want := joseThumbprint(t, pub); got != want {
				t.Errorf("Thumbprint = %s, go-jose says %s", got, want)
			}
			back, err := k.PublicKey()
			if err != nil {
				t.Fatalf("PublicKey: %v", err)
			}
			if !pub.Equal(back) {
				t.Error("PublicKey does not round-trip")
			}
		})
	}
}

// testKeys returns one fresh public key of every kind keyd supports, those
// of testSigners.
func testKeys(t testing.TB) map[string]crypto.PublicKey {
	t.Helper()
	names := map[keystore.Algorithm]string{keystore.ES256: "P-256", keystore.ES384: "P-384", keystore.RS256: "RSA", keystore.EdDSA: "Ed25519"}
	keys := map[string]crypto.PublicKey{}
	for _, s := range testSigners(t) {
		if name, ok := names[s.alg]; ok {
			keys[name] = s.pub
		}
	}
	return keys
}

func TestJWKAgainstGoJose(t *testing.T) {
	for name, pub := range testKeys(t) {
		t.Run(name, func(t *testing.T) {
			tp, err := Thumbprint(pub)
			if err != nil {
				t.Fatalf("Thumbprint: %v", err)
			}
			if want := joseThumbprint(t, pub); tp != want {
				t.Errorf("Thumbprint = %s, go-jose says %s", tp, want)
			}

			k, err := PublicJWK(pub)
			if err != nil {
				t.Fatalf("PublicJWK: %v", err)
			}
			k.Kid, k.Use = "key-1", "sig"
			k.Alg = string(AlgorithmForKey(pub)[0])
			data, err := json.Marshal(k)
			if err != nil {
				t.Fatalf("Marshal: %v", err)
			}
			var jk jose.JSONWebKey
			if err := json.Unmarshal(data, &jk); err != nil {
				t.Fatalf("go-jose cannot read %s: %v", data, err)
			}
			if !jk.IsPublic() || !jk.Valid() {
				t.Errorf("go-jose: public %v, valid %v", jk.IsPublic(), jk.Valid())
			}
			if eq, ok := pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !eq.Equal(jk.Key) {
				t.Errorf("go-jose read a different key from %s", data)
			}
			if jk.KeyID != "key-1" || jk.Use != "sig" || jk.Algorithm != k.Alg {
				t.Errorf("go-jose read kid %q use %q alg %q", jk.KeyID, jk.Use, jk.Algorithm)
			}

			// And the other way: go-jose's JWK reads back as the same key and
			// thumbprint here.
			joseData, err := json.Marshal(jk)
			if err != nil {
				t.Fatalf("go-jose Marshal: %v", err)
			}
			var back JWK
			if err := json.Unmarshal(joseData, &back); err != nil {
				t.Fatalf("Unmarshal %s: %v", joseData, err)
			}
			got, err := back.PublicKey()
			if err != nil {
				t.Fatalf("PublicKey of %s: %v", joseData, err)
			}
			if !pub.(interface{ Equal(crypto.PublicKey) bool }).Equal(got) {
				t.Error("key does not round-trip through go-jose")
			}
			if tp2, err := back.Thumbprint(); err != nil || tp2 != tp {
				t.Errorf("JWK.Thumbprint = %s, %v; want %s", tp2, err, tp)
			}
		})
	}
}

func TestMarshalJSONOrder(t *testing.T) {
	k := JWK{Kty: "EC", Crv: "P-256", X: "xx", Y: "yy", N: "nn", E: "ee", Kid: `a"b<`, Alg: "ES256", Use: "sig"}
	data, err := json.Marshal(k)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"kty":"EC","crv":"P-256","x":"xx","y":"yy","n":"nn","e":"ee","kid":"a\"b\u003c","alg":"ES256","use":"sig"}`
	if string(data) != want {
		t.Errorf("Marshal =\n%s\nwant\n%s", data, want)
	}
	data, err = json.Marshal(JWK{Kty: "OKP", Crv: "Ed25519", X: "xx"})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"kty":"OKP","crv":"Ed25519","x":"xx"}`; string(data) != want {
		t.Errorf("Marshal = %s, want %s", data, want)
	}
}

func TestPublicJWKUnsupported(t *testing.T) {
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p256, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, edPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	n := new(big.Int).Lsh(big.NewInt(1), 2047)
	n.Add(n, big.NewInt(1)) // odd, 2048 bits
	tests := []struct {
		name string
		key  crypto.PublicKey
	}{
		{"nil", nil},
		{"nil ECDSA", (*ecdsa.PublicKey)(nil)},
		{"P-224", &p224.PublicKey},
		{"ECDSA private key", p256},
		{"point off the curve", &ecdsa.PublicKey{Curve: elliptic.P256(), X: big.NewInt(1), Y: big.NewInt(1)}},
		{"ECDSA without coordinates", &ecdsa.PublicKey{Curve: elliptic.P256()}},
		{"ECDSA without y", &ecdsa.PublicKey{Curve: elliptic.P256(), X: big.NewInt(1)}},
		{"ECDSA without curve", &ecdsa.PublicKey{X: big.NewInt(1), Y: big.NewInt(1)}},
		{"nil RSA", (*rsa.PublicKey)(nil)},
		{"RSA negative modulus", &rsa.PublicKey{N: new(big.Int).Neg(n), E: 65537}},
		{"RSA without modulus", &rsa.PublicKey{E: 65537}},
		{"RSA 1024", &rsa.PublicKey{N: new(big.Int).Add(new(big.Int).Lsh(big.NewInt(1), 1023), big.NewInt(1)), E: 65537}},
		{"RSA even exponent", &rsa.PublicKey{N: n, E: 65536}},
		{"RSA exponent 1", &rsa.PublicKey{N: n, E: 1}},
		{"RSA even modulus", &rsa.PublicKey{N: new(big.Int).Lsh(big.NewInt(1), 2047), E: 65537}},
		{"Ed25519 private key", edPriv},
		{"short Ed25519", ed25519.PublicKey(make([]byte, 31))},
		{"pointer to Ed25519", new(ed25519.PublicKey)},
		{"bytes", []byte("key")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := PublicJWK(tt.key); !errors.Is(err, ErrUnsupportedKey) {
				t.Errorf("PublicJWK: %v, want ErrUnsupportedKey", err)
			}
			if _, err := Thumbprint(tt.key); !errors.Is(err, ErrUnsupportedKey) {
				t.Errorf("Thumbprint: %v, want ErrUnsupportedKey", err)
			}
			if algs := AlgorithmForKey(tt.key); algs != nil {
				t.Errorf("AlgorithmForKey = %v, want nil", algs)
			}
		})
	}
}

func TestAlgorithmForKey(t *testing.T) {
	keys := testKeys(t)
	want := map[string][]keystore.Algorithm{
		"P-256":   {keystore.ES256},
		"P-384":   {keystore.ES384},
		"RSA":     {keystore.RS256, keystore.PS256},
		"Ed25519": {keystore.EdDSA},
	}
	for name, pub := range keys {
		if got := AlgorithmForKey(pub); !slices.Equal(got, want[name]) {
			t.Errorf("%s: AlgorithmForKey = %v, want %v", name, got, want[name])
		}
	}
}

func TestUnmarshalJSON(t *testing.T) {
	ec := `"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"`
	tests := []struct {
		name    string
		in      string
		want    JWK
		wantErr error
	}{
		{"EC", "{" + ec + "}", JWK{Kty: "EC", Crv: "P-256", X: "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", Y: "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}, nil},
		{"unknown members ignored", `{"kty":"OKP","key_ops":["verify"],"x5c":[],"ext":true,"crv":"Ed25519","x":"` + rfc8037X + `","kid":"k","use":"sig","alg":"EdDSA"}`,
			JWK{Kty: "OKP", Crv: "Ed25519", X: rfc8037X, Kid: "k", Use: "sig", Alg: "EdDSA"}, nil},
		{"white space", " {\n \"kty\" : \"RSA\" } \n", JWK{Kty: "RSA"}, nil},
		{"escaped name", `{"\u006bty":"RSA"}`, JWK{Kty: "RSA"}, nil},
		{"names are case-sensitive", `{"kty":"RSA","D":"x","N":"y"}`, JWK{Kty: "RSA"}, nil},

		{"d", "{" + ec + `,"d":"jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI"}`, JWK{}, ErrPrivateMember},
		{"empty d", "{" + ec + `,"d":""}`, JWK{}, ErrPrivateMember},
		{"null d", "{" + ec + `,"d":null}`, JWK{}, ErrPrivateMember},
		{"escaped d", "{" + ec + `,"\u0064":"x"}`, JWK{}, ErrPrivateMember},
		{"p", `{"kty":"RSA","p":"x"}`, JWK{}, ErrPrivateMember},
		{"q", `{"kty":"RSA","q":"x"}`, JWK{}, ErrPrivateMember},
		{"dp", `{"kty":"RSA","dp":"x"}`, JWK{}, ErrPrivateMember},
		{"dq", `{"kty":"RSA","dq":"x"}`, JWK{}, ErrPrivateMember},
		{"qi", `{"kty":"RSA","qi":"x"}`, JWK{}, ErrPrivateMember},
		{"oth", `{"kty":"RSA","oth":[]}`, JWK{}, ErrPrivateMember},
		{"k", `{"kty":"oct","k":"AAAA"}`, JWK{}, ErrPrivateMember},
		{"private member first", `{"d":"x","kty":"OKP"}`, JWK{}, ErrPrivateMember},

		{"empty", ``, JWK{}, ErrMalformed},
		{"array", `[]`, JWK{}, ErrMalformed},
		{"string", `"kty"`, JWK{}, ErrMalformed},
		{"no kty", `{"crv":"P-256"}`, JWK{}, ErrMalformed},
		{"empty kty", `{"kty":""}`, JWK{}, ErrMalformed},
		{"number member", `{"kty":"RSA","e":65537}`, JWK{}, ErrMalformed},
		{"null member", `{"kty":"RSA","kid":null}`, JWK{}, ErrMalformed},
		{"duplicate", `{"kty":"RSA","kty":"EC"}`, JWK{}, ErrMalformed},
		{"duplicate unknown", `{"kty":"RSA","z":1,"z":2}`, JWK{}, ErrMalformed},
		{"trailing data", `{"kty":"RSA"} x`, JWK{}, ErrMalformed},
		{"two objects", `{"kty":"RSA"}{}`, JWK{}, ErrMalformed},
		{"truncated", `{"kty":"RSA"`, JWK{}, ErrMalformed},
		{"bad unknown value", `{"kty":"RSA","z":[1,}`, JWK{}, ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := JWK{Kid: "unchanged"}
			err := k.UnmarshalJSON([]byte(tt.in))
			if !errors.Is(err, tt.wantErr) || (err != nil) != (tt.wantErr != nil) {
				t.Fatalf("UnmarshalJSON(%s) = %v, want %v", tt.in, err, tt.wantErr)
			}
			if err != nil {
				if k != (JWK{Kid: "unchanged"}) {
					t.Errorf("UnmarshalJSON changed k on error: %+v", k)
				}
				return
			}
			if k != tt.want {
				t.Errorf("UnmarshalJSON = %+v, want %+v", k, tt.want)
			}
		})
	}
}

func TestUnmarshalJSONNull(t *testing.T) {
	k := JWK{Kty: "RSA"}
	if err := json.Unmarshal([]byte(`null`), &k); err != nil || k.Kty != "RSA" {
		t.Errorf("null: %v, %+v", err, k)
	}
	var doc struct{ Key JWK }
	if err := json.Unmarshal([]byte(`{"Key":{"kty":"EC","d":"x"}}`), &doc); !errors.Is(err, ErrPrivateMember) {
		t.Errorf("nested private member: %v, want ErrPrivateMember", err)
	}
}

func TestJWKPublicKeyErrors(t *testing.T) {
	keys := testKeys(t)
	jwk := func(name string) JWK {
		k, err := PublicJWK(keys[name])
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	ec, ec384, rsaKey, ed := jwk("P-256"), jwk("P-384"), jwk("RSA"), jwk("Ed25519")
	with := func(k JWK, f func(*JWK)) JWK { f(&k); return k }
	b64 := base64.RawURLEncoding.EncodeToString
	rawX, _ := base64.RawURLEncoding.DecodeString(ec.X)
	rawN, _ := base64.RawURLEncoding.DecodeString(rsaKey.N)

	tests := []struct {
		name    string
		k       JWK
		wantErr error
	}{
		{"P-256", ec, nil},
		{"P-384", ec384, nil},
		{"RSA", rsaKey, nil},
		{"Ed25519", ed, nil},
		{"matching alg", with(ec, func(k *JWK) { k.Alg = "ES256" }), nil},
		{"RSA PS256", with(rsaKey, func(k *JWK) { k.Alg = "PS256" }), nil},

		{"unknown kty", with(ec, func(k *JWK) { k.Kty = "oct" }), ErrUnsupportedKey},
		{"lower-case kty", with(ec, func(k *JWK) { k.Kty = "ec" }), ErrUnsupportedKey},
		{"P-521", with(ec, func(k *JWK) { k.Crv = "P-521" }), ErrUnsupportedKey},
		{"secp256k1", with(ec, func(k *JWK) { k.Crv = "secp256k1" }), ErrUnsupportedKey},
		{"X25519", with(ed, func(k *JWK) { k.Crv = "X25519" }), ErrUnsupportedKey},
		{"Ed448", with(ed, func(k *JWK) { k.Crv = "Ed448" }), ErrUnsupportedKey},
		{"RSA 1024", with(rsaKey, func(k *JWK) { k.N = b64(rawN[:128]) }), ErrUnsupportedKey},
		{"RSA too large", with(rsaKey, func(k *JWK) { k.N = b64(append(rawN, make([]byte, 1024)...)) }), ErrUnsupportedKey},
		{"RSA e 1", with(rsaKey, func(k *JWK) { k.E = "AQ" }), ErrUnsupportedKey},
		{"RSA e even", with(rsaKey, func(k *JWK) { k.E = "AQAA" }), ErrUnsupportedKey},
		{"RSA e 2^32-1", with(rsaKey, func(k *JWK) { k.E = "_____w" }), ErrUnsupportedKey},
		{"RSA e 5 bytes", with(rsaKey, func(k *JWK) { k.E = "AQAAAAE" }), ErrUnsupportedKey},

		{"x missing", with(ec, func(k *JWK) { k.X = "" }), ErrMalformed},
		{"y missing", with(ec, func(k *JWK) { k.Y = "" }), ErrMalformed},
		{"x unpadded (31 bytes)", with(ec, func(k *JWK) { k.X = b64(rawX[1:]) }), ErrMalformed},
		{"x 33 bytes", with(ec, func(k *JWK) { k.X = b64(append([]byte{0}, rawX...)) }), ErrMalformed},
		{"x with padding", with(ec, func(k *JWK) { k.X += "=" }), ErrMalformed},
		{"x std alphabet", with(ec, func(k *JWK) { k.X = base64.RawStdEncoding.EncodeToString(make([]byte, 32))[:42] + "/" }), ErrMalformed},
		{"x with newline", with(ec, func(k *JWK) { k.X = k.X[:20] + "\n" + k.X[20:] }), ErrMalformed},
		{"x stray bits", with(ec, func(k *JWK) { k.X = k.X[:42] + flipLowBits(k.X[42]) }), ErrMalformed},
		{"P-256 coordinates on P-384", with(ec, func(k *JWK) { k.Crv = "P-384" }), ErrMalformed},
		{"point off the curve", with(ec, func(k *JWK) { k.Y = k.X }), ErrMalformed},
		{"EC with n", with(ec, func(k *JWK) { k.N = rsaKey.N }), ErrMalformed},
		{"EC with e", with(ec, func(k *JWK) { k.E = "AQAB" }), ErrMalformed},
		{"RSA with crv", with(rsaKey, func(k *JWK) { k.Crv = "P-256" }), ErrMalformed},
		{"RSA with x", with(rsaKey, func(k *JWK) { k.X = ec.X }), ErrMalformed},
		{"RSA n leading zero", with(rsaKey, func(k *JWK) { k.N = b64(append([]byte{0}, rawN...)) }), ErrMalformed},
		{"RSA e leading zero", with(rsaKey, func(k *JWK) { k.E = "AAEAAQ" }), ErrMalformed},
		{"RSA n missing", with(rsaKey, func(k *JWK) { k.N = "" }), ErrMalformed},
		{"RSA e missing", with(rsaKey, func(k *JWK) { k.E = "" }), ErrMalformed},
		{"RSA n even", with(rsaKey, func(k *JWK) { n := append([]byte(nil), rawN...); n[len(n)-1] &^= 1; k.N = b64(n) }), ErrUnsupportedKey},
		{"Ed25519 short", with(ed, func(k *JWK) { k.X = b64(make([]byte, 31)) }), ErrMalformed},
		{"Ed25519 with y", with(ed, func(k *JWK) { k.Y = ec.Y }), ErrMalformed},
		{"mismatched alg", with(ec, func(k *JWK) { k.Alg = "RS256" }), ErrMalformed},
		{"P-256 with ES384", with(ec, func(k *JWK) { k.Alg = "ES384" }), ErrMalformed},
		{"unknown alg", with(ed, func(k *JWK) { k.Alg = "Ed448" }), ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pub, err := tt.k.PublicKey()
			if !errors.Is(err, tt.wantErr) || (err != nil) != (tt.wantErr != nil) {
				t.Fatalf("PublicKey(%+v) = %v, want %v", tt.k, err, tt.wantErr)
			}
			_, tpErr := tt.k.Thumbprint()
			if !errors.Is(tpErr, tt.wantErr) || (tpErr != nil) != (tt.wantErr != nil) {
				t.Errorf("Thumbprint = %v, want %v", tpErr, tt.wantErr)
			}
			if err != nil {
				return
			}
			back, err := PublicJWK(pub)
			if err != nil {
				t.Fatalf("PublicJWK: %v", err)
			}
			back.Kid, back.Alg, back.Use = tt.k.Kid, tt.k.Alg, tt.k.Use
			if back != tt.k {
				t.Errorf("round trip: %+v, want %+v", back, tt.k)
			}
		})
	}
}

// flipLowBits returns the base64url character that decodes to the same upper
// bits as c but with its lowest bits set, making a non-canonical encoding of
// the final byte.
func flipLowBits(c byte) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	i := strings.IndexByte(alphabet, c)
	return string(alphabet[i|1])
}
