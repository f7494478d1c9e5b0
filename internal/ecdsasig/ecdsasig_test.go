package ecdsasig

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"math/big"
	"strings"
	"testing"
)

// sigValue is the ASN.1 form of an ECDSA signature for encoding/asn1, the
// reference the codec is checked against.
type sigValue struct {
	R, S *big.Int
}

// refRaw is the reference for Raw built on encoding/asn1: der is accepted
// iff it parses with no trailing data, re-encodes to exactly der (so it was
// canonical DER and had no extra elements), and 0 < r, s with each at most
// size bytes long.
func refRaw(der []byte, size int) ([]byte, bool) {
	var v sigValue
	rest, err := asn1.Unmarshal(der, &v)
	if err != nil || len(rest) != 0 {
		return nil, false
	}
	canon, err := asn1.Marshal(v)
	if err != nil || !bytes.Equal(canon, der) {
		return nil, false
	}
	if v.R.Sign() <= 0 || v.S.Sign() <= 0 || len(v.R.Bytes()) > size || len(v.S.Bytes()) > size {
		return nil, false
	}
	out := make([]byte, 2*size)
	v.R.FillBytes(out[:size])
	v.S.FillBytes(out[size:])
	return out, true
}

// refDER is the reference for DER: encoding/asn1 with math/big, as
// keystore/pkcs11 did it before this package.
func refDER(raw []byte, size int) ([]byte, error) {
	r := new(big.Int).SetBytes(raw[:size])
	s := new(big.Int).SetBytes(raw[size:])
	if r.Sign() == 0 || s.Sign() == 0 {
		return nil, errors.New("zero r or s")
	}
	return asn1.Marshal(sigValue{r, s})
}

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var curves = []struct {
	name  string
	curve elliptic.Curve
	size  int
}{
	{"P-256", elliptic.P256(), 32},
	{"P-384", elliptic.P384(), 48},
}

// TestStdlibRoundTrip checks real signatures of crypto/ecdsa: Raw reads
// the same r and s from ecdsa.SignASN1's DER as encoding/asn1 does, DER
// turns them back into the very same bytes, and the DER of a raw signature
// from ecdsa.Sign verifies.
func TestStdlibRoundTrip(t *testing.T) {
	for _, c := range curves {
		t.Run(c.name, func(t *testing.T) {
			k, err := ecdsa.GenerateKey(c.curve, rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			d := sha256.Sum256([]byte("keyd"))
			short := 0 // signatures with an r or s shorter than size
			for range 1000 {
				sig, err := ecdsa.SignASN1(rand.Reader, k, d[:])
				if err != nil {
					t.Fatal(err)
				}
				var v sigValue
				if rest, err := asn1.Unmarshal(sig, &v); err != nil || len(rest) != 0 {
					t.Fatalf("encoding/asn1 cannot parse %x: %v", sig, err)
				}
				want := make([]byte, 2*c.size)
				v.R.FillBytes(want[:c.size])
				v.S.FillBytes(want[c.size:])
				if want[0] == 0 || want[c.size] == 0 {
					short++
				}
				raw, err := Raw(sig, c.size)
				if err != nil {
					t.Fatalf("Raw(%x): %v", sig, err)
				}
				if !bytes.Equal(raw, want) {
					t.Fatalf("Raw(%x) =\n%x\nwant\n%x", sig, raw, want)
				}
				der, err := DER(raw, c.size)
				if err != nil {
					t.Fatalf("DER(%x): %v", raw, err)
				}
				if !bytes.Equal(der, sig) {
					t.Fatalf("DER(Raw(%x)) = %x", sig, der)
				}
			}
			t.Logf("%d signatures with a short r or s", short)

			r, s, err := ecdsa.Sign(rand.Reader, k, d[:])
			if err != nil {
				t.Fatal(err)
			}
			raw := make([]byte, 2*c.size)
			r.FillBytes(raw[:c.size])
			s.FillBytes(raw[c.size:])
			der, err := DER(raw, c.size)
			if err != nil || !ecdsa.VerifyASN1(&k.PublicKey, d[:], der) {
				t.Fatalf("DER(%x) = %x, %v: does not verify", raw, der, err)
			}
		})
	}
}

// TestEdgeValues runs values at the edges of the encoding (leading zero
// bytes, high bit set, 1, all ones) through DER and Raw for several sizes,
// including sizes whose encoding needs long-form lengths, and checks both
// against encoding/asn1.
func TestEdgeValues(t *testing.T) {
	for _, size := range []int{1, 2, 32, 48, 60, 61, 66, 127, 128, 200} {
		values := [][]byte{
			{1},
			{0x7f},
			{0x80},
			{0xff},
			{0x01, 0x00},
			{0x80, 0x00},
			bytes.Repeat([]byte{0xff}, size),
			append([]byte{0x80}, make([]byte, size-1)...),
			append([]byte{0x7f}, bytes.Repeat([]byte{0xff}, size-1)...),
		}
		for _, r := range values {
			for _, s := range values {
				if len(r) > size || len(s) > size {
					continue
				}
				raw := make([]byte, 2*size)
				copy(raw[size-len(r):size], r)
				copy(raw[2*size-len(s):], s)
				want, err := refDER(raw, size)
				if err != nil {
					t.Fatal(err)
				}
				der, err := DER(raw, size)
				if err != nil {
					t.Fatalf("size %d: DER(%x): %v", size, raw, err)
				}
				if !bytes.Equal(der, want) {
					t.Fatalf("size %d: DER(%x) =\n%x\nwant\n%x", size, raw, der, want)
				}
				back, err := Raw(der, size)
				if err != nil || !bytes.Equal(back, raw) {
					t.Fatalf("size %d: Raw(%x) = %x, %v; want %x", size, der, back, err, raw)
				}
				if size > 1 {
					if _, err := Raw(der, size-1); len(r) == size || len(s) == size {
						if !errors.Is(err, ErrOutOfRange) {
							t.Fatalf("size %d: Raw(%x, %d) = %v, want ErrOutOfRange", size, der, size-1, err)
						}
					}
				}
			}
		}
	}
}

func TestDERVectors(t *testing.T) {
	for _, tt := range []struct {
		name string
		raw  string
		size int
		want string
	}{
		{"minimal", "01 01", 1, "3006 020101 020101"},
		{"sign byte", "80 ff", 1, "3008 02020080 020200ff"},
		{"leading zeros", "0001 0102", 2, "3007 020101 02020102"},
		{"zero then high bit", "0080 7fff", 2, "3008 02020080 02027fff"},
		{
			"P-256 sign byte and short s",
			"80" + strings.Repeat("11", 31) + strings.Repeat("00", 29) + "010203",
			32,
			"3028 0221 0080" + strings.Repeat("11", 31) + " 0203 010203",
		},
		{
			// The largest P-384 signature: 0x81 0x80 would be long form,
			// the content is 2×(2+49) = 102 bytes, still short form.
			"P-384 longest",
			strings.Repeat("ff", 96),
			48,
			"3066 0231 00" + strings.Repeat("ff", 48) + " 0231 00" + strings.Repeat("ff", 48),
		},
		{
			// Content of 2×(2+62) = 128 bytes: the first size that needs
			// a long-form SEQUENCE length.
			"long-form sequence",
			strings.Repeat("ff", 122),
			61,
			"308180 023e 00" + strings.Repeat("ff", 61) + " 023e 00" + strings.Repeat("ff", 61),
		},
		{
			"long-form integers",
			strings.Repeat("ff", 256),
			128,
			"30820108 028181 00" + strings.Repeat("ff", 128) + " 028181 00" + strings.Repeat("ff", 128),
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			raw, want := mustHex(t, tt.raw), mustHex(t, tt.want)
			got, err := DER(raw, tt.size)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("DER(%x, %d) =\n%x, %v\nwant\n%x", raw, tt.size, got, err, want)
			}
			back, err := Raw(want, tt.size)
			if err != nil || !bytes.Equal(back, raw) {
				t.Fatalf("Raw(%x, %d) = %x, %v; want %x", want, tt.size, back, err, raw)
			}
		})
	}
}

func TestDERErrors(t *testing.T) {
	for _, tt := range []struct {
		name    string
		raw     []byte
		size    int
		wantErr error
	}{
		{"empty", nil, 32, ErrMalformed},
		{"short", make([]byte, 63), 32, ErrMalformed},
		{"long", append(bytes.Repeat([]byte{1}, 64), 1), 32, ErrMalformed},
		{"P-384 length for P-256", bytes.Repeat([]byte{1}, 96), 32, ErrMalformed},
		{"zero", make([]byte, 64), 32, ErrOutOfRange},
		{"r zero", append(make([]byte, 32), bytes.Repeat([]byte{1}, 32)...), 32, ErrOutOfRange},
		{"s zero", append(bytes.Repeat([]byte{1}, 32), make([]byte, 32)...), 32, ErrOutOfRange},
		{"size 0", nil, 0, nil},
		{"negative size", nil, -1, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DER(tt.raw, tt.size)
			if err == nil || got != nil {
				t.Fatalf("DER = %x, %v; want an error", got, err)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("DER = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestRawMalformed(t *testing.T) {
	ff32 := strings.Repeat("ff", 32)
	for _, tt := range []struct {
		name    string
		der     string
		size    int
		wantErr error
	}{
		{"empty", "", 32, ErrMalformed},
		{"one byte", "30", 32, ErrMalformed},
		{"empty sequence", "3000", 32, ErrMalformed},
		{"only r", "3003 020101", 32, ErrMalformed},
		{"trailing data", "3006 020101 020101 00", 32, ErrMalformed},
		{"trailing sequence", "3006 020101 020101 3006 020101 020101", 32, ErrMalformed},
		{"extra element", "3009 020101 020101 020101", 32, ErrMalformed},
		{"extra byte in sequence", "3007 020101 020101 00", 32, ErrMalformed},
		{"sequence length too long", "3007 020101 020101", 32, ErrMalformed},
		{"sequence length too short", "3005 020101 020101", 32, ErrMalformed},
		{"integer length past sequence", "3006 020101 020201", 32, ErrMalformed},
		{"wrong sequence tag (SET)", "3106 020101 020101", 32, ErrMalformed},
		{"constructed integer", "3006 220101 020101", 32, ErrMalformed},
		{"bit string instead of integer", "3006 030101 020101", 32, ErrMalformed},
		{"octet string instead of integer", "3006 020101 040101", 32, ErrMalformed},
		{"high tag number form", "3f10 06 020101 020101", 32, ErrMalformed},
		{"indefinite length", "3080 020101 020101 0000", 32, ErrMalformed},
		{"indefinite integer length", "3008 0280 01 0000 020101", 32, ErrMalformed},
		{"non-minimal sequence length", "308106 020101 020101", 32, ErrMalformed},
		{"sequence length with leading zero", "30820006 020101 020101", 32, ErrMalformed},
		{"non-minimal integer length", "3007 028101 01 020101", 32, ErrMalformed},
		{"truncated long-form length", "3082 01", 32, ErrMalformed},
		{"huge length", "3088 7fffffffffffffff 020101 020101", 32, ErrMalformed},
		{"overflowing length", "3089 010000000000000000 020101", 32, ErrMalformed},
		{"empty integer", "3005 0200 020101", 32, ErrMalformed},
		{"non-minimal integer", "3007 02020001 020101", 32, ErrMalformed},
		{"non-minimal zero", "3007 02020000 020101", 32, ErrMalformed},
		{"r zero", "3006 020100 020101", 32, ErrOutOfRange},
		{"s zero", "3006 020101 020100", 32, ErrOutOfRange},
		{"r negative", "3006 0201ff 020101", 32, ErrOutOfRange},
		{"s negative", "3025 020101 0220 80" + strings.Repeat("11", 31), 32, ErrOutOfRange},
		{"non-minimal negative", "3007 0202ff80 020101", 32, ErrOutOfRange},
		{"r longer than size", "3026 0221 01" + ff32 + " 020101", 32, ErrOutOfRange},
		{"s longer than size with sign byte", "3027 020101 0222 0080" + ff32, 32, ErrOutOfRange},
		{"P-384 r for P-256", "3036 0231 00" + strings.Repeat("ff", 48) + " 020101", 32, ErrOutOfRange},
		{"raw r‖s", "31" + strings.Repeat("11", 63), 32, ErrMalformed},
		{"raw r‖s starting 0x30", "30" + strings.Repeat("11", 63), 32, ErrMalformed},
		{"size 0", "3006 020101 020101", 0, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			der := mustHex(t, tt.der)
			if _, ok := refRaw(der, tt.size); ok {
				t.Fatalf("the encoding/asn1 reference accepts %x: bad test case", der)
			}
			got, err := Raw(der, tt.size)
			if err == nil || got != nil {
				t.Fatalf("Raw(%x) = %x, %v; want an error", der, got, err)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("Raw(%x) = %v, want %v", der, err, tt.wantErr)
			}
		})
	}
}

// TestNoAlias checks that the results are fresh slices.
func TestNoAlias(t *testing.T) {
	raw := bytes.Repeat([]byte{0x11}, 64)
	der, err := DER(raw, 32)
	if err != nil {
		t.Fatal(err)
	}
	back, err := Raw(der, 32)
	if err != nil {
		t.Fatal(err)
	}
	back[0], der[2] = 0x22, 0x22
	if raw[0] != 0x11 || der[4] != 0x11 {
		t.Fatal("a result aliases its input")
	}
}

// TestAllocs checks DER and Raw allocate only their result.
func TestAllocs(t *testing.T) {
	raw := bytes.Repeat([]byte{0x81}, 96)
	der, err := DER(raw, 48)
	if err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(100, func() { _, _ = DER(raw, 48) }); n != 1 {
		t.Errorf("DER: %v allocations, want 1", n)
	}
	if n := testing.AllocsPerRun(100, func() { _, _ = Raw(der, 48) }); n != 1 {
		t.Errorf("Raw: %v allocations, want 1", n)
	}
}
