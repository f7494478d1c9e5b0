package policy

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// now is the fixed clock of the tests: 2023-11-14T22:13:20Z.
var now = time.Unix(1700000000, 0)

// at returns now+d in Unix seconds, as JSON.
func at(d int64) string { return fmt.Sprint(now.Unix() + d) }

// seqReader returns 0, 1, 2, … forever.
type seqReader struct{ n byte }

func (r *seqReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = r.n
		r.n++
	}
	return len(p), nil
}

// The RFC 9449 example key and its RFC 7638 thumbprint.
const (
	testJWK = `{"kty":"EC","x":"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs","y":"9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA","crv":"P-256"}`
	testKid = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
	// otherJWK is another P-256 public key.
	otherJWK = `{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}`
	// firstJTI is the jti made from seqReader's first 16 bytes.
	firstJTI = "AAECAwQFBgcICQoLDA0ODw"
)

var testKey = Key{Alg: "ES256", Kid: testKid, JWK: []byte(testJWK)}

func ptr[T any](v T) *T { return &v }

var (
	dpopPolicy      = Policy{Purpose: DPoP}
	assertionPolicy = Policy{Purpose: ClientAssertion, ClientID: "s6BhdRkqt3", Audience: "https://server.example.com"}
	jwtPolicy       = Policy{Purpose: JWT, Issuers: []string{"https://op.example.com", "https://op2.example.com"}}
)

// validATH is the ath of the access token "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU".
var validATH = func() string {
	h := sha256.Sum256([]byte("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"))
	return base64.RawURLEncoding.EncodeToString(h[:])
}()

// wantViolation fails unless err is a *Violation about claim.
func wantViolation(t *testing.T, err error, claim string) {
	t.Helper()
	if !errors.Is(err, ErrViolation) {
		t.Fatalf("err = %v, want a violation of %q", err, claim)
	}
	var v *Violation
	if !errors.As(err, &v) {
		t.Fatalf("err = %#v is not a *Violation", err)
	}
	if v.Claim != claim {
		t.Fatalf("violation of %q (%v), want one of %q", v.Claim, err, claim)
	}
	if v.Reason == "" {
		t.Fatalf("violation of %q has no reason", claim)
	}
}

func TestParsePurpose(t *testing.T) {
	for _, p := range []Purpose{DPoP, ClientAssertion, JWT} {
		got, err := ParsePurpose(string(p))
		if err != nil || got != p {
			t.Errorf("ParsePurpose(%q) = %q, %v", p, got, err)
		}
	}
	for _, s := range []string{"", "DPoP", "assertion", "client-assertion"} {
		if _, err := ParsePurpose(s); err == nil {
			t.Errorf("ParsePurpose(%q) succeeded", s)
		}
	}
}

func TestViolationError(t *testing.T) {
	for _, tc := range []struct {
		v    Violation
		want string
	}{
		{Violation{"htu", "must not have a query"}, `claim "htu": must not have a query`},
		{Violation{"header.typ", "is set by keyd"}, `header parameter "typ": is set by keyd`},
		{Violation{"claims", "must be a JSON object"}, `claims: must be a JSON object`},
		{Violation{"header", "is not valid JSON"}, `header: is not valid JSON`},
	} {
		if got := tc.v.Error(); got != tc.want {
			t.Errorf("Error() = %q, want %q", got, tc.want)
		}
		if !errors.Is(&tc.v, ErrViolation) {
			t.Errorf("%v is not ErrViolation", &tc.v)
		}
	}
	if errors.Is(&Violation{}, errors.New("policy violation")) {
		t.Error("a Violation matches an unrelated error")
	}
	wrapped := fmt.Errorf("sign: %w", &Violation{"aud", "x"})
	var v *Violation
	if !errors.Is(wrapped, ErrViolation) || !errors.As(wrapped, &v) || v.Claim != "aud" {
		t.Errorf("wrapped violation lost: %v", wrapped)
	}
}

func TestValidate(t *testing.T) {
	valid := []Policy{
		dpopPolicy,
		{Purpose: DPoP, Skew: 2 * time.Minute},
		assertionPolicy,
		{Purpose: ClientAssertion, ClientID: "c", Audience: "http://localhost:8080/realms/x", Typ: ptr(""), MaxLifetime: time.Minute, DefaultLifetime: 30 * time.Second},
		{Purpose: ClientAssertion, ClientID: "c", Audience: "https://as.example", Typ: ptr("JWT")},
		{Purpose: ClientAssertion, ClientID: "c", Audience: "https://as.example", MaxLifetime: 30 * time.Second}, // default lifetime min(60s, 30s)
		jwtPolicy,
		{Purpose: JWT, Issuers: []string{"x"}, MaxLifetime: time.Hour},
	}
	for _, p := range valid {
		if err := p.Validate(); err != nil {
			t.Errorf("Validate(%+v) = %v", p, err)
		}
	}
	for _, tc := range []struct {
		name string
		p    Policy
		want []string // substrings, one per joined error
	}{
		{"no purpose", Policy{}, []string{"unknown purpose"}},
		{"bad purpose", Policy{Purpose: "sign-anything"}, []string{"unknown purpose"}},
		{"negative skew", Policy{Purpose: DPoP, Skew: -time.Second}, []string{"Skew -1s must not be negative"}},
		{"fractional skew", Policy{Purpose: DPoP, Skew: 1500 * time.Millisecond}, []string{"whole number of seconds"}},
		{"dpop with assertion fields", Policy{Purpose: DPoP, ClientID: "c", Audience: "https://a", Typ: ptr(""), MaxLifetime: time.Minute, DefaultLifetime: time.Second, Issuers: []string{"i"}},
			[]string{"ClientID does not apply", "Audience does not apply", "Typ does not apply", "MaxLifetime does not apply", "DefaultLifetime does not apply", "Issuers does not apply"}},
		{"assertion without client and audience", Policy{Purpose: ClientAssertion}, []string{"needs a ClientID", "needs an Audience"}},
		{"assertion audience relative", Policy{Purpose: ClientAssertion, ClientID: "c", Audience: "/token"}, []string{"absolute https or http URL"}},
		{"assertion audience not http", Policy{Purpose: ClientAssertion, ClientID: "c", Audience: "urn:example:as"}, []string{"absolute https or http URL"}},
		{"assertion audience no host", Policy{Purpose: ClientAssertion, ClientID: "c", Audience: "https:///x"}, []string{"absolute https or http URL"}},
		{"assertion audience fragment", Policy{Purpose: ClientAssertion, ClientID: "c", Audience: "https://as.example/#x"}, []string{"fragment"}},
		{"assertion client id control", Policy{Purpose: ClientAssertion, ClientID: "c\n", Audience: "https://as.example"}, []string{"printable"}},
		{"assertion bad typ", Policy{Purpose: ClientAssertion, ClientID: "c", Audience: "https://as.example", Typ: ptr("a b")}, []string{"Typ"}},
		{"assertion default over max", Policy{Purpose: ClientAssertion, ClientID: "c", Audience: "https://as.example", MaxLifetime: time.Minute, DefaultLifetime: 2 * time.Minute}, []string{"must not exceed MaxLifetime"}},
		{"assertion with issuers", Policy{Purpose: ClientAssertion, ClientID: "c", Audience: "https://as.example", Issuers: []string{"x"}}, []string{"Issuers does not apply"}},
		{"negative lifetimes", Policy{Purpose: ClientAssertion, ClientID: "c", Audience: "https://as.example", MaxLifetime: -time.Minute, DefaultLifetime: -time.Second}, []string{"MaxLifetime -1m0s must not be negative", "DefaultLifetime -1s must not be negative"}},
		{"jwt without issuers", Policy{Purpose: JWT}, []string{"at least one entry in Issuers"}},
		{"jwt empty and duplicate issuer", Policy{Purpose: JWT, Issuers: []string{"", "a", "a"}}, []string{"empty string", `lists "a" twice`}},
		{"jwt with assertion fields", Policy{Purpose: JWT, Issuers: []string{"a"}, ClientID: "c", Audience: "https://a", Typ: ptr("x"), DefaultLifetime: time.Minute},
			[]string{"ClientID does not apply", "Audience does not apply", "Typ does not apply", "DefaultLifetime (a jwt must carry its own exp) does not apply"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.p.Validate()
			if err == nil {
				t.Fatal("Validate succeeded")
			}
			if errors.Is(err, ErrViolation) {
				t.Errorf("a configuration error is a violation: %v", err)
			}
			var n int
			if j, ok := err.(interface{ Unwrap() []error }); ok {
				n = len(j.Unwrap())
			} else {
				n = 1
			}
			if n != len(tc.want) {
				t.Errorf("%d errors, want %d: %v", n, len(tc.want), err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func TestPrepareGolden(t *testing.T) {
	for _, tc := range []struct {
		name           string
		p              Policy
		header, claims string
		wantHeader     string
		wantClaims     string
		wantSummary    Summary
	}{
		{
			name:       "dpop",
			p:          dpopPolicy,
			claims:     `{"htm":"POST","htu":"https://server.example.com/token"}`,
			wantHeader: `{"typ":"dpop+jwt","alg":"ES256","jwk":` + testJWK + `}`,
			wantClaims: `{"htm":"POST","htu":"https://server.example.com/token","iat":1700000000,"jti":"AAECAwQFBgcICQoLDA0ODw"}`,
			wantSummary: Summary{Htm: "POST", Htu: "https://server.example.com/token",
				Jti: firstJTI, Iat: 1700000000},
		},
		{
			name:       "dpop with ath, nonce, jti and iat",
			p:          dpopPolicy,
			claims:     `{"htu":"https://resource.example.org/protected","htm":"GET","ath":"` + validATH + `","nonce":"eyJ7S_zG.eyJH0-Z.HX4w-7v","jti":"e1j3V_bKic8-LAEB","iat":1699999990}`,
			wantHeader: `{"typ":"dpop+jwt","alg":"ES256","jwk":` + testJWK + `}`,
			wantClaims: `{"ath":"` + validATH + `","htm":"GET","htu":"https://resource.example.org/protected","iat":1699999990,"jti":"e1j3V_bKic8-LAEB","nonce":"eyJ7S_zG.eyJH0-Z.HX4w-7v"}`,
			wantSummary: Summary{Htm: "GET", Htu: "https://resource.example.org/protected", Ath: validATH,
				HasNonce: true, Jti: "e1j3V_bKic8-LAEB", Iat: 1699999990},
		},
		{
			name:       "client assertion from nothing",
			p:          assertionPolicy,
			wantHeader: `{"alg":"ES256","kid":"` + testKid + `","typ":"client-authentication+jwt"}`,
			wantClaims: `{"aud":"https://server.example.com","exp":1700000060,"iat":1700000000,"iss":"s6BhdRkqt3","jti":"AAECAwQFBgcICQoLDA0ODw","sub":"s6BhdRkqt3"}`,
			wantSummary: Summary{Iss: "s6BhdRkqt3", Sub: "s6BhdRkqt3", Aud: []string{"https://server.example.com"},
				Jti: firstJTI, Iat: 1700000000, Exp: 1700000060},
		},
		{
			name: "client assertion without typ, caller's values",
			p: Policy{Purpose: ClientAssertion, ClientID: "s6BhdRkqt3", Audience: "https://server.example.com",
				Typ: ptr(""), MaxLifetime: 10 * time.Minute, DefaultLifetime: 2 * time.Minute},
			header:     ` {} `,
			claims:     `{"iss":"s6BhdRkqt3","sub":"s6BhdRkqt3","aud":"https://server.example.com","exp":1700000600,"nbf":1700000000,"jti":"id-1"}`,
			wantHeader: `{"alg":"ES256","kid":"` + testKid + `"}`,
			wantClaims: `{"aud":"https://server.example.com","exp":1700000600,"iat":1700000000,"iss":"s6BhdRkqt3","jti":"id-1","nbf":1700000000,"sub":"s6BhdRkqt3"}`,
			wantSummary: Summary{Iss: "s6BhdRkqt3", Sub: "s6BhdRkqt3", Aud: []string{"https://server.example.com"},
				Jti: "id-1", Iat: 1700000000, Exp: 1700000600},
		},
		{
			name:       "client assertion default lifetime",
			p:          Policy{Purpose: ClientAssertion, ClientID: "c", Audience: "https://as.example", DefaultLifetime: 45 * time.Second},
			claims:     `{}`,
			wantHeader: `{"alg":"ES256","kid":"` + testKid + `","typ":"client-authentication+jwt"}`,
			wantClaims: `{"aud":"https://as.example","exp":1700000045,"iat":1700000000,"iss":"c","jti":"AAECAwQFBgcICQoLDA0ODw","sub":"c"}`,
			wantSummary: Summary{Iss: "c", Sub: "c", Aud: []string{"https://as.example"},
				Jti: firstJTI, Iat: 1700000000, Exp: 1700000045},
		},
		{
			name:       "jwt id token",
			p:          jwtPolicy,
			header:     `{"typ":"JWT"}`,
			claims:     `{"iss":"https://op.example.com","sub":"alice","aud":["rp1","rp2"],"exp":1700000300,"nonce":"n-0S6_WzA2Mj","auth_time":1699999000,"azp":"rp1","name":"<Alice & Bob>","custom":{"x":[1,2.50,1e3,12345678901234567890]}}`,
			wantHeader: `{"alg":"ES256","kid":"` + testKid + `","typ":"JWT"}`,
			wantClaims: `{"aud":["rp1","rp2"],"auth_time":1699999000,"azp":"rp1","custom":{"x":[1,2.50,1e3,12345678901234567890]},"exp":1700000300,"iat":1700000000,"iss":"https://op.example.com","jti":"AAECAwQFBgcICQoLDA0ODw","name":"<Alice & Bob>","nonce":"n-0S6_WzA2Mj","sub":"alice"}`,
			wantSummary: Summary{Iss: "https://op.example.com", Sub: "alice", Aud: []string{"rp1", "rp2"},
				Jti: firstJTI, Iat: 1700000000, Exp: 1700000300},
		},
		{
			name:       "jwt without typ",
			p:          jwtPolicy,
			claims:     `{"iss":"https://op2.example.com","aud":"rp","exp":1700000001}`,
			wantHeader: `{"alg":"ES256","kid":"` + testKid + `"}`,
			wantClaims: `{"aud":"rp","exp":1700000001,"iat":1700000000,"iss":"https://op2.example.com","jti":"AAECAwQFBgcICQoLDA0ODw"}`,
			wantSummary: Summary{Iss: "https://op2.example.com", Aud: []string{"rp"},
				Jti: firstJTI, Iat: 1700000000, Exp: 1700000001},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := tc.p.Prepare(now, testKey, []byte(tc.header), []byte(tc.claims), &seqReader{})
			if err != nil {
				t.Fatal(err)
			}
			if string(tok.Header) != tc.wantHeader {
				t.Errorf("header\n got %s\nwant %s", tok.Header, tc.wantHeader)
			}
			if string(tok.Claims) != tc.wantClaims {
				t.Errorf("claims\n got %s\nwant %s", tok.Claims, tc.wantClaims)
			}
			if !reflect.DeepEqual(tok.Summary, tc.wantSummary) {
				t.Errorf("summary\n got %+v\nwant %+v", tok.Summary, tc.wantSummary)
			}
			// What Prepare made, CheckPrebuilt accepts, with the same summary.
			sum, err := tc.p.CheckPrebuilt(now, testKey, tok.Header, tok.Claims)
			if err != nil {
				t.Fatalf("CheckPrebuilt of Prepare's output: %v", err)
			}
			if !reflect.DeepEqual(sum, tc.wantSummary) {
				t.Errorf("CheckPrebuilt summary\n got %+v\nwant %+v", sum, tc.wantSummary)
			}
		})
	}
}

func TestPrepareDPoPHeaderHasPublicJWKOnly(t *testing.T) {
	pretty := Key{Alg: "ES256", JWK: []byte("{\n  \"kty\": \"EC\",\n  \"crv\": \"P-256\",\n  \"x\": \"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs\",\n  \"y\": \"9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA\"\n}\n")}
	tok, err := dpopPolicy.Prepare(now, pretty, nil, []byte(`{"htm":"GET","htu":"https://rs.example/"}`), nil)
	if err != nil {
		t.Fatal(err)
	}
	var h struct {
		Typ string                     `json:"typ"`
		Alg string                     `json:"alg"`
		JWK map[string]json.RawMessage `json:"jwk"`
	}
	if err := json.Unmarshal(tok.Header, &h); err != nil {
		t.Fatal(err)
	}
	if h.Typ != "dpop+jwt" || h.Alg != "ES256" {
		t.Errorf("header %s", tok.Header)
	}
	if len(h.JWK) != 4 || string(h.JWK["x"]) != `"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs"` {
		t.Errorf("jwk %s", tok.Header)
	}
	for _, m := range privateJWKMembers {
		if _, ok := h.JWK[m]; ok {
			t.Errorf("header jwk has private member %q", m)
		}
	}
	if bytes.ContainsAny(tok.Header, "\n ") {
		t.Errorf("header not compact: %s", tok.Header)
	}
	// The crypto/rand jti is 22 base64url characters.
	var c struct{ Jti string }
	if err := json.Unmarshal(tok.Claims, &c); err != nil || len(c.Jti) != 22 {
		t.Errorf("jti %q, %v", c.Jti, err)
	}
}

// TestPrepareFreshJTI: every call makes a new jti.
func TestPrepareFreshJTI(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		tok, err := dpopPolicy.Prepare(now, testKey, nil, []byte(`{"htm":"GET","htu":"https://rs.example/"}`), nil)
		if err != nil {
			t.Fatal(err)
		}
		if seen[tok.Summary.Jti] {
			t.Fatalf("jti %q repeated", tok.Summary.Jti)
		}
		seen[tok.Summary.Jti] = true
	}
}

func TestPrepareKeyErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    Policy
		k    Key
	}{
		{"alg none", assertionPolicy, Key{Alg: "none", Kid: testKid}},
		{"alg HS256", assertionPolicy, Key{Alg: "HS256", Kid: testKid}},
		{"alg empty", dpopPolicy, Key{JWK: []byte(testJWK)}},
		{"no kid", assertionPolicy, Key{Alg: "ES256"}},
		{"kid with space", jwtPolicy, Key{Alg: "ES256", Kid: "a b"}},
		{"dpop without jwk", dpopPolicy, Key{Alg: "ES256", Kid: testKid}},
		{"jwk not json", dpopPolicy, Key{Alg: "ES256", JWK: []byte(`{"kty":`)}},
		{"jwk with d", dpopPolicy, Key{Alg: "ES256", JWK: []byte(`{"kty":"EC","crv":"P-256","x":"a","y":"b","d":"c"}`)}},
		{"jwk with k", assertionPolicy, Key{Alg: "ES256", Kid: testKid, JWK: []byte(`{"kty":"EC","crv":"P-256","x":"a","y":"b","k":"c"}`)}},
		{"jwk kty mismatch", dpopPolicy, Key{Alg: "RS256", JWK: []byte(testJWK)}},
		{"jwk crv mismatch", dpopPolicy, Key{Alg: "ES384", JWK: []byte(testJWK)}},
		{"jwk lacks y", dpopPolicy, Key{Alg: "ES256", JWK: []byte(`{"kty":"EC","crv":"P-256","x":"a"}`)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			claims := []byte(`{"htm":"GET","htu":"https://rs.example/","iss":"https://op.example.com","exp":` + at(60) + `}`)
			if tc.p.Purpose != DPoP {
				claims = nil
				if tc.p.Purpose == JWT {
					claims = []byte(`{"iss":"https://op.example.com","exp":` + at(60) + `}`)
				}
			}
			_, err := tc.p.Prepare(now, tc.k, nil, claims, nil)
			if !errors.Is(err, ErrInvalidKey) || errors.Is(err, ErrViolation) {
				t.Errorf("Prepare: err = %v, want ErrInvalidKey", err)
			}
			_, err = tc.p.CheckPrebuilt(now, tc.k, []byte(`{}`), claims)
			if !errors.Is(err, ErrInvalidKey) {
				t.Errorf("CheckPrebuilt: err = %v, want ErrInvalidKey", err)
			}
		})
	}
	// The other algorithms and their JWKs are accepted.
	for _, k := range []Key{
		{Alg: "ES384", JWK: []byte(`{"kty":"EC","crv":"P-384","x":"a","y":"b"}`)},
		{Alg: "RS256", JWK: []byte(`{"kty":"RSA","n":"a","e":"AQAB"}`)},
		{Alg: "PS256", JWK: []byte(`{"kty":"RSA","n":"a","e":"AQAB"}`)},
		{Alg: "EdDSA", JWK: []byte(`{"kty":"OKP","crv":"Ed25519","x":"a"}`)},
	} {
		if _, err := dpopPolicy.Prepare(now, k, nil, []byte(`{"htm":"GET","htu":"https://rs.example/"}`), nil); err != nil {
			t.Errorf("%s: %v", k.Alg, err)
		}
	}
}

func TestPrepareOtherErrors(t *testing.T) {
	_, err := Policy{Purpose: JWT}.Prepare(now, testKey, nil, []byte(`{"iss":"x","exp":`+at(60)+`}`), nil)
	if err == nil || errors.Is(err, ErrViolation) || !strings.Contains(err.Error(), "Issuers") {
		t.Errorf("invalid policy: err = %v", err)
	}
	_, err = assertionPolicy.Prepare(now, testKey, nil, nil, iotest.ErrReader(errors.New("entropy gone")))
	if err == nil || errors.Is(err, ErrViolation) || !strings.Contains(err.Error(), "entropy gone") {
		t.Errorf("failing rand: err = %v", err)
	}
	_, err = Policy{Purpose: JWT}.CheckPrebuilt(now, testKey, nil, nil)
	if err == nil || errors.Is(err, ErrViolation) {
		t.Errorf("CheckPrebuilt with invalid policy: err = %v", err)
	}
}

type prepareCase struct {
	name           string
	p              Policy
	header, claims string
	claim          string // the violated claim; "" when accepted
}

func runPrepareCases(t *testing.T, cases []prepareCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := tc.p.Prepare(now, testKey, []byte(tc.header), []byte(tc.claims), &seqReader{})
			if tc.claim != "" {
				wantViolation(t, err, tc.claim)
				return
			}
			if err != nil {
				t.Fatalf("Prepare: %v", err)
			}
			if _, err := tc.p.CheckPrebuilt(now, testKey, tok.Header, tok.Claims); err != nil {
				t.Fatalf("CheckPrebuilt of Prepare's output: %v", err)
			}
		})
	}
}

func TestPrepareJSON(t *testing.T) {
	big := `{"iss":"https://op.example.com","exp":` + at(60) + `,"x":"` + strings.Repeat("a", MaxJSONSize) + `"}`
	almost := `{"iss":"https://op.example.com","exp":` + at(60) + `,"x":"` + strings.Repeat("a", MaxJSONSize-80) + `"}`
	deep := `{"iss":"https://op.example.com","exp":` + at(60) + `,"x":` + strings.Repeat("[", 40) + strings.Repeat("]", 40) + `}`
	jwtOK := `"iss":"https://op.example.com","exp":` + at(60)
	runPrepareCases(t, []prepareCase{
		{"empty header and claims", assertionPolicy, "", "", ""},
		{"whitespace header and claims", assertionPolicy, " \n\t", "\r\n ", ""},
		{"empty objects", assertionPolicy, "{}", "{ }", ""},
		{"claims array", assertionPolicy, "", `[]`, "claims"},
		{"claims string", assertionPolicy, "", `"iss"`, "claims"},
		{"claims null", assertionPolicy, "", `null`, "claims"},
		{"claims truncated", assertionPolicy, "", `{"iss":`, "claims"},
		{"claims two objects", assertionPolicy, "", `{}{}`, "claims"},
		{"claims trailing garbage", assertionPolicy, "", `{} x`, "claims"},
		{"claims trailing comma", assertionPolicy, "", `{"jti":"a",}`, "claims"},
		{"claims invalid UTF-8", jwtPolicy, "", `{` + jwtOK + `,"x":"` + "\xff" + `"}`, "claims"},
		{"claims too big", jwtPolicy, "", big, "claims"},
		{"claims too big once completed", jwtPolicy, "", almost, "claims"},
		{"claims duplicate", assertionPolicy, "", `{"jti":"a","jti":"b"}`, "jti"},
		{"claims duplicate by escape", assertionPolicy, "", `{"aud":"https://server.example.com","\u0061ud":"https://attacker.example"}`, "aud"},
		{"claims nested duplicate", jwtPolicy, "", `{` + jwtOK + `,"x":{"a":1,"a":2}}`, "x"},
		{"claims nested too deep", jwtPolicy, "", deep, "x"},
		{"header array", jwtPolicy, `[{"typ":"JWT"}]`, `{` + jwtOK + `}`, "header"},
		{"header invalid", jwtPolicy, `{"typ"}`, `{` + jwtOK + `}`, "header"},
		{"header duplicate", jwtPolicy, `{"typ":"JWT","typ":"at+jwt"}`, `{` + jwtOK + `}`, "header.typ"},
		{"header too big", jwtPolicy, `{"typ":"` + strings.Repeat("a", MaxJSONSize) + `"}`, `{` + jwtOK + `}`, "header"},
	})
}

func TestPrepareHeader(t *testing.T) {
	dpopClaims := `{"htm":"GET","htu":"https://rs.example/"}`
	jwtClaims := `{"iss":"https://op.example.com","exp":` + at(60) + `}`
	var cases []prepareCase
	for _, name := range []string{"alg", "jwk", "kid", "typ", "jku", "x5u", "x5c", "x5t", "x5t#S256", "crit", "b64", "zip", "enc", "cty", "nonce", "foo"} {
		cases = append(cases,
			prepareCase{"dpop " + name, dpopPolicy, `{"` + name + `":"x"}`, dpopClaims, "header." + name},
			prepareCase{"client_assertion " + name, assertionPolicy, `{"` + name + `":"x"}`, "", "header." + name})
		if name != "typ" {
			cases = append(cases, prepareCase{"jwt " + name, jwtPolicy, `{"` + name + `":"x"}`, jwtClaims, "header." + name})
		}
	}
	cases = append(cases,
		prepareCase{"dpop typ dpop+jwt", dpopPolicy, `{"typ":"dpop+jwt"}`, dpopClaims, "header.typ"},
		prepareCase{"dpop alg none", dpopPolicy, `{"alg":"none"}`, dpopClaims, "header.alg"},
		prepareCase{"jwt typ JWT", jwtPolicy, `{"typ":"JWT"}`, jwtClaims, ""},
		prepareCase{"jwt typ at+jwt", jwtPolicy, `{"typ":"at+jwt"}`, jwtClaims, ""},
		prepareCase{"jwt typ 64 chars", jwtPolicy, `{"typ":"` + strings.Repeat("t", 64) + `"}`, jwtClaims, ""},
		prepareCase{"jwt typ 65 chars", jwtPolicy, `{"typ":"` + strings.Repeat("t", 65) + `"}`, jwtClaims, "header.typ"},
		prepareCase{"jwt typ empty", jwtPolicy, `{"typ":""}`, jwtClaims, "header.typ"},
		prepareCase{"jwt typ space", jwtPolicy, `{"typ":"a b"}`, jwtClaims, "header.typ"},
		prepareCase{"jwt typ non-ASCII", jwtPolicy, `{"typ":"jwté"}`, jwtClaims, "header.typ"},
		prepareCase{"jwt typ number", jwtPolicy, `{"typ":1}`, jwtClaims, "header.typ"},
		prepareCase{"jwt typ dpop", jwtPolicy, `{"typ":"dpop+jwt"}`, jwtClaims, "header.typ"},
		prepareCase{"jwt typ DPoP upper", jwtPolicy, `{"typ":"DPoP+JWT"}`, jwtClaims, "header.typ"},
		prepareCase{"jwt typ assertion", jwtPolicy, `{"typ":"application/client-authentication+jwt"}`, jwtClaims, "header.typ"},
	)
	runPrepareCases(t, cases)
}

func TestPrepareCommonClaims(t *testing.T) {
	var cases []prepareCase
	for _, pc := range []struct {
		p    Policy
		base string // claims that make the rest valid, ending in a member
	}{
		{dpopPolicy, `"htm":"GET","htu":"https://rs.example/"`},
		{assertionPolicy, `"exp":` + at(120)},
		{jwtPolicy, `"iss":"https://op.example.com","exp":` + at(120)},
	} {
		add := func(name, member, claim string) {
			cases = append(cases, prepareCase{string(pc.p.Purpose) + " " + name, pc.p, "", "{" + pc.base + "," + member + "}", claim})
		}
		add("iat now", `"iat":`+at(0), "")
		add("iat now+skew", `"iat":`+at(60), "")
		add("iat now-skew", `"iat":`+at(-60), "")
		add("iat now+skew+1", `"iat":`+at(61), "iat")
		add("iat now-skew-1", `"iat":`+at(-61), "iat")
		add("iat string", `"iat":"`+at(0)+`"`, "iat")
		add("iat fraction", `"iat":`+at(0)+`.0`, "iat")
		add("iat exponent", `"iat":1.7e9`, "iat")
		add("iat huge exponent", `"iat":1e400`, "iat")
		add("iat beyond int64", `"iat":99999999999999999999`, "iat")
		add("iat min int64", `"iat":-9223372036854775808`, "iat")
		add("iat bool", `"iat":true`, "iat")
		add("iat null", `"iat":null`, "iat")
		add("iat object", `"iat":{}`, "iat")
		add("jti given", `"jti":"abc-123_~.XYZ"`, "")
		add("jti 64", `"jti":"`+strings.Repeat("j", 64)+`"`, "")
		add("jti 65", `"jti":"`+strings.Repeat("j", 65)+`"`, "jti")
		add("jti empty", `"jti":""`, "jti")
		add("jti space", `"jti":"a b"`, "jti")
		add("jti control", `"jti":"a\u0000b"`, "jti")
		add("jti non-ASCII", `"jti":"jé"`, "jti")
		add("jti number", `"jti":12345`, "jti")
		add("jti null", `"jti":null`, "jti")
	}
	cases = append(cases,
		prepareCase{"wider skew", Policy{Purpose: DPoP, Skew: 5 * time.Minute}, "", `{"htm":"GET","htu":"https://rs.example/","iat":` + at(-300) + `}`, ""},
		prepareCase{"wider skew exceeded", Policy{Purpose: DPoP, Skew: 5 * time.Minute}, "", `{"htm":"GET","htu":"https://rs.example/","iat":` + at(301) + `}`, "iat"},
	)
	runPrepareCases(t, cases)
}

func TestPrepareDPoP(t *testing.T) {
	p := dpopPolicy
	c := func(htm, htu, extra string) string {
		s := `{"htm":` + htm + `,"htu":` + htu
		if extra != "" {
			s += "," + extra
		}
		return s + "}"
	}
	const get, htu = `"GET"`, `"https://server.example.com/token"`
	runPrepareCases(t, []prepareCase{
		{"minimal", p, "", c(get, htu, ""), ""},
		{"empty claims", p, "", ``, "htm"},
		{"htm missing", p, "", `{"htu":` + htu + `}`, "htm"},
		{"htu missing", p, "", `{"htm":"POST"}`, "htu"},
		{"htm PATCH", p, "", c(`"PATCH"`, htu, ""), ""},
		{"htm M-SEARCH", p, "", c(`"M-SEARCH"`, htu, ""), ""},
		{"htm 32", p, "", c(`"`+strings.Repeat("X", 32)+`"`, htu, ""), ""},
		{"htm 33", p, "", c(`"`+strings.Repeat("X", 33)+`"`, htu, ""), "htm"},
		{"htm empty", p, "", c(`""`, htu, ""), "htm"},
		{"htm space", p, "", c(`"GE T"`, htu, ""), "htm"},
		{"htm separator", p, "", c(`"GET/"`, htu, ""), "htm"},
		{"htm number", p, "", c(`1`, htu, ""), "htm"},
		{"htu uppercase kept", p, "", c(get, `"HTTPS://Server.Example.COM/Token"`, ""), ""},
		{"htu http port", p, "", c(get, `"http://localhost:8080/realms/x/protocol/openid-connect/token"`, ""), ""},
		{"htu ipv6", p, "", c(get, `"http://[::1]:8080/x"`, ""), ""},
		{"htu escaped path", p, "", c(get, `"https://rs.example/a%20b/%C3%A9"`, ""), ""},
		{"htu query", p, "", c(get, `"https://rs.example/x?a=1"`, ""), "htu"},
		{"htu empty query", p, "", c(get, `"https://rs.example/x?"`, ""), "htu"},
		{"htu fragment", p, "", c(get, `"https://rs.example/x#f"`, ""), "htu"},
		{"htu userinfo", p, "", c(get, `"https://user:pass@rs.example/x"`, ""), "htu"},
		{"htu ftp", p, "", c(get, `"ftp://rs.example/x"`, ""), "htu"},
		{"htu relative", p, "", c(get, `"/token"`, ""), "htu"},
		{"htu scheme-relative", p, "", c(get, `"//rs.example/token"`, ""), "htu"},
		{"htu opaque", p, "", c(get, `"https:rs.example/token"`, ""), "htu"},
		{"htu no host", p, "", c(get, `"https:///token"`, ""), "htu"},
		{"htu scheme only", p, "", c(get, `"https://"`, ""), "htu"},
		{"htu empty", p, "", c(get, `""`, ""), "htu"},
		{"htu space", p, "", c(get, `"https://rs.example/a b"`, ""), "htu"},
		{"htu tab", p, "", c(get, `"https://rs.example/a\tb"`, ""), "htu"},
		{"htu newline", p, "", c(get, `"https://rs.example/a\r\nHost: evil"`, ""), "htu"},
		{"htu DEL", p, "", c(get, `"https://rs.example/a\u007f"`, ""), "htu"},
		{"htu non-ASCII", p, "", c(get, `"https://rs.example/é"`, ""), "htu"},
		{"htu bad escape", p, "", c(get, `"https://rs.example/%zz"`, ""), "htu"},
		{"htu bad port", p, "", c(get, `"https://rs.example:99999/"`, ""), "htu"},
		{"htu port zero", p, "", c(get, `"https://rs.example:0/"`, ""), "htu"},
		{"htu bad host char", p, "", c(get, `"https://rs!example/"`, ""), "htu"},
		{"htu 2048", p, "", c(get, `"https://rs.example/`+strings.Repeat("a", 2048-len("https://rs.example/"))+`"`, ""), ""},
		{"htu 2049", p, "", c(get, `"https://rs.example/`+strings.Repeat("a", 2049-len("https://rs.example/"))+`"`, ""), "htu"},
		{"htu number", p, "", c(get, `42`, ""), "htu"},
		{"htu array", p, "", c(get, `["https://rs.example/"]`, ""), "htu"},
		{"ath", p, "", c(get, htu, `"ath":"`+validATH+`"`), ""},
		{"ath 42", p, "", c(get, htu, `"ath":"`+validATH[:42]+`"`), "ath"},
		{"ath 44", p, "", c(get, htu, `"ath":"`+validATH+`A"`), "ath"},
		{"ath padded", p, "", c(get, htu, `"ath":"`+validATH+`="`), "ath"},
		{"ath std alphabet", p, "", c(get, htu, `"ath":"`+strings.Repeat("+", 42)+`A"`), "ath"},
		{"ath non-canonical", p, "", c(get, htu, `"ath":"`+strings.Repeat("A", 42)+`B"`), "ath"},
		{"ath number", p, "", c(get, htu, `"ath":1`), "ath"},
		{"nonce", p, "", c(get, htu, `"nonce":"eyJ7S_zG.eyJH0-Z.HX4w-7v"`), ""},
		{"nonce 512", p, "", c(get, htu, `"nonce":"`+strings.Repeat("n", 512)+`"`), ""},
		{"nonce 513", p, "", c(get, htu, `"nonce":"`+strings.Repeat("n", 513)+`"`), "nonce"},
		{"nonce empty", p, "", c(get, htu, `"nonce":""`), "nonce"},
		{"nonce space", p, "", c(get, htu, `"nonce":"a b"`), "nonce"},
		{"nonce quote", p, "", c(get, htu, `"nonce":"a\"b"`), "nonce"},
		{"nonce backslash", p, "", c(get, htu, `"nonce":"a\\b"`), "nonce"},
		{"nonce object", p, "", c(get, htu, `"nonce":{}`), "nonce"},
		{"exp", p, "", c(get, htu, `"exp":`+at(60)), "exp"},
		{"iss", p, "", c(get, htu, `"iss":"s6BhdRkqt3"`), "iss"},
		{"sub", p, "", c(get, htu, `"sub":"s6BhdRkqt3"`), "sub"},
		{"aud", p, "", c(get, htu, `"aud":"https://server.example.com"`), "aud"},
		{"nbf", p, "", c(get, htu, `"nbf":`+at(0)), "nbf"},
		{"custom", p, "", c(get, htu, `"foo":"bar"`), "foo"},
		{"unknown first", p, "", `{"zzz":1,"htm":""}`, "zzz"},
	})
}

func TestPrepareClientAssertion(t *testing.T) {
	p := assertionPolicy
	long := Policy{Purpose: ClientAssertion, ClientID: "s6BhdRkqt3", Audience: "https://server.example.com", MaxLifetime: 10 * time.Minute}
	runPrepareCases(t, []prepareCase{
		{"iss and sub given", p, "", `{"iss":"s6BhdRkqt3","sub":"s6BhdRkqt3"}`, ""},
		{"iss other", p, "", `{"iss":"attacker"}`, "iss"},
		{"sub other", p, "", `{"sub":"attacker"}`, "sub"},
		{"iss number", p, "", `{"iss":1}`, "iss"},
		{"sub empty", p, "", `{"sub":""}`, "sub"},
		{"aud given", p, "", `{"aud":"https://server.example.com"}`, ""},
		{"aud other", p, "", `{"aud":"https://attacker.example"}`, "aud"},
		{"aud token endpoint", p, "", `{"aud":"https://server.example.com/token"}`, "aud"},
		{"aud array of one", p, "", `{"aud":["https://server.example.com"]}`, "aud"},
		{"aud array of two", p, "", `{"aud":["https://server.example.com","https://attacker.example"]}`, "aud"},
		{"aud empty array", p, "", `{"aud":[]}`, "aud"},
		{"aud number", p, "", `{"aud":1}`, "aud"},
		{"aud null", p, "", `{"aud":null}`, "aud"},
		{"exp max", p, "", `{"exp":` + at(300) + `}`, ""},
		{"exp max+1", p, "", `{"exp":` + at(301) + `}`, "exp"},
		{"exp now+1", p, "", `{"exp":` + at(1) + `}`, ""},
		{"exp now", p, "", `{"exp":` + at(0) + `}`, "exp"},
		{"exp past", p, "", `{"exp":` + at(-100) + `}`, "exp"},
		{"exp far future", p, "", `{"exp":9223372036854775807}`, "exp"},
		{"exp min int64", p, "", `{"exp":-9223372036854775808}`, "exp"},
		{"exp string", p, "", `{"exp":"` + at(60) + `"}`, "exp"},
		{"exp fraction", p, "", `{"exp":` + at(60) + `.5}`, "exp"},
		{"exp longer policy", long, "", `{"exp":` + at(600) + `}`, ""},
		{"exp longer policy exceeded", long, "", `{"exp":` + at(601) + `}`, "exp"},
		{"exp before iat", p, "", `{"iat":` + at(30) + `,"exp":` + at(20) + `}`, "exp"},
		{"filled exp not after iat", p, "", `{"iat":` + at(60) + `}`, "iat"},
		{"nbf now", p, "", `{"nbf":` + at(0) + `}`, ""},
		{"nbf past", p, "", `{"nbf":` + at(-3600) + `}`, ""},
		{"nbf within skew", p, "", `{"nbf":` + at(59) + `,"exp":` + at(120) + `}`, ""},
		{"nbf beyond skew", p, "", `{"nbf":` + at(61) + `,"exp":` + at(120) + `}`, "nbf"},
		{"nbf not before exp", p, "", `{"nbf":` + at(30) + `,"exp":` + at(30) + `}`, "nbf"},
		{"nbf string", p, "", `{"nbf":"0"}`, "nbf"},
		{"htm", p, "", `{"htm":"POST"}`, "htm"},
		{"htu", p, "", `{"htu":"https://server.example.com/token"}`, "htu"},
		{"ath", p, "", `{"ath":"` + validATH + `"}`, "ath"},
		{"nonce", p, "", `{"nonce":"n"}`, "nonce"},
		{"custom", p, "", `{"scope":"admin"}`, "scope"},
		{"cnf", p, "", `{"cnf":{"jkt":"x"}}`, "cnf"},
	})
}

func TestPrepareJWT(t *testing.T) {
	p := jwtPolicy
	exp := `"exp":` + at(300)
	iss := `"iss":"https://op.example.com"`
	runPrepareCases(t, []prepareCase{
		{"minimal", p, "", `{` + iss + `,` + exp + `}`, ""},
		{"second issuer", p, "", `{"iss":"https://op2.example.com",` + exp + `}`, ""},
		{"iss missing", p, "", `{` + exp + `}`, "iss"},
		{"iss other", p, "", `{"iss":"https://attacker.example",` + exp + `}`, "iss"},
		{"iss array", p, "", `{"iss":["https://op.example.com"],` + exp + `}`, "iss"},
		{"exp missing", p, "", `{` + iss + `}`, "exp"},
		{"exp max+1", p, "", `{` + iss + `,"exp":` + at(301) + `}`, "exp"},
		{"exp now", p, "", `{` + iss + `,"exp":` + at(0) + `}`, "exp"},
		{"exp float", p, "", `{` + iss + `,"exp":1.7e9}`, "exp"},
		{"exp longer policy", Policy{Purpose: JWT, Issuers: []string{"https://op.example.com"}, MaxLifetime: time.Hour}, "", `{` + iss + `,"exp":` + at(3600) + `}`, ""},
		{"sub", p, "", `{` + iss + `,` + exp + `,"sub":"248289761001"}`, ""},
		{"sub number", p, "", `{` + iss + `,` + exp + `,"sub":248289761001}`, "sub"},
		{"aud string", p, "", `{` + iss + `,` + exp + `,"aud":"s6BhdRkqt3"}`, ""},
		{"aud array", p, "", `{` + iss + `,` + exp + `,"aud":["a","b"]}`, ""},
		{"aud empty array", p, "", `{` + iss + `,` + exp + `,"aud":[]}`, "aud"},
		{"aud array with number", p, "", `{` + iss + `,` + exp + `,"aud":["a",1]}`, "aud"},
		{"aud object", p, "", `{` + iss + `,` + exp + `,"aud":{}}`, "aud"},
		{"nbf", p, "", `{` + iss + `,` + exp + `,"nbf":` + at(0) + `}`, ""},
		{"nbf future", p, "", `{` + iss + `,` + exp + `,"nbf":` + at(61) + `}`, "nbf"},
		{"exp before iat", p, "", `{` + iss + `,"exp":` + at(10) + `,"iat":` + at(20) + `}`, "exp"},
		{"custom claims", p, "", `{` + iss + `,` + exp + `,"nonce":"n","auth_time":1,"azp":"x","at_hash":"y","acr":null,"amr":["pwd"],"email_verified":true,"address":{"country":"x"}}`, ""},
	})
}

func TestCheckPrebuilt(t *testing.T) {
	dpopClaims := `{"htm":"GET","htu":"https://rs.example/","iat":` + at(0) + `,"jti":"j1"}`
	assertionClaims := `{"iss":"s6BhdRkqt3","sub":"s6BhdRkqt3","aud":"https://server.example.com","exp":` + at(60) + `,"iat":` + at(0) + `,"jti":"j1"}`
	jwtClaims := `{"iss":"https://op.example.com","exp":` + at(60) + `,"iat":` + at(0) + `,"jti":"j1"}`
	dpopHeader := `{"typ":"dpop+jwt","alg":"ES256","jwk":` + testJWK + `}`
	assertionHeader := `{"alg":"ES256","kid":"` + testKid + `","typ":"client-authentication+jwt"}`
	noTyp := Policy{Purpose: ClientAssertion, ClientID: "s6BhdRkqt3", Audience: "https://server.example.com", Typ: ptr("")}
	for _, tc := range []struct {
		name           string
		p              Policy
		k              Key
		header, claims string
		claim          string
	}{
		{"dpop", dpopPolicy, testKey, dpopHeader, dpopClaims, ""},
		{"dpop reordered, jwk members reordered", dpopPolicy, testKey,
			`{"jwk":{"y":"9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA","crv":"P-256","x":"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs","kty":"EC"},"alg":"ES256","typ":"dpop+jwt"}`, dpopClaims, ""},
		{"dpop extra param", dpopPolicy, testKey, `{"typ":"dpop+jwt","alg":"ES256","jwk":` + testJWK + `,"x5c":["MII"]}`, dpopClaims, "header.x5c"},
		{"dpop kid", dpopPolicy, testKey, `{"typ":"dpop+jwt","alg":"ES256","jwk":` + testJWK + `,"kid":"` + testKid + `"}`, dpopClaims, "header.kid"},
		{"dpop other jwk", dpopPolicy, testKey, `{"typ":"dpop+jwt","alg":"ES256","jwk":` + otherJWK + `}`, dpopClaims, "header.jwk"},
		{"dpop jwk with d", dpopPolicy, testKey, `{"typ":"dpop+jwt","alg":"ES256","jwk":` + strings.TrimSuffix(testJWK, "}") + `,"d":"x"}}`, dpopClaims, "header.jwk"},
		{"dpop jwk string", dpopPolicy, testKey, `{"typ":"dpop+jwt","alg":"ES256","jwk":"` + testKid + `"}`, dpopClaims, "header.jwk"},
		{"dpop no jwk", dpopPolicy, testKey, `{"typ":"dpop+jwt","alg":"ES256"}`, dpopClaims, "header.jwk"},
		{"dpop no typ", dpopPolicy, testKey, `{"alg":"ES256","jwk":` + testJWK + `}`, dpopClaims, "header.typ"},
		{"dpop wrong typ", dpopPolicy, testKey, `{"typ":"JWT","alg":"ES256","jwk":` + testJWK + `}`, dpopClaims, "header.typ"},
		{"dpop alg mismatch", dpopPolicy, testKey, `{"typ":"dpop+jwt","alg":"ES384","jwk":` + testJWK + `}`, dpopClaims, "header.alg"},
		{"dpop alg none", dpopPolicy, testKey, `{"typ":"dpop+jwt","alg":"none","jwk":` + testJWK + `}`, dpopClaims, "header.alg"},
		{"dpop alg number", dpopPolicy, testKey, `{"typ":"dpop+jwt","alg":256,"jwk":` + testJWK + `}`, dpopClaims, "header.alg"},
		{"dpop missing jti", dpopPolicy, testKey, dpopHeader, `{"htm":"GET","htu":"https://rs.example/","iat":` + at(0) + `}`, "jti"},
		{"dpop missing iat", dpopPolicy, testKey, dpopHeader, `{"htm":"GET","htu":"https://rs.example/","jti":"j1"}`, "iat"},
		{"dpop stale iat", dpopPolicy, testKey, dpopHeader, `{"htm":"GET","htu":"https://rs.example/","iat":` + at(-61) + `,"jti":"j1"}`, "iat"},
		{"dpop query", dpopPolicy, testKey, dpopHeader, `{"htm":"GET","htu":"https://rs.example/?q","iat":` + at(0) + `,"jti":"j1"}`, "htu"},
		{"dpop header empty", dpopPolicy, testKey, ``, dpopClaims, "header.typ"},
		{"dpop header invalid", dpopPolicy, testKey, `{`, dpopClaims, "header"},
		{"assertion", assertionPolicy, testKey, assertionHeader, assertionClaims, ""},
		{"assertion other kid", assertionPolicy, testKey, `{"alg":"ES256","kid":"other","typ":"client-authentication+jwt"}`, assertionClaims, "header.kid"},
		{"assertion kid number", assertionPolicy, testKey, `{"alg":"ES256","kid":1,"typ":"client-authentication+jwt"}`, assertionClaims, "header.kid"},
		{"assertion no kid", assertionPolicy, testKey, `{"alg":"ES256","typ":"client-authentication+jwt"}`, assertionClaims, "header.kid"},
		{"assertion no typ", assertionPolicy, testKey, `{"alg":"ES256","kid":"` + testKid + `"}`, assertionClaims, "header.typ"},
		{"assertion typ JWT", assertionPolicy, testKey, `{"alg":"ES256","kid":"` + testKid + `","typ":"JWT"}`, assertionClaims, "header.typ"},
		{"assertion jwk", assertionPolicy, testKey, `{"alg":"ES256","kid":"` + testKid + `","typ":"client-authentication+jwt","jwk":` + testJWK + `}`, assertionClaims, "header.jwk"},
		{"assertion alg mismatch", assertionPolicy, testKey, `{"alg":"RS256","kid":"` + testKid + `","typ":"client-authentication+jwt"}`, assertionClaims, "header.alg"},
		{"assertion without typ", noTyp, testKey, `{"alg":"ES256","kid":"` + testKid + `"}`, assertionClaims, ""},
		{"assertion without typ given typ", noTyp, testKey, assertionHeader, assertionClaims, "header.typ"},
		{"assertion missing iss", assertionPolicy, testKey, assertionHeader, `{"sub":"s6BhdRkqt3","aud":"https://server.example.com","exp":` + at(60) + `,"iat":` + at(0) + `,"jti":"j1"}`, "iss"},
		{"assertion missing sub", assertionPolicy, testKey, assertionHeader, `{"iss":"s6BhdRkqt3","aud":"https://server.example.com","exp":` + at(60) + `,"iat":` + at(0) + `,"jti":"j1"}`, "sub"},
		{"assertion missing aud", assertionPolicy, testKey, assertionHeader, `{"iss":"s6BhdRkqt3","sub":"s6BhdRkqt3","exp":` + at(60) + `,"iat":` + at(0) + `,"jti":"j1"}`, "aud"},
		{"assertion aud array", assertionPolicy, testKey, assertionHeader, `{"iss":"s6BhdRkqt3","sub":"s6BhdRkqt3","aud":["https://server.example.com"],"exp":` + at(60) + `,"iat":` + at(0) + `,"jti":"j1"}`, "aud"},
		{"assertion missing exp", assertionPolicy, testKey, assertionHeader, `{"iss":"s6BhdRkqt3","sub":"s6BhdRkqt3","aud":"https://server.example.com","iat":` + at(0) + `,"jti":"j1"}`, "exp"},
		{"assertion missing jti", assertionPolicy, testKey, assertionHeader, `{"iss":"s6BhdRkqt3","sub":"s6BhdRkqt3","aud":"https://server.example.com","exp":` + at(60) + `,"iat":` + at(0) + `}`, "jti"},
		{"assertion with htm", assertionPolicy, testKey, assertionHeader, `{"iss":"s6BhdRkqt3","sub":"s6BhdRkqt3","aud":"https://server.example.com","exp":` + at(60) + `,"iat":` + at(0) + `,"jti":"j1","htm":"GET"}`, "htm"},
		{"jwt", jwtPolicy, testKey, `{"alg":"ES256","kid":"` + testKid + `"}`, jwtClaims, ""},
		{"jwt typ", jwtPolicy, testKey, `{"kid":"` + testKid + `","typ":"JWT","alg":"ES256"}`, jwtClaims, ""},
		{"jwt typ dpop", jwtPolicy, testKey, `{"kid":"` + testKid + `","typ":"dpop+jwt","alg":"ES256"}`, jwtClaims, "header.typ"},
		{"jwt cty", jwtPolicy, testKey, `{"kid":"` + testKid + `","cty":"JWT","alg":"ES256"}`, jwtClaims, "header.cty"},
		{"jwt crit", jwtPolicy, testKey, `{"kid":"` + testKid + `","crit":["exp"],"exp":1,"alg":"ES256"}`, jwtClaims, "header.crit"},
		{"jwt other kid", jwtPolicy, testKey, `{"alg":"ES256","kid":"x"}`, jwtClaims, "header.kid"},
		{"jwt missing iat", jwtPolicy, testKey, `{"alg":"ES256","kid":"` + testKid + `"}`, `{"iss":"https://op.example.com","exp":` + at(60) + `,"jti":"j1"}`, "iat"},
		{"jwt duplicate alg", jwtPolicy, testKey, `{"alg":"ES256","kid":"` + testKid + `","alg":"none"}`, jwtClaims, "header.alg"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.p.CheckPrebuilt(now, tc.k, []byte(tc.header), []byte(tc.claims))
			if tc.claim == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			wantViolation(t, err, tc.claim)
		})
	}
}

// TestPurposeConfusion: what one purpose's key set makes, the others refuse.
func TestPurposeConfusion(t *testing.T) {
	policies := []Policy{dpopPolicy, assertionPolicy, jwtPolicy}
	requests := map[Purpose][2]string{
		DPoP:            {"", `{"htm":"POST","htu":"https://server.example.com/token"}`},
		ClientAssertion: {"", ""},
		JWT:             {`{"typ":"JWT"}`, `{"iss":"https://op.example.com","exp":` + at(60) + `}`},
	}
	for _, from := range policies {
		req := requests[from.Purpose]
		tok, err := from.Prepare(now, testKey, []byte(req[0]), []byte(req[1]), nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, to := range policies {
			if to.Purpose == from.Purpose {
				continue
			}
			if _, err := to.CheckPrebuilt(now, testKey, tok.Header, tok.Claims); !errors.Is(err, ErrViolation) {
				t.Errorf("%s token accepted by a %s key set: %v", from.Purpose, to.Purpose, err)
			}
			if _, err := to.Prepare(now, testKey, []byte(req[0]), []byte(req[1]), nil); !errors.Is(err, ErrViolation) {
				t.Errorf("%s request accepted by a %s key set: %v", from.Purpose, to.Purpose, err)
			}
		}
	}
}

// TestViolationMessages spot-checks that messages say what to do.
func TestViolationMessages(t *testing.T) {
	for _, tc := range []struct {
		p              Policy
		header, claims string
		want           string
	}{
		{dpopPolicy, "", `{"htm":"GET","htu":"https://rs.example/x?a=1"}`, `claim "htu": must not have a query`},
		{dpopPolicy, "", `{"htm":"GET","htu":"https://rs.example/x#a"}`, `claim "htu": must not have a fragment`},
		{dpopPolicy, "", `{"htm":"GET","htu":"https://u@rs.example/x"}`, `claim "htu": must not have userinfo`},
		{dpopPolicy, "", `{"htm":"GET","htu":"https://rs.example/ x"}`, `claim "htu": must not contain whitespace or control characters (a space at byte 19)`},
		{dpopPolicy, `{"alg":"none"}`, ``, `header parameter "alg": is set by keyd`},
		{dpopPolicy, `{"x5u":"https://attacker.example"}`, ``, `header parameter "x5u": is not allowed`},
		{assertionPolicy, "", `{"htm":"POST"}`, `claim "htm": is not allowed in a client assertion`},
		{assertionPolicy, "", `{"aud":["https://server.example.com"]}`, `claim "aud": must be a single string, not an array`},
		{dpopPolicy, "", `{"htm":"GET","htu":"https://rs.example/","exp":1}`, `claim "exp": is not allowed in a dpop proof`},
		{assertionPolicy, "", `{"exp":1.5}`, `claim "exp": must be an integer number of seconds (no fraction or exponent)`},
	} {
		_, err := tc.p.Prepare(now, testKey, []byte(tc.header), []byte(tc.claims), nil)
		if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
			t.Errorf("err = %v, want prefix %q", err, tc.want)
		}
	}
}

// TestViolationLongNames: a message names the caller's claim or parameter by
// its start only. A whole name, up to MaxJSONSize bytes and tripled by %q
// for characters it escapes (U+0378 is unassigned: 2 bytes in, 6 out),
// would go into the caller's error and the audit record of every refusal.
func TestViolationLongNames(t *testing.T) {
	long := strings.Repeat("\u0378", 4000)
	jwtOK := `"iss":"https://op.example.com","exp":` + at(60)
	for _, tc := range []struct {
		name           string
		p              Policy
		header, claims string
	}{
		{"unknown claim", dpopPolicy, "", `{"` + long + long + `":1}`},
		{"header parameter", dpopPolicy, `{"` + long + long + `":1}`, ""},
		{"letter case", jwtPolicy, "", `{` + jwtOK + `,"` + long + `a":1,"` + long + `A":2}`},
		{"nested duplicate", jwtPolicy, "", `{` + jwtOK + `,"x":{"` + long + `":1,"` + long + `":2}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.p.Prepare(now, testKey, []byte(tc.header), []byte(tc.claims), &seqReader{})
			if !errors.Is(err, ErrViolation) {
				t.Fatalf("Prepare: %v, want a violation", err)
			}
			if n := len(err.Error()); n > 1<<10 {
				t.Errorf("message of %d bytes: %.120s…", n, err)
			}
		})
	}
}
