package main

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"sync"

	"github.com/ThalesGroup/crypto11"
	p11 "github.com/miekg/pkcs11"

	"github.com/keyd-dev/keyd/keystore"
)

// PKCS#11 3.0 constant that miekg/pkcs11 v1.1.2 lacks.
const ckmEdDSA = 0x1057 // CKM_EDDSA

// digestInfoSHA256 is the DER DigestInfo prefix that CKM_RSA_PKCS expects
// in front of a SHA-256 digest for RSASSA-PKCS1-v1_5 (RFC 8017 §9.2).
var digestInfoSHA256 = []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}

// p11Direct is the "direct pkcs11" signer: what a Go program that signs on
// a token in-process through miekg/pkcs11 does at its leanest. One anchor
// session holds the login; a fixed pool of logged-in sessions (a buffered
// channel) serves the signatures; each key's private object handle is found
// once by its CKA_LABEL and cached. A signature is C_SignInit + C_Sign on a
// pooled session, nothing else: no recovery, no cancellation, no checks.
//
// With copies, each key signs through a session copy of it (C_CopyObject
// on the anchor, CKA_TOKEN false), as keyd does: the same SoftHSM work as
// keyd's per signature, without the token object's file checks.
type p11Direct struct {
	ctx    *p11.Ctx
	ours   bool // this C_Initialize was the process's first
	copies bool
	anchor p11.SessionHandle
	all    []p11.SessionHandle
	pool   chan p11.SessionHandle

	mu   sync.RWMutex
	keys map[string]p11Key // by keystore key ID
}

type p11Key struct {
	h   p11.ObjectHandle
	alg keystore.Algorithm
}

// openP11Direct initializes module (tolerating an initialization by another
// user in this process), finds the token labelled token, logs in once and
// opens sessions pooled sessions.
func openP11Direct(module, token, pin string, sessions int, copies bool) (_ *p11Direct, err error) {
	ctx := p11.New(module)
	if ctx == nil {
		return nil, fmt.Errorf("cannot load PKCS#11 module %s", module)
	}
	d := &p11Direct{ctx: ctx, copies: copies, pool: make(chan p11.SessionHandle, sessions), keys: map[string]p11Key{}}
	switch err := ctx.Initialize(); {
	case err == nil:
		d.ours = true
	case isP11(err, p11.CKR_CRYPTOKI_ALREADY_INITIALIZED):
	default:
		return nil, fmt.Errorf("C_Initialize: %w", err)
	}
	defer func() {
		if err != nil {
			d.close()
		}
	}()
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		return nil, fmt.Errorf("C_GetSlotList: %w", err)
	}
	slot, found := uint(0), false
	for _, s := range slots {
		ti, err := ctx.GetTokenInfo(s)
		if err == nil && strings.TrimRight(ti.Label, " ") == token {
			slot, found = s, true
			break
		}
	}
	if !found {
		return nil, fmt.Errorf("no token labelled %q", token)
	}
	if d.anchor, err = ctx.OpenSession(slot, p11.CKF_SERIAL_SESSION); err != nil {
		return nil, fmt.Errorf("C_OpenSession: %w", err)
	}
	d.all = append(d.all, d.anchor)
	if err := ctx.Login(d.anchor, p11.CKU_USER, pin); err != nil && !isP11(err, p11.CKR_USER_ALREADY_LOGGED_IN) {
		return nil, fmt.Errorf("C_Login: %w", err)
	}
	for range sessions {
		h, err := ctx.OpenSession(slot, p11.CKF_SERIAL_SESSION)
		if err != nil {
			return nil, fmt.Errorf("C_OpenSession: %w", err)
		}
		d.all = append(d.all, h)
		d.pool <- h
	}
	return d, nil
}

func isP11(err error, code uint) bool {
	var e p11.Error
	return errors.As(err, &e) && uint(e) == code
}

// addKey finds the private key labelled "keyd:<id>" (its token object)
// and caches its handle, or that of a session copy of it made now.
func (d *p11Direct) addKey(id string, alg keystore.Algorithm) error {
	tmpl := []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_LABEL, "keyd:"+id),
	}
	if err := d.ctx.FindObjectsInit(d.anchor, tmpl); err != nil {
		return fmt.Errorf("C_FindObjectsInit: %w", err)
	}
	hs, _, err := d.ctx.FindObjects(d.anchor, 2)
	if ferr := d.ctx.FindObjectsFinal(d.anchor); err == nil {
		err = ferr
	}
	if err != nil {
		return fmt.Errorf("C_FindObjects: %w", err)
	}
	if len(hs) != 1 {
		return fmt.Errorf("%d private keys labelled keyd:%s on the token, want 1", len(hs), id)
	}
	h := hs[0]
	if d.copies {
		if h, err = d.ctx.CopyObject(d.anchor, h, []*p11.Attribute{p11.NewAttribute(p11.CKA_TOKEN, false)}); err != nil {
			return fmt.Errorf("C_CopyObject: %w", err)
		}
	}
	d.mu.Lock()
	d.keys[id] = p11Key{h: h, alg: alg}
	d.mu.Unlock()
	return nil
}

// signRaw signs data (a digest, a DigestInfo or a message, as the mechanism
// wants) with key id on a pooled session and returns what the token
// returns: raw r||s for CKM_ECDSA.
func (d *p11Direct) signRaw(id string, data []byte) ([]byte, error) {
	d.mu.RLock()
	k, ok := d.keys[id]
	d.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("direct pkcs11: no key %s", id)
	}
	var mech uint
	switch k.alg {
	case keystore.ES256, keystore.ES384:
		mech = p11.CKM_ECDSA
	case keystore.RS256:
		mech = p11.CKM_RSA_PKCS
	case keystore.EdDSA:
		mech = ckmEdDSA
	default:
		return nil, fmt.Errorf("direct pkcs11: %s: %w", k.alg, keystore.ErrUnsupportedAlgorithm)
	}
	s := <-d.pool
	defer func() { d.pool <- s }()
	if err := d.ctx.SignInit(s, []*p11.Mechanism{p11.NewMechanism(mech, nil)}, k.h); err != nil {
		return nil, fmt.Errorf("C_SignInit: %w", err)
	}
	sig, err := d.ctx.Sign(s, data)
	if err != nil {
		return nil, fmt.Errorf("C_Sign: %w", err)
	}
	return sig, nil
}

// Sign has keystore.Backend.Sign's semantics (ASN.1 DER for ECDSA), for
// the "direct proof" mode.
func (d *p11Direct) Sign(_ context.Context, id string, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	d.mu.RLock()
	k := d.keys[id]
	d.mu.RUnlock()
	data := digest
	if k.alg == keystore.RS256 {
		if opts == nil || opts.HashFunc() != crypto.SHA256 {
			return nil, fmt.Errorf("direct pkcs11: RS256 signs SHA-256 digests: %w", keystore.ErrUnsupportedAlgorithm)
		}
		data = append(append(make([]byte, 0, len(digestInfoSHA256)+len(digest)), digestInfoSHA256...), digest...)
	}
	sig, err := d.signRaw(id, data)
	if err != nil {
		return nil, err
	}
	if k.alg == keystore.ES256 || k.alg == keystore.ES384 {
		return rawToDER(sig)
	}
	return sig, nil
}

// close closes the sessions and, if this C_Initialize was the first,
// finalizes the module.
func (d *p11Direct) close() {
	for _, s := range d.all {
		_ = d.ctx.CloseSession(s)
	}
	d.all = nil
	if d.ours {
		_ = d.ctx.Finalize()
	}
}

// rawToDER turns r||s into ASN.1 DER.
func rawToDER(raw []byte) ([]byte, error) {
	if len(raw) == 0 || len(raw)%2 != 0 {
		return nil, fmt.Errorf("ECDSA signature of %d bytes", len(raw))
	}
	n := len(raw) / 2
	return asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(raw[:n]), new(big.Int).SetBytes(raw[n:])})
}

// bareInput is what the bare modes sign for alg: the data C_Sign gets in
// the direct mode (a SHA-256 digest, the DigestInfo and digest, or the
// message for EdDSA), and the digest (or message) with the crypto.Signer
// options a crypto.Signer or keystore.Backend gets.
type bareInput struct {
	raw    []byte // for C_Sign
	digest []byte // for crypto.Signer / Backend.Sign (the message for EdDSA)
	msg    []byte // the message, for verification of EdDSA
	opts   crypto.SignerOpts
}

func newBareInput(alg keystore.Algorithm) bareInput {
	// About as long as the signing input of a DPoP proof.
	msg := []byte(strings.Repeat("keyd bench signing input ", 16))
	sum := sha256.Sum256(msg)
	switch alg {
	case keystore.RS256:
		return bareInput{raw: append(append([]byte{}, digestInfoSHA256...), sum[:]...), digest: sum[:], msg: msg, opts: crypto.SHA256}
	case keystore.EdDSA:
		return bareInput{raw: msg, digest: msg, msg: msg, opts: crypto.Hash(0)}
	}
	return bareInput{raw: sum[:], digest: sum[:], msg: msg, opts: crypto.SHA256}
}

// c11Signer is the same key through crypto11 (FindKeyPair by label, then
// crypto.Signer.Sign).
type c11Signer struct {
	s crypto11.Signer
}

func (c c11Signer) sign(in bareInput) ([]byte, error) {
	return c.s.Sign(rand.Reader, in.digest, in.opts)
}

// c11Find returns the crypto11 signer of the key labelled "keyd:<id>".
func c11Find(c *crypto11.Context, id string) (c11Signer, error) {
	s, err := c.FindKeyPair(nil, []byte("keyd:"+id))
	if err != nil {
		return c11Signer{}, err
	}
	return c11Signer{s: s}, nil
}
