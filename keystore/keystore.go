// Package keystore defines the contract between keyd and the places its
// private keys live: a software directory, a PKCS#11 token or a TPM 2.0.
//
// A backend is custody only. It generates a key under an ID chosen by the
// caller, returns the public half, signs digests with crypto.Signer semantics
// and destroys keys. It knows nothing of JOSE, gRPC, key sets or rotation:
// JOSE encoding of signatures (DER to fixed-width r||s, for example) lives once,
// outside the backends, in keyd's JWS code.
//
// Every backend must pass the contract suite in package keystoretest.
package keystore

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"errors"
	"fmt"
	"math/big"
)

// Algorithm is a JWS algorithm name (RFC 7518, RFC 8037).
type Algorithm string

// The algorithms keyd signs with.
const (
	ES256 Algorithm = "ES256" // ECDSA P-256, SHA-256
	ES384 Algorithm = "ES384" // ECDSA P-384, SHA-384
	RS256 Algorithm = "RS256" // RSASSA-PKCS1-v1_5, SHA-256
	PS256 Algorithm = "PS256" // RSASSA-PSS, SHA-256, MGF1-SHA-256, salt length 32
	EdDSA Algorithm = "EdDSA" // Ed25519
)

// Algorithms lists every algorithm keyd knows, in a stable order.
func Algorithms() []Algorithm { return []Algorithm{ES256, ES384, RS256, PS256, EdDSA} }

// ParseAlgorithm returns the Algorithm named s, or an error wrapping
// ErrUnsupportedAlgorithm.
func ParseAlgorithm(s string) (Algorithm, error) {
	for _, a := range Algorithms() {
		if string(a) == s {
			return a, nil
		}
	}
	return "", fmt.Errorf("algorithm %q: %w (want one of ES256, ES384, RS256, PS256, EdDSA)", s, ErrUnsupportedAlgorithm)
}

// IsRSA reports whether a is an RSA algorithm.
func (a Algorithm) IsRSA() bool { return a == RS256 || a == PS256 }

// Hash is the digest the algorithm signs, or 0 for EdDSA, which signs the
// message itself.
func (a Algorithm) Hash() crypto.Hash {
	switch a {
	case ES256, RS256, PS256:
		return crypto.SHA256
	case ES384:
		return crypto.SHA384
	}
	return 0
}

// SignerOpts returns the crypto.SignerOpts a backend's Sign expects for a:
// *rsa.PSSOptions with the salt length equal to the hash length for PS256 (as
// RFC 7518 §3.5 requires), the hash for the others, crypto.Hash(0) for EdDSA.
func (a Algorithm) SignerOpts() crypto.SignerOpts {
	if a == PS256 {
		return &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}
	}
	return a.Hash()
}

// KeySpec says what key to generate.
type KeySpec struct {
	Algorithm Algorithm
	// RSABits is the modulus size for RS256 and PS256: 2048 (the default when
	// zero) or 3072. It is ignored for other algorithms.
	RSABits int
}

// Bits returns the RSA modulus size the spec asks for, applying the default.
func (s KeySpec) Bits() int {
	if s.RSABits == 0 {
		return 2048
	}
	return s.RSABits
}

// Validate reports whether the spec names a known algorithm and a supported
// RSA size.
func (s KeySpec) Validate() error {
	if _, err := ParseAlgorithm(string(s.Algorithm)); err != nil {
		return err
	}
	if s.Algorithm.IsRSA() && s.Bits() != 2048 && s.Bits() != 3072 {
		return fmt.Errorf("RSA key size %d: %w (want 2048 or 3072)", s.RSABits, ErrUnsupportedAlgorithm)
	}
	return nil
}

// String returns the algorithm, with the RSA size where it applies.
func (s KeySpec) String() string {
	if s.Algorithm.IsRSA() {
		return fmt.Sprintf("%s/%d", s.Algorithm, s.Bits())
	}
	return string(s.Algorithm)
}

// Backend is where keys live. Implementations are safe for concurrent use.
//
// Key IDs are chosen by the caller and never reused: Generate with an ID that
// exists (or existed and was destroyed, where the backend can tell) fails with
// ErrAlreadyExists, so a caller that journals an ID before generating can retry
// after a crash without ever overwriting a key.
type Backend interface {
	// Name is a short name for logs and metrics ("soft", "pkcs11", "tpm").
	Name() string

	// Algorithms lists the algorithms this backend can generate and sign with,
	// as probed from the device where there is one.
	Algorithms() []Algorithm

	// Generate creates a key under id and returns its public key
	// (*ecdsa.PublicKey, *rsa.PublicKey or ed25519.PublicKey). It fails with
	// ErrUnsupportedAlgorithm, ErrAlreadyExists, ErrInvalidID or ErrUnavailable.
	Generate(ctx context.Context, id string, spec KeySpec) (crypto.PublicKey, error)

	// Public returns the public key of id, or ErrNotFound.
	Public(ctx context.Context, id string) (crypto.PublicKey, error)

	// Sign signs digest with key id with crypto.Signer semantics: ECDSA returns
	// an ASN.1 DER signature, RSA takes crypto.SHA256 (PKCS #1 v1.5) or
	// *rsa.PSSOptions, Ed25519 takes the whole message and crypto.Hash(0).
	// It fails with ErrNotFound, ErrKeyLost (the key was known but is gone from
	// the device), ErrUnavailable (try again) or ErrLocked.
	Sign(ctx context.Context, id string, digest []byte, opts crypto.SignerOpts) ([]byte, error)

	// List returns the IDs of every key this backend holds for keyd, in no
	// particular order.
	List(ctx context.Context) ([]string, error)

	// Destroy deletes key id. Destroying a key that does not exist returns
	// ErrNotFound, so a retried destroy can tell it already happened.
	Destroy(ctx context.Context, id string) error

	// Close releases the backend's resources. Calls after Close fail.
	Close() error
}

// Sentinel errors. Backends wrap them with the operation and key ID
// ("sign k1: %w") and map device codes (CKR_*, TPM_RC_*) onto them.
var (
	ErrNotFound             = errors.New("key not found")
	ErrAlreadyExists        = errors.New("key already exists")
	ErrUnsupportedAlgorithm = errors.New("algorithm not supported")
	ErrInvalidID            = errors.New("invalid key id")
	ErrUnavailable          = errors.New("key store unavailable")
	ErrKeyLost              = errors.New("key material lost")
	ErrLocked               = errors.New("key store locked")
	ErrInsecureStorage      = errors.New("key storage is not private")
	ErrClosed               = errors.New("key store closed")
)

// CheckOpts refuses signer options that are nil, or a nil pointer of a
// type that carries them (*rsa.PSSOptions, *ed25519.Options), whose
// methods would panic, with ErrUnsupportedAlgorithm. Backends call it
// first in Sign.
func CheckOpts(opts crypto.SignerOpts) error {
	switch o := opts.(type) {
	case nil:
		return fmt.Errorf("no signer options: %w", ErrUnsupportedAlgorithm)
	case *rsa.PSSOptions:
		if o == nil {
			return fmt.Errorf("nil %T: %w", o, ErrUnsupportedAlgorithm)
		}
	case *ed25519.Options:
		if o == nil {
			return fmt.Errorf("nil %T: %w", o, ErrUnsupportedAlgorithm)
		}
	}
	return nil
}

// ClonePublic returns a copy of pub that shares no memory with it. Backends
// return their public keys through it, so a caller that changes the key it
// got (a *big.Int, a byte slice) cannot change the backend's.
func ClonePublic(pub crypto.PublicKey) (crypto.PublicKey, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		b, err := k.Bytes()
		if err != nil {
			return nil, fmt.Errorf("keystore: copying an ECDSA public key: %w", err)
		}
		return ecdsa.ParseUncompressedPublicKey(k.Curve, b)
	case *rsa.PublicKey:
		return &rsa.PublicKey{N: new(big.Int).Set(k.N), E: k.E}, nil
	case ed25519.PublicKey:
		return ed25519.PublicKey(bytes.Clone(k)), nil
	}
	return nil, fmt.Errorf("keystore: a public key of type %T", pub)
}

// ValidID reports whether id may name a key: 1 to 64 characters from
// [A-Za-z0-9._-], not starting with a dot. Backends use IDs as file names and
// object labels, so anything else is refused with ErrInvalidID.
func ValidID(id string) error {
	if len(id) == 0 || len(id) > 64 || id[0] == '.' {
		return fmt.Errorf("%q: %w", id, ErrInvalidID)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return fmt.Errorf("%q: %w", id, ErrInvalidID)
		}
	}
	return nil
}
