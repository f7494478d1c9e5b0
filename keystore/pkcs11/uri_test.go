package pkcs11

import (
	"reflect"
	"strings"
	"testing"
)

func TestParseURI(t *testing.T) {
	ok := []struct {
		in   string
		want URI
	}{
		{"pkcs11:token=keyd", URI{Token: "keyd"}},
		{"PKCS11:token=keyd", URI{Token: "keyd"}},
		{"pkcs11:serial=2a2794af3b184258", URI{Serial: "2a2794af3b184258"}},
		{"pkcs11:slot-id=991445592", URI{SlotID: 991445592, HasSlotID: true}},
		{"pkcs11:slot-id=0", URI{HasSlotID: true}},
		{"pkcs11:token=My%20Token;manufacturer=SoftHSM%20project;model=SoftHSM%20v2",
			URI{Token: "My Token", Manufacturer: "SoftHSM project", Model: "SoftHSM v2"}},
		{"pkcs11:token=a%3bb%25c", URI{Token: "a;b%c"}},
		{"pkcs11:token=k:[x]@!$'()*+,=&", URI{Token: "k:[x]@!$'()*+,=&"}},
		{"pkcs11:token=keyd;object=dpop;id=%01%02;type=private", URI{Token: "keyd", Ignored: []string{"object", "id", "type"}}},
		{"pkcs11:token=keyd;x-vendor=1?x-q=a/b|c", URI{Token: "keyd", Ignored: []string{"x-vendor", "?x-q"}}},
		{"pkcs11:token=keyd?", URI{Token: "keyd"}},
		{"pkcs11:", URI{}},
		{"pkcs11:token=" + strings.Repeat("l", 32), URI{Token: strings.Repeat("l", 32)}},
	}
	for _, tt := range ok {
		got, err := ParseURI(tt.in)
		if err != nil {
			t.Errorf("ParseURI(%q): %v", tt.in, err)
			continue
		}
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("ParseURI(%q) = %+v, want %+v", tt.in, got, tt.want)
		}
	}

	bad := []struct{ in, want string }{
		{"", "starting with"},
		{"pkcs11", "starting with"},
		{"http://x", "starting with"},
		{"pkcs11:token=keyd?pin-value=1234", "put the PIN in pin_file"},
		{"pkcs11:token=keyd?pin-value", "put the PIN in pin_file"},
		{"pkcs11:token=keyd?x-a=1&pin-value=%zz", "put the PIN in pin_file"},
		{"pkcs11:token=keyd?pin-source=file:/p", "pin_file"},
		{"pkcs11:token=keyd?module-path=/x.so", "module field"},
		{"pkcs11:token=keyd?module-name=softhsm2", "module field"},
		{"pkcs11:token=keyd?foo=1", "unknown query attribute"},
		{"pkcs11:token=a;token=b", "appears twice"},
		{"pkcs11:token=", "empty"},
		{"pkcs11:token", "no '='"},
		{"pkcs11:token=a;;serial=b", "stray"},
		{"pkcs11:=a", "no name"},
		{"pkcs11:to ken=a", "invalid character"},
		{"pkcs11:token=a b", "percent-encoded (%20)"},
		{"pkcs11:token=a/b", "percent-encoded (%2F)"},
		{"pkcs11:token=a%2", "percent-encoding"},
		{"pkcs11:token=a%g0", "percent-encoding"},
		{"pkcs11:slot-id=-1", "decimal"},
		{"pkcs11:slot-id=0x10", "decimal"},
		{"pkcs11:slot-id=99999999999999999999999", "out of range"},
		{"pkcs11:token=" + strings.Repeat("l", 33), "can never match"},
		{"pkcs11:serial=" + strings.Repeat("s", 17), "can never match"},
		{"pkcs11:library-description=x", "not supported"},
		{"pkcs11:slot-description=x", "not supported"},
		{"pkcs11:frobnicate=1", "unknown path attribute"},
	}
	for _, tt := range bad {
		_, err := ParseURI(tt.in)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParseURI(%q) = %v, want an error saying %q", tt.in, err, tt.want)
		}
		if err != nil && strings.Contains(tt.in, "pin-value") && strings.Contains(err.Error(), "1234") {
			t.Errorf("ParseURI(%q): error %q quotes the PIN", tt.in, err)
		}
	}
}

// A path error never quotes the query, which may hold a PIN.
func TestParseURIHidesQuery(t *testing.T) {
	_, err := ParseURI("pkcs11:tokn=keyd?pin-value=s3cret")
	if err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Errorf("ParseURI = %v; want an error that does not quote the query", err)
	}
}

func TestURIString(t *testing.T) {
	u := URI{Token: "My Token;1", Serial: "ab", Manufacturer: "M", Model: "m/1", SlotID: 7, HasSlotID: true}
	want := "pkcs11:token=My%20Token%3B1;manufacturer=M;serial=ab;model=m%2F1;slot-id=7"
	if got := u.String(); got != want {
		t.Errorf("String() = %s, want %s", got, want)
	}
	back, err := ParseURI(want)
	if err != nil || !reflect.DeepEqual(back, u) {
		t.Errorf("ParseURI(String()) = %+v, %v; want %+v", back, err, u)
	}
}

// FuzzParseURI: ParseURI never panics; what it accepts prints (String) to a
// URI that parses to the same selection; a pin-value is always refused and
// never quoted.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{
		"pkcs11:token=keyd", "pkcs11:serial=2a2794af3b184258;slot-id=12", "pkcs11:token=a%20b;model=SoftHSM%20v2",
		"pkcs11:token=keyd?pin-value=1234", "pkcs11:object=x;id=%01?x-y=z", "pkcs11:", "pkcs11:token=k:[x]@!$'()*+,=&",
		"pkcs11:slot-id=18446744073709551615", "pkcs11:token=%",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		pre, q, hasQuery := strings.Cut(s, "?")
		if hasQuery && strings.Contains(q, "pin-value") && err == nil {
			t.Fatalf("ParseURI(%q) accepted a pin-value", s)
		}
		if hasQuery {
			// Nothing of the query is ever quoted in an error: mark
			// both ends of it and look for the marks.
			const mark = "QmarkQ"
			for _, v := range []string{pre + "?" + mark + q, pre + "?" + q + mark} {
				if _, err := ParseURI(v); err != nil && strings.Contains(err.Error(), mark) {
					t.Fatalf("ParseURI(%q): error %q quotes the query", v, err)
				}
			}
		}
		if err != nil {
			return
		}
		if !strings.HasPrefix(strings.ToLower(s), "pkcs11:") {
			t.Fatalf("ParseURI(%q) accepted a non-pkcs11 URI", s)
		}
		canon := u.String()
		v, err := ParseURI(canon)
		if err != nil {
			t.Fatalf("ParseURI(%q) = %+v, whose String %q does not parse: %v", s, u, canon, err)
		}
		u.Ignored = nil
		if !reflect.DeepEqual(u, v) {
			t.Fatalf("ParseURI(%q) = %+v; String %q parses to %+v", s, u, canon, v)
		}
	})
}

// A PIN written into the path of the URI (a common mistake: the
// query form is pkcs11:…?pin-value=) must not be quoted by the error, which
// New returns and the daemon logs.
func TestURIPathPINNotQuoted(t *testing.T) {
	for _, in := range []string{
		"pkcs11:token=keyd;pin-value=1234",
		"pkcs11:pin-value=1234;token=keyd",
		// After another mistake in the path, whose error quotes the path.
		"pkcs11:tokn=keyd;pin-value=1234",
		"pkcs11:token=keyd;;pin-value=1234",
		// RFC 7512's ABNF names are case-insensitive; a PIN is a PIN in
		// any case, percent-encoded or not, with or without the scheme.
		"pkcs11:token=keyd;PIN-VALUE=1234",
		"pkcs11:token=keyd;pin%2Dvalue=1234",
		"token=keyd;pin-value=1234",
		"pkcs11:token=keyd?PIN-VALUE=1234",
	} {
		_, err := ParseURI(in)
		if err == nil {
			t.Errorf("ParseURI(%q) = nil error; want a refusal", in)
			continue
		}
		if strings.Contains(err.Error(), "1234") {
			t.Errorf("ParseURI(%q): error %q quotes the PIN", in, err)
		}
	}
}
