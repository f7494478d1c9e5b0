// Package jws encodes what keyd signs and publishes: JWKs, RFC 7638
// thumbprints, JWS signing inputs and signatures.
//
// keyd never holds a private key. A backend (keystore.Backend) signs a digest
// with crypto.Signer semantics and returns what the standard library would
// return: an ASN.1 DER SEQUENCE of two INTEGERs for ECDSA, a modulus-length
// octet string for RSA, 64 bytes for Ed25519. Everything JOSE-specific happens
// here, once, so that no backend has to know about it:
//
//   - SigningInput builds BASE64URL(header) '.' BASE64URL(claims) (RFC 7515
//     §5.1) and SplitSigningInput takes one apart again, strictly.
//   - Digest turns a signing input into what keystore.Backend.Sign expects for
//     an algorithm: the SHA-256 or SHA-384 hash for ES*, RS* and PS*, the input
//     itself for EdDSA.
//   - EncodeSignature turns the backend's signature into the JWS form (RFC 7518
//     §3.4: raw R‖S, each left-padded to the curve size, for ECDSA) and checks
//     lengths and ranges for every algorithm; Compact joins signing input and
//     signature into a compact-serialised JWS.
//   - Verify checks a JWS signature with the standard library alone, applying
//     RFC 7518's rules strictly (for PS256, the salt must be exactly the hash
//     length). keyd uses it to check its own output.
//   - PublicJWK, JWK and Thumbprint publish public keys as RFC 7517/7518/8037
//     JWKs and compute RFC 7638 SHA-256 thumbprints (the DPoP "jkt").
//
// The encodings this package writes are canonical and the ones it reads are
// checked to be canonical too: base64url without padding and without stray
// bits, EC coordinates at the full curve size, RSA integers without leading
// zeros, DER without trailing or extra data. Two byte strings that mean the
// same key or signature are therefore always equal, and a thumbprint computed
// from a Go key and from its published JWK are the same.
//
// Every error wraps one of the sentinel errors of this package
// (ErrUnsupportedKey, ErrPrivateMember, ErrMalformed, ErrBadSignature) or,
// for an algorithm keyd does not know, keystore.ErrUnsupportedAlgorithm, so
// callers can tell them apart with errors.Is.
//
// The package has no state; everything in it is safe for concurrent use.
package jws

import (
	"bytes"
	"crypto"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	"github.com/keyd-dev/keyd/keystore"
)

// Sentinel errors. Functions wrap them with what failed ("jwk x: ...") and,
// where there is one, the underlying error.
var (
	// ErrUnsupportedKey means a key is not one keyd can publish or sign
	// with: a type other than *ecdsa.PublicKey (P-256, P-384),
	// *rsa.PublicKey or ed25519.PublicKey, a nil or invalid key, an RSA
	// modulus outside the sizes keyd accepts, a JWK "kty" or "crv" this
	// package does not know, or a key that does not fit the algorithm it is
	// used with.
	ErrUnsupportedKey = errors.New("jws: unsupported key")

	// ErrPrivateMember means a JWK carried a private key member ("d", "p",
	// "q", "dp", "dq", "qi", "oth" or "k"). keyd only ever reads and writes
	// public JWKs, so such a document is refused as a whole rather than
	// having the private part silently dropped.
	ErrPrivateMember = errors.New("jws: JWK has a private member")

	// ErrMalformed means an input is not well-formed: a signing input that
	// is not exactly two canonical base64url parts, a JWK that is not a JSON
	// object of string members, or a JWK member whose value is not a
	// canonical encoding of a valid key.
	ErrMalformed = errors.New("jws: malformed input")

	// ErrBadSignature means a signature has the wrong form for its algorithm
	// and key (not canonical DER, a value out of range, the wrong length) or
	// does not verify.
	ErrBadSignature = errors.New("jws: bad signature")
)

// Key types ("kty") and curves ("crv") of the JWKs keyd handles.
const (
	ktyEC  = "EC"  // RFC 7518 §6.2
	ktyRSA = "RSA" // RFC 7518 §6.3
	ktyOKP = "OKP" // RFC 8037 §2

	crvP256    = "P-256"
	crvP384    = "P-384"
	crvEd25519 = "Ed25519"
)

// params describes what an algorithm needs from a key and a signature.
type params struct {
	hash  crypto.Hash    // digest signed, 0 for EdDSA
	kty   string         // ktyEC, ktyRSA or ktyOKP
	curve elliptic.Curve // EC only
	size  int            // EC only: bytes in a coordinate and in each of r, s
}

// paramsFor returns the parameters of alg, or an error wrapping
// keystore.ErrUnsupportedAlgorithm.
func paramsFor(alg keystore.Algorithm) (params, error) {
	switch alg {
	case keystore.ES256:
		return params{hash: crypto.SHA256, kty: ktyEC, curve: elliptic.P256(), size: 32}, nil
	case keystore.ES384:
		return params{hash: crypto.SHA384, kty: ktyEC, curve: elliptic.P384(), size: 48}, nil
	case keystore.RS256, keystore.PS256:
		return params{hash: crypto.SHA256, kty: ktyRSA}, nil
	case keystore.EdDSA:
		return params{kty: ktyOKP}, nil
	}
	return params{}, fmt.Errorf("algorithm %q: %w", alg, keystore.ErrUnsupportedAlgorithm)
}

// SigningInput returns the JWS signing input of RFC 7515 §5.1 for the given
// JOSE header and claims (payload): BASE64URL(header) '.' BASE64URL(claims),
// both encoded with the URL-safe alphabet and without padding
// (base64.RawURLEncoding). header and claims are encoded as they are; it is
// the caller's job to pass the exact JSON bytes it means to sign.
func SigningInput(header, claims []byte) []byte {
	enc := base64.RawURLEncoding
	hl, cl := enc.EncodedLen(len(header)), enc.EncodedLen(len(claims))
	out := make([]byte, hl+1+cl)
	enc.Encode(out[:hl], header)
	out[hl] = '.'
	enc.Encode(out[hl+1:], claims)
	return out
}

// SplitSigningInput is the inverse of SigningInput: it splits in at its only
// '.' and decodes both parts. It is strict, so that it accepts exactly the
// byte strings SigningInput produces: there must be exactly one '.', both
// parts must be non-empty, and each must be canonical unpadded base64url (no
// '=' padding, no '+' or '/' from the standard alphabet, no line breaks, no
// non-zero unused trailing bits). Every error wraps ErrMalformed.
func SplitSigningInput(in []byte) (header, claims []byte, err error) {
	if n := bytes.Count(in, []byte{'.'}); n != 1 {
		return nil, nil, fmt.Errorf("signing input: %d dots, want exactly 1: %w", n, ErrMalformed)
	}
	h, c, _ := bytes.Cut(in, []byte{'.'})
	if header, err = decodeB64(h); err != nil {
		return nil, nil, fmt.Errorf("signing input header: %w", err)
	}
	if claims, err = decodeB64(c); err != nil {
		return nil, nil, fmt.Errorf("signing input claims: %w", err)
	}
	return header, claims, nil
}

// decodeB64 decodes one non-empty, canonical, unpadded base64url value. The
// standard library's decoder skips '\r' and '\n' even in strict mode, so they
// are refused here first. Errors wrap ErrMalformed.
func decodeB64(s []byte) ([]byte, error) {
	if len(s) == 0 {
		return nil, fmt.Errorf("empty base64url value: %w", ErrMalformed)
	}
	if bytes.ContainsAny(s, "\r\n") {
		return nil, fmt.Errorf("line break in base64url value: %w", ErrMalformed)
	}
	enc := base64.RawURLEncoding.Strict()
	out := make([]byte, enc.DecodedLen(len(s)))
	n, err := enc.Decode(out, s)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	return out[:n], nil
}

// b64 encodes b as unpadded base64url.
func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// Digest returns what keystore.Backend.Sign expects to be given for alg when
// signing signingInput: the SHA-256 hash of signingInput for ES256, RS256 and
// PS256, the SHA-384 hash for ES384, and signingInput itself (not a copy) for
// EdDSA, because Ed25519 hashes the whole message internally. Pair it with
// alg.SignerOpts(). An unknown alg yields an error wrapping
// keystore.ErrUnsupportedAlgorithm.
func Digest(alg keystore.Algorithm, signingInput []byte) ([]byte, error) {
	p, err := paramsFor(alg)
	if err != nil {
		return nil, err
	}
	switch p.hash {
	case crypto.SHA256:
		sum := sha256.Sum256(signingInput)
		return sum[:], nil
	case crypto.SHA384:
		sum := sha512.Sum384(signingInput)
		return sum[:], nil
	}
	return signingInput, nil
}

// Compact returns the JWS Compact Serialization (RFC 7515 §7.1) of a signing
// input, as built by SigningInput, and a signature in JWS form, as returned by
// EncodeSignature: signingInput '.' BASE64URL(jwsSig).
//
// It allocates once, the string it returns: keyd builds one per signature.
func Compact(signingInput, jwsSig []byte) string {
	enc := base64.RawURLEncoding
	var b strings.Builder
	b.Grow(len(signingInput) + 1 + enc.EncodedLen(len(jwsSig)))
	b.Write(signingInput)
	b.WriteByte('.')
	// The signature's base64url through a buffer on the stack (JWS
	// signatures are at most 512 bytes, RSA-4096; larger ones take a
	// second allocation).
	var buf [704]byte
	sig := buf[:0]
	sig = enc.AppendEncode(sig, jwsSig)
	b.Write(sig)
	return b.String()
}
