package policy

import (
	"encoding/json"
	"strings"
	"testing"
)

// A claim name that differs from another only in letter case (ASCII, or a
// Unicode simple fold such as U+017F LATIN SMALL LETTER LONG S for "s") is
// one claim to verifiers that match names without regard to case: Go's
// encoding/json decoding into a struct (golang-jwt's RegisteredClaims,
// go-oidc's ID token), Newtonsoft.Json, System.Text.Json with
// PropertyNameCaseInsensitive. Such a verifier takes the last one, which is
// not the one keyd's policy checked.
func TestClaimNameCaseFold(t *testing.T) {
	type registered struct {
		Iss string `json:"iss"`
		Sub string `json:"sub"`
		Exp int64  `json:"exp"`
	}
	issOK := `"iss":"https://op.example.com"`

	// Prepare: the completed claims are sorted by name, and "iſſ" sorts
	// after "iss", so a case-insensitive verifier reads iss = attacker.
	tok, err := jwtPolicy.Prepare(now, testKey, nil,
		[]byte(`{`+issOK+`,"exp":`+at(60)+`,"iſſ":"https://attacker.example"}`), &seqReader{})
	if err == nil {
		var c registered
		if err := json.Unmarshal(tok.Claims, &c); err != nil {
			t.Fatal(err)
		}
		t.Errorf("Prepare signs %s: a verifier decoding into a struct reads iss %q; policy Issuers are %q",
			tok.Claims, c.Iss, jwtPolicy.Issuers)
	} else {
		wantViolation(t, err, "iſſ")
	}

	// CheckPrebuilt: the caller chooses the order, so a plain "EXP" after
	// "exp" gives the token any lifetime.
	claims := `{` + issOK + `,"exp":` + at(60) + `,"iat":` + at(0) + `,"jti":"j1","EXP":99999999999}`
	header := `{"alg":"ES256","kid":"` + testKid + `"}`
	if _, err := jwtPolicy.CheckPrebuilt(now, testKey, []byte(header), []byte(claims)); err == nil {
		var c registered
		if err := json.Unmarshal([]byte(claims), &c); err != nil {
			t.Fatal(err)
		}
		t.Errorf("CheckPrebuilt accepts %s: a verifier decoding into a struct reads exp %d, %d s after keyd's clock (max %d)",
			claims, c.Exp, c.Exp-now.Unix(), int64(DefaultMaxLifetime.Seconds()))
	} else {
		wantViolation(t, err, "EXP")
	}

	// Distinct names stay allowed.
	runPrepareCases(t, []prepareCase{
		{"custom names", jwtPolicy, "", `{` + issOK + `,"exp":` + at(60) + `,"given_name":"a","family_name":"b"}`, ""},
	})
}

// The same holds for a claims set with many members (where the object is
// searched through its index).
func TestClaimNameCaseFoldLarge(t *testing.T) {
	claims := `{"iss":"https://op.example.com","exp":` + at(60) + manyClaims(20)
	_, err := jwtPolicy.Prepare(now, testKey, nil, []byte(claims+`,"ſub":"x","sub":"y"}`), &seqReader{})
	wantViolation(t, err, "sub")
	if _, err := jwtPolicy.Prepare(now, testKey, nil, []byte(claims+`,"sub":"y"}`), &seqReader{}); err != nil {
		t.Fatal(err)
	}
}

// keyd fills jti and iat into a jwt's claims after the caller's names were
// checked for case collisions: a caller's "JTI" or "IAT" must not end up in
// the signed claims next to the jti and iat keyd adds, where a verifier that
// matches names without regard to case reads one as the other. Whatever
// Prepare signs, CheckPrebuilt accepts too.
func TestClaimNameCaseFoldFilled(t *testing.T) {
	iss := `"iss":"https://op.example.com","exp":` + at(60)
	for _, tc := range []struct{ claims, name string }{
		{`{` + iss + `,"JTI":"` + strings.Repeat("x ", 100) + `"}`, "jti"},
		{`{` + iss + `,"IAT":99999999999}`, "iat"},
		{`{` + iss + `,"Iat":"yesterday","jti":"j1"}`, "iat"},
		// Past maxLinear members, the object is searched through its index.
		{`{` + iss + manyClaims(20) + `,"IAT":1}`, "iat"},
	} {
		tok, err := jwtPolicy.Prepare(now, testKey, nil, []byte(tc.claims), &seqReader{})
		if err == nil {
			t.Errorf("Prepare(%s) signs %s: two claims that are one to a case-insensitive verifier", tc.claims, tok.Claims)
			if _, err := jwtPolicy.CheckPrebuilt(now, testKey, tok.Header, tok.Claims); err != nil {
				t.Errorf("and CheckPrebuilt refuses it: %v", err)
			}
			continue
		}
		wantViolation(t, err, tc.name)
	}
}

// manyClaims is n more members for a claims set, ",\"ca\":1,\"cb\":1...".
func manyClaims(n int) string {
	var b strings.Builder
	for i := range n {
		b.WriteString(`,"c` + string(rune('a'+i)) + `":1`)
	}
	return b.String()
}
