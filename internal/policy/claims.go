package policy

import (
	"encoding/base64"
	"encoding/json"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"
)

// claimsCheck validates (and, when fill is set, completes) one claims set.
type claimsCheck struct {
	p    Policy
	now  int64 // Unix seconds
	c    *object
	fill bool
	rand io.Reader
	sum  Summary
}

func (cc *claimsCheck) run() error {
	// A verifier that matches claim names without regard to case (Go's
	// encoding/json into a struct, Newtonsoft.Json, ...) reads two such
	// names as one claim, and the one it keeps need not be the one checked
	// here.
	if v := cc.c.foldCollision(); v != nil {
		return v
	}
	sent := len(cc.c.members)
	var err error
	switch cc.p.Purpose {
	case DPoP:
		err = cc.dpop()
	case ClientAssertion:
		err = cc.assertion()
	case JWT:
		err = cc.jwt()
	default:
		return violation("claims", "unknown purpose %q", cc.p.Purpose) // unreachable: Validate ran
	}
	if err != nil {
		return err
	}
	// The claims keyd filled in must not collide with a caller's name in
	// another letter case either (a jwt's "IAT" next to the iat keyd adds).
	// Only the added ones need checking: the others passed above.
	if v := cc.c.foldCollisionFrom(sent); v != nil {
		return v
	}
	return nil
}

var (
	dpopClaims      = []string{"htm", "htu", "ath", "nonce", "jti", "iat"}
	assertionClaims = []string{"iss", "sub", "aud", "exp", "nbf", "iat", "jti"}
)

func (cc *claimsCheck) dpop() error {
	for _, m := range cc.c.members {
		name := m.name
		if slices.Contains(dpopClaims, name) {
			continue
		}
		switch name {
		case "exp":
			return violation(name, "is not allowed in a dpop proof: a proof has no exp, the server checks its iat")
		case "iss", "sub", "aud", "nbf":
			return violation(name, "is not allowed in a dpop proof (it carries only %s); client assertions need a client_assertion key set", list(dpopClaims))
		}
		return violation(name, "is not allowed in a dpop proof (it carries only %s)", list(dpopClaims))
	}
	htm, _, v := cc.str("htm", true)
	if v != nil {
		return v
	}
	if len(htm) > 32 || !isToken(htm) {
		return violation("htm", "must be an HTTP method like GET or POST (1 to 32 token characters)")
	}
	htu, _, v := cc.str("htu", true)
	if v != nil {
		return v
	}
	if reason := checkHTU(htu); reason != "" {
		return violation("htu", "%s", reason)
	}
	cc.sum.Htm, cc.sum.Htu = htm, htu
	ath, ok, v := cc.str("ath", false)
	if v != nil {
		return v
	}
	if ok {
		if b, err := base64.RawURLEncoding.Strict().DecodeString(ath); err != nil || len(ath) != 43 || len(b) != 32 {
			return violation("ath", "must be the SHA-256 hash of the access token, base64url-encoded without padding (43 characters)")
		}
		cc.sum.Ath = ath
	}
	nonce, ok, v := cc.str("nonce", false)
	if v != nil {
		return v
	}
	if ok {
		if len(nonce) > 512 || !isNQChars(nonce) {
			return violation("nonce", "must be the server's DPoP-Nonce: 1 to 512 printable ASCII characters without spaces, quotes or backslashes")
		}
		cc.sum.HasNonce = true
	}
	if err := cc.jti(); err != nil {
		return err
	}
	_, err := cc.iat()
	return err
}

func (cc *claimsCheck) assertion() error {
	for _, m := range cc.c.members {
		name := m.name
		if slices.Contains(assertionClaims, name) {
			continue
		}
		if slices.Contains(dpopClaims, name) {
			return violation(name, "is not allowed in a client assertion (it carries only %s); DPoP proofs need a dpop key set", list(assertionClaims))
		}
		return violation(name, "is not allowed in a client assertion (it carries only %s)", list(assertionClaims))
	}
	for _, name := range []string{"iss", "sub"} {
		s, ok, v := cc.str(name, !cc.fill)
		if v != nil {
			return v
		}
		if !ok {
			cc.c.set(name, cc.p.ClientID)
			s = cc.p.ClientID
		} else if s != cc.p.ClientID {
			return violation(name, "must be %q, this key set's client_id (or leave it out and keyd fills it in)", cc.p.ClientID)
		}
		if name == "iss" {
			cc.sum.Iss = s
		} else {
			cc.sum.Sub = s
		}
	}
	switch aud, ok := cc.c.get("aud"); {
	case !ok && cc.fill:
		cc.c.set("aud", cc.p.Audience)
	case !ok:
		return violation("aud", "is required: %q, the configured audience", cc.p.Audience)
	default:
		if _, isArray := aud.([]any); isArray {
			return violation("aud", "must be a single string, not an array: keyd signs assertions only for the configured audience %q (leave aud out and keyd fills it in)", cc.p.Audience)
		}
		if aud != cc.p.Audience {
			return violation("aud", "must be %q, the configured audience: keyd signs assertions for no other audience (leave aud out and keyd fills it in)", cc.p.Audience)
		}
	}
	cc.sum.Aud = []string{cc.p.Audience}
	if err := cc.jti(); err != nil {
		return err
	}
	iat, err := cc.iat()
	if err != nil {
		return err
	}
	return cc.expNbf(iat, cc.p.defaultLifetime())
}

func (cc *claimsCheck) jwt() error {
	iss, _, v := cc.str("iss", true)
	if v != nil {
		return v
	}
	if !slices.Contains(cc.p.Issuers, iss) {
		return violation("iss", "must be one of this key set's issuers: %s", quoteList(cc.p.Issuers))
	}
	cc.sum.Iss = iss
	sub, ok, v := cc.str("sub", false)
	if v != nil {
		return v
	}
	if ok {
		cc.sum.Sub = sub
	}
	if aud, ok := cc.c.get("aud"); ok {
		switch aud := aud.(type) {
		case string:
			cc.sum.Aud = []string{aud}
		case []any:
			if len(aud) == 0 {
				return violation("aud", "must be a string or a non-empty array of strings")
			}
			for _, a := range aud {
				s, ok := a.(string)
				if !ok {
					return violation("aud", "must be a string or a non-empty array of strings")
				}
				cc.sum.Aud = append(cc.sum.Aud, s)
			}
		default:
			return violation("aud", "must be a string or a non-empty array of strings")
		}
	}
	if err := cc.jti(); err != nil {
		return err
	}
	iat, err := cc.iat()
	if err != nil {
		return err
	}
	return cc.expNbf(iat, 0)
}

// expNbf checks exp (filling now+def when it is absent and def > 0) and nbf.
func (cc *claimsCheck) expNbf(iat int64, def time.Duration) error {
	maxLife := seconds(cc.p.maxLifetime())
	exp, ok, v := cc.date("exp")
	if v != nil {
		return v
	}
	if !ok && cc.fill && def > 0 {
		exp = cc.now + seconds(def)
		cc.c.set("exp", number(exp))
		if exp <= iat {
			return violation("iat", "is %d, not before the exp keyd fills in (%d); leave iat out or send an earlier one", iat, exp)
		}
		ok = true
	}
	switch {
	case !ok:
		return violation("exp", "is required: a time at most %d seconds from now", maxLife)
	case exp <= cc.now:
		return violation("exp", "is %d, not after keyd's clock (%d): the token would be expired already", exp, cc.now)
	case exp > cc.now+maxLife:
		return violation("exp", "is %d, %d seconds from keyd's clock (%d); at most %d seconds are allowed", exp, lifetime(exp, cc.now), cc.now, maxLife)
	case exp <= iat:
		return violation("exp", "is %d, not after iat (%d)", exp, iat)
	}
	cc.sum.Exp = exp
	nbf, ok, v := cc.date("nbf")
	if v != nil {
		return v
	}
	switch {
	case !ok:
	case nbf > cc.now+seconds(cc.p.skew()):
		return violation("nbf", "is %d, more than %d seconds after keyd's clock (%d)", nbf, seconds(cc.p.skew()), cc.now)
	case nbf >= exp:
		return violation("nbf", "is %d, not before exp (%d)", nbf, exp)
	}
	return nil
}

// lifetime returns exp - now, saturating instead of overflowing.
func lifetime(exp, now int64) int64 {
	if d := exp - now; d >= 0 {
		return d
	}
	return 1<<63 - 1
}

// jti checks jti, or fills it in.
func (cc *claimsCheck) jti() error {
	jti, ok, v := cc.str("jti", false)
	if v != nil {
		return v
	}
	if !ok {
		if !cc.fill {
			return violation("jti", "is required: a unique identifier for this token")
		}
		var err error
		if jti, err = newJTI(cc.rand); err != nil {
			return err
		}
		cc.c.set("jti", jti)
	} else if len(jti) > 64 || !isPrintable(jti, '!') {
		return violation("jti", "must be 1 to 64 printable ASCII characters without spaces (or leave it out and keyd makes one)")
	}
	cc.sum.Jti = jti
	return nil
}

// iat checks iat against the skew window, or fills it in with now.
func (cc *claimsCheck) iat() (int64, error) {
	iat, ok, v := cc.date("iat")
	if v != nil {
		return 0, v
	}
	skew := seconds(cc.p.skew())
	switch {
	case !ok && cc.fill:
		iat = cc.now
		cc.c.set("iat", number(iat))
	case !ok:
		return 0, violation("iat", "is required: the time the token is issued")
	case iat < cc.now-skew || iat > cc.now+skew:
		return 0, violation("iat", "is %d, more than %d seconds from keyd's clock (%d) (leave it out and keyd fills it in)", iat, skew, cc.now)
	}
	cc.sum.Iat = iat
	return iat, nil
}

// str returns claim name as a string.
func (cc *claimsCheck) str(name string, required bool) (string, bool, *Violation) {
	v, ok := cc.c.get(name)
	if !ok {
		if required {
			return "", false, violation(name, "is required")
		}
		return "", false, nil
	}
	s, isString := v.(string)
	if !isString {
		return "", false, violation(name, "must be a string, not %s", describe(v))
	}
	return s, true, nil
}

// date returns claim name as a NumericDate: an integer number of seconds.
func (cc *claimsCheck) date(name string) (int64, bool, *Violation) {
	v, ok := cc.c.get(name)
	if !ok {
		return 0, false, nil
	}
	n, isNumber := v.(json.Number)
	if !isNumber {
		if _, isString := v.(string); isString {
			return 0, false, violation(name, "must be a number of seconds since 1970 (like %d), not a string", cc.now)
		}
		return 0, false, violation(name, "must be an integer number of seconds since 1970 (like %d), not %s", cc.now, describe(v))
	}
	i, err := strconv.ParseInt(string(n), 10, 64)
	if err != nil {
		if strings.ContainsAny(string(n), ".eE") {
			return 0, false, violation(name, "must be an integer number of seconds (no fraction or exponent), like %d", cc.now)
		}
		return 0, false, violation(name, "is %s, out of range", describe(n))
	}
	return i, true, nil
}

func seconds(d time.Duration) int64 { return int64(d / time.Second) }

// isToken reports whether s is an RFC 9110 token: one or more tchar.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// isNQChars reports whether s is one or more RFC 6749 NQCHAR (%x21 / %x23-5B
// / %x5D-7E), the syntax of a DPoP-Nonce (RFC 9449 §8).
func isNQChars(s string) bool {
	return isPrintable(s, '!') && !strings.ContainsAny(s, "\"\\")
}

func list(names []string) string {
	return strings.Join(names[:len(names)-1], ", ") + " and " + names[len(names)-1]
}

func quoteList(s []string) string {
	q := make([]string, len(s))
	for i, x := range s {
		q[i] = strconv.Quote(x)
	}
	return strings.Join(q, ", ")
}
