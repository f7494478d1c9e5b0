package pkcs11

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyd-dev/keyd/internal/ecdsasig"
	"github.com/keyd-dev/keyd/keystore"
)

// PKCS#11 3.0 constants that miekg/pkcs11 v1.1.2 lacks.
const (
	ckkECEdwards           = 0x40   // CKK_EC_EDWARDS
	ckmECEdwardsKeyPairGen = 0x1055 // CKM_EC_EDWARDS_KEY_PAIR_GEN
	ckmEdDSA               = 0x1057 // CKM_EDDSA
)

// DER-encoded curve OIDs, the CKA_EC_PARAMS of keyd's keys.
var (
	oidP256    = []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07} // 1.2.840.10045.3.1.7
	oidP384    = []byte{0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22}                   // 1.3.132.0.34
	oidEd25519 = []byte{0x06, 0x03, 0x2b, 0x65, 0x70}                               // 1.3.101.112
	// Some tokens name the Edwards curve with a PrintableString instead.
	nameEd25519 = append([]byte{0x13, 0x0c}, "edwards25519"...)
)

// kind is the type of a key on the token, which decides how it signs.
type kind int

const (
	kindUnknown kind = iota
	kindP256
	kindP384
	kindRSA
	kindEd25519
)

func (k kind) String() string {
	return [...]string{"unknown", "EC P-256", "EC P-384", "RSA", "Ed25519"}[k]
}

// algSpec is how keyd makes and uses a key of one algorithm on a token.
type algSpec struct {
	keyType  uint
	ecParams []byte // CKA_EC_PARAMS, for EC and Edwards keys
	gen      uint   // key pair generation mechanism
	sign     uint   // signing mechanism
	need     string // the mechanisms, for error messages
}

// algorithms is keyd's algorithm table. Algorithms() lists the ones whose
// mechanisms the token offers.
var algorithms = map[keystore.Algorithm]algSpec{
	keystore.ES256: {keyType: p11.CKK_EC, ecParams: oidP256, gen: p11.CKM_EC_KEY_PAIR_GEN, sign: p11.CKM_ECDSA,
		need: "CKM_EC_KEY_PAIR_GEN and CKM_ECDSA for P-256"},
	keystore.ES384: {keyType: p11.CKK_EC, ecParams: oidP384, gen: p11.CKM_EC_KEY_PAIR_GEN, sign: p11.CKM_ECDSA,
		need: "CKM_EC_KEY_PAIR_GEN and CKM_ECDSA for P-384"},
	keystore.RS256: {keyType: p11.CKK_RSA, gen: p11.CKM_RSA_PKCS_KEY_PAIR_GEN, sign: p11.CKM_RSA_PKCS,
		need: "CKM_RSA_PKCS_KEY_PAIR_GEN and CKM_RSA_PKCS"},
	keystore.PS256: {keyType: p11.CKK_RSA, gen: p11.CKM_RSA_PKCS_KEY_PAIR_GEN, sign: p11.CKM_RSA_PKCS_PSS,
		need: "CKM_RSA_PKCS_KEY_PAIR_GEN and CKM_RSA_PKCS_PSS"},
	keystore.EdDSA: {keyType: ckkECEdwards, ecParams: oidEd25519, gen: ckmECEdwardsKeyPairGen, sign: ckmEdDSA,
		need: "CKM_EC_EDWARDS_KEY_PAIR_GEN and CKM_EDDSA for Ed25519"},
}

// capability is what the mechanism probe found for one algorithm.
type capability struct {
	// minBits and maxBits are CK_MECHANISM_INFO's key sizes for the
	// generation mechanism, 0 when unknown. Only RSA sizes are checked:
	// tokens disagree on the units of EC sizes.
	minBits, maxBits uint
}

// fits reports whether a key of bits bits is within the token's range.
func (c capability) fits(bits int) bool {
	if c.maxBits == 0 {
		return true
	}
	return uint(bits) >= c.minBits && uint(bits) <= c.maxBits
}

// keyAttrs returns the public and private key templates for a key of spec
// with the given CKA_LABEL and CKA_ID: a token key, private, sensitive, never
// extractable, that can only sign.
func keyAttrs(spec keystore.KeySpec, label string, id []byte) (pub, priv []*p11.Attribute) {
	a := algorithms[spec.Algorithm]
	pub = []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PUBLIC_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, a.keyType),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, false),
		p11.NewAttribute(p11.CKA_VERIFY, true),
		p11.NewAttribute(p11.CKA_ENCRYPT, false),
		p11.NewAttribute(p11.CKA_WRAP, false),
		p11.NewAttribute(p11.CKA_LABEL, label),
		p11.NewAttribute(p11.CKA_ID, id),
	}
	if a.keyType == p11.CKK_RSA {
		pub = append(pub,
			p11.NewAttribute(p11.CKA_MODULUS_BITS, spec.Bits()),
			p11.NewAttribute(p11.CKA_PUBLIC_EXPONENT, []byte{0x01, 0x00, 0x01}),
		)
	} else {
		pub = append(pub, p11.NewAttribute(p11.CKA_EC_PARAMS, a.ecParams))
	}
	priv = []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, a.keyType),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, true),
		p11.NewAttribute(p11.CKA_SENSITIVE, true),
		p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		p11.NewAttribute(p11.CKA_SIGN, true),
		p11.NewAttribute(p11.CKA_DECRYPT, false),
		p11.NewAttribute(p11.CKA_UNWRAP, false),
		p11.NewAttribute(p11.CKA_DERIVE, false),
		p11.NewAttribute(p11.CKA_LABEL, label),
		p11.NewAttribute(p11.CKA_ID, id),
	}
	return pub, priv
}

// kindOf returns the kind of a key from its CKA_KEY_TYPE and CKA_EC_PARAMS.
func kindOf(keyType uint, ecParams []byte) kind {
	switch keyType {
	case p11.CKK_RSA:
		return kindRSA
	case p11.CKK_EC:
		switch {
		case bytes.Equal(ecParams, oidP256):
			return kindP256
		case bytes.Equal(ecParams, oidP384):
			return kindP384
		}
	case ckkECEdwards:
		if bytes.Equal(ecParams, oidEd25519) || bytes.Equal(ecParams, nameEd25519) {
			return kindEd25519
		}
	}
	return kindUnknown
}

// ecPoint returns the point in a CKA_EC_POINT value: PKCS#11 says it is a DER
// OCTET STRING around the point (SoftHSM does that), but some tokens return
// the bare point. size is the expected length of the bare point.
func ecPoint(v []byte, size int) ([]byte, error) {
	if len(v) == size {
		return v, nil
	}
	var inner []byte
	rest, err := asn1.Unmarshal(v, &inner)
	if err != nil || len(rest) != 0 {
		return nil, fmt.Errorf("CKA_EC_POINT is neither a %d-byte point nor a DER OCTET STRING around one (%d bytes)", size, len(v))
	}
	if len(inner) != size {
		return nil, fmt.Errorf("CKA_EC_POINT holds %d bytes, want %d", len(inner), size)
	}
	return inner, nil
}

// publicEC decodes an EC or Ed25519 public key from CKA_EC_POINT.
func publicEC(k kind, point []byte) (crypto.PublicKey, error) {
	switch k {
	case kindP256, kindP384:
		curve, size := elliptic.P256(), 65
		if k == kindP384 {
			curve, size = elliptic.P384(), 97
		}
		raw, err := ecPoint(point, size)
		if err != nil {
			return nil, err
		}
		pub, err := ecdsa.ParseUncompressedPublicKey(curve, raw)
		if err != nil {
			return nil, fmt.Errorf("CKA_EC_POINT: %w", err)
		}
		return pub, nil
	case kindEd25519:
		raw, err := ecPoint(point, ed25519.PublicKeySize)
		if err != nil {
			return nil, err
		}
		return ed25519.PublicKey(bytes.Clone(raw)), nil
	}
	return nil, fmt.Errorf("%v key has no EC point", k)
}

// publicRSA decodes an RSA public key from CKA_MODULUS and
// CKA_PUBLIC_EXPONENT.
func publicRSA(modulus, exponent []byte) (*rsa.PublicKey, error) {
	n := new(big.Int).SetBytes(modulus)
	e := new(big.Int).SetBytes(exponent)
	if n.Sign() == 0 || !e.IsInt64() || e.Int64() < 3 || e.Int64() > 1<<31-1 {
		return nil, errors.New("RSA public key: bad modulus or exponent")
	}
	return &rsa.PublicKey{N: n, E: int(e.Int64())}, nil
}

// digestInfoSHA256 is the DER DigestInfo prefix of a SHA-256 digest, which
// CKM_RSA_PKCS expects in front of the digest for RSASSA-PKCS1-v1_5
// (RFC 8017 §9.2).
var digestInfoSHA256 = []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}

// signParams checks that opts and digest suit a key of kind k and returns the
// mechanism and the data to pass to C_SignInit and C_Sign. It takes the
// crypto.Signer semantics of keystore.Backend.Sign: ECDSA keys take the hash
// of their curve, RSA keys crypto.SHA256 (PKCS #1 v1.5) or *rsa.PSSOptions
// with SHA-256 and a salt as long as the hash, Ed25519 keys the message and
// crypto.Hash(0).
func signParams(k kind, digest []byte, opts crypto.SignerOpts) (*p11.Mechanism, []byte, error) {
	if err := keystore.CheckOpts(opts); err != nil {
		return nil, nil, err
	}
	switch k {
	case kindP256, kindP384:
		want := crypto.SHA256
		if k == kindP384 {
			want = crypto.SHA384
		}
		if _, pss := opts.(*rsa.PSSOptions); pss || opts.HashFunc() != want {
			return nil, nil, fmt.Errorf("%v key signs %v digests, not %T %v: %w", k, want, opts, opts.HashFunc(), keystore.ErrUnsupportedAlgorithm)
		}
		if len(digest) != want.Size() {
			return nil, nil, fmt.Errorf("digest is %d bytes, want %d for %v", len(digest), want.Size(), want)
		}
		return p11.NewMechanism(p11.CKM_ECDSA, nil), digest, nil
	case kindRSA:
		if o, ok := opts.(*rsa.PSSOptions); ok {
			if o.Hash != crypto.SHA256 || (o.SaltLength != rsa.PSSSaltLengthEqualsHash && o.SaltLength != crypto.SHA256.Size()) {
				return nil, nil, fmt.Errorf("RSA-PSS with hash %v and salt length %d: %w (PS256 wants SHA-256 and a 32-byte salt)", o.Hash, o.SaltLength, keystore.ErrUnsupportedAlgorithm)
			}
			if len(digest) != crypto.SHA256.Size() {
				return nil, nil, fmt.Errorf("digest is %d bytes, want 32 for SHA-256", len(digest))
			}
			params := p11.NewPSSParams(p11.CKM_SHA256, p11.CKG_MGF1_SHA256, uint(crypto.SHA256.Size()))
			return p11.NewMechanism(p11.CKM_RSA_PKCS_PSS, params), digest, nil
		}
		if opts.HashFunc() != crypto.SHA256 {
			return nil, nil, fmt.Errorf("RSA PKCS #1 v1.5 with hash %v: %w (RS256 wants SHA-256)", opts.HashFunc(), keystore.ErrUnsupportedAlgorithm)
		}
		if len(digest) != crypto.SHA256.Size() {
			return nil, nil, fmt.Errorf("digest is %d bytes, want 32 for SHA-256", len(digest))
		}
		data := make([]byte, 0, len(digestInfoSHA256)+len(digest))
		data = append(append(data, digestInfoSHA256...), digest...)
		return p11.NewMechanism(p11.CKM_RSA_PKCS, nil), data, nil
	case kindEd25519:
		if o, ok := opts.(*ed25519.Options); ok && o.Context != "" {
			return nil, nil, fmt.Errorf("Ed25519 with a context: %w", keystore.ErrUnsupportedAlgorithm)
		}
		if opts.HashFunc() != 0 {
			return nil, nil, fmt.Errorf("Ed25519 signs the message, not a %v digest: %w", opts.HashFunc(), keystore.ErrUnsupportedAlgorithm)
		}
		return p11.NewMechanism(ckmEdDSA, nil), digest, nil
	}
	return nil, nil, fmt.Errorf("key type %v: %w", k, keystore.ErrUnsupportedAlgorithm)
}

// algOfSign is the algorithm whose mechanism a Sign with opts on a key of
// kind k uses, to check it against the probe.
func algOfSign(k kind, opts crypto.SignerOpts) keystore.Algorithm {
	switch k {
	case kindP256:
		return keystore.ES256
	case kindP384:
		return keystore.ES384
	case kindEd25519:
		return keystore.EdDSA
	case kindRSA:
		if _, ok := opts.(*rsa.PSSOptions); ok {
			return keystore.PS256
		}
		return keystore.RS256
	}
	return ""
}

// ecdsaDER turns the raw r||s that CKM_ECDSA returns (PKCS#11 §2.3.1) into
// the ASN.1 DER SEQUENCE { r, s } that crypto.Signer returns. size is the
// byte length of r and of s.
func ecdsaDER(raw []byte, size int) ([]byte, error) {
	der, err := ecdsasig.DER(raw, size)
	if err != nil {
		return nil, fmt.Errorf("CKM_ECDSA signature: %w", err)
	}
	return der, nil
}
