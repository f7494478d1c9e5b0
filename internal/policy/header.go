package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/keyd-dev/keyd/keystore"
)

// privateJWKMembers are the JWK members that hold private key material
// (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
var privateJWKMembers = []string{"d", "p", "q", "dp", "dq", "qi", "oth", "k"}

// checkKey checks that k can sign for purpose and returns its parsed JWK
// (empty when k has none).
func checkKey(purpose Purpose, k Key) (*object, error) {
	alg, err := keystore.ParseAlgorithm(k.Alg)
	if err != nil {
		return nil, err
	}
	if purpose != DPoP && (len(k.Kid) > 256 || !isPrintable(k.Kid, '!')) {
		return nil, fmt.Errorf("kid %q must be 1 to 256 printable ASCII characters", k.Kid)
	}
	if len(k.JWK) == 0 {
		if purpose == DPoP {
			return nil, errors.New("a dpop key needs its public JWK")
		}
		return &object{}, nil
	}
	jwk, v := parseObject(k.JWK, "jwk")
	if v != nil {
		return nil, fmt.Errorf("JWK: %s", v.Error())
	}
	for _, m := range privateJWKMembers {
		if _, ok := jwk.get(m); ok {
			return nil, fmt.Errorf("JWK has the private member %q; keyd publishes public keys only", m)
		}
	}
	str := func(name string) string { v, _ := jwk.get(name); s, _ := v.(string); return s }
	var kty, crv string
	var members []string
	switch alg {
	case keystore.ES256:
		kty, crv, members = "EC", "P-256", []string{"x", "y"}
	case keystore.ES384:
		kty, crv, members = "EC", "P-384", []string{"x", "y"}
	case keystore.RS256, keystore.PS256:
		kty, members = "RSA", []string{"n", "e"}
	case keystore.EdDSA:
		kty, crv, members = "OKP", "Ed25519", []string{"x"}
	}
	if str("kty") != kty {
		return nil, fmt.Errorf("JWK kty %q does not fit algorithm %s (want %q)", str("kty"), alg, kty)
	}
	if crv != "" && str("crv") != crv {
		return nil, fmt.Errorf("JWK crv %q does not fit algorithm %s (want %q)", str("crv"), alg, crv)
	}
	for _, m := range members {
		if str(m) == "" {
			return nil, fmt.Errorf("JWK lacks the member %q", m)
		}
	}
	return jwk, nil
}

// callerHeader checks the header parameters a caller sent to Prepare and
// returns the typ to write for a jwt ("" for none).
func (p Policy) callerHeader(h *object) (string, *Violation) {
	var typ string
	for _, m := range h.members {
		switch name := m.name; name {
		case "alg", "jwk", "kid":
			return "", violation("header."+name, "is set by keyd from the signing key; do not send it")
		case "typ":
			if p.Purpose != JWT {
				return "", violation("header.typ", "is set by keyd for a %s key set; do not send it", p.Purpose)
			}
			var v *Violation
			if typ, v = checkJWTTyp(m.val); v != nil {
				return "", v
			}
		default:
			if p.Purpose == JWT {
				return "", violation("header."+name, "is not allowed: keyd writes the header, a caller may send only typ")
			}
			return "", violation("header."+name, "is not allowed: keyd writes the whole header of a %s token; send an empty header", p.Purpose)
		}
	}
	return typ, nil
}

// checkJWTTyp checks the typ of a generic JWT.
func checkJWTTyp(v any) (string, *Violation) {
	s, ok := v.(string)
	if !ok || !isTyp(s) {
		return "", violation("header.typ", "must be a string of 1 to 64 printable ASCII characters without spaces, like \"JWT\"")
	}
	// The media type alone: without the "application/" a typ may omit
	// (RFC 7515 §4.1.9) and without parameters (";v=1").
	mt, _, _ := strings.Cut(strings.ToLower(s), ";")
	switch strings.TrimPrefix(mt, "application/") {
	case TypDPoP, TypClientAssertion:
		return "", violation("header.typ", "%q is the type of another purpose's tokens; use a key set of that purpose", s)
	}
	return s, nil
}

// header returns the JOSE header Prepare writes, members in a fixed order.
func (p Policy) header(k Key, typ string) []byte {
	var b bytes.Buffer
	param := func(name string, value []byte) {
		if b.Len() == 0 {
			b.WriteByte('{')
		} else {
			b.WriteByte(',')
		}
		b.Write(jsonString(name))
		b.WriteByte(':')
		b.Write(value)
	}
	switch p.Purpose {
	case DPoP:
		var compact bytes.Buffer
		if err := json.Compact(&compact, k.JWK); err != nil {
			panic("policy: JWK checked but not JSON: " + err.Error()) // checkKey parsed it
		}
		param("typ", jsonString(TypDPoP))
		param("alg", jsonString(k.Alg))
		param("jwk", compact.Bytes())
	case ClientAssertion:
		param("alg", jsonString(k.Alg))
		param("kid", jsonString(k.Kid))
		if t := p.assertionTyp(); t != "" {
			param("typ", jsonString(t))
		}
	case JWT:
		param("alg", jsonString(k.Alg))
		param("kid", jsonString(k.Kid))
		if typ != "" {
			param("typ", jsonString(typ))
		}
	}
	b.WriteByte('}')
	return b.Bytes()
}

// prebuiltHeader checks that h holds exactly the parameters Prepare would
// write for k, in any order; jwk is k.JWK parsed.
func (p Policy) prebuiltHeader(h *object, k Key, jwk map[string]any) *Violation {
	var want []string
	switch p.Purpose {
	case DPoP:
		want = []string{"typ", "alg", "jwk"}
	case ClientAssertion:
		want = []string{"alg", "kid"}
		if p.assertionTyp() != "" {
			want = append(want, "typ")
		}
	case JWT:
		want = []string{"alg", "kid"}
	}
	allowed := func(name string) bool {
		for _, w := range want {
			if w == name {
				return true
			}
		}
		return p.Purpose == JWT && name == "typ"
	}
	for _, m := range h.members {
		if name := m.name; !allowed(name) {
			if name == "typ" { // a client assertion without typ
				return violation("header.typ", "is not allowed: this key set's client assertions carry no typ")
			}
			return violation("header."+name, "is not allowed: keyd's header of a %s token has only %s", p.Purpose, strings.Join(want, ", "))
		}
	}
	for _, name := range want {
		if _, ok := h.get(name); !ok {
			return violation("header."+name, "is missing")
		}
	}
	if alg, _ := h.get("alg"); alg != k.Alg {
		return violation("header.alg", "is %s but the signing key's algorithm is %q", describe(alg), k.Alg)
	}
	switch p.Purpose {
	case DPoP:
		if typ, _ := h.get("typ"); typ != TypDPoP {
			return violation("header.typ", "is %s; a DPoP proof's typ is %q", describe(typ), TypDPoP)
		}
		if hjwk, _ := h.get("jwk"); !equalJSON(hjwk, jwk) {
			return violation("header.jwk", "is not the public key of the signing key")
		}
	case ClientAssertion:
		if typ, ok := h.get("typ"); ok && typ != p.assertionTyp() {
			return violation("header.typ", "is %s; this key set's client assertions have typ %q", describe(typ), p.assertionTyp())
		}
	case JWT:
		if typ, ok := h.get("typ"); ok {
			if _, v := checkJWTTyp(typ); v != nil {
				return v
			}
		}
	}
	if kid, ok := h.get("kid"); ok && kid != k.Kid {
		return violation("header.kid", "is %s, not the kid of the signing key (%q)", describe(kid), k.Kid)
	}
	return nil
}

// describe renders a decoded JSON value for a message, shortened.
func describe(v any) string {
	if s, ok := v.(string); ok {
		return fmt.Sprintf("%q", truncate(s))
	}
	b, err := marshal(v)
	if err != nil {
		return "an invalid value"
	}
	return truncate(string(b))
}

// truncate shortens s to about 80 bytes, on a character boundary.
func truncate(s string) string {
	if len(s) <= 80 {
		return s
	}
	n := 80
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}
