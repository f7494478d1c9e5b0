package policy

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

func FuzzPrepare(f *testing.F) {
	seeds := []struct {
		purpose        byte
		header, claims string
	}{
		{0, "", `{"htm":"POST","htu":"https://server.example.com/token"}`},
		{0, "{}", `{"htm":"GET","htu":"https://rs.example/x","ath":"` + validATH + `","nonce":"abc","jti":"j","iat":1700000000}`},
		{0, `{"typ":"dpop+jwt"}`, `{"htm":"GET","htu":"https://rs.example/x?q#f"}`},
		{0, "", `{"htm":"GET","htu":"HTTP://[::1]:80/a%20b","exp":1}`},
		{1, "", ""},
		{1, "", `{"iss":"s6BhdRkqt3","sub":"s6BhdRkqt3","aud":"https://server.example.com","exp":1700000060,"nbf":1700000000}`},
		{1, "", `{"aud":["https://server.example.com"],"iat":1.7e9}`},
		{1, "", `{"iat":1700000060}`},
		{1, `{"alg":"none"}`, `{"jti":"a","jti":"b"}`},
		{2, `{"typ":"JWT"}`, `{"iss":"https://op.example.com","exp":1700000300,"aud":["a","b"],"x":{"y":[1,2.5,null,true]}}`},
		{2, "", `{"iss":"https://op.example.com","exp":1700000300,"iat":1700000300,"nbf":1700000299}`},
		{2, `{"typ":"application/dpop+jwt"}`, `{"iss":"https://op.example.com","exp":1700000100,"s":"\u00e9\ud83d\ude00<>&"}`},
		{2, "", `{"iss":"https://op.example.com","exp":99999999999999999999}`},
		{2, "", "{\"iss\":\"https://op.example.com\",\"exp\":1700000100,\"x\":{\"a\":1,\"a\":2}}"},
		{2, "", "\xff"},
	}
	for _, s := range seeds {
		f.Add(s.purpose, []byte(s.header), []byte(s.claims))
	}
	policies := []Policy{dpopPolicy, assertionPolicy, jwtPolicy,
		{Purpose: ClientAssertion, ClientID: "c", Audience: "https://as.example", Typ: ptr(""), MaxLifetime: time.Minute}}
	f.Fuzz(func(t *testing.T, purpose byte, header, claims []byte) {
		p := policies[int(purpose)%len(policies)]
		tok, err := p.Prepare(now, testKey, header, claims, &seqReader{})
		if err != nil {
			// v.Claim may be "": a claim or parameter named "".
			var v *Violation
			if !errors.As(err, &v) || !errors.Is(err, ErrViolation) || v.Reason == "" {
				t.Fatalf("Prepare error is not a complete violation: %#v", err)
			}
			return
		}
		for _, b := range [][]byte{tok.Header, tok.Claims} {
			var m map[string]any
			if err := json.Unmarshal(b, &m); err != nil {
				t.Fatalf("output %q is not a JSON object: %v", b, err)
			}
		}
		if strings.Contains(string(tok.Header), `"d"`) {
			t.Fatalf("header %s has a private member", tok.Header)
		}
		sum, err := p.CheckPrebuilt(now, testKey, tok.Header, tok.Claims)
		if err != nil {
			t.Fatalf("CheckPrebuilt refuses Prepare's output\nheader %s\nclaims %s\n%v", tok.Header, tok.Claims, err)
		}
		if sum.Jti != tok.Summary.Jti || sum.Iat != tok.Summary.Iat || sum.Exp != tok.Summary.Exp {
			t.Fatalf("summaries differ: %+v vs %+v", sum, tok.Summary)
		}
		// Prepare's output is a fixed point.
		again, err := p.Prepare(now, testKey, nil, tok.Claims, &seqReader{})
		if p.Purpose == JWT {
			again, err = p.Prepare(now, testKey, typOnly(t, tok.Header), tok.Claims, &seqReader{})
		}
		if err != nil || string(again.Claims) != string(tok.Claims) || string(again.Header) != string(tok.Header) {
			t.Fatalf("Prepare of its own output: %v\n got %s %s\nwant %s %s", err, again.Header, again.Claims, tok.Header, tok.Claims)
		}
	})
}

// typOnly returns the jwt header's typ alone, as a caller's header.
func typOnly(t *testing.T, header []byte) []byte {
	var h map[string]json.RawMessage
	if err := json.Unmarshal(header, &h); err != nil {
		t.Fatal(err)
	}
	if typ, ok := h["typ"]; ok {
		return append(append([]byte(`{"typ":`), typ...), '}')
	}
	return nil
}

func FuzzNormalizeHTU(f *testing.F) {
	for _, s := range []string{
		"HTTPS://Server.Example.COM:443/token?x=1#f",
		"http://a.example:8080",
		"https://user:pass@a.example/x",
		"http://[FE80::1]:0080/x",
		"https://a.example/é/%2F/%zz",
		"https://a.example:/./../x",
		"ftp://x", "/relative", "https://", "https://[::1", "https://a.example/a b",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		out, err := NormalizeHTU(raw)
		if err != nil {
			return
		}
		if strings.ContainsAny(out, "?#") {
			t.Fatalf("NormalizeHTU(%q) = %q has a query or fragment", raw, out)
		}
		again, err := NormalizeHTU(out)
		if err != nil || again != out {
			t.Fatalf("NormalizeHTU(%q) = %q, but NormalizeHTU(%q) = %q, %v", raw, out, out, again, err)
		}
		if reason := checkHTU(out); reason != "" {
			t.Fatalf("policy refuses NormalizeHTU(%q) = %q: %s", raw, out, reason)
		}
	})
}
