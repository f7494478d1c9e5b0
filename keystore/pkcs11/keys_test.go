package pkcs11

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"math/big"
	"testing"

	"github.com/keyd-dev/keyd/keystore"
)

// P12: raw r||s with leading zero bytes converts to DER that verifies and
// parses back to the same r and s.
func TestECDSADER(t *testing.T) {
	for _, size := range []int{32, 48} {
		for _, tc := range []struct{ r, s *big.Int }{
			{big.NewInt(1), big.NewInt(0x0102)},
			{new(big.Int).Lsh(big.NewInt(1), uint(8*size-1)), big.NewInt(7)},            // high bit set: DER adds 0x00
			{big.NewInt(0xff), new(big.Int).Lsh(big.NewInt(1), uint(8*(size-1)-1))},     // s has a zero first byte
			{new(big.Int).Lsh(big.NewInt(1), uint(8*size-9)), new(big.Int).SetInt64(1)}, // r has a zero first byte
		} {
			raw := make([]byte, 2*size)
			tc.r.FillBytes(raw[:size])
			tc.s.FillBytes(raw[size:])
			der, err := ecdsaDER(raw, size)
			if err != nil {
				t.Fatalf("size %d: %v", size, err)
			}
			var rs struct{ R, S *big.Int }
			if rest, err := asn1.Unmarshal(der, &rs); err != nil || len(rest) != 0 {
				t.Fatalf("size %d: DER %x does not parse: %v", size, der, err)
			}
			if rs.R.Cmp(tc.r) != 0 || rs.S.Cmp(tc.s) != 0 {
				t.Errorf("size %d: r, s = %v, %v; want %v, %v", size, rs.R, rs.S, tc.r, tc.s)
			}
		}
	}
	// A real signature round trip.
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	d := sha256.Sum256([]byte("m"))
	for range 64 {
		r, s, err := ecdsa.Sign(rand.Reader, k, d[:])
		if err != nil {
			t.Fatal(err)
		}
		raw := make([]byte, 64)
		r.FillBytes(raw[:32])
		s.FillBytes(raw[32:])
		der, err := ecdsaDER(raw, 32)
		if err != nil || !ecdsa.VerifyASN1(&k.PublicKey, d[:], der) {
			t.Fatalf("converted signature does not verify: %v", err)
		}
	}
	for name, raw := range map[string][]byte{"short": make([]byte, 63), "long": make([]byte, 65), "zero": make([]byte, 64)} {
		if _, err := ecdsaDER(raw, 32); err == nil {
			t.Errorf("%s: ecdsaDER accepted %d bytes", name, len(raw))
		}
	}
}

func TestECPoint(t *testing.T) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	point, _ := k.PublicKey.Bytes()
	wrapped, _ := asn1.Marshal(point)
	for name, v := range map[string][]byte{"bare": point, "wrapped": wrapped} {
		pub, err := publicEC(kindP256, v)
		if err != nil || !k.PublicKey.Equal(pub) {
			t.Errorf("%s: publicEC = %v, %v", name, pub, err)
		}
	}
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	edWrapped, _ := asn1.Marshal([]byte(edPub))
	for name, v := range map[string][]byte{"bare": edPub, "wrapped": edWrapped} {
		pub, err := publicEC(kindEd25519, v)
		if err != nil || !edPub.Equal(pub) {
			t.Errorf("Ed25519 %s: publicEC = %v, %v", name, pub, err)
		}
	}
	bad := map[string][]byte{
		"truncated": wrapped[:len(wrapped)-1],
		"trailing":  append(bytes.Clone(wrapped), 0),
		"off curve": append([]byte{4}, make([]byte, 64)...),
		"P-384 len": make([]byte, 97),
	}
	for name, v := range bad {
		if _, err := publicEC(kindP256, v); err == nil {
			t.Errorf("%s: publicEC accepted it", name)
		}
	}
}

func TestKindOf(t *testing.T) {
	for _, tc := range []struct {
		kt     uint
		params []byte
		want   kind
	}{
		{0x3, oidP256, kindP256}, {0x3, oidP384, kindP384}, {0x0, nil, kindRSA},
		{ckkECEdwards, oidEd25519, kindEd25519}, {ckkECEdwards, nameEd25519, kindEd25519},
		{0x3, oidEd25519, kindUnknown}, {ckkECEdwards, oidP256, kindUnknown}, {0x99, nil, kindUnknown},
	} {
		if got := kindOf(tc.kt, tc.params); got != tc.want {
			t.Errorf("kindOf(0x%x, %x) = %v, want %v", tc.kt, tc.params, got, tc.want)
		}
	}
}

// signParams refuses options that do not fit the key, with
// ErrUnsupportedAlgorithm, before anything reaches the token.
func TestSignParams(t *testing.T) {
	d32, d48 := make([]byte, 32), make([]byte, 48)
	ok := []struct {
		k    kind
		d    []byte
		opts crypto.SignerOpts
	}{
		{kindP256, d32, crypto.SHA256}, {kindP384, d48, crypto.SHA384}, {kindRSA, d32, crypto.SHA256},
		{kindRSA, d32, &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}},
		{kindRSA, d32, &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 32}},
		{kindEd25519, []byte("message"), crypto.Hash(0)}, {kindEd25519, []byte("m"), &ed25519.Options{}},
	}
	for _, tt := range ok {
		if _, _, err := signParams(tt.k, tt.d, tt.opts); err != nil {
			t.Errorf("signParams(%v, %T %v): %v", tt.k, tt.opts, tt.opts, err)
		}
	}
	unsupported := []struct {
		k    kind
		d    []byte
		opts crypto.SignerOpts
	}{
		{kindP256, d32, crypto.SHA384}, {kindP256, d32, &rsa.PSSOptions{Hash: crypto.SHA256}}, {kindP384, d48, crypto.SHA256},
		{kindRSA, d32, crypto.SHA384}, {kindRSA, d32, &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthAuto}},
		{kindRSA, d32, &rsa.PSSOptions{Hash: crypto.SHA384, SaltLength: 48}}, {kindEd25519, d32, crypto.SHA256},
		{kindEd25519, d32, &ed25519.Options{Context: "c"}}, {kindP256, d32, nil}, {kindUnknown, d32, crypto.SHA256},
	}
	for _, tt := range unsupported {
		if _, _, err := signParams(tt.k, tt.d, tt.opts); !errors.Is(err, keystore.ErrUnsupportedAlgorithm) {
			t.Errorf("signParams(%v, %T %v) = %v; want ErrUnsupportedAlgorithm", tt.k, tt.opts, tt.opts, err)
		}
	}
	if _, _, err := signParams(kindP256, d48, crypto.SHA256); err == nil {
		t.Error("signParams accepted a 48-byte digest for SHA-256")
	}
	_, data, _ := signParams(kindRSA, d32, crypto.SHA256)
	if !bytes.Equal(data[:len(digestInfoSHA256)], digestInfoSHA256) || len(data) != 51 {
		t.Errorf("RS256 data = %x; want the SHA-256 DigestInfo and the digest", data)
	}
}
