package tpm

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rsa"
	"errors"
	"fmt"
	"testing"

	"github.com/keyd-dev/keyd/internal/swtpmtest"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// TestNilSignerOptions: a nil *rsa.PSSOptions by an RSA key, or a nil
// *ed25519.Options by an ECDSA key (typed nils, so not "no options"),
// fails with ErrUnsupportedAlgorithm, as keystore.CheckOpts says backends
// must, instead of panicking the daemon.
func TestNilSignerOptions(t *testing.T) {
	s := swtpmtest.Start(t)
	b := newTestBackend(t, s, Config{})
	pub, err := b.Generate(t.Context(), "rs", keystore.KeySpec{Algorithm: keystore.RS256})
	if err != nil {
		t.Fatal(err)
	}
	ec := keystoretest.MustGenerate(t, b, "ec")
	d := keystoretest.Digest(keystore.RS256, []byte("m"))
	for _, tc := range []struct {
		id   string
		opts crypto.SignerOpts
	}{
		{"rs", (*rsa.PSSOptions)(nil)},
		{"rs", nil},
		{"ec", (*ed25519.Options)(nil)},
	} {
		id, opts := tc.id, tc.opts
		err := func() (err error) {
			defer func() {
				if r := recover(); r != nil {
					err = fmt.Errorf("Sign panicked: %v", r)
				}
			}()
			_, err = b.Sign(t.Context(), id, d, opts)
			return err
		}()
		if !errors.Is(err, keystore.ErrUnsupportedAlgorithm) {
			t.Errorf("Sign(%q) with %T(nil) = %v, want ErrUnsupportedAlgorithm", id, opts, err)
		}
	}
	mustSign(t, b, "rs", keystore.RS256, pub, d)
	mustSign(t, b, "ec", keystore.ES256, ec, d)
}
