package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/keyd-dev/keyd/internal/jws"
	"github.com/keyd-dev/keyd/internal/policy"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/soft"
	"github.com/keyd-dev/keyd/rotation"
)

// activeVersion reads keyd's key metadata (<state_dir>/keys.json; keyd holds
// the store's lock, so the file is read directly) and returns the active
// version of keyset.
func activeVersion(stateDir, keyset string) (rotation.Version, error) {
	b, err := os.ReadFile(filepath.Join(stateDir, "keys.json"))
	if err != nil {
		return rotation.Version{}, err
	}
	var doc struct {
		Format   int                `json:"format"`
		Versions []rotation.Version `json:"versions"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return rotation.Version{}, fmt.Errorf("keys.json: %w", err)
	}
	if doc.Format != 1 {
		return rotation.Version{}, fmt.Errorf("keys.json: format %d, this bench reads format 1", doc.Format)
	}
	for _, v := range doc.Versions {
		if v.KeySet == keyset && v.State == rotation.Active {
			return v, nil
		}
	}
	return rotation.Version{}, fmt.Errorf("keys.json: key set %q has no active version", keyset)
}

// signBackend is what inproc signs with: keyd's soft keystore, or one of the
// bench's direct signers on a token or a TPM (keystore.Backend.Sign
// semantics: a digest in, ASN.1 DER out for ECDSA).
type signBackend interface {
	Sign(ctx context.Context, id string, digest []byte, opts crypto.SignerOpts) ([]byte, error)
}

var _ signBackend = (*soft.Backend)(nil)

// inproc signs DPoP proofs with the key keyd uses (or, for the TPM, a key
// of the same type), doing per proof what the client and keyd's Sign
// handler do, minus the transport and the audit record: normalize htu and
// encode the claims (client side), policy.Prepare, jws.SigningInput,
// jws.Digest, backend.Sign, jws.EncodeSignature, jws.Compact.
type inproc struct {
	be     signBackend
	alg    keystore.Algorithm
	id     string // backend key ID
	kid    string
	pub    crypto.PublicKey
	pol    policy.Policy
	key    policy.Key
	digest []byte // for bare signs
}

func newInproc(be signBackend, pol policy.Policy, v rotation.Version) (*inproc, error) {
	pub, err := publicOf(v)
	if err != nil {
		return nil, err
	}
	in, err := newInprocKey(be, pol, v.Alg, v.ID, pub)
	if err != nil {
		return nil, err
	}
	if in.kid != v.Kid {
		return nil, fmt.Errorf("kid %s: the thumbprint of its JWK is %s", v.Kid, in.kid)
	}
	return in, nil
}

// newInprocKey returns the signer of key id of be, whose public key is pub.
func newInprocKey(be signBackend, pol policy.Policy, alg keystore.Algorithm, id string, pub crypto.PublicKey) (*inproc, error) {
	kid, err := jws.Thumbprint(pub)
	if err != nil {
		return nil, err
	}
	// The bare JWK that goes into DPoP headers, as keyd's key cache makes it.
	jwk, err := jws.PublicJWK(pub)
	if err != nil {
		return nil, err
	}
	bare, err := json.Marshal(jwk)
	if err != nil {
		return nil, err
	}
	d := sha256.Sum256([]byte("keyd bench"))
	digest := d[:]
	switch alg {
	case keystore.ES384:
		digest = make([]byte, 48)
	case keystore.EdDSA:
		digest = []byte("keyd bench message")
	}
	return &inproc{
		be: be, alg: alg, id: id, kid: kid, pub: pub, pol: pol,
		key:    policy.Key{Alg: string(alg), Kid: kid, JWK: bare},
		digest: digest,
	}, nil
}

// proof makes one DPoP proof for method and rawURL.
func (p *inproc) proof(ctx context.Context, method, rawURL string) (string, error) {
	htu, err := policy.NormalizeHTU(rawURL)
	if err != nil {
		return "", err
	}
	claims, err := json.Marshal(map[string]any{"htm": method, "htu": htu})
	if err != nil {
		return "", err
	}
	tok, err := p.pol.Prepare(time.Now(), p.key, nil, claims, nil)
	if err != nil {
		return "", err
	}
	input := jws.SigningInput(tok.Header, tok.Claims)
	digest, err := jws.Digest(p.alg, input)
	if err != nil {
		return "", err
	}
	der, err := p.be.Sign(ctx, p.id, digest, p.alg.SignerOpts())
	if err != nil {
		return "", err
	}
	sig, err := jws.EncodeSignature(p.alg, p.pub, der)
	if err != nil {
		return "", err
	}
	return jws.Compact(input, sig), nil
}

// bareSign is backend.Sign alone, over a fixed digest.
func (p *inproc) bareSign(ctx context.Context) error {
	_, err := p.be.Sign(ctx, p.id, p.digest, p.alg.SignerOpts())
	return err
}

// verifyProof checks a DPoP proof with go-jose: signed with alg by the key
// published under kid in jwks, carrying that key as its header jwk, typ
// dpop+jwt, and the claims asked for. It returns the jti. With a nil jwks
// (the echo+proof diagnostic, whose keys nobody publishes) the proof is
// checked against its header jwk alone.
func verifyProof(token string, alg keystore.Algorithm, kid string, jwks *jose.JSONWebKeySet, htm, htu string) (string, error) {
	obj, err := jose.ParseSigned(token, []jose.SignatureAlgorithm{jose.SignatureAlgorithm(alg)})
	if err != nil {
		return "", fmt.Errorf("parse: %w", err)
	}
	if len(obj.Signatures) != 1 {
		return "", fmt.Errorf("%d signatures", len(obj.Signatures))
	}
	h := obj.Signatures[0].Protected
	if h.Algorithm != string(alg) {
		return "", fmt.Errorf("header alg %q, want %s", h.Algorithm, alg)
	}
	if typ, _ := h.ExtraHeaders[jose.HeaderType].(string); typ != policy.TypDPoP {
		return "", fmt.Errorf("header typ %q, want %s", typ, policy.TypDPoP)
	}
	if h.JSONWebKey == nil || !h.JSONWebKey.IsPublic() {
		return "", errors.New("header has no public jwk")
	}
	tp, err := h.JSONWebKey.Thumbprint(crypto.SHA256)
	if err != nil {
		return "", fmt.Errorf("header jwk thumbprint: %w", err)
	}
	if got := base64.RawURLEncoding.EncodeToString(tp); jwks != nil && got != kid {
		return "", fmt.Errorf("header jwk has thumbprint %s, want kid %s", got, kid)
	}
	payload, err := obj.Verify(h.JSONWebKey)
	if err != nil {
		return "", fmt.Errorf("signature does not verify with the header jwk: %w", err)
	}
	if jwks != nil {
		published := jwks.Key(kid)
		if len(published) != 1 {
			return "", fmt.Errorf("JWKS has %d keys with kid %s", len(published), kid)
		}
		if _, err := obj.Verify(published[0]); err != nil {
			return "", fmt.Errorf("signature does not verify with the published key %s: %w", kid, err)
		}
	}
	var c struct {
		Htm string `json:"htm"`
		Htu string `json:"htu"`
		Jti string `json:"jti"`
		Iat int64  `json:"iat"`
	}
	if err := json.Unmarshal(payload, &c); err != nil {
		return "", fmt.Errorf("claims: %w", err)
	}
	if c.Htm != htm || c.Htu != htu {
		return "", fmt.Errorf("claims htm %q htu %q, want %q %q", c.Htm, c.Htu, htm, htu)
	}
	if c.Jti == "" {
		return "", errors.New("claims have no jti")
	}
	if d := time.Since(time.Unix(c.Iat, 0)); d < -time.Minute || d > time.Minute {
		return "", fmt.Errorf("claims iat %d is %v from now", c.Iat, d)
	}
	return c.Jti, nil
}

// headerKid returns the RFC 7638 thumbprint of the jwk in a proof's header,
// or "" if it has none.
func headerKid(token string) string {
	obj, err := jose.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256, jose.ES384, jose.RS256, jose.PS256, jose.EdDSA})
	if err != nil || len(obj.Signatures) != 1 || obj.Signatures[0].Protected.JSONWebKey == nil {
		return ""
	}
	tp, err := obj.Signatures[0].Protected.JSONWebKey.Thumbprint(crypto.SHA256)
	if err != nil {
		return ""
	}
	return base64.RawURLEncoding.EncodeToString(tp)
}

// publicOf returns the public key of a key version, from its JWK.
func publicOf(v rotation.Version) (crypto.PublicKey, error) {
	var k jws.JWK
	if err := json.Unmarshal(v.JWK, &k); err != nil {
		return nil, fmt.Errorf("JWK of kid %s: %w", v.Kid, err)
	}
	pub, err := k.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("JWK of kid %s: %w", v.Kid, err)
	}
	return pub, nil
}

// verifyRaw checks a signature as a direct signer returns it: raw r||s for
// ECDSA (what CKM_ECDSA and JWS use) or ASN.1 DER (crypto.Signer), PKCS #1
// v1.5 over digest for RSA, Ed25519 over msg.
func verifyRaw(pub crypto.PublicKey, digest, msg, sig []byte) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		size := (k.Curve.Params().BitSize + 7) / 8
		if len(sig) == 2*size {
			r := new(big.Int).SetBytes(sig[:size])
			s := new(big.Int).SetBytes(sig[size:])
			if ecdsa.Verify(k, digest, r, s) {
				return nil
			}
			return errors.New("ECDSA signature (r||s) does not verify")
		}
		if ecdsa.VerifyASN1(k, digest, sig) {
			return nil
		}
		return errors.New("ECDSA signature (DER) does not verify")
	case *rsa.PublicKey:
		return rsa.VerifyPKCS1v15(k, crypto.SHA256, digest, sig)
	case ed25519.PublicKey:
		if ed25519.Verify(k, msg, sig) {
			return nil
		}
		return errors.New("Ed25519 signature does not verify")
	}
	return fmt.Errorf("public key of type %T", pub)
}
