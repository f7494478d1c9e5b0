// Package ecdsasig converts ECDSA signatures between the two forms keyd
// meets: the raw r ‖ s that PKCS#11 CKM_ECDSA returns and JWS uses (RFC 7518
// §3.4), and the ASN.1 DER ECDSA-Sig-Value that crypto.Signer returns (RFC
// 3279 §2.2.3, SEC 1 §C.8):
//
//	ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }
//
// It is a small hand-written codec for this one structure: it works on the
// big-endian bytes directly, with no math/big and no reflection, and
// allocates only its result. It knows nothing of curves: size is the byte
// length of r and of s (32 for P-256, 48 for P-384), and the check that r
// and s are below the curve order n is left to the caller, who knows the
// curve.
package ecdsasig

import (
	"errors"
	"fmt"
	"math"
)

var (
	// ErrMalformed is wrapped by the errors of a signature that is not in
	// the expected form: DER that is not exactly the one canonical DER
	// encoding of a SEQUENCE of two INTEGERs, or a raw signature whose
	// length is not 2×size.
	ErrMalformed = errors.New("ecdsasig: malformed signature")
	// ErrOutOfRange is wrapped by the errors of a signature whose r or s is
	// zero, negative, or longer than size bytes.
	ErrOutOfRange = errors.New("ecdsasig: r or s out of range")
)

// ASN.1 identifier octets (X.690 §8.1.2): universal, SEQUENCE constructed,
// INTEGER primitive.
const (
	tagSequence = 0x30
	tagInteger  = 0x02
)

// DER returns the canonical ASN.1 DER encoding of the ECDSA signature raw,
// r ‖ s with each exactly size bytes (big-endian, left-padded with zeros) as
// PKCS#11 CKM_ECDSA returns it: SEQUENCE { INTEGER r, INTEGER s } with each
// INTEGER minimal, that is without leading zero bytes except the 0x00 that
// keeps an integer whose high bit is set positive.
//
// A raw of any length but 2×size wraps ErrMalformed; a zero r or s wraps
// ErrOutOfRange. The result never aliases raw.
func DER(raw []byte, size int) ([]byte, error) {
	if size < 1 {
		return nil, fmt.Errorf("ecdsasig: size %d, want at least 1", size)
	}
	if len(raw) != 2*size {
		return nil, fmt.Errorf("%w: raw signature of %d bytes, want %d (r ‖ s)", ErrMalformed, len(raw), 2*size)
	}
	r, s := trimZeros(raw[:size]), trimZeros(raw[size:])
	if len(r) == 0 {
		return nil, fmt.Errorf("%w: r is zero", ErrOutOfRange)
	}
	if len(s) == 0 {
		return nil, fmt.Errorf("%w: s is zero", ErrOutOfRange)
	}
	rLen, sLen := integerLen(r), integerLen(s)
	body := 1 + lengthLen(rLen) + rLen + 1 + lengthLen(sLen) + sLen
	out := make([]byte, 0, 1+lengthLen(body)+body)
	out = appendHeader(out, tagSequence, body)
	out = appendInteger(out, r)
	out = appendInteger(out, s)
	return out, nil
}

// Raw returns the ECDSA signature der as r ‖ s, each left-padded with zeros
// to size bytes: always 2×size bytes.
//
// der must be exactly the canonical DER encoding of
// SEQUENCE { INTEGER r, INTEGER s }: definite lengths in their shortest
// form, minimal INTEGERs, nothing else inside the SEQUENCE and nothing after
// it; anything else wraps ErrMalformed. r and s must be positive and at most
// size bytes long, else the error wraps ErrOutOfRange. Raw does not check r
// and s against the curve order: the caller must, for example by comparing
// each half of the result with the big-endian order of the same size.
//
// The result never aliases der.
func Raw(der []byte, size int) ([]byte, error) {
	if size < 1 {
		return nil, fmt.Errorf("ecdsasig: size %d, want at least 1", size)
	}
	body, rest, err := element(der, tagSequence)
	if err != nil {
		return nil, fmt.Errorf("%w: SEQUENCE: %s", ErrMalformed, err)
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: %d bytes of trailing data", ErrMalformed, len(rest))
	}
	r, body, err := integer(body, "r", size)
	if err != nil {
		return nil, err
	}
	s, body, err := integer(body, "s", size)
	if err != nil {
		return nil, err
	}
	if len(body) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after s in the SEQUENCE", ErrMalformed, len(body))
	}
	out := make([]byte, 2*size)
	copy(out[size-len(r):size], r)
	copy(out[2*size-len(s):], s)
	return out, nil
}

// integer parses a DER INTEGER, named name in errors, at the start of b and
// returns its magnitude without the sign byte, and what follows it. The
// integer must be minimally encoded, positive and at most size bytes long.
func integer(b []byte, name string, size int) (mag, rest []byte, err error) {
	c, rest, err := element(b, tagInteger)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: INTEGER %s: %s", ErrMalformed, name, err)
	}
	switch {
	case len(c) == 0:
		return nil, nil, fmt.Errorf("%w: INTEGER %s is empty", ErrMalformed, name)
	case c[0]&0x80 != 0:
		return nil, nil, fmt.Errorf("%w: %s is negative", ErrOutOfRange, name)
	case c[0] == 0 && len(c) == 1:
		return nil, nil, fmt.Errorf("%w: %s is zero", ErrOutOfRange, name)
	case c[0] == 0 && c[1]&0x80 == 0:
		return nil, nil, fmt.Errorf("%w: INTEGER %s is not minimally encoded", ErrMalformed, name)
	case c[0] == 0:
		c = c[1:] // the sign byte
	}
	if len(c) > size {
		return nil, nil, fmt.Errorf("%w: %s is %d bytes, at most %d", ErrOutOfRange, name, len(c), size)
	}
	return c, rest, nil
}

// element parses a DER element with the one-byte identifier tag at the start
// of b and returns its contents and what follows it. The length must be
// definite and in its shortest form (X.690 §10.1). The errors are bare
// descriptions for the caller to wrap.
func element(b []byte, tag byte) (contents, rest []byte, err error) {
	if len(b) < 2 {
		return nil, nil, errors.New("truncated header")
	}
	if b[0] != tag {
		return nil, nil, fmt.Errorf("tag 0x%02x, want 0x%02x", b[0], tag)
	}
	n, hdr := int(b[1]), 2
	switch {
	case n < 0x80: // short form
	case n == 0x80:
		return nil, nil, errors.New("indefinite length")
	default: // long form: n&0x7f big-endian length bytes follow
		k := n & 0x7f
		if len(b) < hdr+k {
			return nil, nil, errors.New("truncated length")
		}
		if b[hdr] == 0 {
			return nil, nil, errors.New("length with a leading zero byte")
		}
		n = 0
		for _, c := range b[hdr : hdr+k] {
			if n > (math.MaxInt-0xff)>>8 {
				return nil, nil, errors.New("length too large")
			}
			n = n<<8 | int(c)
		}
		hdr += k
		if n < 0x80 {
			return nil, nil, errors.New("long-form length below 128")
		}
	}
	if len(b)-hdr < n {
		return nil, nil, fmt.Errorf("length %d, only %d bytes left", n, len(b)-hdr)
	}
	return b[hdr : hdr+n], b[hdr+n:], nil
}

// trimZeros returns b without its leading zero bytes.
func trimZeros(b []byte) []byte {
	for len(b) > 0 && b[0] == 0 {
		b = b[1:]
	}
	return b
}

// integerLen returns the length of the contents of the minimal DER INTEGER
// with magnitude mag, which has no leading zero bytes: a 0x00 sign byte
// goes before a magnitude whose high bit is set.
func integerLen(mag []byte) int {
	return len(mag) + int(mag[0]>>7)
}

// lengthLen returns how many bytes the DER length n takes.
func lengthLen(n int) int {
	l := 1
	if n >= 0x80 {
		for ; n > 0; n >>= 8 {
			l++
		}
	}
	return l
}

// appendHeader appends the identifier tag and the DER length n to b.
func appendHeader(b []byte, tag byte, n int) []byte {
	b = append(b, tag)
	if n < 0x80 {
		return append(b, byte(n))
	}
	k := lengthLen(n) - 1
	b = append(b, 0x80|byte(k))
	for i := k - 1; i >= 0; i-- {
		b = append(b, byte(n>>(8*i)))
	}
	return b
}

// appendInteger appends the minimal DER INTEGER with magnitude mag, which
// has no leading zero bytes, to b.
func appendInteger(b, mag []byte) []byte {
	b = appendHeader(b, tagInteger, integerLen(mag))
	if mag[0]&0x80 != 0 {
		b = append(b, 0)
	}
	return append(b, mag...)
}
