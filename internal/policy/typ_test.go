package policy

import (
	"mime"
	"strings"
	"testing"
)

// A typ is a media type (RFC 7515 §4.1.9), which may carry parameters: a
// verifier that parses it (mime.ParseMediaType, for one) reads
// "dpop+jwt;x=1" as dpop+jwt. A jwt key set must refuse those as it refuses
// "application/dpop+jwt".
func TestJWTTypMediaTypeParameters(t *testing.T) {
	claims := `{"iss":"https://op.example.com","exp":` + at(60) + `}`
	for _, typ := range []string{
		"dpop+jwt;x=1",
		"DPoP+JWT;v=2",
		"client-authentication+jwt;charset=utf-8",
		"application/client-authentication+jwt;a=b",
	} {
		mt, _, err := mime.ParseMediaType(strings.TrimPrefix(strings.ToLower(typ), "application/"))
		if err != nil || (mt != TypDPoP && mt != TypClientAssertion) {
			t.Fatalf("test case %q: media type %q, %v", typ, mt, err)
		}
		_, err = jwtPolicy.Prepare(now, testKey, []byte(`{"typ":"`+typ+`"}`), []byte(claims), &seqReader{})
		wantViolation(t, err, "header.typ")
		header := `{"alg":"ES256","kid":"` + testKid + `","typ":"` + typ + `"}`
		full := `{"iss":"https://op.example.com","exp":` + at(60) + `,"iat":` + at(0) + `,"jti":"j1"}`
		_, err = jwtPolicy.CheckPrebuilt(now, testKey, []byte(header), []byte(full))
		wantViolation(t, err, "header.typ")
	}
	// A parameter on another type is still that type.
	if _, err := jwtPolicy.Prepare(now, testKey, []byte(`{"typ":"at+jwt;v=1"}`), []byte(claims), &seqReader{}); err != nil {
		t.Errorf("at+jwt;v=1: %v", err)
	}
}
