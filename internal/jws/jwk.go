package jws

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"slices"

	"github.com/keyd-dev/keyd/keystore"
)

// RSA moduli keyd accepts, in bits. keyd generates 2048- and 3072-bit keys;
// anything under 2048 bits is too weak to publish, and the upper bound keeps
// a hostile JWK from making verification arbitrarily slow.
const (
	minRSABits = 2048
	maxRSABits = 8192
)

// JWK is the public part of a key as RFC 7517, RFC 7518 §6 and RFC 8037 §2
// describe it. Every field holds the JSON member of the same name; an empty
// field is an absent member.
//
// A JWK built by PublicJWK is canonical: X and Y are the full size of the
// curve, N and E carry no leading zero bytes. JWK.PublicKey checks a JWK read
// from elsewhere for the same, so that the thumbprint of a key never depends
// on where its JWK came from.
//
// JWK has no field for private members, and UnmarshalJSON refuses documents
// that carry one, so a JWK value can never leak private key material.
type JWK struct {
	// Kty is the key type: "EC", "RSA" or "OKP".
	Kty string
	// Crv is the curve: "P-256" or "P-384" for EC, "Ed25519" for OKP.
	Crv string
	// X and Y are the unpadded base64url coordinates of an EC point, each
	// left-padded with zeros to the curve size (32 bytes for P-256, 48 for
	// P-384) as RFC 7518 §6.2.1.2 requires. For OKP, X is the 32-byte public
	// key and Y is empty.
	X, Y string
	// N and E are the RSA modulus and public exponent as Base64urlUInt
	// (RFC 7518 §2): unpadded base64url of the minimal big-endian bytes,
	// with no leading zero byte.
	N, E string
	// Kid, Alg and Use are the optional "kid", "alg" and "use" members.
	// PublicJWK leaves them empty; keyd sets them when it publishes a key.
	Kid string
	Alg string
	Use string
}

// keyInfo is what PublicJWK, AlgorithmForKey and the signature functions need
// to know about a validated public key.
type keyInfo struct {
	kty   string
	crv   string         // EC and OKP
	curve elliptic.Curve // EC only
	size  int            // EC only: coordinate size in bytes
}

// inspect validates pub and says what kind of key it is. Errors wrap
// ErrUnsupportedKey.
func inspect(pub crypto.PublicKey) (keyInfo, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		// ecdsa.PublicKey.Bytes panics on nil coordinates, so they are
		// checked here; they are read, never used for arithmetic.
		if k == nil || k.Curve == nil || k.X == nil || k.Y == nil {
			return keyInfo{}, fmt.Errorf("nil or incomplete ECDSA key: %w", ErrUnsupportedKey)
		}
		var info keyInfo
		switch k.Curve {
		case elliptic.P256():
			info = keyInfo{kty: ktyEC, crv: crvP256, curve: k.Curve, size: 32}
		case elliptic.P384():
			info = keyInfo{kty: ktyEC, crv: crvP384, curve: k.Curve, size: 48}
		default:
			name := "unknown"
			if cp := k.Params(); cp != nil {
				name = cp.Name
			}
			return keyInfo{}, fmt.Errorf("ECDSA curve %s: %w (want P-256 or P-384)", name, ErrUnsupportedKey)
		}
		// Bytes fails for a point that is not on the curve or is at infinity.
		if _, err := k.Bytes(); err != nil {
			return keyInfo{}, fmt.Errorf("ECDSA %s key: %w: %w", info.crv, ErrUnsupportedKey, err)
		}
		return info, nil
	case *rsa.PublicKey:
		if k == nil || k.N == nil {
			return keyInfo{}, fmt.Errorf("nil RSA key: %w", ErrUnsupportedKey)
		}
		if err := checkRSA(k.N, k.E); err != nil {
			return keyInfo{}, err
		}
		return keyInfo{kty: ktyRSA}, nil
	case ed25519.PublicKey:
		if len(k) != ed25519.PublicKeySize {
			return keyInfo{}, fmt.Errorf("Ed25519 key of %d bytes: %w (want %d)", len(k), ErrUnsupportedKey, ed25519.PublicKeySize)
		}
		return keyInfo{kty: ktyOKP, crv: crvEd25519}, nil
	}
	return keyInfo{}, fmt.Errorf("key type %T: %w (want *ecdsa.PublicKey, *rsa.PublicKey or ed25519.PublicKey)", pub, ErrUnsupportedKey)
}

// checkRSA checks an RSA modulus and exponent the way crypto/rsa will and
// against keyd's size limits. Errors wrap ErrUnsupportedKey.
func checkRSA(n *big.Int, e int) error {
	if n.Sign() <= 0 {
		return fmt.Errorf("RSA modulus is not positive: %w", ErrUnsupportedKey)
	}
	if bits := n.BitLen(); bits < minRSABits || bits > maxRSABits {
		return fmt.Errorf("RSA modulus of %d bits: %w (want %d to %d)", bits, ErrUnsupportedKey, minRSABits, maxRSABits)
	}
	if n.Bit(0) == 0 {
		return fmt.Errorf("RSA modulus is even: %w", ErrUnsupportedKey)
	}
	if e < 3 || e > 1<<31-1 || e&1 == 0 {
		return fmt.Errorf("RSA exponent %d: %w (want odd, 3 to 2^31-1)", e, ErrUnsupportedKey)
	}
	return nil
}

// PublicJWK returns the JWK of pub, which must be an *ecdsa.PublicKey on P-256
// or P-384, an *rsa.PublicKey with a 2048- to 8192-bit modulus, or an
// ed25519.PublicKey. EC coordinates are left-padded to the curve size and
// RSA integers are minimal, as RFC 7518 requires. Kid, Alg and Use are left
// empty. Any other key, including a private key, and a nil or invalid key
// (a point off the curve, an even exponent) yield an error wrapping
// ErrUnsupportedKey.
func PublicJWK(pub crypto.PublicKey) (JWK, error) {
	info, err := inspect(pub)
	if err != nil {
		return JWK{}, err
	}
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		// Bytes returns 0x04 ‖ X ‖ Y with both coordinates at full size,
		// never the shortened form big.Int.Bytes would give.
		b, err := k.Bytes()
		if err != nil {
			return JWK{}, fmt.Errorf("ECDSA key: %w: %w", ErrUnsupportedKey, err)
		}
		return JWK{Kty: ktyEC, Crv: info.crv, X: b64(b[1 : 1+info.size]), Y: b64(b[1+info.size:])}, nil
	case *rsa.PublicKey:
		return JWK{Kty: ktyRSA, N: b64(k.N.Bytes()), E: b64(big.NewInt(int64(k.E)).Bytes())}, nil
	case ed25519.PublicKey:
		return JWK{Kty: ktyOKP, Crv: crvEd25519, X: b64(k)}, nil
	}
	// inspect accepted a type the switch above does not handle.
	return JWK{}, fmt.Errorf("key type %T: %w", pub, ErrUnsupportedKey)
}

// AlgorithmForKey returns the algorithms pub can sign with, in the order of
// keystore.Algorithms: ES256 for a P-256 key, ES384 for a P-384 key, RS256
// and PS256 for an RSA key, EdDSA for an Ed25519 key. It returns nil for a key
// PublicJWK would refuse. The slice is new on every call.
func AlgorithmForKey(pub crypto.PublicKey) []keystore.Algorithm {
	info, err := inspect(pub)
	if err != nil {
		return nil
	}
	switch info.kty {
	case ktyEC:
		if info.crv == crvP256 {
			return []keystore.Algorithm{keystore.ES256}
		}
		return []keystore.Algorithm{keystore.ES384}
	case ktyRSA:
		return []keystore.Algorithm{keystore.RS256, keystore.PS256}
	case ktyOKP:
		return []keystore.Algorithm{keystore.EdDSA}
	}
	return nil
}

// MarshalJSON encodes k as a JSON object holding only its non-empty members,
// in the fixed order kty, crv, x, y, n, e, kid, alg, use, with no whitespace.
// The same JWK therefore always encodes to the same bytes. It never writes a
// private member: JWK has none.
func (k JWK) MarshalJSON() ([]byte, error) {
	members := [...]struct{ name, value string }{
		{"kty", k.Kty}, {"crv", k.Crv}, {"x", k.X}, {"y", k.Y},
		{"n", k.N}, {"e", k.E}, {"kid", k.Kid}, {"alg", k.Alg}, {"use", k.Use},
	}
	var buf bytes.Buffer
	buf.WriteByte('{')
	first := true
	for _, m := range members {
		if m.value == "" {
			continue
		}
		if !first {
			buf.WriteByte(',')
		}
		first = false
		if err := writeMember(&buf, m.name, m.value); err != nil {
			return nil, err
		}
	}
	buf.WriteByte('}')
	return buf.Bytes(), nil
}

// writeMember writes "name":value with value JSON-escaped.
func writeMember(buf *bytes.Buffer, name, value string) error {
	v, err := json.Marshal(value)
	if err != nil {
		return fmt.Errorf("jwk %s: %w", name, err)
	}
	buf.WriteByte('"')
	buf.WriteString(name)
	buf.WriteString(`":`)
	buf.Write(v)
	return nil
}

// isPrivateMember reports whether a JWK member carries private key material:
// RFC 7518 §6.2.2 (EC), §6.3.2 (RSA), §6.4 (symmetric) and RFC 8037 §2 (OKP).
func isPrivateMember(name string) bool {
	switch name {
	case "d", "p", "q", "dp", "dq", "qi", "oth", "k":
		return true
	}
	return false
}

// UnmarshalJSON decodes a JWK strictly. data must be a single JSON object
// with a non-empty string "kty"; the members kty, crv, x, y, n, e, kid, alg
// and use must be strings when present; no member may appear twice. A private
// member ("d", "p", "q", "dp", "dq", "qi", "oth" or "k"), whatever its value,
// fails the whole document with an error wrapping ErrPrivateMember; any other
// problem wraps ErrMalformed. Other members ("key_ops", "x5c", ...) are
// ignored. Member names are case-sensitive, as in RFC 7517.
//
// UnmarshalJSON checks syntax only; JWK.PublicKey checks that the members
// describe a valid key. On error k is left unchanged. As for the standard
// library's types, a JSON null leaves k unchanged and is not an error.
func (k *JWK) UnmarshalJSON(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("jwk: %w: %w", ErrMalformed, err)
	}
	if tok == nil {
		return expectEOF(dec)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return fmt.Errorf("jwk: not a JSON object: %w", ErrMalformed)
	}
	var out JWK
	fields := map[string]*string{
		"kty": &out.Kty, "crv": &out.Crv, "x": &out.X, "y": &out.Y,
		"n": &out.N, "e": &out.E, "kid": &out.Kid, "alg": &out.Alg, "use": &out.Use,
	}
	seen := make(map[string]bool)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return fmt.Errorf("jwk: %w: %w", ErrMalformed, err)
		}
		name, ok := tok.(string)
		if !ok {
			return fmt.Errorf("jwk: member name is not a string: %w", ErrMalformed)
		}
		if isPrivateMember(name) {
			return fmt.Errorf("jwk member %q: %w", name, ErrPrivateMember)
		}
		if seen[name] {
			return fmt.Errorf("jwk member %q appears twice: %w", name, ErrMalformed)
		}
		seen[name] = true
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return fmt.Errorf("jwk member %q: %w: %w", name, ErrMalformed, err)
		}
		field, known := fields[name]
		if !known {
			continue
		}
		if len(raw) == 0 || raw[0] != '"' {
			return fmt.Errorf("jwk member %q is not a string: %w", name, ErrMalformed)
		}
		if err := json.Unmarshal(raw, field); err != nil {
			return fmt.Errorf("jwk member %q: %w: %w", name, ErrMalformed, err)
		}
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return fmt.Errorf("jwk: %w: %w", ErrMalformed, err)
	}
	if err := expectEOF(dec); err != nil {
		return err
	}
	if out.Kty == "" {
		return fmt.Errorf("jwk: no \"kty\": %w", ErrMalformed)
	}
	*k = out
	return nil
}

// expectEOF fails unless dec has nothing left but white space.
func expectEOF(dec *json.Decoder) error {
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("jwk: data after the JSON value: %w", ErrMalformed)
	}
	return nil
}

// PublicKey returns the Go public key k describes: an *ecdsa.PublicKey for
// kty "EC" (crv "P-256" or "P-384"), an *rsa.PublicKey for kty "RSA", an
// ed25519.PublicKey for kty "OKP" (crv "Ed25519").
//
// It accepts only canonical JWKs, the ones PublicJWK produces (plus any Kid,
// Alg and Use): every value must be unpadded base64url with no stray bits; x
// and y must be exactly the curve size and name a point on the curve; n and e
// must be minimal (no leading zero byte); an Ed25519 x must be 32 bytes;
// members that do not belong to the key type (an "n" in an EC key, a "y" in
// an OKP key) must be absent; and a non-empty Alg must be one of the
// algorithms AlgorithmForKey returns for the key. An unknown kty or crv, or an
// RSA key PublicJWK would refuse, yields an error wrapping ErrUnsupportedKey;
// anything else wrong wraps ErrMalformed.
//
// An Ed25519 x is checked for length only; whether it decodes to a curve
// point is left to ed25519.Verify, which rejects signatures under keys that
// do not.
func (k JWK) PublicKey() (crypto.PublicKey, error) {
	pub, err := k.publicKey()
	if err != nil {
		return nil, err
	}
	if k.Alg != "" && !slices.Contains(AlgorithmForKey(pub), keystore.Algorithm(k.Alg)) {
		return nil, fmt.Errorf("jwk alg %q does not fit a %s %s key: %w", k.Alg, k.Kty, k.Crv, ErrMalformed)
	}
	return pub, nil
}

func (k JWK) publicKey() (crypto.PublicKey, error) {
	switch k.Kty {
	case ktyEC:
		if err := k.absent("n", k.N, "e", k.E); err != nil {
			return nil, err
		}
		var curve elliptic.Curve
		var size int
		switch k.Crv {
		case crvP256:
			curve, size = elliptic.P256(), 32
		case crvP384:
			curve, size = elliptic.P384(), 48
		default:
			return nil, fmt.Errorf("jwk crv %q: %w (want P-256 or P-384)", k.Crv, ErrUnsupportedKey)
		}
		x, err := decodeMember("x", k.X, size)
		if err != nil {
			return nil, err
		}
		y, err := decodeMember("y", k.Y, size)
		if err != nil {
			return nil, err
		}
		point := make([]byte, 0, 1+2*size)
		point = append(append(append(point, 4), x...), y...)
		pub, err := ecdsa.ParseUncompressedPublicKey(curve, point)
		if err != nil {
			return nil, fmt.Errorf("jwk %s point: %w: %w", k.Crv, ErrMalformed, err)
		}
		return pub, nil
	case ktyRSA:
		if err := k.absent("crv", k.Crv, "x", k.X, "y", k.Y); err != nil {
			return nil, err
		}
		n, err := decodeUInt("n", k.N, maxRSABits/8)
		if err != nil {
			return nil, err
		}
		e, err := decodeUInt("e", k.E, 4)
		if err != nil {
			return nil, err
		}
		if !e.IsInt64() || e.Int64() > 1<<31-1 {
			return nil, fmt.Errorf("jwk e too large: %w", ErrUnsupportedKey)
		}
		if err := checkRSA(n, int(e.Int64())); err != nil {
			return nil, fmt.Errorf("jwk: %w", err)
		}
		return &rsa.PublicKey{N: n, E: int(e.Int64())}, nil
	case ktyOKP:
		if err := k.absent("y", k.Y, "n", k.N, "e", k.E); err != nil {
			return nil, err
		}
		if k.Crv != crvEd25519 {
			return nil, fmt.Errorf("jwk OKP crv %q: %w (want Ed25519)", k.Crv, ErrUnsupportedKey)
		}
		x, err := decodeMember("x", k.X, ed25519.PublicKeySize)
		if err != nil {
			return nil, err
		}
		return ed25519.PublicKey(x), nil
	}
	return nil, fmt.Errorf("jwk kty %q: %w (want EC, RSA or OKP)", k.Kty, ErrUnsupportedKey)
}

// absent fails if any of the (name, value) pairs has a non-empty value:
// the member does not belong to k's key type.
func (k JWK) absent(pairs ...string) error {
	for i := 0; i+1 < len(pairs); i += 2 {
		if pairs[i+1] != "" {
			return fmt.Errorf("jwk member %q in a %s key: %w", pairs[i], k.Kty, ErrMalformed)
		}
	}
	return nil
}

// decodeMember decodes a base64url member that must be exactly size bytes.
func decodeMember(name, value string, size int) ([]byte, error) {
	b, err := decodeB64([]byte(value))
	if err != nil {
		return nil, fmt.Errorf("jwk %s: %w", name, err)
	}
	if len(b) != size {
		return nil, fmt.Errorf("jwk %s is %d bytes, want %d: %w", name, len(b), size, ErrMalformed)
	}
	return b, nil
}

// decodeUInt decodes a Base64urlUInt member (RFC 7518 §2): non-empty, no
// leading zero byte, at most maxLen bytes.
func decodeUInt(name, value string, maxLen int) (*big.Int, error) {
	b, err := decodeB64([]byte(value))
	if err != nil {
		return nil, fmt.Errorf("jwk %s: %w", name, err)
	}
	if b[0] == 0 {
		return nil, fmt.Errorf("jwk %s has a leading zero byte: %w", name, ErrMalformed)
	}
	if len(b) > maxLen {
		return nil, fmt.Errorf("jwk %s is %d bytes: %w (at most %d)", name, len(b), ErrUnsupportedKey, maxLen)
	}
	return new(big.Int).SetBytes(b), nil
}

// Thumbprint returns the RFC 7638 JWK thumbprint of pub with SHA-256, as
// unpadded base64url: the hash of the JSON object holding only the members
// RFC 7638 §3.2 requires for the key type, in lexicographic order, with no
// white space:
//
//	EC:  {"crv":…,"kty":"EC","x":…,"y":…}
//	RSA: {"e":…,"kty":"RSA","n":…}
//	OKP: {"crv":"Ed25519","kty":"OKP","x":…}
//
// with the values PublicJWK gives (full-size EC coordinates, minimal RSA
// integers). This is the "jkt" of RFC 9449 DPoP. A key PublicJWK refuses
// yields its error.
func Thumbprint(pub crypto.PublicKey) (string, error) {
	k, err := PublicJWK(pub)
	if err != nil {
		return "", err
	}
	var members []struct{ name, value string }
	switch k.Kty {
	case ktyEC:
		members = []struct{ name, value string }{{"crv", k.Crv}, {"kty", k.Kty}, {"x", k.X}, {"y", k.Y}}
	case ktyRSA:
		members = []struct{ name, value string }{{"e", k.E}, {"kty", k.Kty}, {"n", k.N}}
	case ktyOKP:
		members = []struct{ name, value string }{{"crv", k.Crv}, {"kty", k.Kty}, {"x", k.X}}
	default:
		return "", fmt.Errorf("thumbprint of kty %q: %w", k.Kty, ErrUnsupportedKey)
	}
	var buf bytes.Buffer
	buf.WriteByte('{')
	for i, m := range members {
		if i > 0 {
			buf.WriteByte(',')
		}
		if err := writeMember(&buf, m.name, m.value); err != nil {
			return "", err
		}
	}
	buf.WriteByte('}')
	sum := sha256.Sum256(buf.Bytes())
	return b64(sum[:]), nil
}

// Thumbprint returns the RFC 7638 SHA-256 thumbprint of the key k describes.
// k must pass JWK.PublicKey, whose error it returns otherwise; Kid, Alg and
// Use do not enter the thumbprint. It equals Thumbprint(pub) for the key pub
// that k.PublicKey returns.
func (k JWK) Thumbprint() (string, error) {
	pub, err := k.PublicKey()
	if err != nil {
		return "", err
	}
	return Thumbprint(pub)
}
