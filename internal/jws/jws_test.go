package jws

import (
	"bytes"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"errors"
	"testing"

	"github.com/keyd-dev/keyd/keystore"
)

func TestSigningInput(t *testing.T) {
	// RFC 7515 Appendix A.1: the example header (with its CRLF line breaks)
	// and payload, and their encodings.
	header := []byte("{\"typ\":\"JWT\",\r\n \"alg\":\"HS256\"}")
	claims := []byte("{\"iss\":\"joe\",\r\n \"exp\":1300819380,\r\n \"http://example.com/is_root\":true}")
	want := "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9" + "." +
		"eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
	in := SigningInput(header, claims)
	if string(in) != want {
		t.Fatalf("SigningInput = %s, want %s", in, want)
	}
	h, c, err := SplitSigningInput(in)
	if err != nil {
		t.Fatalf("SplitSigningInput: %v", err)
	}
	if !bytes.Equal(h, header) || !bytes.Equal(c, claims) {
		t.Errorf("SplitSigningInput = %q, %q", h, c)
	}
	if got, want := Compact(in, []byte{0xfb, 0xff}), want+".-_8"; got != want {
		t.Errorf("Compact = %s, want %s", got, want)
	}
}

func TestSplitSigningInputStrict(t *testing.T) {
	tests := []struct {
		name       string
		in         string
		wantHeader string
		wantClaims string
		wantErr    error
	}{
		{"valid", "eyJhIjoxfQ.e30", `{"a":1}`, `{}`, nil},
		{"url alphabet", "-_8.AA", "\xfb\xff", "\x00", nil},

		{"empty", "", "", "", ErrMalformed},
		{"no dot", "eyJhIjoxfQ", "", "", ErrMalformed},
		{"two dots", "eyJhIjoxfQ.e30.", "", "", ErrMalformed},
		{"three parts", "eyJhIjoxfQ.e30.AA", "", "", ErrMalformed},
		{"only a dot", ".", "", "", ErrMalformed},
		{"empty header", ".e30", "", "", ErrMalformed},
		{"empty claims", "eyJhIjoxfQ.", "", "", ErrMalformed},
		{"padded header", "eyJhIjoxfQ==.e30", "", "", ErrMalformed},
		{"padded claims", "eyJhIjoxfQ.e30=", "", "", ErrMalformed},
		{"std alphabet plus", "+_8.AA", "", "", ErrMalformed},
		{"std alphabet slash", "-_8.A/", "", "", ErrMalformed},
		{"stray bits", "eyJhIjoxfR.e30", "", "", ErrMalformed},
		{"impossible length", "eyJhI.e30", "", "", ErrMalformed},
		{"newline", "eyJhIjox\nfQ.e30", "", "", ErrMalformed},
		{"carriage return", "eyJhIjoxfQ.e3\r0", "", "", ErrMalformed},
		{"space", "eyJhIjoxfQ .e30", "", "", ErrMalformed},
		{"compact JWS", "eyJhIjoxfQ.e30.c2ln", "", "", ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, c, err := SplitSigningInput([]byte(tt.in))
			if !errors.Is(err, tt.wantErr) || (err != nil) != (tt.wantErr != nil) {
				t.Fatalf("SplitSigningInput(%q) = %v, want %v", tt.in, err, tt.wantErr)
			}
			if err != nil {
				if h != nil || c != nil {
					t.Errorf("non-nil parts with an error")
				}
				return
			}
			if string(h) != tt.wantHeader || string(c) != tt.wantClaims {
				t.Errorf("SplitSigningInput = %q, %q; want %q, %q", h, c, tt.wantHeader, tt.wantClaims)
			}
			if back := SigningInput(h, c); string(back) != tt.in {
				t.Errorf("SigningInput(Split(%q)) = %q", tt.in, back)
			}
		})
	}
}

func TestDigest(t *testing.T) {
	in := []byte("eyJhbGciOiJFUzI1NiJ9.e30")
	s256 := sha256.Sum256(in)
	s384 := sha512.Sum384(in)
	tests := []struct {
		alg     keystore.Algorithm
		want    []byte
		wantErr error
	}{
		{keystore.ES256, s256[:], nil},
		{keystore.RS256, s256[:], nil},
		{keystore.PS256, s256[:], nil},
		{keystore.ES384, s384[:], nil},
		{keystore.EdDSA, in, nil},
		{"ES512", nil, keystore.ErrUnsupportedAlgorithm},
		{"none", nil, keystore.ErrUnsupportedAlgorithm},
		{"", nil, keystore.ErrUnsupportedAlgorithm},
	}
	for _, tt := range tests {
		got, err := Digest(tt.alg, in)
		if !errors.Is(err, tt.wantErr) || (err != nil) != (tt.wantErr != nil) {
			t.Errorf("Digest(%q) error = %v, want %v", tt.alg, err, tt.wantErr)
			continue
		}
		if !bytes.Equal(got, tt.want) {
			t.Errorf("Digest(%q) = %x, want %x", tt.alg, got, tt.want)
		}
		// The digest fits what the algorithm's SignerOpts promise.
		if err == nil && tt.alg.Hash() != 0 && len(got) != tt.alg.SignerOpts().HashFunc().Size() {
			t.Errorf("Digest(%q) is %d bytes, SignerOpts hash is %d", tt.alg, len(got), tt.alg.SignerOpts().HashFunc().Size())
		}
	}
}

// compactSink keeps TestCompactAllocatesOnce's result alive, as keyd's is.
var compactSink string

// TestCompactAllocatesOnce: keyd builds a compact JWS per signature, and
// its allocations are what drive the daemon's garbage collection under
// load. Signatures past the stack buffer (larger than RSA-4096's) still
// come out right.
func TestCompactAllocatesOnce(t *testing.T) {
	in := SigningInput([]byte(`{"alg":"RS256"}`), bytes.Repeat([]byte("c"), 600)) // about a DPoP proof with its JWK
	for _, n := range []int{64, 96, 512, 528, 2048} {
		sig := bytes.Repeat([]byte{0xfb}, n)
		want := string(in) + "." + base64.RawURLEncoding.EncodeToString(sig)
		if got := Compact(in, sig); got != want {
			t.Errorf("Compact with a %d-byte signature = %q, want %q", n, got, want)
		}
		if n > 512 {
			continue
		}
		if a := testing.AllocsPerRun(100, func() { compactSink = Compact(in, sig) }); a != 1 {
			t.Errorf("Compact with a %d-byte signature: %v allocations, want 1", n, a)
		}
	}
}
