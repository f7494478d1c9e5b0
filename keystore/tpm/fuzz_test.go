package tpm

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/keystore"
)

// sampleKeyFile is a well-formed key file around a software P-256 point
// (its private blob is junk: only the TPM could load a real one).
func sampleKeyFile(t testing.TB) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub := keyTemplate(kindP256)
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, 32))},
		Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, 32))},
	})
	blob, err := newBlob(tpm2.Marshal(pub), []byte("encrypted private area"))
	if err != nil {
		t.Fatal(err)
	}
	data, err := encodeKey(blob)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// FuzzDecodeKey: whatever a key file holds, decodeKey returns a blob that
// re-encodes to an equivalent file, or an error wrapping ErrKeyLost,
// ErrInsecureStorage or ErrUnsupportedAlgorithm; it never panics.
func FuzzDecodeKey(f *testing.F) {
	good := sampleKeyFile(f)
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte("-----BEGIN TSS2 PRIVATE KEY-----\nMAA=\n-----END TSS2 PRIVATE KEY-----\n"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		blob, err := decodeKey(data)
		if err != nil {
			if !errors.Is(err, keystore.ErrKeyLost) && !errors.Is(err, keystore.ErrInsecureStorage) && !errors.Is(err, keystore.ErrUnsupportedAlgorithm) {
				t.Fatalf("decodeKey: %v: not a sentinel error", err)
			}
			return
		}
		again, err := encodeKey(blob)
		if err != nil {
			t.Fatal(err)
		}
		blob2, err := decodeKey(again)
		if err != nil {
			t.Fatalf("re-encoded key does not decode: %v", err)
		}
		if !bytes.Equal(blob.pub, blob2.pub) || !bytes.Equal(blob.priv, blob2.priv) || blob.kind != blob2.kind {
			t.Fatal("re-encoded key differs")
		}
	})
}

// FuzzDecodePin: srk.name parses or fails, never panics, and what parses
// round-trips.
func FuzzDecodePin(f *testing.F) {
	f.Add(pin{template: srkTemplateID, name: []byte{0, 0xb, 1, 2, 3}}.encode())
	f.Add([]byte("name=zz\n"))
	f.Add([]byte("template=x\nname=\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := decodePin(data)
		if err != nil {
			return
		}
		q, err := decodePin(p.encode())
		if err != nil || q.template != p.template || !bytes.Equal(q.name, p.name) {
			t.Fatalf("pin %+v does not round-trip: %+v, %v", p, q, err)
		}
	})
}

// FuzzSignResponse: parseSignResponse never panics, returns the TPM's
// response code as go-tpm does, accepts only what go-tpm accepts and then
// returns the same signature, and refuses nothing well-formed that go-tpm
// accepts.
func FuzzSignResponse(f *testing.F) {
	for _, s := range signResponseSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, rsp []byte) {
		compareSignResponse(t, rsp)
	})
}
