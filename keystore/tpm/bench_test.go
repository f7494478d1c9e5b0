package tpm

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/asn1"
	"encoding/binary"
	"fmt"
	"io"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/internal/swtpmtest"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// BenchmarkSign measures Backend.Sign on swtpm: "resident" signs ES256 with
// one key, which stays loaded (one TPM2_Sign per signature); "reload"
// alternates two keys, so each signature costs TPM2_FlushContext +
// TPM2_Load + TPM2_Sign, as a load-sign-flush design would for every
// request; "resident-RS256" is "resident" with an RSA-2048 key.
// BenchmarkSignDirect is the same TPM2_Sign sent by go-tpm directly: compare
// "resident" with it.
func BenchmarkSign(b *testing.B) {
	for _, mode := range []string{"resident", "reload", "resident-RS256"} {
		b.Run(mode, func(b *testing.B) {
			alg := keystore.ES256
			if mode == "resident-RS256" {
				alg = keystore.RS256
			}
			s := swtpmtest.Start(b)
			be, err := New(b.Context(), Config{Address: s.Addr(), StateDir: b.TempDir()})
			if err != nil {
				b.Fatal(err)
			}
			defer be.Close()
			ids := []string{"a", "b"}
			for _, id := range ids {
				if _, err := be.Generate(b.Context(), id, keystore.KeySpec{Algorithm: alg}); err != nil {
					b.Fatal(err)
				}
			}
			d := keystoretest.Digest(alg, []byte("bench"))
			opts := alg.SignerOpts()
			// Warm up: the first TPM2_Sign after start-up may be answered
			// with TPM_RC_RETRY.
			if _, err := be.Sign(b.Context(), ids[0], d, opts); err != nil {
				b.Fatal(err)
			}
			i := 0
			for b.Loop() {
				id := ids[0]
				if mode == "reload" {
					id = ids[i%2]
				}
				i++
				if _, err := be.Sign(b.Context(), id, d, opts); err != nil {
					b.Fatal(fmt.Errorf("sign %d: %w", i, err))
				}
			}
		})
	}
}

// BenchmarkSignDirect is the baseline for BenchmarkSign: one TPM2_Sign by a
// resident key, built and parsed by go-tpm (tpm2.Sign.Execute) and sent over
// a plain connection to swtpm with the raw command stream, nothing else — as
// the direct TPM signer of `make bench` does, without its DER encoding.
func BenchmarkSignDirect(b *testing.B) {
	for _, mode := range []string{"resident", "resident-RS256"} {
		b.Run(mode, func(b *testing.B) {
			kind, alg := kindP256, keystore.ES256
			if mode == "resident-RS256" {
				kind, alg = kindRSA2048, keystore.RS256
			}
			s := swtpmtest.Start(b)
			c, err := net.Dial("tcp", s.Addr()[len("tcp://"):])
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			t := &directTPM{c: c}
			cp, err := tpm2.CreatePrimary{
				PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
				InPublic:      tpm2.New2B(srkTemplate()),
			}.Execute(t)
			if err != nil {
				b.Fatal(err)
			}
			srk := tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name}
			cr, err := tpm2.Create{ParentHandle: srk, InPublic: tpm2.New2B(keyTemplate(kind))}.Execute(t)
			if err != nil {
				b.Fatal(err)
			}
			l, err := tpm2.Load{ParentHandle: srk, InPrivate: cr.OutPrivate, InPublic: cr.OutPublic}.Execute(t)
			if err != nil {
				b.Fatal(err)
			}
			sa := tpm2.TPMAlgECDSA
			if kind.isRSA() {
				sa = tpm2.TPMAlgRSASSA
			}
			cmd := tpm2.Sign{
				KeyHandle:  tpm2.NamedHandle{Handle: l.ObjectHandle, Name: l.Name},
				Digest:     tpm2.TPM2BDigest{Buffer: keystoretest.Digest(alg, []byte("bench"))},
				InScheme:   tpm2.TPMTSigScheme{Scheme: sa, Details: tpm2.NewTPMUSigScheme(sa, &tpm2.TPMSSchemeHash{HashAlg: tpm2.TPMAlgSHA256})},
				Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
			}
			if _, err := cmd.Execute(t); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if _, err := cmd.Execute(t); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// directTPM is go-tpm's transport.TPM over a raw connection to swtpm, with
// a bounded retry of TPM_RC_RETRY, as bench/tpmdirect.go's.
type directTPM struct {
	c   net.Conn
	hdr [headerSize]byte
}

func (d *directTPM) Send(cmd []byte) ([]byte, error) {
	for attempt := 0; ; attempt++ {
		if err := d.c.SetDeadline(time.Now().Add(time.Minute)); err != nil {
			return nil, err
		}
		if _, err := d.c.Write(cmd); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(d.c, d.hdr[:]); err != nil {
			return nil, err
		}
		size := int(binary.BigEndian.Uint32(d.hdr[2:6]))
		if size < headerSize || size > maxResponse {
			return nil, fmt.Errorf("response header claims %d bytes", size)
		}
		rsp := make([]byte, size)
		copy(rsp, d.hdr[:])
		if _, err := io.ReadFull(d.c, rsp[headerSize:]); err != nil {
			return nil, err
		}
		if retryable(responseCode(rsp)) && attempt < maxRetries {
			time.Sleep(retryBackoff)
			continue
		}
		return rsp, nil
	}
}

// BenchmarkSignCodec measures the CPU cost of one TPM2_Sign without the TPM
// (a canned ES256 response): built and parsed by go-tpm, or by hand
// (appendSignCommand, parseSignResponse); and the DER encoding of the
// signature by encoding/asn1 or by hand; and the ES256 verification that
// Backend.sign makes after each TPM2_Load.
func BenchmarkSignCodec(b *testing.B) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	digest := keystoretest.Digest(keystore.ES256, []byte("bench"))
	r, s, err := ecdsa.Sign(rand.Reader, k, digest)
	if err != nil {
		b.Fatal(err)
	}
	scheme := sigScheme{tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA256}
	rsp := signResponse(ecdsaSig(tpm2.TPMAlgSHA256, r.FillBytes(make([]byte, 32)), s.FillBytes(make([]byte, 32))))
	h := tpm2.NamedHandle{Handle: 0x80000001, Name: tpm2.TPM2BName{Buffer: make([]byte, 34)}}
	canned := &recorder{rsp: rsp}
	b.Run("go-tpm", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			out, err := tpm2.Sign{
				KeyHandle:  h,
				Digest:     tpm2.TPM2BDigest{Buffer: digest},
				InScheme:   tpm2.TPMTSigScheme{Scheme: scheme.alg, Details: tpm2.NewTPMUSigScheme(scheme.alg, &tpm2.TPMSSchemeHash{HashAlg: scheme.hash})},
				Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
			}.Execute(canned)
			if err != nil || out.Signature.SigAlg != tpm2.TPMAlgECDSA {
				b.Fatal(err)
			}
		}
	})
	b.Run("hand", func(b *testing.B) {
		b.ReportAllocs()
		var buf []byte
		for b.Loop() {
			buf = appendSignCommand(buf[:0], h.Handle, digest, scheme)
			rsp, _ := canned.Send(buf)
			sig, err := parseSignResponse(rsp)
			if err != nil || sig.alg != tpm2.TPMAlgECDSA {
				b.Fatal(err)
			}
		}
	})
	b.Run("der-asn1", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(r.Bytes()), new(big.Int).SetBytes(s.Bytes())}); err != nil {
				b.Fatal(err)
			}
		}
	})
	blob := &keyBlob{kind: kindP256, key: &k.PublicKey}
	ts := tpmSignature{alg: scheme.alg, hash: scheme.hash, r: r.Bytes(), s: s.Bytes()}
	b.Run("der-hand", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := encodeSig(blob, scheme, ts); err != nil {
				b.Fatal(err)
			}
		}
	})
	sig, _ := encodeSig(blob, scheme, ts)
	b.Run("verify-ES256", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := verifySig(blob, digest, scheme.alg, sig); err != nil {
				b.Fatal(err)
			}
		}
	})
}
