package keystoretest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"strings"
	"testing"

	"github.com/keyd-dev/keyd/keystore"
)

// VerifyDER verifies sig, as a backend's Sign returns it, over msgOrDigest:
// the alg.Hash() digest of the message, or the message itself for EdDSA.
// ECDSA signatures are ASN.1 DER (ecdsa.VerifyASN1); PS256 signatures must
// use a salt exactly as long as the hash (rsa.PSSSaltLengthEqualsHash, as RFC
// 7518 §3.5 requires), so a signature made with the maximum salt, as
// crypto.Signer defaults allow, is rejected. The public key must match alg
// (curve included). It returns nil if the signature is valid.
func VerifyDER(alg keystore.Algorithm, pub crypto.PublicKey, msgOrDigest, sig []byte) error {
	switch alg {
	case keystore.ES256, keystore.ES384:
		k, err := ecdsaKey(alg, pub)
		if err != nil {
			return err
		}
		if len(msgOrDigest) != alg.Hash().Size() {
			return fmt.Errorf("verify %s: digest is %d bytes, want %d", alg, len(msgOrDigest), alg.Hash().Size())
		}
		if !ecdsa.VerifyASN1(k, msgOrDigest, sig) {
			return fmt.Errorf("verify %s: invalid ECDSA signature (%d bytes DER)", alg, len(sig))
		}
		return nil
	case keystore.RS256, keystore.PS256:
		k, ok := pub.(*rsa.PublicKey)
		if !ok || k.N == nil {
			return fmt.Errorf("verify %s: public key is %T, want *rsa.PublicKey", alg, pub)
		}
		if want := (k.N.BitLen() + 7) / 8; len(sig) != want {
			return fmt.Errorf("verify %s: signature is %d bytes, want %d (the modulus size)", alg, len(sig), want)
		}
		if alg == keystore.RS256 {
			if err := rsa.VerifyPKCS1v15(k, crypto.SHA256, msgOrDigest, sig); err != nil {
				return fmt.Errorf("verify %s: %w", alg, err)
			}
			return nil
		}
		if err := rsa.VerifyPSS(k, crypto.SHA256, msgOrDigest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}); err != nil {
			return fmt.Errorf("verify %s with a salt of 32 bytes (RFC 7518 §3.5): %w", alg, err)
		}
		return nil
	case keystore.EdDSA:
		k, ok := pub.(ed25519.PublicKey)
		if !ok {
			return fmt.Errorf("verify %s: public key is %T, want ed25519.PublicKey", alg, pub)
		}
		if len(k) != ed25519.PublicKeySize {
			return fmt.Errorf("verify %s: public key is %d bytes, want %d", alg, len(k), ed25519.PublicKeySize)
		}
		if !ed25519.Verify(k, msgOrDigest, sig) {
			return fmt.Errorf("verify %s: invalid Ed25519 signature", alg)
		}
		return nil
	}
	return fmt.Errorf("verify %q: %w", alg, keystore.ErrUnsupportedAlgorithm)
}

func ecdsaKey(alg keystore.Algorithm, pub crypto.PublicKey) (*ecdsa.PublicKey, error) {
	k, ok := pub.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("verify %s: public key is %T, want *ecdsa.PublicKey", alg, pub)
	}
	if k.Curve == nil || k.Curve.Params().BitSize != ecSize(alg)*8 {
		return nil, fmt.Errorf("verify %s: public key is on curve %s", alg, curveName(k.Curve))
	}
	return k, nil
}

// ecSize is the byte length of r and of s in a JWS ECDSA signature.
func ecSize(alg keystore.Algorithm) int {
	if alg == keystore.ES384 {
		return 48
	}
	return 32
}

// joseSignature converts a signature as Sign returns it into the JWS form:
// ECDSA's ASN.1 DER SEQUENCE { r, s } becomes r||s, each left-padded with
// zeros to the curve size (RFC 7518 §3.4); other algorithms are unchanged.
// It is written here, independently of keyd's JWS code, so the suite checks
// the backends rather than that code.
func joseSignature(alg keystore.Algorithm, sig []byte) ([]byte, error) {
	if alg != keystore.ES256 && alg != keystore.ES384 {
		return append([]byte(nil), sig...), nil
	}
	var rs struct{ R, S *big.Int }
	rest, err := asn1.Unmarshal(sig, &rs)
	if err != nil {
		return nil, fmt.Errorf("%s signature is not ASN.1 DER: %w", alg, err)
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%s signature has %d bytes after the DER sequence", alg, len(rest))
	}
	size := ecSize(alg)
	out := make([]byte, 2*size)
	for i, v := range []*big.Int{rs.R, rs.S} {
		if v.Sign() <= 0 || v.BitLen() > 8*size {
			return nil, fmt.Errorf("%s signature: %c out of range (%d bits)", alg, "rs"[i], v.BitLen())
		}
		v.FillBytes(out[i*size : (i+1)*size])
	}
	return out, nil
}

var b64 = base64.RawURLEncoding

// checkJWS signs a compact JWS with key id of b and verifies it twice: with
// the standard library over the raw JWS signature, and with go-jose.
func checkJWS(ctx context.Context, t *testing.T, b keystore.Backend, id string, alg keystore.Algorithm, pub crypto.PublicKey, round int) error {
	t.Helper()
	return checkJWSWith(t, alg, pub, round, func(digest []byte) ([]byte, error) {
		sig, err := b.Sign(ctx, id, digest, alg.SignerOpts())
		if err != nil {
			return nil, fmt.Errorf("Sign(%q) over a JWS signing input: %w", id, err)
		}
		return sig, nil
	})
}

// checkJWSWith is checkJWS with any signer: sign gets what Sign would and
// returns what Sign would.
func checkJWSWith(t *testing.T, alg keystore.Algorithm, pub crypto.PublicKey, round int, sign func(digest []byte) ([]byte, error)) error {
	t.Helper()
	header, err := json.Marshal(map[string]string{"alg": string(alg), "typ": "JWT"})
	if err != nil {
		return err
	}
	payload, err := json.Marshal(map[string]any{"iss": "keystoretest", "round": round, "alg": alg})
	if err != nil {
		return err
	}
	input := b64.EncodeToString(header) + "." + b64.EncodeToString(payload)
	der, err := sign(Digest(alg, []byte(input)))
	if err != nil {
		return err
	}
	raw, err := joseSignature(alg, der)
	if err != nil {
		return err
	}
	compact := input + "." + b64.EncodeToString(raw)
	if err := verifyCompact(alg, pub, compact); err != nil {
		return err
	}
	if err := verifyGoJOSE(alg, pub, compact, payload); err != nil {
		return fmt.Errorf("go-jose: %w\n%s", err, compact)
	}
	return nil
}

// verifyCompact verifies a compact JWS with the standard library, taking the
// ECDSA signature as raw r||s.
func verifyCompact(alg keystore.Algorithm, pub crypto.PublicKey, compact string) error {
	parts := strings.Split(compact, ".")
	if len(parts) != 3 {
		return fmt.Errorf("compact JWS has %d parts", len(parts))
	}
	sig, err := b64.DecodeString(parts[2])
	if err != nil {
		return fmt.Errorf("JWS signature: %w", err)
	}
	input := []byte(parts[0] + "." + parts[1])
	if alg != keystore.ES256 && alg != keystore.ES384 {
		return VerifyDER(alg, pub, Digest(alg, input), sig)
	}
	k, err := ecdsaKey(alg, pub)
	if err != nil {
		return err
	}
	size := ecSize(alg)
	if len(sig) != 2*size {
		return fmt.Errorf("%s JWS signature is %d bytes, want %d", alg, len(sig), 2*size)
	}
	r, s := new(big.Int).SetBytes(sig[:size]), new(big.Int).SetBytes(sig[size:])
	if !ecdsa.Verify(k, Digest(alg, input), r, s) {
		return fmt.Errorf("%s JWS signature (r||s) does not verify", alg)
	}
	return nil
}
