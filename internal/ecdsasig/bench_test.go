package ecdsasig

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"math/big"
	"testing"
)

// oldRaw is what internal/jws did before this package: encoding/asn1 into
// math/big, a re-encoding to prove der canonical, and the range check
// against the curve order n.
func oldRaw(der []byte, size int, n *big.Int) ([]byte, error) {
	var v sigValue
	rest, err := asn1.Unmarshal(der, &v)
	if err != nil {
		return nil, err
	}
	if len(rest) != 0 {
		return nil, errors.New("trailing data")
	}
	canon, err := asn1.Marshal(v)
	if err != nil || !bytes.Equal(canon, der) {
		return nil, errors.New("not canonical DER")
	}
	for _, x := range []*big.Int{v.R, v.S} {
		if x.Sign() <= 0 || x.Cmp(n) >= 0 {
			return nil, errors.New("out of range")
		}
	}
	out := make([]byte, 2*size)
	v.R.FillBytes(out[:size])
	v.S.FillBytes(out[size:])
	return out, nil
}

// newRaw is what internal/jws does now: Raw, then the range check against
// the big-endian order, as bytes.
func newRaw(der []byte, size int, order []byte) ([]byte, error) {
	raw, err := Raw(der, size)
	if err != nil {
		return nil, err
	}
	if bytes.Compare(raw[:size], order) >= 0 || bytes.Compare(raw[size:], order) >= 0 {
		return nil, errors.New("out of range")
	}
	return raw, nil
}

// benchSignature returns an ASN.1 DER ECDSA signature by a fresh key on
// curve.
func benchSignature(b *testing.B, curve elliptic.Curve) []byte {
	b.Helper()
	k, err := ecdsa.GenerateKey(curve, rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	d := sha256.Sum256([]byte("bench"))
	sig, err := ecdsa.SignASN1(rand.Reader, k, d[:])
	if err != nil {
		b.Fatal(err)
	}
	return sig
}

// BenchmarkDER compares converting a raw r ‖ s from CKM_ECDSA to DER the
// old way (math/big and encoding/asn1, as keystore/pkcs11 did) and with DER.
func BenchmarkDER(b *testing.B) {
	for _, c := range curves {
		sig := benchSignature(b, c.curve)
		raw, err := Raw(sig, c.size)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(c.name+"/old", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := refDER(raw, c.size); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(c.name+"/new", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := DER(raw, c.size); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRaw compares converting a DER signature to JWS r ‖ s with the
// range check the old way (encoding/asn1, re-encoding, math/big, as
// internal/jws did) and with Raw plus a byte comparison with the order.
func BenchmarkRaw(b *testing.B) {
	for _, c := range curves {
		sig := benchSignature(b, c.curve)
		n := c.curve.Params().N
		order := n.FillBytes(make([]byte, c.size))
		b.Run(c.name+"/old", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := oldRaw(sig, c.size, n); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(c.name+"/new", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := newRaw(sig, c.size, order); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
