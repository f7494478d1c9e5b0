package jws

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"fmt"
	"math/big"

	"github.com/keyd-dev/keyd/internal/ecdsasig"
	"github.com/keyd-dev/keyd/keystore"
)

// keyFor checks that pub is a valid key of the kind alg signs with and
// returns alg's parameters. An unknown alg wraps
// keystore.ErrUnsupportedAlgorithm; a key of the wrong kind, curve or size
// wraps ErrUnsupportedKey.
func keyFor(alg keystore.Algorithm, pub crypto.PublicKey) (params, error) {
	p, err := paramsFor(alg)
	if err != nil {
		return params{}, err
	}
	info, err := inspect(pub)
	if err != nil {
		return params{}, fmt.Errorf("%s: %w", alg, err)
	}
	if info.kty != p.kty || (p.kty == ktyEC && info.curve != p.curve) {
		return params{}, fmt.Errorf("%s with a %s %s key: %w", alg, info.kty, info.crv, ErrUnsupportedKey)
	}
	return p, nil
}

// EncodeSignature turns sig, a signature that a keystore.Backend (or any
// crypto.Signer) made with pub for alg over Digest(alg, signingInput), into
// the JWS signature of RFC 7518 and RFC 8037:
//
//   - ES256, ES384: sig must be exactly the DER encoding of an ECDSA-Sig-Value
//     SEQUENCE { r INTEGER, s INTEGER } with nothing before, after or inside
//     it beyond the two integers, each minimally encoded, and 1 ≤ r, s < n
//     where n is the order of the curve. The result is r ‖ s with each
//     left-padded with zeros to the curve size: always 64 bytes for ES256
//     and 96 for ES384. A signature that is already in that raw form is
//     refused: backends return DER, and accepting two forms would hide a
//     backend that does not.
//   - RS256, PS256: sig must be exactly as long as the modulus of pub.
//   - EdDSA: sig must be exactly 64 bytes.
//
// The result never aliases sig. EncodeSignature does not verify the
// signature; Verify does. A signature of the wrong form wraps
// ErrBadSignature, a key that does not fit alg wraps ErrUnsupportedKey, an
// unknown alg wraps keystore.ErrUnsupportedAlgorithm.
func EncodeSignature(alg keystore.Algorithm, pub crypto.PublicKey, sig []byte) ([]byte, error) {
	e, err := NewSignatureEncoder(alg, pub)
	if err != nil {
		return nil, err
	}
	return e.Encode(sig)
}

// A SignatureEncoder is EncodeSignature for one key and algorithm, whose
// check of the key (a point on the curve, a sane modulus) is made once, by
// NewSignatureEncoder, rather than for every signature.
type SignatureEncoder struct {
	alg  keystore.Algorithm
	p    params
	size int // RSA: the modulus size in bytes
}

// NewSignatureEncoder checks pub for alg as EncodeSignature does.
func NewSignatureEncoder(alg keystore.Algorithm, pub crypto.PublicKey) (SignatureEncoder, error) {
	p, err := keyFor(alg, pub)
	if err != nil {
		return SignatureEncoder{}, err
	}
	e := SignatureEncoder{alg: alg, p: p}
	if p.kty == ktyRSA {
		e.size = pub.(*rsa.PublicKey).Size()
	}
	return e, nil
}

// Encode is EncodeSignature(alg, pub, sig) for the encoder's alg and pub.
func (e SignatureEncoder) Encode(sig []byte) ([]byte, error) {
	switch e.p.kty {
	case ktyEC:
		return encodeECDSA(e.alg, e.p, sig)
	case ktyRSA:
		if len(sig) != e.size {
			return nil, fmt.Errorf("%s signature of %d bytes, want %d: %w", e.alg, len(sig), e.size, ErrBadSignature)
		}
	case ktyOKP:
		if len(sig) != ed25519.SignatureSize {
			return nil, fmt.Errorf("%s signature of %d bytes, want %d: %w", e.alg, len(sig), ed25519.SignatureSize, ErrBadSignature)
		}
	default:
		return nil, fmt.Errorf("a SignatureEncoder not made by NewSignatureEncoder: %w", ErrUnsupportedKey)
	}
	return bytes.Clone(sig), nil
}

// encodeECDSA converts a DER ECDSA signature to fixed-width r ‖ s.
func encodeECDSA(alg keystore.Algorithm, p params, der []byte) ([]byte, error) {
	// The longest canonical DER: a 2-byte SEQUENCE header (the content never
	// reaches 128 bytes for P-256 or P-384) and two INTEGERs of a 2-byte
	// header, a 0x00 sign byte and size bytes each.
	if maxLen := 2 + 2*(3+p.size); len(der) > maxLen {
		return nil, fmt.Errorf("%s DER signature of %d bytes, at most %d: %w", alg, len(der), maxLen, ErrBadSignature)
	}
	// Raw accepts only the one canonical DER encoding of (r, s), with
	// 1 ≤ r, s < 2^(8·size); the bound n is ours to check.
	out, err := ecdsasig.Raw(der, p.size)
	if err != nil {
		return nil, fmt.Errorf("%s DER signature: %w: %w", alg, ErrBadSignature, err)
	}
	var buf [66]byte // room for the order of any NIST curve, P-521's included
	order := p.curve.Params().N.FillBytes(buf[:p.size])
	for i, name := range [...]string{"r", "s"} {
		if bytes.Compare(out[i*p.size:(i+1)*p.size], order) >= 0 {
			return nil, fmt.Errorf("%s signature %s out of range [1, n-1]: %w", alg, name, ErrBadSignature)
		}
	}
	return out, nil
}

// Verify checks jwsSig, a signature in JWS form (as EncodeSignature returns
// it, or as found in a compact JWS), over signingInput with pub for alg, using
// the standard library only:
//
//   - ES256, ES384: jwsSig must be exactly 2×size bytes (64, 96), split into
//     r and s and checked with ecdsa.Verify over the hash of signingInput.
//   - RS256: rsa.VerifyPKCS1v15 with SHA-256.
//   - PS256: rsa.VerifyPSS with SHA-256, MGF1-SHA-256 and a salt of exactly
//     32 bytes (rsa.PSSSaltLengthEqualsHash), as RFC 7518 §3.5 requires; a
//     signature with any other salt length fails, even one that verifiers
//     which auto-detect the salt would accept.
//   - EdDSA: ed25519.Verify over signingInput itself.
//
// A signature that does not verify, or has the wrong length, wraps
// ErrBadSignature; a key that does not fit alg wraps ErrUnsupportedKey; an
// unknown alg wraps keystore.ErrUnsupportedAlgorithm.
func Verify(alg keystore.Algorithm, pub crypto.PublicKey, signingInput, jwsSig []byte) error {
	p, err := keyFor(alg, pub)
	if err != nil {
		return err
	}
	digest, err := Digest(alg, signingInput)
	if err != nil {
		return err
	}
	switch p.kty {
	case ktyEC:
		if len(jwsSig) != 2*p.size {
			return fmt.Errorf("%s signature of %d bytes, want %d: %w", alg, len(jwsSig), 2*p.size, ErrBadSignature)
		}
		r := new(big.Int).SetBytes(jwsSig[:p.size])
		s := new(big.Int).SetBytes(jwsSig[p.size:])
		if !ecdsa.Verify(pub.(*ecdsa.PublicKey), digest, r, s) {
			return fmt.Errorf("%s: %w", alg, ErrBadSignature)
		}
	case ktyRSA:
		k := pub.(*rsa.PublicKey)
		if len(jwsSig) != k.Size() {
			return fmt.Errorf("%s signature of %d bytes, want %d: %w", alg, len(jwsSig), k.Size(), ErrBadSignature)
		}
		if alg == keystore.PS256 {
			err = rsa.VerifyPSS(k, crypto.SHA256, digest, jwsSig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256})
		} else {
			err = rsa.VerifyPKCS1v15(k, crypto.SHA256, digest, jwsSig)
		}
		if err != nil {
			return fmt.Errorf("%s: %w: %w", alg, ErrBadSignature, err)
		}
	case ktyOKP:
		if len(jwsSig) != ed25519.SignatureSize {
			return fmt.Errorf("%s signature of %d bytes, want %d: %w", alg, len(jwsSig), ed25519.SignatureSize, ErrBadSignature)
		}
		if !ed25519.Verify(pub.(ed25519.PublicKey), signingInput, jwsSig) {
			return fmt.Errorf("%s: %w", alg, ErrBadSignature)
		}
	}
	return nil
}
