// Package policy decides whether a JWT is one a key set may sign, and
// completes it.
//
// Every key set has one purpose, and the purpose fixes what its keys sign:
//
//   - dpop: DPoP proofs (RFC 9449). keyd writes the header
//     {"typ":"dpop+jwt","alg":…,"jwk":…}; the caller sends htm and htu, and
//     optionally ath, nonce, jti and iat.
//   - client_assertion: private_key_jwt client assertions (RFC 7523).
//     keyd writes {"alg":…,"kid":…,"typ":"client-authentication+jwt"}; iss,
//     sub and aud come from the configuration, so a caller cannot aim an
//     assertion at another audience.
//   - jwt: generic signed JWTs (ID tokens, for example) with an allowed
//     issuer and a bounded lifetime.
//
// A caller never chooses alg, kid or jwk, and cannot ask a key of one purpose
// for a token of another: the claims a purpose allows do not overlap with the
// claims that make the other purposes' tokens. Prepare validates a request and
// returns the header and claims to sign; CheckPrebuilt validates a header and
// claims built elsewhere and fills nothing in. Both return a *Violation,
// matching ErrViolation, for anything the policy refuses, and another error
// only for a misconfigured Policy or Key (ErrInvalidKey) or a failing rand.
package policy

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Purpose is what a key set's keys sign.
type Purpose string

// The purposes.
const (
	DPoP            Purpose = "dpop"
	ClientAssertion Purpose = "client_assertion"
	JWT             Purpose = "jwt"
)

// ParsePurpose returns the Purpose named s.
func ParsePurpose(s string) (Purpose, error) {
	switch p := Purpose(s); p {
	case DPoP, ClientAssertion, JWT:
		return p, nil
	}
	return "", fmt.Errorf("unknown purpose %q (want dpop, client_assertion or jwt)", s)
}

// Defaults for the zero durations of a Policy.
const (
	DefaultSkew            = 60 * time.Second
	DefaultMaxLifetime     = 5 * time.Minute
	DefaultDefaultLifetime = 60 * time.Second // capped at MaxLifetime
)

// TypClientAssertion is the header typ of client assertions unless the policy
// says otherwise (RFC 7523bis).
const TypClientAssertion = "client-authentication+jwt"

// TypDPoP is the header typ of DPoP proofs (RFC 9449 §4.2).
const TypDPoP = "dpop+jwt"

// Policy is one key set's policy. Zero durations take their defaults. Fields
// that do not apply to the purpose must be left zero (Validate says so).
type Policy struct {
	Purpose Purpose

	// Skew is how far a caller's iat may be from now, either side, and how
	// far in the future an nbf may be. Default 60s.
	Skew time.Duration

	// ClientID is the iss and the sub of every client assertion.
	ClientID string
	// Audience is the aud of every client assertion: one string, usually the
	// authorization server's issuer identifier.
	Audience string
	// Typ is the header typ of client assertions: nil means
	// "client-authentication+jwt", a pointer to "" means no typ at all (for
	// servers that reject one).
	Typ *string

	// MaxLifetime bounds exp - now for client_assertion and jwt. Default 5m.
	MaxLifetime time.Duration
	// DefaultLifetime is exp - now for a client assertion sent without exp.
	// Default min(60s, MaxLifetime).
	DefaultLifetime time.Duration

	// Issuers lists the iss values a jwt key set signs; required for jwt.
	Issuers []string
}

func (p Policy) skew() time.Duration { return orDefault(p.Skew, DefaultSkew) }

func (p Policy) maxLifetime() time.Duration { return orDefault(p.MaxLifetime, DefaultMaxLifetime) }

func (p Policy) defaultLifetime() time.Duration {
	if p.DefaultLifetime != 0 {
		return p.DefaultLifetime
	}
	return min(DefaultDefaultLifetime, p.maxLifetime())
}

// assertionTyp returns the typ of client assertions, "" for none.
func (p Policy) assertionTyp() string {
	if p.Typ == nil {
		return TypClientAssertion
	}
	return *p.Typ
}

func orDefault(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// Validate checks the policy as configuration and reports every problem at
// once, joined with errors.Join.
func (p Policy) Validate() error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if _, err := ParsePurpose(string(p.Purpose)); err != nil {
		return err
	}
	for _, d := range []struct {
		name string
		d    time.Duration
	}{{"Skew", p.Skew}, {"MaxLifetime", p.MaxLifetime}, {"DefaultLifetime", p.DefaultLifetime}} {
		switch {
		case d.d < 0:
			add("%s %v must not be negative", d.name, d.d)
		case d.d%time.Second != 0:
			add("%s %v must be a whole number of seconds", d.name, d.d)
		}
	}
	notFor := func(field string, set bool) {
		if set {
			add("%s does not apply to purpose %s", field, p.Purpose)
		}
	}
	switch p.Purpose {
	case DPoP:
		notFor("ClientID", p.ClientID != "")
		notFor("Audience", p.Audience != "")
		notFor("Typ", p.Typ != nil)
		notFor("MaxLifetime", p.MaxLifetime != 0)
		notFor("DefaultLifetime", p.DefaultLifetime != 0)
		notFor("Issuers", p.Issuers != nil)
	case ClientAssertion:
		notFor("Issuers", p.Issuers != nil)
		if p.ClientID == "" {
			add("client_assertion needs a ClientID (the iss and sub of its assertions)")
		} else if !isPrintable(p.ClientID, 0x20) {
			add("ClientID %q must be printable ASCII", p.ClientID)
		}
		if p.Audience == "" {
			add("client_assertion needs an Audience (the authorization server's issuer identifier)")
		} else if err := checkAudienceURL(p.Audience); err != nil {
			errs = append(errs, err)
		}
		if p.Typ != nil && *p.Typ != "" && !isTyp(*p.Typ) {
			add("Typ %q must be 1 to 64 printable ASCII characters without spaces", *p.Typ)
		}
		if p.DefaultLifetime >= 0 && p.MaxLifetime >= 0 && p.defaultLifetime() > p.maxLifetime() {
			add("DefaultLifetime %v must not exceed MaxLifetime %v", p.defaultLifetime(), p.maxLifetime())
		}
	case JWT:
		notFor("ClientID", p.ClientID != "")
		notFor("Audience", p.Audience != "")
		notFor("Typ", p.Typ != nil)
		notFor("DefaultLifetime (a jwt must carry its own exp)", p.DefaultLifetime != 0)
		if len(p.Issuers) == 0 {
			add("jwt needs at least one entry in Issuers")
		}
		seen := map[string]bool{}
		for _, iss := range p.Issuers {
			switch {
			case iss == "":
				add("Issuers must not contain an empty string")
			case seen[iss]:
				add("Issuers lists %q twice", iss)
			}
			seen[iss] = true
		}
	}
	return errors.Join(errs...)
}

func checkAudienceURL(aud string) error {
	u, err := url.Parse(aud)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.Opaque != "" {
		return fmt.Errorf("Audience %q must be an absolute https or http URL (the authorization server's issuer identifier)", aud)
	}
	if u.User != nil || u.Fragment != "" || u.RawFragment != "" || strings.Contains(aud, "#") {
		return fmt.Errorf("Audience %q must not have userinfo or a fragment", aud)
	}
	return nil
}

// ErrInvalidKey is returned (wrapped) by Prepare and CheckPrebuilt when the
// Key is not usable with the policy: a bad algorithm, a missing kid, or a JWK
// that is not a public key of the algorithm. It means keyd is misconfigured,
// not that the request is wrong.
var ErrInvalidKey = errors.New("invalid signing key")

// Key is the key version that will sign.
type Key struct {
	Alg string // JWS alg, e.g. "ES256"
	Kid string // RFC 7638 thumbprint
	// JWK is the public JWK, e.g. {"kty":"EC","crv":"P-256","x":"..","y":".."}.
	// It is required for dpop (it goes in the header) and must hold no
	// private member.
	JWK []byte
}

// Summary is what the audit log records of a signed token: never the token,
// never an access token (only its hash, ath), never a nonce.
type Summary struct {
	Htm      string   `json:"htm,omitempty"`
	Htu      string   `json:"htu,omitempty"`
	Ath      string   `json:"ath,omitempty"`
	HasNonce bool     `json:"has_nonce,omitempty"`
	Iss      string   `json:"iss,omitempty"`
	Sub      string   `json:"sub,omitempty"`
	Aud      []string `json:"aud,omitempty"`
	Jti      string   `json:"jti,omitempty"`
	Iat      int64    `json:"iat,omitempty"`
	Exp      int64    `json:"exp,omitempty"`
}

// Token is a complete header and claims set, ready to be signed. Header may
// be shared between tokens of the same key: do not modify it.
type Token struct {
	Header, Claims []byte // compact JSON objects
	Summary        Summary
}

// Prepare validates a caller's header extras and claims for key k at time
// now, fills in what keyd fills (header; jti from rand, crypto/rand.Reader
// when nil; iat; for client assertions iss, sub, aud and exp) and returns the
// header and claims to sign. header and claims are each empty (meaning {}) or
// one JSON object of at most MaxJSONSize bytes. A refused request returns a
// *Violation (errors.Is(err, ErrViolation)); an invalid policy or key, or a
// failing rand, another error.
func (p Policy) Prepare(now time.Time, k Key, header, claims []byte, rand io.Reader) (Token, error) {
	b, err := p.Bind(k)
	if err != nil {
		return Token{}, err
	}
	return b.Prepare(now, header, claims, rand)
}

// CheckPrebuilt validates a header and claims someone else built (keyd's
// signing_input mode) for key k at time now. Nothing is filled in: the header
// must hold exactly the parameters Prepare would write (alg = k.Alg; kid =
// k.Kid for client_assertion and jwt; for dpop typ "dpop+jwt" and a jwk with
// the members of k.JWK; typ as the policy demands), in any order, and the
// claims must be complete (jti and iat always; iss, sub, aud and exp for a
// client assertion) and pass every rule Prepare applies.
func (p Policy) CheckPrebuilt(now time.Time, k Key, header, claims []byte) (Summary, error) {
	b, err := p.Bind(k)
	if err != nil {
		return Summary{}, err
	}
	return b.CheckPrebuilt(now, header, claims)
}

// Bound is a policy bound to one key, both validated once, so that signing
// with the same key set and key pays for neither again. It is immutable and
// safe for concurrent use.
type Bound struct {
	p Policy
	k Key
	// jwk is k.JWK parsed, as the jwk of a header parses.
	jwk map[string]any
	// fixed is the header Prepare writes when the caller cannot change it
	// (dpop and client_assertion); nil for jwt.
	fixed []byte
}

// Bind validates p and k and returns them bound. It fails with an error
// wrapping ErrInvalidKey for a key that cannot serve the policy, and another
// error for an invalid policy.
func (p Policy) Bind(k Key) (*Bound, error) {
	jwk, err := p.check(k)
	if err != nil {
		return nil, err
	}
	b := &Bound{p: p, k: k, jwk: jwk.asMap()}
	if p.Purpose != JWT {
		b.fixed = p.header(k, "")
	}
	return b, nil
}

// Prepare is Policy.Prepare for the bound key.
func (b *Bound) Prepare(now time.Time, header, claims []byte, rand io.Reader) (Token, error) {
	p := b.p
	h, v := parseObject(header, "header")
	if v != nil {
		return Token{}, v
	}
	typ, v := p.callerHeader(h)
	if v != nil {
		return Token{}, v
	}
	c, v := parseObject(claims, "claims")
	if v != nil {
		return Token{}, v
	}
	cc := claimsCheck{p: p, now: now.Unix(), c: c, fill: true, rand: rand}
	if err := cc.run(); err != nil {
		return Token{}, err
	}
	// The claims encoded as encoding/json encodes a map, members sorted by
	// name, in one allocation for what keyd adds to the caller's.
	out, err := c.appendJSON(make([]byte, 0, len(claims)+128))
	if err != nil {
		return Token{}, fmt.Errorf("policy: encoding claims: %w", err)
	}
	if len(out) > MaxJSONSize {
		return Token{}, violation("claims", "are %d bytes once completed; at most %d are allowed", len(out), MaxJSONSize)
	}
	hdr := b.fixed
	if hdr == nil {
		hdr = p.header(b.k, typ)
	}
	return Token{Header: hdr, Claims: out, Summary: cc.sum}, nil
}

// CheckPrebuilt is Policy.CheckPrebuilt for the bound key.
func (b *Bound) CheckPrebuilt(now time.Time, header, claims []byte) (Summary, error) {
	h, v := parseObject(header, "header")
	if v != nil {
		return Summary{}, v
	}
	if v := b.p.prebuiltHeader(h, b.k, b.jwk); v != nil {
		return Summary{}, v
	}
	c, v := parseObject(claims, "claims")
	if v != nil {
		return Summary{}, v
	}
	cc := claimsCheck{p: b.p, now: now.Unix(), c: c}
	if err := cc.run(); err != nil {
		return Summary{}, err
	}
	return cc.sum, nil
}

// check validates the policy and the key, returning the key's parsed JWK.
func (p Policy) check(k Key) (*object, error) {
	if err := p.Validate(); err != nil {
		return nil, fmt.Errorf("policy: invalid policy: %w", err)
	}
	jwk, err := checkKey(p.Purpose, k)
	if err != nil {
		return nil, fmt.Errorf("policy: %w: %s", ErrInvalidKey, err)
	}
	return jwk, nil
}

// newJTI returns 16 bytes from r, base64url-encoded.
func newJTI(r io.Reader) (string, error) {
	if r == nil {
		r = rand.Reader
	}
	var b [16]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return "", fmt.Errorf("policy: making jti: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b[:]), nil
}

func number(n int64) json.Number { return json.Number(strconv.FormatInt(n, 10)) }

// isPrintable reports whether s is non-empty ASCII from lo to '~'.
func isPrintable(s string, lo byte) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < lo || s[i] > '~' {
			return false
		}
	}
	return true
}

// isTyp reports whether s is 1 to 64 printable ASCII characters, no spaces.
func isTyp(s string) bool { return len(s) <= 64 && isPrintable(s, '!') }
