package ecdsasig

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/asn1"
	"math/big"
	"strings"
	"testing"
)

// fuzzSeeds are DER signatures to start from: real ones of both curves and
// hand-made near misses.
func fuzzSeeds(f *testing.F) [][]byte {
	f.Helper()
	var seeds [][]byte
	d := sha256.Sum256([]byte("seed"))
	for _, c := range curves {
		k, err := ecdsa.GenerateKey(c.curve, rand.Reader)
		if err != nil {
			f.Fatal(err)
		}
		sig, err := ecdsa.SignASN1(rand.Reader, k, d[:])
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, sig)
	}
	for _, s := range []string{
		"",
		"3006 020101 020101",
		"3007 020101 020101 00",
		"3006 020100 020101",
		"3006 020180 020101",
		"3007 02020080 020101",
		"3007 02020001 020101",
		"3080 020101 020101 0000",
		"308106 020101 020101",
		"3009 020101 020101 020101",
		"308180 023e 00" + strings.Repeat("ff", 61) + " 023e 00" + strings.Repeat("ff", 61),
	} {
		seeds = append(seeds, mustHex(f, s))
	}
	return seeds
}

// FuzzRaw checks Raw against refRaw, the encoding/asn1 reference: they must
// accept exactly the same inputs and return the same r ‖ s, and DER must
// turn whatever Raw accepts back into the same bytes.
func FuzzRaw(f *testing.F) {
	for _, seed := range fuzzSeeds(f) {
		for _, size := range []uint8{32, 48, 61, 1} {
			f.Add(seed, size)
		}
	}
	f.Fuzz(func(t *testing.T, der []byte, size8 uint8) {
		size := int(size8)
		got, err := Raw(der, size)
		want, ok := refRaw(der, size)
		if (err == nil) != ok {
			t.Fatalf("Raw(%x, %d) = %x, %v; encoding/asn1 reference accepts: %v", der, size, got, err, ok)
		}
		if err != nil {
			if got != nil {
				t.Fatalf("Raw(%x, %d) = %x with error %v", der, size, got, err)
			}
			return
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("Raw(%x, %d) =\n%x\nwant\n%x", der, size, got, want)
		}
		back, err := DER(got, size)
		if err != nil || !bytes.Equal(back, der) {
			t.Fatalf("DER(Raw(%x, %d)) = %x, %v", der, size, back, err)
		}
	})
}

// FuzzDER checks that DER of any r ‖ s with both halves nonzero is the
// encoding/asn1 encoding of the same r and s, which Raw turns back into the
// input, and that DER refuses every other input.
func FuzzDER(f *testing.F) {
	for _, seed := range fuzzSeeds(f) {
		if raw, err := Raw(seed, 32); err == nil {
			f.Add(raw)
		}
		if raw, err := Raw(seed, 48); err == nil {
			f.Add(raw)
		}
	}
	f.Add([]byte{})
	f.Add([]byte{0})
	f.Add([]byte{0, 1})
	f.Add([]byte{0x80, 0x80})
	f.Add(make([]byte, 64))
	f.Add(bytes.Repeat([]byte{0xff}, 122))
	f.Fuzz(func(t *testing.T, raw []byte) {
		size := len(raw) / 2
		if _, err := DER(raw, size+1); err == nil {
			t.Fatalf("DER(%x, %d) accepted %d bytes", raw, size+1, len(raw))
		}
		der, err := DER(raw, size)
		r := new(big.Int).SetBytes(raw[:size])
		s := new(big.Int).SetBytes(raw[size:])
		if len(raw)%2 != 0 || r.Sign() == 0 || s.Sign() == 0 {
			if err == nil || der != nil {
				t.Fatalf("DER(%x, %d) = %x, %v; want an error", raw, size, der, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("DER(%x, %d): %v", raw, size, err)
		}
		want, err := asn1.Marshal(sigValue{r, s})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(der, want) {
			t.Fatalf("DER(%x, %d) =\n%x\nwant\n%x", raw, size, der, want)
		}
		back, err := Raw(der, size)
		if err != nil || !bytes.Equal(back, raw) {
			t.Fatalf("Raw(DER(%x, %d)) = %x, %v", raw, size, back, err)
		}
	})
}
