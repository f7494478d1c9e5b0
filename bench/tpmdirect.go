package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/keystore"
)

// tpmDirect is the "direct TPM2_Sign" signer: go-tpm in-process against the
// same swtpm, over one connection (swtpm serves one at a time), speaking the
// raw TPM command stream as keyd's backend does. Its keys are its own,
// created under the same storage root key with the same templates as keyd's
// (keyd's keys are encrypted to the TPM and their blobs are keyd's state),
// and stay loaded: every signature is one TPM2_Sign, as with keyd's cached
// key. A mutex serializes the callers, as keyd's token does.
type tpmDirect struct {
	mu      sync.Mutex
	network string // "tcp"; "unix" for the relay, "grpc" for the gRPC relay (addr: its socket)
	addr    string
	conn    tpmConn
	buf     []byte // a response being read (tpmMaxMessage bytes)
	srk     tpm2.NamedHandle
	keys    map[keystore.Algorithm]*tpmKey
}

type tpmKey struct {
	alg    keystore.Algorithm
	pub    []byte // TPMT_PUBLIC as TPM2_Create returned it
	priv   []byte // TPM2B_PRIVATE contents
	key    crypto.PublicKey
	h      tpm2.NamedHandle // 0 when not loaded
	scheme tpm2.TPMTSigScheme
}

// tpmRetries bounds the resends of a command the TPM answered with
// TPM_RC_RETRY, _YIELDED or _TESTING (swtpm says RETRY right after start-up).
const tpmRetries = 5

// dialTPMDirect connects to the swtpm command port at addr (host:port),
// flushes any transient object left there and re-creates the SRK.
func dialTPMDirect(ctx context.Context, addr string) (*tpmDirect, error) {
	d := &tpmDirect{network: "tcp", addr: addr, keys: map[keystore.Algorithm]*tpmKey{}}
	if err := d.connect(ctx); err != nil {
		return nil, err
	}
	return d, nil
}

func (d *tpmDirect) connect(ctx context.Context) error {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if d.network == "grpc" {
		g, err := dialGRPCTPM(d.addr)
		if err != nil {
			return fmt.Errorf("connect to the gRPC relay at %s: %w", d.addr, err)
		}
		d.conn = g
	} else {
		var dl net.Dialer
		c, err := dl.DialContext(dctx, d.network, d.addr)
		if err != nil {
			return fmt.Errorf("connect to the TPM at %s: %w", d.addr, err)
		}
		d.conn = c
	}
	// Whatever an earlier user left in the TPM's three transient slots.
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(tpm2.TPMHTTransient) << 24, PropertyCount: 16}.Execute(d)
	if err != nil {
		d.closeConn()
		return fmt.Errorf("TPM2_GetCapability: %w", err)
	}
	if hs, err := rsp.CapabilityData.Data.Handles(); err == nil {
		for _, h := range hs.Handle {
			if uint32(h)>>24 == uint32(tpm2.TPMHTTransient) {
				_, _ = tpm2.FlushContext{FlushHandle: h}.Execute(d)
			}
		}
	}
	cp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	}.Execute(d)
	if err != nil {
		d.closeConn()
		return fmt.Errorf("TPM2_CreatePrimary (SRK): %w", err)
	}
	d.srk = tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name}
	return nil
}

// Send implements go-tpm's transport.TPM: one command, one response, with
// a bounded retry of TPM_RC_RETRY, _YIELDED and _TESTING.
func (d *tpmDirect) Send(cmd []byte) ([]byte, error) {
	if d.conn == nil {
		return nil, errors.New("not connected to the TPM")
	}
	for attempt := 0; ; attempt++ {
		if err := d.conn.SetDeadline(time.Now().Add(2 * time.Minute)); err != nil {
			return nil, err
		}
		if _, err := d.conn.Write(cmd); err != nil {
			return nil, err
		}
		if d.buf == nil {
			d.buf = make([]byte, tpmMaxMessage)
		}
		msg, err := readTPMMessage(d.conn, d.buf)
		if err != nil {
			return nil, err
		}
		rsp := bytes.Clone(msg)
		switch tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:10])) {
		case tpm2.TPMRCRetry, tpm2.TPMRCYielded, tpm2.TPMRCTesting:
			if attempt < tpmRetries {
				time.Sleep(time.Duration(10<<attempt) * time.Millisecond)
				continue
			}
		}
		return rsp, nil
	}
}

// tpmConn is tpmDirect's connection to the TPM: a net.Conn, or the gRPC
// relay's grpcTPMConn.
type tpmConn interface {
	io.ReadWriteCloser
	SetDeadline(time.Time) error
}

// template is the TPM2_Create template of keyd's keys of alg (see
// keystore/tpm keyTemplate): fixedTPM, fixedParent, sensitiveDataOrigin,
// userWithAuth, noDA, sign; ECDSA-SHA256 on P-256, or RSA-2048 with the
// NULL scheme.
func tpmTemplate(alg keystore.Algorithm) (tpm2.TPMTPublic, error) {
	pub := tpm2.TPMTPublic{
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
			UserWithAuth: true, NoDA: true, SignEncrypt: true,
		},
	}
	switch alg {
	case keystore.ES256:
		pub.Type = tpm2.TPMAlgECC
		pub.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		})
		pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
			Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
		})
	case keystore.RS256:
		pub.Type = tpm2.TPMAlgRSA
		pub.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
			KeyBits:   2048,
		})
		pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, 256)})
	default:
		return pub, fmt.Errorf("direct TPM: %s: %w (TPM keys are ES256 and RS256 here)", alg, keystore.ErrUnsupportedAlgorithm)
	}
	return pub, nil
}

// create makes a key of alg under the SRK and loads it.
func (d *tpmDirect) create(alg keystore.Algorithm) error {
	tmpl, err := tpmTemplate(alg)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	rsp, err := tpm2.Create{ParentHandle: d.srk, InPublic: tpm2.New2B(tmpl)}.Execute(d)
	if err != nil {
		return fmt.Errorf("TPM2_Create %s: %w", alg, err)
	}
	pubArea, err := rsp.OutPublic.Contents()
	if err != nil {
		return err
	}
	key, err := tpm2.Pub(*pubArea)
	if err != nil {
		return err
	}
	k := &tpmKey{alg: alg, pub: rsp.OutPublic.Bytes(), priv: rsp.OutPrivate.Buffer, key: key}
	sa := tpm2.TPMAlgECDSA
	if alg == keystore.RS256 {
		sa = tpm2.TPMAlgRSASSA
	}
	k.scheme = tpm2.TPMTSigScheme{Scheme: sa, Details: tpm2.NewTPMUSigScheme(sa, &tpm2.TPMSSchemeHash{HashAlg: tpm2.TPMAlgSHA256})}
	d.keys[alg] = k
	return d.loadLocked(k)
}

func (d *tpmDirect) loadLocked(k *tpmKey) error {
	rsp, err := tpm2.Load{
		ParentHandle: d.srk,
		InPrivate:    tpm2.TPM2BPrivate{Buffer: k.priv},
		InPublic:     tpm2.BytesAs2B[tpm2.TPMTPublic](k.pub),
	}.Execute(d)
	if err != nil {
		return fmt.Errorf("TPM2_Load %s: %w", k.alg, err)
	}
	k.h = tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}
	return nil
}

// reconnect connects again after disconnect and reloads the keys from
// their blobs.
func (d *tpmDirect) reconnect(ctx context.Context) error {
	if err := d.connect(ctx); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, k := range d.keys {
		if err := d.loadLocked(k); err != nil {
			return err
		}
	}
	return nil
}

// signTPM runs one TPM2_Sign of digest with the resident key of alg and
// returns the TPM's signature structure.
func (d *tpmDirect) signTPM(alg keystore.Algorithm, digest []byte) (tpm2.TPMTSignature, *tpmKey, error) {
	k := d.keys[alg]
	if k == nil {
		return tpm2.TPMTSignature{}, nil, fmt.Errorf("direct TPM: no %s key", alg)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	rsp, err := tpm2.Sign{
		KeyHandle:  k.h,
		Digest:     tpm2.TPM2BDigest{Buffer: digest},
		InScheme:   k.scheme,
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
	}.Execute(d)
	if err != nil {
		return tpm2.TPMTSignature{}, nil, fmt.Errorf("TPM2_Sign: %w", err)
	}
	return rsp.Signature, k, nil
}

// Sign has keystore.Backend.Sign's semantics for the "direct proof" mode;
// id is the algorithm (each algorithm has one key here).
func (d *tpmDirect) Sign(_ context.Context, id string, digest []byte, _ crypto.SignerOpts) ([]byte, error) {
	sig, k, err := d.signTPM(keystore.Algorithm(strings.ToUpper(id)), digest)
	if err != nil {
		return nil, err
	}
	return tpmSigBytes(k, sig)
}

// tpmSigBytes is a TPM signature as crypto.Signer returns it: ASN.1 DER for
// ECDSA, modulus-sized for RSA.
func tpmSigBytes(k *tpmKey, sig tpm2.TPMTSignature) ([]byte, error) {
	switch sig.SigAlg {
	case tpm2.TPMAlgECDSA:
		s, err := sig.Signature.ECDSA()
		if err != nil {
			return nil, err
		}
		return asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(s.SignatureR.Buffer), new(big.Int).SetBytes(s.SignatureS.Buffer)})
	case tpm2.TPMAlgRSASSA:
		s, err := sig.Signature.RSASSA()
		if err != nil {
			return nil, err
		}
		size := k.key.(*rsa.PublicKey).Size()
		out := make([]byte, size)
		copy(out[size-len(s.Sig.Buffer):], s.Sig.Buffer)
		return out, nil
	}
	return nil, fmt.Errorf("TPM signature of type %#x", uint16(sig.SigAlg))
}

// public returns the public key of the key of alg.
func (d *tpmDirect) public(alg keystore.Algorithm) crypto.PublicKey {
	if k := d.keys[alg]; k != nil {
		return k.key
	}
	return nil
}

// disconnect flushes the keys and the SRK and closes the connection, so
// that keyd can have the TPM; the blobs are kept for reconnect.
func (d *tpmDirect) disconnect() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.conn == nil {
		return
	}
	for _, k := range d.keys {
		if k.h.Handle != 0 {
			_, _ = tpm2.FlushContext{FlushHandle: k.h.Handle}.Execute(d)
			k.h = tpm2.NamedHandle{}
		}
	}
	if d.srk.Handle != 0 {
		_, _ = tpm2.FlushContext{FlushHandle: d.srk.Handle}.Execute(d)
		d.srk = tpm2.NamedHandle{}
	}
	d.closeConn()
}

func (d *tpmDirect) closeConn() {
	if d.conn != nil {
		d.conn.Close()
		d.conn = nil
	}
}
