package keystore_test

import (
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"testing"

	"github.com/keyd-dev/keyd/keystore"
)

func TestClonePublic(t *testing.T) {
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ed, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, pub := range []crypto.PublicKey{&ec.PublicKey, &rk.PublicKey, ed} {
		c, err := keystore.ClonePublic(pub)
		if err != nil {
			t.Fatalf("ClonePublic(%T): %v", pub, err)
		}
		if !pub.(interface{ Equal(crypto.PublicKey) bool }).Equal(c) {
			t.Errorf("ClonePublic(%T) differs from the key", pub)
		}
	}
	if c, _ := keystore.ClonePublic(&rk.PublicKey); c.(*rsa.PublicKey).N == rk.N {
		t.Error("ClonePublic of an RSA key shares its modulus")
	}
	if c, _ := keystore.ClonePublic(ed); &c.(ed25519.PublicKey)[0] == &ed[0] {
		t.Error("ClonePublic of an Ed25519 key shares its bytes")
	}
	x, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := keystore.ClonePublic(x.PublicKey()); err == nil {
		t.Error("ClonePublic of an X25519 key: no error")
	}
}
