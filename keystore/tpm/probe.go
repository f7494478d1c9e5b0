package tpm

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/keystore"
)

// probe finds the algorithms the TPM supports. The token holder calls it.
func (b *Backend) probe(o *op) error {
	algs, err := capAlgs(o)
	if err != nil {
		return fmt.Errorf("probe algorithms: %w", err)
	}
	curves, err := capCurves(o)
	if err != nil {
		return fmt.Errorf("probe ECC curves: %w", err)
	}
	has := func(ids ...tpm2.TPMAlgID) bool {
		for _, id := range ids {
			if !algs[id] {
				return false
			}
		}
		return true
	}
	ok := map[keystore.Algorithm]bool{}
	ok[keystore.ES256] = has(tpm2.TPMAlgECC, tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA256) && curves[tpm2.TPMECCNistP256]
	if !ok[keystore.ES256] {
		b.refused[keystore.ES256] = "this TPM lacks ECDSA on NIST P-256"
	}
	ok[keystore.ES384] = has(tpm2.TPMAlgECC, tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA384) && curves[tpm2.TPMECCNistP384]
	if !ok[keystore.ES384] {
		b.refused[keystore.ES384] = "this TPM lacks ECDSA with SHA-384 on NIST P-384"
	}
	ok[keystore.RS256] = has(tpm2.TPMAlgRSA, tpm2.TPMAlgRSASSA, tpm2.TPMAlgSHA256)
	if !ok[keystore.RS256] {
		b.refused[keystore.RS256] = "this TPM lacks RSASSA with SHA-256"
	}
	b.refused[keystore.EdDSA] = "TPM 2.0 has no Ed25519 keys; use ES256"
	if has(tpm2.TPMAlgRSA) {
		_, err := tpm2.TestParms{Parameters: tpm2.TPMTPublicParms{
			Type: tpm2.TPMAlgRSA,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
				Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
				KeyBits:   3072,
			}),
		}}.Execute(o)
		if probeFailed(o, err) {
			return fmt.Errorf("probe RSA-3072: %w", err)
		}
		b.rsa3072 = err == nil
	}
	switch {
	case !has(tpm2.TPMAlgRSA, tpm2.TPMAlgRSAPSS, tpm2.TPMAlgSHA256):
		b.refused[keystore.PS256] = "this TPM lacks RSAPSS with SHA-256"
	default:
		err := b.pssSelfTest(o)
		if probeFailed(o, err) {
			return fmt.Errorf("PS256 self-test: %w", err)
		}
		if err != nil {
			b.refused[keystore.PS256] = "PS256 is disabled: " + err.Error()
			b.log.Warn("PS256 disabled: the TPM's RSA-PSS signatures failed the salt-length self-test; use RS256 or ES256", "err", err)
		} else {
			ok[keystore.PS256] = true
			b.pss = true
		}
	}
	b.algs = nil
	for _, a := range keystore.Algorithms() {
		if ok[a] {
			b.algs = append(b.algs, a)
		}
	}
	if len(b.algs) == 0 {
		return fmt.Errorf("%w: the TPM supports none of ES256, ES384, RS256, PS256", keystore.ErrUnsupportedAlgorithm)
	}
	return nil
}

// probeFailed reports whether err, from a probe's command, says nothing
// about what the TPM supports: the connection failed, the caller gave up,
// or the TPM answered with a warning (still testing, asked to retry once
// too often) or a failure. Start-up then fails rather than refuse an
// algorithm for the process's lifetime over a passing condition.
func probeFailed(o *op, err error) bool {
	if err == nil {
		return false
	}
	// Once the op's context has ended, its commands fail with the
	// context's error (see op.Send).
	var ce *connError
	if errors.As(err, &ce) || o.ctx.Err() != nil {
		return true
	}
	var rc tpm2.TPMRC
	return errors.As(err, &rc) && passingCondition(rc)
}

func capAlgs(o *op) (map[tpm2.TPMAlgID]bool, error) {
	out := map[tpm2.TPMAlgID]bool{}
	next := uint32(0)
	for range 16 {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapAlgs, Property: next, PropertyCount: 128}.Execute(o)
		if err != nil {
			return nil, err
		}
		l, err := rsp.CapabilityData.Data.Algorithms()
		if err != nil {
			return nil, err
		}
		for _, a := range l.AlgProperties {
			out[a.Alg] = true
			next = uint32(a.Alg) + 1
		}
		if !rsp.MoreData || len(l.AlgProperties) == 0 {
			break
		}
	}
	return out, nil
}

func capCurves(o *op) (map[tpm2.TPMECCCurve]bool, error) {
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapECCCurves, Property: 0, PropertyCount: 64}.Execute(o)
	if err != nil {
		return nil, err
	}
	l, err := rsp.CapabilityData.Data.ECCCurves()
	if err != nil {
		return nil, err
	}
	out := map[tpm2.TPMECCCurve]bool{}
	for _, c := range l.ECCCurves {
		out[c] = true
	}
	return out, nil
}

// selfTestKey is the software key the PS256 self-test loads into the TPM's
// NULL hierarchy. It signs nothing but the self-test digest.
var selfTestKey = sync.OnceValues(func() (*rsa.PrivateKey, error) { return rsa.GenerateKey(rand.Reader, 2048) })

// pssSelfTest has the TPM sign with RSAPSS/SHA-256 and checks that the
// signature verifies with a 32-byte salt (RFC 7518 §3.5). It uses a software
// key loaded with TPM2_LoadExternal, or a TPM-generated key if the TPM
// refuses to load external private keys.
func (b *Backend) pssSelfTest(o *op) error {
	digest := sha256.Sum256([]byte("keyd PS256 salt-length self-test"))
	scheme := tpm2.TPMTSigScheme{
		Scheme:  tpm2.TPMAlgRSAPSS,
		Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgRSAPSS, &tpm2.TPMSSchemeHash{HashAlg: tpm2.TPMAlgSHA256}),
	}
	h, pub, how, err := b.loadSelfTestKey(o)
	if err != nil {
		return err
	}
	rsp, err := tpm2.Sign{
		KeyHandle:  h,
		Digest:     tpm2.TPM2BDigest{Buffer: digest[:]},
		InScheme:   scheme,
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
	}.Execute(o)
	if _, ferr := (tpm2.FlushContext{FlushHandle: h.Handle}).Execute(o); ferr != nil {
		// The key may still be loaded: as in flushCached, keyd forgets
		// what the TPM holds, so that Close (after a failed start) or the
		// next use flushes every transient object instead of leaving a
		// slot taken.
		b.st.dirty = true
		if err == nil {
			err = ferr
		}
	}
	if err != nil {
		return fmt.Errorf("RSA-PSS self-test signature: %w", err)
	}
	s, err := rsp.Signature.Signature.RSAPSS()
	if err != nil {
		return fmt.Errorf("RSA-PSS self-test signature: %w", err)
	}
	sig := leftPad(s.Sig.Buffer, pub.Size())
	if err := rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}); err != nil {
		if rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto}) == nil {
			return errors.New("the TPM signs RSA-PSS with a salt longer than the hash (likely the maximum); RFC 7518 verifiers reject such PS256 signatures")
		}
		return fmt.Errorf("the TPM's RSA-PSS signature does not verify: %v", err)
	}
	b.pssProbe = how
	return nil
}

// loadSelfTestKey loads the PS256 self-test key and returns its handle,
// public key and how it was made.
func (b *Backend) loadSelfTestKey(o *op) (tpm2.NamedHandle, *rsa.PublicKey, string, error) {
	key, err := selfTestKey()
	if err == nil {
		pub := tpm2.TPMTPublic{
			Type:             tpm2.TPMAlgRSA,
			NameAlg:          tpm2.TPMAlgSHA256,
			ObjectAttributes: tpm2.TPMAObject{UserWithAuth: true, NoDA: true, SignEncrypt: true},
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
				Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
				KeyBits:   2048,
			}),
			Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: key.N.Bytes()}),
		}
		sens := tpm2.TPMTSensitive{
			SensitiveType: tpm2.TPMAlgRSA,
			Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgRSA, &tpm2.TPM2BPrivateKeyRSA{Buffer: key.Primes[0].Bytes()}),
		}
		rsp, lerr := tpm2.LoadExternal{InPrivate: tpm2.New2B(sens), InPublic: tpm2.New2B(pub), Hierarchy: tpm2.TPMRHNull}.Execute(o)
		if lerr == nil {
			return tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, &key.PublicKey, "external key", nil
		}
		var ce *connError
		if errors.As(lerr, &ce) {
			return tpm2.NamedHandle{}, nil, "", lerr
		}
		b.log.Info("TPM refused to load the external PS256 self-test key; generating one in the TPM", "err", lerr)
	}
	c, err := tpm2.Create{ParentHandle: b.st.srk, InPublic: tpm2.New2B(keyTemplate(kindRSA2048))}.Execute(&op{b: b, ctx: o.ctx, timeout: b.keygenTimeout})
	if err != nil {
		return tpm2.NamedHandle{}, nil, "", fmt.Errorf("create the self-test key: %w", err)
	}
	blob, err := newBlob(c.OutPublic.Bytes(), c.OutPrivate.Buffer)
	if err != nil {
		return tpm2.NamedHandle{}, nil, "", fmt.Errorf("self-test key: %w", err)
	}
	l, err := tpm2.Load{ParentHandle: b.st.srk, InPrivate: c.OutPrivate, InPublic: c.OutPublic}.Execute(o)
	if err != nil {
		return tpm2.NamedHandle{}, nil, "", fmt.Errorf("load the self-test key: %w", err)
	}
	return tpm2.NamedHandle{Handle: l.ObjectHandle, Name: l.Name}, blob.key.(*rsa.PublicKey), "TPM-generated key", nil
}
