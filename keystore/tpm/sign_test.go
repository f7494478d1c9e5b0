package tpm

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/internal/swtpmtest"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// recorder is a go-tpm transport that records the command it is sent and
// answers with rsp.
type recorder struct {
	cmd []byte
	rsp []byte
}

func (r *recorder) Send(cmd []byte) ([]byte, error) {
	r.cmd = bytes.Clone(cmd)
	return r.rsp, nil
}

// goTPMSign runs go-tpm's TPM2_Sign on a recorder answering rsp.
func goTPMSign(h tpm2.TPMHandle, digest []byte, scheme sigScheme, rsp []byte) (*tpm2.SignResponse, *recorder, error) {
	rec := &recorder{rsp: rsp}
	out, err := tpm2.Sign{
		KeyHandle: tpm2.NamedHandle{Handle: h, Name: tpm2.TPM2BName{Buffer: []byte{0, 0xb, 1, 2, 3}}},
		Digest:    tpm2.TPM2BDigest{Buffer: digest},
		InScheme: tpm2.TPMTSigScheme{
			Scheme:  scheme.alg,
			Details: tpm2.NewTPMUSigScheme(scheme.alg, &tpm2.TPMSSchemeHash{HashAlg: scheme.hash}),
		},
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
	}.Execute(rec)
	return out, rec, err
}

var testSchemes = []struct {
	alg    keystore.Algorithm
	scheme sigScheme
}{
	{keystore.ES256, sigScheme{tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA256}},
	{keystore.ES384, sigScheme{tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA384}},
	{keystore.RS256, sigScheme{tpm2.TPMAlgRSASSA, tpm2.TPMAlgSHA256}},
	{keystore.PS256, sigScheme{tpm2.TPMAlgRSAPSS, tpm2.TPMAlgSHA256}},
}

// TestSignCommandBytes: the hand-encoded TPM2_Sign is byte for byte the
// command go-tpm sends, for every algorithm keyd signs with.
func TestSignCommandBytes(t *testing.T) {
	for _, tc := range testSchemes {
		for _, h := range []tpm2.TPMHandle{0x80000001, 0x80fffffe} {
			digest := keystoretest.Digest(tc.alg, []byte("m"))
			_, rec, err := goTPMSign(h, digest, tc.scheme, errorResponse(uint32(tpm2.TPMRCHandle)))
			if !errors.Is(err, tpm2.TPMRCHandle) {
				t.Fatalf("%s: go-tpm: %v", tc.alg, err)
			}
			got := appendSignCommand([]byte("prefix"), h, digest, tc.scheme)
			if !bytes.HasPrefix(got, []byte("prefix")) || !bytes.Equal(got[6:], rec.cmd) {
				t.Errorf("%s handle %#x:\nhand-encoded %x\ngo-tpm       %x", tc.alg, uint32(h), got[6:], rec.cmd)
			}
			if n := signCommandSize(len(digest)); n != len(rec.cmd) {
				t.Errorf("%s: signCommandSize = %d, go-tpm sent %d bytes", tc.alg, n, len(rec.cmd))
			}
		}
	}
}

func ecdsaSig(hash tpm2.TPMAlgID, r, s []byte) tpm2.TPMTSignature {
	return tpm2.TPMTSignature{
		SigAlg: tpm2.TPMAlgECDSA,
		Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA, &tpm2.TPMSSignatureECC{
			Hash:       hash,
			SignatureR: tpm2.TPM2BECCParameter{Buffer: r},
			SignatureS: tpm2.TPM2BECCParameter{Buffer: s},
		}),
	}
}

func rsaSig(alg, hash tpm2.TPMAlgID, sig []byte) tpm2.TPMTSignature {
	return tpm2.TPMTSignature{
		SigAlg:    alg,
		Signature: tpm2.NewTPMUSignature(alg, &tpm2.TPMSSignatureRSA{Hash: hash, Sig: tpm2.TPM2BPublicKeyRSA{Buffer: sig}}),
	}
}

// signResponseSeeds are well-formed and malformed TPM2_Sign responses.
func signResponseSeeds() [][]byte {
	r32, s32 := bytes.Repeat([]byte{0x81}, 32), bytes.Repeat([]byte{0x11}, 32)
	rsaBytes := bytes.Repeat([]byte{0x5a}, 256)
	good := [][]byte{
		signResponse(ecdsaSig(tpm2.TPMAlgSHA256, r32, s32)),
		signResponse(ecdsaSig(tpm2.TPMAlgSHA384, bytes.Repeat([]byte{7}, 48), []byte{1})),
		signResponse(rsaSig(tpm2.TPMAlgRSASSA, tpm2.TPMAlgSHA256, rsaBytes)),
		signResponse(rsaSig(tpm2.TPMAlgRSAPSS, tpm2.TPMAlgSHA256, rsaBytes[:255])),
		signResponse(tpm2.TPMTSignature{SigAlg: tpm2.TPMAlgNull}),
		signResponse(tpm2.TPMTSignature{
			SigAlg:    tpm2.TPMAlgHMAC,
			Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgHMAC, &tpm2.TPMTHA{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)}),
		}),
	}
	out := slices.Clone(good)
	for _, g := range good {
		out = append(out, g[:len(g)-1], g[:len(g)/2], g[:14], g[:10])
		bad := bytes.Clone(g)
		bad[13]++ // parameter size
		out = append(out, bad)
		bad = bytes.Clone(g)
		bad[len(bad)-3] = 0 // continueSession clear
		out = append(out, bad)
		bad = bytes.Clone(g)
		bad[1] = 1 // TPM_ST_NO_SESSIONS
		out = append(out, bad)
		bad = append(bytes.Clone(g), 0) // trailing byte, size unchanged
		out = append(out, bad)
	}
	for _, rc := range []tpm2.TPMRC{tpm2.TPMRCInitialize, tpm2.TPMRCRetry, tpm2.TPMRCHandle + 0x100, 0x98b, tpm2.TPMRCFailure} {
		out = append(out, errorResponse(uint32(rc)))
		out = append(out, append(errorResponse(uint32(rc)), 1, 2, 3))
	}
	return append(out, nil, []byte{0x80}, make([]byte, 9))
}

// rawSignResponse is a successful TPM2_Sign response with parameter area
// params.
func rawSignResponse(params []byte) []byte {
	out := binary.BigEndian.AppendUint16(nil, tagSessions)
	out = binary.BigEndian.AppendUint32(out, uint32(14+len(params)+5))
	out = binary.BigEndian.AppendUint32(out, 0)
	out = binary.BigEndian.AppendUint32(out, uint32(len(params)))
	out = append(out, params...)
	return append(out, pwAuthResponse[:]...)
}

// compareSignResponse checks parseSignResponse against go-tpm's parsing of
// rsp: the same TPM response code; a success only where go-tpm succeeds,
// with the same signature; and a success wherever go-tpm succeeds on a
// response whose header is consistent, whose parameter area is exactly an
// ECDSA, RSASSA or RSAPSS signature and whose authorization area is the
// password session's.
func compareSignResponse(t *testing.T, rsp []byte) {
	t.Helper()
	mine, err := parseSignResponse(rsp)
	theirs, _, gerr := goTPMSign(0x80000001, make([]byte, 32), sigScheme{tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA256}, rsp)

	var rc, grc tpm2.TPMRC
	isRC, gIsRC := errors.As(err, &rc), errors.As(gerr, &grc)
	if isRC != gIsRC || rc != grc {
		t.Fatalf("response %x: parseSignResponse error %v, go-tpm %v: not the same response code", rsp, err, gerr)
	}
	if err == nil {
		if gerr != nil {
			t.Fatalf("response %x: parseSignResponse accepts what go-tpm refuses (%v)", rsp, gerr)
		}
		if got := fromGoTPM(t, theirs.Signature); !sameSig(mine, got) {
			t.Fatalf("response %x: parseSignResponse %+v, go-tpm %+v", rsp, mine, got)
		}
		return
	}
	if isRC {
		return // the same code as go-tpm's, checked above
	}
	if !errors.Is(err, errProtocol) && !strings.Contains(err.Error(), "signature of type") {
		t.Fatalf("response %x: parseSignResponse error %v is neither errProtocol nor an unknown signature type", rsp, err)
	}
	if gerr != nil {
		return
	}
	// go-tpm accepts it; keyd may refuse only what it is stricter about.
	sig := theirs.Signature
	be := binary.BigEndian
	n := len(tpm2.Marshal(sig))
	strict := be.Uint16(rsp) == tagSessions && int(be.Uint32(rsp[2:])) == len(rsp) &&
		len(rsp) >= 14+n && int(be.Uint32(rsp[10:])) == n &&
		string(rsp[14+n:]) == string(pwAuthResponse[:]) // go-tpm ignores the authorization area
	switch sig.SigAlg {
	case tpm2.TPMAlgECDSA, tpm2.TPMAlgRSASSA, tpm2.TPMAlgRSAPSS:
	default:
		strict = false
	}
	if strict {
		t.Fatalf("response %x: go-tpm parses %+v, parseSignResponse fails: %v", rsp, fromGoTPM(t, sig), err)
	}
}

func fromGoTPM(t *testing.T, sig tpm2.TPMTSignature) tpmSignature {
	out := tpmSignature{alg: sig.SigAlg}
	switch sig.SigAlg {
	case tpm2.TPMAlgECDSA:
		s, err := sig.Signature.ECDSA()
		if err != nil {
			t.Fatal(err)
		}
		out.hash, out.r, out.s = s.Hash, s.SignatureR.Buffer, s.SignatureS.Buffer
	case tpm2.TPMAlgRSASSA:
		s, err := sig.Signature.RSASSA()
		if err != nil {
			t.Fatal(err)
		}
		out.hash, out.sig = s.Hash, s.Sig.Buffer
	case tpm2.TPMAlgRSAPSS:
		s, err := sig.Signature.RSAPSS()
		if err != nil {
			t.Fatal(err)
		}
		out.hash, out.sig = s.Hash, s.Sig.Buffer
	}
	return out
}

func sameSig(a, b tpmSignature) bool {
	return a.alg == b.alg && a.hash == b.hash && bytes.Equal(a.r, b.r) && bytes.Equal(a.s, b.s) && bytes.Equal(a.sig, b.sig)
}

// TestSignResponse compares parseSignResponse with go-tpm on the seed
// responses and checks what it refuses.
func TestSignResponse(t *testing.T) {
	for _, rsp := range signResponseSeeds() {
		compareSignResponse(t, rsp)
	}
	r32 := bytes.Repeat([]byte{0x81}, 32)
	for _, tc := range []struct {
		rsp  []byte
		want string // "" for success
	}{
		{signResponse(ecdsaSig(tpm2.TPMAlgSHA256, r32, r32)), ""},
		{signResponse(rsaSig(tpm2.TPMAlgRSAPSS, tpm2.TPMAlgSHA256, r32)), ""},
		{signResponse(tpm2.TPMTSignature{SigAlg: tpm2.TPMAlgNull}), "signature of type 0x10"},
		{rawSignResponse([]byte{0, 0x18, 0, 0xb, 0, 5, 1}), "malformed"},
		{rawSignResponse([]byte{0, 0x14, 0, 0xb, 0, 1, 1, 9}), "malformed"},
		{append(signResponse(ecdsaSig(tpm2.TPMAlgSHA256, r32, r32)), 0), "tag"},
		{errorResponse(uint32(tpm2.TPMRCInitialize)), "TPM_RC_INITIALIZE"},
		{[]byte{0x80, 2, 0, 0}, "4 bytes"},
	} {
		_, err := parseSignResponse(tc.rsp)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("parseSignResponse(%x) = %v, want %q", tc.rsp, err, tc.want)
		}
	}
	if _, err := parseSignResponse(errorResponse(uint32(tpm2.TPMRCInitialize))); !errors.Is(err, tpm2.TPMRCInitialize) {
		t.Errorf("TPM_RC_INITIALIZE response: %v, not errors.Is TPMRCInitialize", err)
	}
}

// TestSignOnSWTPM sends the hand-encoded TPM2_Sign to swtpm for every
// algorithm and compares its parsing of the real responses, and of the
// TPM's errors, with go-tpm's; and go-tpm's own command gets a response
// that parses the same way.
func TestSignOnSWTPM(t *testing.T) {
	s := swtpmtest.Start(t)
	b := newTestBackend(t, s, Config{})
	ctx := t.Context()
	pubs := map[keystore.Algorithm]crypto.PublicKey{}
	for _, tc := range testSchemes {
		if tc.alg == keystore.PS256 {
			continue // the RS256 key signs PS256 too
		}
		pub, err := b.Generate(ctx, string(tc.alg), keystore.KeySpec{Algorithm: tc.alg})
		if err != nil {
			t.Fatal(err)
		}
		pubs[tc.alg] = pub
	}
	for _, tc := range testSchemes {
		id := tc.alg
		if id == keystore.PS256 {
			id = keystore.RS256
		}
		blob, err := b.blob(string(id))
		if err != nil {
			t.Fatal(err)
		}
		digest := keystoretest.Digest(tc.alg, []byte("swtpm"))
		err = b.do(ctx, b.cmdTimeout, func(o *op) error {
			h, err := b.load(o, string(id), blob)
			if err != nil {
				return err
			}
			for _, mode := range []string{"hand", "go-tpm"} {
				var rsp []byte
				if mode == "hand" {
					rsp, err = o.Send(appendSignCommand(nil, h, digest, tc.scheme))
				} else {
					rec := &tpmRecorder{t: o}
					name := sha256.Sum256(blob.pub)
					_, err = tpm2.Sign{
						KeyHandle: tpm2.NamedHandle{Handle: h, Name: tpm2.TPM2BName{Buffer: append([]byte{0, 0xb}, name[:]...)}},
						Digest:    tpm2.TPM2BDigest{Buffer: digest},
						InScheme: tpm2.TPMTSigScheme{
							Scheme:  tc.scheme.alg,
							Details: tpm2.NewTPMUSigScheme(tc.scheme.alg, &tpm2.TPMSSchemeHash{HashAlg: tc.scheme.hash}),
						},
						Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
					}.Execute(rec)
					rsp = rec.rsp
				}
				if err != nil {
					return err
				}
				compareSignResponse(t, rsp)
				ts, err := parseSignResponse(rsp)
				if err != nil {
					return fmt.Errorf("%s, %s command: %v", tc.alg, mode, err)
				}
				sig, err := encodeSig(blob, tc.scheme, ts)
				if err != nil {
					return fmt.Errorf("%s, %s command: %v", tc.alg, mode, err)
				}
				if err := keystoretest.VerifyDER(tc.alg, pubs[id], digest, sig); err != nil {
					return fmt.Errorf("%s, %s command: %v", tc.alg, mode, err)
				}
			}
			// The TPM's errors: a handle that names nothing, a digest
			// of the wrong size, a scheme the key does not have.
			for _, cmd := range [][]byte{
				appendSignCommand(nil, 0x80fffff0, digest, tc.scheme),
				appendSignCommand(nil, h, digest[:20], tc.scheme),
				appendSignCommand(nil, h, digest, sigScheme{tpm2.TPMAlgECDAA, tpm2.TPMAlgSHA256}),
			} {
				rsp, err := o.Send(cmd)
				if err != nil {
					return err
				}
				compareSignResponse(t, rsp)
				if _, err := parseSignResponse(rsp); err == nil {
					return fmt.Errorf("%s: command %x succeeded", tc.alg, cmd)
				} else {
					t.Logf("%s: %v", tc.alg, err)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// tpmRecorder passes commands to t and records the last response.
type tpmRecorder struct {
	t   *op
	rsp []byte
}

func (r *tpmRecorder) Send(cmd []byte) ([]byte, error) {
	rsp, err := r.t.Send(cmd)
	r.rsp = bytes.Clone(rsp)
	return rsp, err
}

// TestECDSADER: encodeSig's DER of an ECDSA signature is asn1.Marshal of
// struct{ R, S *big.Int }, for r and s of every length up to 48 bytes (the
// TPM may return them shorter than the curve size), with and without the
// high bit.
func TestECDSADER(t *testing.T) {
	k, err := ecdsa.GenerateKey(elliptic.P384(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	blob := &keyBlob{kind: kindP384, key: &k.PublicKey}
	es384 := sigScheme{tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA384}
	for n := 1; n <= 48; n++ {
		for _, first := range []byte{0x01, 0x7f, 0x80, 0xff} {
			r := bytes.Repeat([]byte{0xa5}, n)
			r[0] = first
			s := bytes.Repeat([]byte{0x3c}, 49-n)
			s[0] = first ^ 0x80
			if s[0] == 0 {
				s[0] = 1
			}
			want, err := asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(r), new(big.Int).SetBytes(s)})
			if err != nil {
				t.Fatal(err)
			}
			got, err := encodeSig(blob, es384, tpmSignature{alg: tpm2.TPMAlgECDSA, hash: tpm2.TPMAlgSHA384, r: r, s: s})
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("r %x s %x: encodeSig %x, %v; asn1 %x", r, s, got, err, want)
			}
		}
	}
}

// TestEncodeSig: the structural checks made on every signature.
func TestEncodeSig(t *testing.T) {
	ek, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rk, err := rsa.GenerateKey(crand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ec := &keyBlob{kind: kindP256, key: &ek.PublicKey}
	rs := &keyBlob{kind: kindRSA2048, key: &rk.PublicKey}
	es256 := sigScheme{tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA256}
	rs256 := sigScheme{tpm2.TPMAlgRSASSA, tpm2.TPMAlgSHA256}
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	r, s, err := ecdsa.Sign(crand.Reader, ek, d)
	if err != nil {
		t.Fatal(err)
	}
	rsig, err := rsa.SignPKCS1v15(crand.Reader, rk, crypto.SHA256, d)
	if err != nil {
		t.Fatal(err)
	}
	long := append(make([]byte, 3), r.FillBytes(make([]byte, 32))...) // 35 bytes, if with leading zeros
	for _, tc := range []struct {
		name   string
		blob   *keyBlob
		scheme sigScheme
		sig    tpmSignature
		want   string
	}{
		{"ok", ec, es256, tpmSignature{alg: tpm2.TPMAlgECDSA, hash: tpm2.TPMAlgSHA256, r: r.Bytes(), s: s.Bytes()}, ""},
		{"padded", ec, es256, tpmSignature{alg: tpm2.TPMAlgECDSA, hash: tpm2.TPMAlgSHA256, r: r.FillBytes(make([]byte, 32)), s: s.FillBytes(make([]byte, 32))}, ""},
		{"r zero", ec, es256, tpmSignature{alg: tpm2.TPMAlgECDSA, hash: tpm2.TPMAlgSHA256, r: []byte{0, 0}, s: s.Bytes()}, "zero"},
		{"s empty", ec, es256, tpmSignature{alg: tpm2.TPMAlgECDSA, hash: tpm2.TPMAlgSHA256, r: r.Bytes(), s: nil}, "zero"},
		{"r long", ec, es256, tpmSignature{alg: tpm2.TPMAlgECDSA, hash: tpm2.TPMAlgSHA256, r: long, s: s.Bytes()}, "longer"},
		{"hash", ec, es256, tpmSignature{alg: tpm2.TPMAlgECDSA, hash: tpm2.TPMAlgSHA384, r: r.Bytes(), s: s.Bytes()}, "asked"},
		{"scheme", ec, es256, tpmSignature{alg: tpm2.TPMAlgRSASSA, hash: tpm2.TPMAlgSHA256, sig: rsig}, "asked"},
		{"rsa ok", rs, rs256, tpmSignature{alg: tpm2.TPMAlgRSASSA, hash: tpm2.TPMAlgSHA256, sig: rsig}, ""},
		{"rsa short", rs, rs256, tpmSignature{alg: tpm2.TPMAlgRSASSA, hash: tpm2.TPMAlgSHA256, sig: rsig[1:]}, ""},
		{"rsa long", rs, rs256, tpmSignature{alg: tpm2.TPMAlgRSASSA, hash: tpm2.TPMAlgSHA256, sig: append([]byte{1}, rsig...)}, "longer"},
		{"rsa zero", rs, rs256, tpmSignature{alg: tpm2.TPMAlgRSASSA, hash: tpm2.TPMAlgSHA256, sig: make([]byte, 256)}, "zero"},
		{"rsa as ecdsa", rs, es256, tpmSignature{alg: tpm2.TPMAlgECDSA, hash: tpm2.TPMAlgSHA256, r: r.Bytes(), s: s.Bytes()}, "type"},
	} {
		got, err := encodeSig(tc.blob, tc.scheme, tc.sig)
		if tc.want != "" {
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s: encodeSig = %x, %v; want an error with %q", tc.name, got, err, tc.want)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		alg := keystore.ES256
		pub := crypto.PublicKey(&ek.PublicKey)
		if tc.blob == rs {
			alg, pub = keystore.RS256, &rk.PublicKey
		}
		if err := keystoretest.VerifyDER(alg, pub, d, got); err != nil && tc.name != "rsa short" {
			t.Errorf("%s: %v", tc.name, err)
		}
		if tc.blob == rs && len(got) != 256 {
			t.Errorf("%s: RSA signature of %d bytes, want 256", tc.name, len(got))
		}
	}
}
