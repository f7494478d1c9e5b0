package keystoretest

import (
	"bytes"
	"crypto"
	"fmt"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/keyd-dev/keyd/keystore"
)

// verifyGoJOSE verifies a compact JWS with go-jose, an implementation
// independent of both the backends and keyd's JWS code. go-jose verifies PS256
// with any salt length, so the strict salt check is VerifyDER's.
func verifyGoJOSE(alg keystore.Algorithm, pub crypto.PublicKey, compact string, payload []byte) error {
	jws, err := jose.ParseSignedCompact(compact, []jose.SignatureAlgorithm{jose.SignatureAlgorithm(alg)})
	if err != nil {
		return fmt.Errorf("parse: %w", err)
	}
	got, err := jws.Verify(pub)
	if err != nil {
		return fmt.Errorf("verify %s: %w", alg, err)
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("verify %s: payload %q, want %q", alg, got, payload)
	}
	return nil
}
