package jws

import (
	"bytes"
	"crypto/rsa"
	"encoding/asn1"
	"encoding/json"
	"math/big"
	"slices"
	"testing"

	"github.com/keyd-dev/keyd/keystore"
)

// FuzzEncodeSignature feeds arbitrary bytes to EncodeSignature for every
// algorithm. It must never panic; whatever it accepts must have the JWS
// length for the algorithm, and for ECDSA must decode back to the same r
// and s, both in [1, n-1].
func FuzzEncodeSignature(f *testing.F) {
	signers := testSigners(f)
	// Seeds: real signatures of every algorithm, plus hand-made DER.
	for i, s := range signers {
		in := SigningInput([]byte(`{"alg":"`+string(s.alg)+`"}`), []byte(`{}`))
		d, err := Digest(s.alg, in)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(uint8(i), stdSign(f, s, d))
	}
	for _, seed := range [][]byte{
		{},
		{0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01},
		{0x30, 0x07, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01, 0x00},
		{0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x01},
		{0x30, 0x06, 0x02, 0x01, 0x80, 0x02, 0x01, 0x01},
		{0x30, 0x80, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01, 0x00, 0x00},
		{0x30, 0x81, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01},
		bytes.Repeat([]byte{0x30}, 64),
	} {
		f.Add(uint8(0), seed)
		f.Add(uint8(1), seed)
	}
	f.Fuzz(func(t *testing.T, which uint8, sig []byte) {
		s := signers[int(which)%len(signers)]
		out, err := EncodeSignature(s.alg, s.pub, sig)
		if err != nil {
			if out != nil {
				t.Fatalf("non-nil output %x with error %v", out, err)
			}
			return
		}
		if want := sigLen(s); len(out) != want {
			t.Fatalf("%s: accepted %x as %d bytes, want %d", s.alg, sig, len(out), want)
		}
		p, err := paramsFor(s.alg)
		if err != nil {
			t.Fatal(err)
		}
		switch p.kty {
		case ktyEC:
			var v ecdsaSignature
			if _, err := asn1.Unmarshal(sig, &v); err != nil {
				t.Fatalf("%s: accepted %x, which encoding/asn1 cannot parse: %v", s.alg, sig, err)
			}
			r := new(big.Int).SetBytes(out[:p.size])
			sv := new(big.Int).SetBytes(out[p.size:])
			if r.Cmp(v.R) != 0 || sv.Cmp(v.S) != 0 {
				t.Fatalf("%s: %x encoded as %x, r/s changed", s.alg, sig, out)
			}
			n := p.curve.Params().N
			for _, x := range []*big.Int{r, sv} {
				if x.Sign() <= 0 || x.Cmp(n) >= 0 {
					t.Fatalf("%s: accepted out-of-range value in %x", s.alg, sig)
				}
			}
			// Canonical DER: the input is the one encoding of (r, s).
			if canon, _ := asn1.Marshal(v); !bytes.Equal(canon, sig) {
				t.Fatalf("%s: accepted non-canonical DER %x", s.alg, sig)
			}
		default:
			if !bytes.Equal(out, sig) {
				t.Fatalf("%s: output %x differs from input %x", s.alg, out, sig)
			}
		}
	})
}

// FuzzSplitSigningInput checks SplitSigningInput never panics and accepts
// exactly the outputs of SigningInput.
func FuzzSplitSigningInput(f *testing.F) {
	for _, seed := range []string{
		"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9",
		"eyJhIjoxfQ.e30",
		"-_8.AA",
		"eyJhIjoxfQ==.e30",
		"+/8.AA",
		"a.b.c",
		".",
		"",
		"eyJhI\n.e30",
		"eyJhIjoxfR.e30",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		h, c, err := SplitSigningInput(in)
		if err != nil {
			return
		}
		if len(h) == 0 || len(c) == 0 {
			t.Fatalf("accepted %q with an empty part", in)
		}
		if back := SigningInput(h, c); !bytes.Equal(back, in) {
			t.Fatalf("accepted %q, which SigningInput writes as %q", in, back)
		}
	})
}

// FuzzJWKUnmarshal checks UnmarshalJSON never panics, that what it accepts
// survives MarshalJSON, and that a JWK which yields a public key round-trips
// exactly through PublicJWK, with the same thumbprint.
func FuzzJWKUnmarshal(f *testing.F) {
	for _, pub := range testKeys(f) {
		k, err := PublicJWK(pub)
		if err != nil {
			f.Fatal(err)
		}
		k.Kid = "k1"
		k.Alg = string(AlgorithmForKey(pub)[0])
		data, err := json.Marshal(k)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	for _, seed := range []string{
		`{"kty":"RSA","n":"` + rfc7638N + `","e":"AQAB","alg":"RS256","kid":"2011-04-29"}`,
		`{"kty":"OKP","crv":"Ed25519","x":"` + rfc8037X + `"}`,
		`{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","d":"jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI"}`,
		`{"kty":"EC","kty":"RSA"}`,
		`{"kty":"oct","k":"AAAA"}`,
		`{"kty":"RSA","e":65537}`,
		`null`,
		`[]`,
		`{"kty":"RSA"} {}`,
		`{"kty":"EC","key_ops":["verify"],"x5c":[{"a":[1,2,{}]}]}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var k JWK
		if err := k.UnmarshalJSON(data); err != nil {
			return
		}
		enc, err := json.Marshal(k)
		if err != nil {
			t.Fatalf("Marshal(%+v): %v", k, err)
		}
		var again JWK
		if err := json.Unmarshal(enc, &again); err != nil {
			if k == (JWK{}) { // input was null
				return
			}
			t.Fatalf("Unmarshal(Marshal(%+v)) = %s: %v", k, enc, err)
		}
		if again != k {
			t.Fatalf("Marshal round trip: %+v, want %+v", again, k)
		}
		pub, err := k.PublicKey()
		if err != nil {
			return
		}
		back, err := PublicJWK(pub)
		if err != nil {
			t.Fatalf("PublicJWK of a key PublicKey returned: %v", err)
		}
		back.Kid, back.Alg, back.Use = k.Kid, k.Alg, k.Use
		if back != k {
			t.Fatalf("PublicKey/PublicJWK round trip: %+v, want %+v", back, k)
		}
		tp1, err1 := k.Thumbprint()
		tp2, err2 := Thumbprint(pub)
		if err1 != nil || err2 != nil || tp1 != tp2 {
			t.Fatalf("thumbprints %s (%v) and %s (%v) differ", tp1, err1, tp2, err2)
		}
		algs := AlgorithmForKey(pub)
		if len(algs) == 0 || (k.Alg != "" && !slices.Contains(algs, keystore.Algorithm(k.Alg))) {
			t.Fatalf("AlgorithmForKey = %v for a JWK with alg %q", algs, k.Alg)
		}
		if r, ok := pub.(*rsa.PublicKey); ok && r.Size()*8 < minRSABits {
			t.Fatalf("accepted a %d-bit RSA key", r.N.BitLen())
		}
	})
}
