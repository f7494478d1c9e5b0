package tpm

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"fmt"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/keystore"
)

// srkTemplateID names the storage root key template in srk.name. Changing
// the template changes the SRK's Name, which New reports as ErrKeyLost: bump
// the ID with it.
const srkTemplateID = "tcg-ecc-nist-p256-srk"

// srkTemplate is the storage root key keyd re-creates with TPM2_CreatePrimary
// in the owner hierarchy: the ECC NIST P-256 SRK template of the TCG TPM v2.0
// Provisioning Guidance (§7.5.1, "Storage Primary Key (SRK) Templates") —
// SHA-256 name, fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth,
// noDA, restricted, decrypt; AES-128-CFB; an empty authPolicy and unique
// field (two 32-byte zero coordinates). It is the same key tpm2-tools and
// tpm2-openssl derive, and the same on every start as long as the owner seed
// is: TPM2_Clear changes the seed, and so the SRK's Name.
func srkTemplate() tpm2.TPMTPublic { return tpm2.ECCSRKTemplate }

// keyKind is a kind of key this backend keeps.
type keyKind int

const (
	kindP256 keyKind = iota + 1
	kindP384
	kindRSA2048
	kindRSA3072
)

func (k keyKind) String() string {
	switch k {
	case kindP256:
		return "ECC NIST P-256"
	case kindP384:
		return "ECC NIST P-384"
	case kindRSA2048:
		return "RSA-2048"
	case kindRSA3072:
		return "RSA-3072"
	}
	return fmt.Sprintf("keyKind(%d)", int(k))
}

func (k keyKind) isRSA() bool { return k == kindRSA2048 || k == kindRSA3072 }

// hash is the digest an ECDSA key signs (it is fixed in its template); RSA
// keys sign SHA-256.
func (k keyKind) hash() crypto.Hash {
	if k == kindP384 {
		return crypto.SHA384
	}
	return crypto.SHA256
}

// kindFor returns the kind of key spec asks for.
func kindFor(spec keystore.KeySpec) (keyKind, error) {
	switch spec.Algorithm {
	case keystore.ES256:
		return kindP256, nil
	case keystore.ES384:
		return kindP384, nil
	case keystore.RS256, keystore.PS256:
		switch spec.Bits() {
		case 2048:
			return kindRSA2048, nil
		case 3072:
			return kindRSA3072, nil
		}
	}
	return 0, keystore.ErrUnsupportedAlgorithm
}

// keyAttributes are the attributes of every key keyd creates: generated in
// and bound to this TPM and this parent (so TPM2_Duplicate refuses it), an
// empty authValue usable by password (keyd holds it; no caller ever supplies
// TPM auth), exempt from dictionary-attack counting, and a signing key only.
var keyAttributes = tpm2.TPMAObject{
	FixedTPM:            true,
	FixedParent:         true,
	SensitiveDataOrigin: true,
	UserWithAuth:        true,
	NoDA:                true,
	SignEncrypt:         true,
}

// keyTemplate is the TPM2_Create template for a key of kind k. ECDSA keys
// carry their scheme (ECDSA with the curve's hash); RSA keys have the NULL
// scheme, so each TPM2_Sign chooses RSASSA or RSAPSS with SHA-256.
func keyTemplate(k keyKind) tpm2.TPMTPublic {
	pub := tpm2.TPMTPublic{
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: keyAttributes,
	}
	switch k {
	case kindP256, kindP384:
		curve, hash, size := tpm2.TPMECCNistP256, tpm2.TPMAlgSHA256, 32
		if k == kindP384 {
			curve, hash, size = tpm2.TPMECCNistP384, tpm2.TPMAlgSHA384, 48
		}
		pub.Type = tpm2.TPMAlgECC
		pub.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: hash}),
			},
			CurveID: curve,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		})
		pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: make([]byte, size)},
			Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, size)},
		})
	case kindRSA2048, kindRSA3072:
		bits := 2048
		if k == kindRSA3072 {
			bits = 3072
		}
		pub.Type = tpm2.TPMAlgRSA
		pub.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
			KeyBits:   tpm2.TPMKeyBits(bits),
		})
		pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, bits/8)})
	}
	return pub
}

// checkPublic checks that pub, read from a key file or returned by
// TPM2_Create, is a key keyd would have created, and returns its kind and
// its public key. A key without noDA, fixedTPM or fixedParent, or one that
// can decrypt, fails with ErrInsecureStorage: keyd never creates one, so the
// file was altered.
func checkPublic(pub *tpm2.TPMTPublic) (keyKind, crypto.PublicKey, error) {
	a := pub.ObjectAttributes
	if !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin || !a.NoDA || !a.SignEncrypt || a.Decrypt || a.Restricted || !a.UserWithAuth || a.AdminWithPolicy {
		return 0, nil, fmt.Errorf("key is not a fixedTPM, fixedParent, noDA signing key as keyd creates: %w", keystore.ErrInsecureStorage)
	}
	if len(pub.AuthPolicy.Buffer) != 0 {
		return 0, nil, fmt.Errorf("key has an authPolicy, which keyd never sets: %w", keystore.ErrInsecureStorage)
	}
	if pub.NameAlg != tpm2.TPMAlgSHA256 {
		return 0, nil, fmt.Errorf("key has name algorithm %#x, want SHA-256", uint16(pub.NameAlg))
	}
	key, err := tpm2.Pub(*pub)
	if err != nil {
		return 0, nil, err
	}
	switch k := key.(type) {
	case *ecdsa.PublicKey:
		parms, err := pub.Parameters.ECCDetail()
		if err != nil {
			return 0, nil, err
		}
		kind, wantHash := kindP256, tpm2.TPMAlgSHA256
		switch k.Curve {
		case elliptic.P256():
		case elliptic.P384():
			kind, wantHash = kindP384, tpm2.TPMAlgSHA384
		default:
			return 0, nil, fmt.Errorf("ECC key on curve %s: %w", k.Curve.Params().Name, keystore.ErrUnsupportedAlgorithm)
		}
		if parms.Scheme.Scheme != tpm2.TPMAlgECDSA {
			return 0, nil, fmt.Errorf("ECC key with scheme %#x, want ECDSA: %w", uint16(parms.Scheme.Scheme), keystore.ErrUnsupportedAlgorithm)
		}
		s, err := parms.Scheme.Details.ECDSA()
		if err != nil || s.HashAlg != wantHash {
			return 0, nil, fmt.Errorf("%s key with the wrong ECDSA hash: %w", kind, keystore.ErrUnsupportedAlgorithm)
		}
		// The point must be on the curve: tpm2.Pub does not check.
		if _, err := k.ECDH(); err != nil {
			return 0, nil, fmt.Errorf("%s key: invalid point: %v", kind, err)
		}
		return kind, k, nil
	case *rsa.PublicKey:
		parms, err := pub.Parameters.RSADetail()
		if err != nil {
			return 0, nil, err
		}
		if parms.Scheme.Scheme != tpm2.TPMAlgNull {
			return 0, nil, fmt.Errorf("RSA key with scheme %#x, want NULL: %w", uint16(parms.Scheme.Scheme), keystore.ErrUnsupportedAlgorithm)
		}
		if k.E != 65537 {
			return 0, nil, fmt.Errorf("RSA key with exponent %d: %w", k.E, keystore.ErrUnsupportedAlgorithm)
		}
		switch n := k.N.BitLen(); {
		case n == 2048 && parms.KeyBits == 2048:
			return kindRSA2048, k, nil
		case n == 3072 && parms.KeyBits == 3072:
			return kindRSA3072, k, nil
		default:
			return 0, nil, fmt.Errorf("RSA key of %d bits: %w", n, keystore.ErrUnsupportedAlgorithm)
		}
	}
	return 0, nil, fmt.Errorf("key type %T: %w", key, keystore.ErrUnsupportedAlgorithm)
}
