package tpm

import (
	"encoding/binary"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// TPM2_Sign is keyd's hot command: every signature is one. go-tpm builds
// and parses commands by reflection, which costs tens of microseconds and
// hundreds of allocations per call, so this one command is encoded and
// parsed here by hand; every other command goes through go-tpm. The bytes
// are exactly those tpm2.Sign{...}.Execute sends (TestSignCommandBytes),
// and parseSignResponse accepts nothing go-tpm would refuse and returns
// what go-tpm returns (TestSignResponse, FuzzSignResponse).

// go-tpm's constants of TPM 2.0 Part 2, as the integers the hand-encoded
// TPM2_Sign writes.
const (
	tagSessions  = uint16(tpm2.TPMSTSessions)
	tagHashCheck = uint16(tpm2.TPMSTHashCheck)
	ccSign       = uint32(tpm2.TPMCCSign)
	rsPW         = uint32(tpm2.TPMRSPW) // the password pseudo-session
	rhNull       = uint32(tpm2.TPMRHNull)
)

const (
	// pwAuthSize is the size of the authorization area with one password
	// session and an empty password: sessionHandle (4), nonceCaller
	// (2 + 0), sessionAttributes (1), hmac (2 + 0).
	pwAuthSize = 4 + 2 + 1 + 2
)

// pwAuthResponse is the response authorization area of a password session:
// an empty nonceTPM, sessionAttributes with only continueSession, and an
// empty hmac. go-tpm accepts nothing else from a password session.
var pwAuthResponse = [5]byte{0, 0, 1, 0, 0}

// sigScheme is a TPMT_SIG_SCHEME whose details are a TPMS_SCHEME_HASH:
// ECDSA, RSASSA or RSAPSS, with its hash.
type sigScheme struct {
	alg  tpm2.TPMAlgID
	hash tpm2.TPMAlgID
}

// signCommandSize is the size of appendSignCommand's command for a digest
// of n bytes.
func signCommandSize(n int) int {
	return headerSize + 4 /* keyHandle */ + 4 + pwAuthSize + 2 + n /* digest */ + 4 /* inScheme */ + 8 /* validation */
}

// appendSignCommand appends to dst the TPM2_Sign command that signs digest
// with the loaded key at handle under scheme, authorizing the key with a
// password session and the key's empty authValue (keyd's keys have an empty
// authValue and userWithAuth, see keyTemplate), with the NULL hash-check
// ticket an unrestricted key takes. It is byte for byte what
// tpm2.Sign{KeyHandle: handle, Digest: digest, InScheme: scheme,
// Validation: {TPM_ST_HASHCHECK, TPM_RH_NULL}}.Execute sends. digest must be
// shorter than 64 KiB (Backend.scheme allows 32 or 48 bytes).
func appendSignCommand(dst []byte, handle tpm2.TPMHandle, digest []byte, scheme sigScheme) []byte {
	be := binary.BigEndian
	dst = be.AppendUint16(dst, tagSessions)
	dst = be.AppendUint32(dst, uint32(signCommandSize(len(digest))))
	dst = be.AppendUint32(dst, ccSign)
	dst = be.AppendUint32(dst, uint32(handle))
	// Authorization area: one TPMS_AUTH_COMMAND. go-tpm's password session
	// sends no session attributes (continueSession clear: the TPM keeps a
	// password pseudo-session anyway and answers with it set).
	dst = be.AppendUint32(dst, pwAuthSize)
	dst = be.AppendUint32(dst, rsPW)
	dst = append(dst,
		0, 0, // nonceCaller: empty
		0,    // sessionAttributes
		0, 0) // hmac: the password, empty
	// digest: TPM2B_DIGEST
	dst = be.AppendUint16(dst, uint16(len(digest)))
	dst = append(dst, digest...)
	// inScheme: TPMT_SIG_SCHEME
	dst = be.AppendUint16(dst, uint16(scheme.alg))
	dst = be.AppendUint16(dst, uint16(scheme.hash))
	// validation: TPMT_TK_HASHCHECK, the NULL ticket
	dst = be.AppendUint16(dst, tagHashCheck)
	dst = be.AppendUint32(dst, rhNull)
	dst = be.AppendUint16(dst, 0)
	return dst
}

// tpmSignature is a TPMT_SIGNATURE of the kinds TPM2_Sign makes for keyd's
// keys. Its byte slices point into the response it was parsed from.
type tpmSignature struct {
	alg  tpm2.TPMAlgID // TPM_ALG_ECDSA, TPM_ALG_RSASSA or TPM_ALG_RSAPSS
	hash tpm2.TPMAlgID
	r, s []byte // ECDSA
	sig  []byte // RSASSA, RSAPSS
}

// parseSignResponse parses a TPM2_Sign response to appendSignCommand's
// command. A response code other than TPM_RC_SUCCESS is returned as the
// tpm2.TPMRC error go-tpm returns, whatever else the response holds. A
// success must be exactly a TPM_ST_SESSIONS header whose size is the
// response's, a parameter area holding one ECDSA, RSASSA or RSAPSS
// TPMT_SIGNATURE and nothing more, and the password session's response
// area; anything else fails with errProtocol. go-tpm is laxer on a few
// points, never stricter: it ignores the tag, the size field and bytes
// after the signature, and it accepts other signature types, which keyd
// refuses anyway.
func parseSignResponse(rsp []byte) (tpmSignature, error) {
	if len(rsp) < headerSize {
		return tpmSignature{}, fmt.Errorf("%w: TPM2_Sign response of %d bytes", errProtocol, len(rsp))
	}
	be := binary.BigEndian
	if rc := be.Uint32(rsp[6:10]); rc != uint32(tpm2.TPMRCSuccess) {
		return tpmSignature{}, tpm2.TPMRC(rc)
	}
	if tag, size := be.Uint16(rsp[0:2]), be.Uint32(rsp[2:6]); tag != tagSessions || uint64(size) != uint64(len(rsp)) {
		return tpmSignature{}, fmt.Errorf("%w: TPM2_Sign response with tag %#x and size %d in %d bytes", errProtocol, tag, size, len(rsp))
	}
	rest := rsp[headerSize:]
	if len(rest) < 4 {
		return tpmSignature{}, fmt.Errorf("%w: TPM2_Sign response without a parameter size", errProtocol)
	}
	n := be.Uint32(rest)
	rest = rest[4:]
	if uint64(n) > uint64(len(rest)) {
		return tpmSignature{}, fmt.Errorf("%w: TPM2_Sign response claims %d bytes of parameters in %d", errProtocol, n, len(rest))
	}
	params, auth := rest[:n], rest[n:]
	if string(auth) != string(pwAuthResponse[:]) {
		return tpmSignature{}, fmt.Errorf("%w: TPM2_Sign response authorization area %x, want %x (a password session's)", errProtocol, auth, pwAuthResponse)
	}
	r := reader{b: params}
	var sig tpmSignature
	sig.alg = tpm2.TPMAlgID(r.u16())
	switch sig.alg {
	case tpm2.TPMAlgECDSA:
		sig.hash = tpm2.TPMAlgID(r.u16())
		sig.r = r.sized()
		sig.s = r.sized()
	case tpm2.TPMAlgRSASSA, tpm2.TPMAlgRSAPSS:
		sig.hash = tpm2.TPMAlgID(r.u16())
		sig.sig = r.sized()
	default:
		if !r.bad {
			return tpmSignature{}, fmt.Errorf("%w: TPM returned a signature of type %#x", errProtocol, uint16(sig.alg))
		}
	}
	if r.bad || len(r.b) != 0 {
		return tpmSignature{}, fmt.Errorf("%w: TPM2_Sign response with a malformed signature (%d bytes)", errProtocol, len(params))
	}
	return sig, nil
}

// reader reads big-endian TPM fields from b; a read past the end sets bad
// and returns zeros.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) u16() uint16 {
	if len(r.b) < 2 {
		r.b, r.bad = nil, true
		return 0
	}
	v := binary.BigEndian.Uint16(r.b)
	r.b = r.b[2:]
	return v
}

// sized reads a TPM2B: a 2-byte size and as many bytes.
func (r *reader) sized() []byte {
	n := int(r.u16())
	if len(r.b) < n {
		r.b, r.bad = nil, true
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}
