package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"golang.org/x/oauth2"
)

// Transport is an http.RoundTripper for calls to resource servers with
// DPoP-bound access tokens (RFC 9449 §7): every request gets
// "Authorization: DPoP <token>" and a new proof, signed by keyd with the key
// the token is bound to (BoundKid), carrying the token's hash (ath) and the
// latest nonce of the request's origin. The proof's htu, and the origin
// whose nonce it carries, are those of the request's target URI: its URL,
// with the host of req.Host when that is set to another.
//
// A 401 whose WWW-Authenticate DPoP challenge says error="use_dpop_nonce"
// and that sends a DPoP-Nonce is retried once with that nonce; a 401 with
// error="invalid_dpop_proof" from a server whose Date header shows a clock
// more than 5s away from ours is retried once with iat on its clock; a 401
// with error="invalid_token" (the token was revoked, or the server no
// longer knows it) is retried once with a new token, when Source is a
// *TokenSource, which drops the refused one. A request is retried only if
// its body can be sent again (no body, or GetBody set, as http.NewRequest
// does for in-memory bodies); otherwise, and when the retry is answered
// the same way, the response is returned as it is. The nonce is
// remembered for the next request either way.
//
// The proof is always signed by the token's own key, draining or not. If
// that key can no longer sign (it was revoked or lost, or retired after
// draining) and Source is a *TokenSource, the token is dropped and the
// request is made once with a new one, bound to the active key; nothing is
// sent with the old token. (With OAuth.WatchKeys the source has usually
// replaced such a token before this happens.)
//
// A token that is not DPoP-bound (OAuthConfig.AllowBearer) is sent as
// "Authorization: Bearer" without a proof.
//
// A request that follows a redirect away from the first request's origin
// is sent without the token or a proof (OAuth.Client does not follow such
// redirects at all; an http.Client of the caller's own may).
type Transport struct {
	// Source supplies the access token for each request.
	Source oauth2.TokenSource
	// Base makes the requests; nil means http.DefaultTransport.
	Base http.RoundTripper

	o *OAuth
}

// Transport returns a Transport that proves with this client's dpop key
// set and keeps resource servers' nonces apart from the authorization
// server's.
func (o *OAuth) Transport(src oauth2.TokenSource, base http.RoundTripper) *Transport {
	return &Transport{Source: src, Base: base, o: o}
}

// Client returns an *http.Client whose requests go through a Transport with
// src, over OAuthConfig.HTTPClient's transport. It follows redirects within
// the request's origin only: a redirect elsewhere is returned as it is, so
// the access token is never sent to another server.
func (o *OAuth) Client(src oauth2.TokenSource) *http.Client {
	return &http.Client{
		Transport: o.Transport(src, o.http.Transport),
		Timeout:   o.http.Timeout,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= 10 {
				return errors.New("stopped after 10 redirects")
			}
			if Origin(req.URL.String()) != Origin(via[0].URL.String()) {
				return http.ErrUseLastResponse
			}
			return nil
		},
	}
}

// leftOrigin reports whether req follows a redirect chain that began at
// another origin.
func leftOrigin(req *http.Request) bool {
	first := req
	for i := 0; i < 100 && first.Response != nil && first.Response.Request != nil; i++ {
		first = first.Response.Request
	}
	return first != req && Origin(first.URL.String()) != Origin(req.URL.String())
}

func (t *Transport) base() http.RoundTripper {
	if t.Base != nil {
		return t.Base
	}
	return http.DefaultTransport
}

// token is the Source's token; a TokenSource's stops waiting when the
// request's context ends.
func (t *Transport) token(ctx context.Context) (*oauth2.Token, error) {
	if ts, ok := t.Source.(*TokenSource); ok {
		return ts.TokenContext(ctx)
	}
	return t.Source.Token()
}

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	fail := func(err error) (*http.Response, error) {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, err
	}
	if t.o == nil || t.Source == nil {
		return fail(fmt.Errorf("%w: client.Transport must come from OAuth.Transport, with a Source", ErrInvalidArgument))
	}
	if leftOrigin(req) {
		// A redirect away from the first request's origin, followed by
		// an http.Client of the caller's own (OAuth.Client stops there):
		// sent without the token, as net/http drops an Authorization
		// header it was given when a redirect leaves the origin.
		return t.base().RoundTrip(req)
	}
	tok, err := t.token(req.Context())
	if err != nil {
		return fail(err)
	}
	if !strings.EqualFold(tok.TokenType, "DPoP") {
		if !t.o.cfg.AllowBearer {
			return fail(fmt.Errorf("%w: token_type %q (OAuthConfig.AllowBearer sends it as a bearer token)", ErrNotDPoPBound, tok.TokenType))
		}
		r := req.Clone(req.Context())
		r.Header.Set("Authorization", "Bearer "+tok.AccessToken)
		return t.base().RoundTrip(r)
	}

	method := req.Method
	if method == "" {
		method = http.MethodGet
	}
	rawURL := targetURI(req)
	prove := func(tok *oauth2.Token) (Proof, error) {
		return t.o.proof(req.Context(), proofParams{method: method, url: rawURL, accessToken: tok.AccessToken,
			nonce: t.o.rsNonces.Get(rawURL), kid: BoundKid(tok), offset: t.o.clock.get(rawURL)})
	}
	proof, err := prove(tok)
	if (errors.Is(err, ErrFailedPrecondition) || errors.Is(err, ErrKeyLost)) && BoundKid(tok) != "" {
		// The bound key is no longer signable: get a token for the active key.
		if ts, ok := t.Source.(*TokenSource); ok {
			ts.Invalidate(tok)
			if tok, err = ts.TokenContext(req.Context()); err != nil {
				return fail(err)
			}
			proof, err = prove(tok)
		}
	}
	if err != nil {
		return fail(err)
	}

	body := req.Body
	var nonceRetried, skewRetried, tokenRetried bool
	for attempt := 0; ; attempt++ {
		resp, err := t.send(req, rawURL, body, tok, proof)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusUnauthorized || attempt == 3 {
			return resp, nil
		}
		ch, _ := dpopChallenge(resp.Header)
		ts, refreshable := t.Source.(*TokenSource)
		renew := false
		switch {
		case ch["error"] == "use_dpop_nonce" && !nonceRetried && resp.Header.Get("DPoP-Nonce") != "":
			nonceRetried = true
		case ch["error"] == "invalid_dpop_proof" && !skewRetried && t.o.clock.learn(rawURL, resp, time.Now()):
			skewRetried = true
		case ch["error"] == "invalid_token" && !tokenRetried && refreshable:
			tokenRetried, renew = true, true
		default:
			return resp, nil
		}
		next, ok := replayBody(req)
		if !ok {
			return resp, nil
		}
		ptok := tok
		if renew {
			ts.Invalidate(tok)
			if ptok, err = ts.TokenContext(req.Context()); err != nil {
				if next != nil {
					next.Close()
				}
				return resp, nil // the caller sees the server's answer
			}
		}
		p, err := prove(ptok)
		if err != nil {
			if next != nil {
				next.Close()
			}
			return resp, nil // the caller sees the server's answer
		}
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		body, proof, tok = next, p, ptok
	}
}

// targetURI is the URI the server sees req for (RFC 9110 §7.1): its URL,
// with the host of req.Host when that overrides the URL's.
func targetURI(req *http.Request) string {
	if req.Host == "" || req.Host == req.URL.Host {
		return req.URL.String()
	}
	u := *req.URL
	u.Host = req.Host
	return u.String()
}

// send makes one request: req with body, the token and the proof. A
// DPoP-Nonce in the answer is remembered for target's origin.
func (t *Transport) send(req *http.Request, target string, body io.ReadCloser, tok *oauth2.Token, proof Proof) (*http.Response, error) {
	r := req.Clone(req.Context())
	r.Body = body
	r.Header.Set("Authorization", "DPoP "+tok.AccessToken)
	r.Header.Set("DPoP", proof.JWT)
	resp, err := t.base().RoundTrip(r)
	if err != nil {
		return nil, err
	}
	if resp.Request == nil {
		resp.Request = r
	}
	t.o.rsNonces.Set(target, resp.Header.Get("DPoP-Nonce"))
	return resp, nil
}

// replayBody returns a new copy of req's body for a retry, and whether
// there can be one.
func replayBody(req *http.Request) (io.ReadCloser, bool) {
	if req.Body == nil || req.Body == http.NoBody {
		return req.Body, true
	}
	if req.GetBody == nil {
		return nil, false
	}
	b, err := req.GetBody()
	if err != nil {
		return nil, false
	}
	return b, true
}

// dpopChallenge returns the auth-params (names lower-cased) of the DPoP
// challenge in h's WWW-Authenticate fields (RFC 9110 §11.6.1, RFC 9449
// §7.1), and whether there is one.
func dpopChallenge(h http.Header) (map[string]string, bool) {
	for _, v := range h.Values("WWW-Authenticate") {
		for _, c := range parseChallenges(v) {
			if strings.EqualFold(c.scheme, "DPoP") {
				return c.params, true
			}
		}
	}
	return nil, false
}

type challenge struct {
	scheme string
	params map[string]string
}

// parseChallenges parses one WWW-Authenticate field value: a
// comma-separated list of challenges, each a scheme followed by
// comma-separated name=value parameters (value a token or a quoted
// string). A token68 is skipped.
func parseChallenges(s string) []challenge {
	p := &challengeParser{s: s}
	var out []challenge
	for !p.done() {
		start := p.i
		p.skip(" \t,")
		scheme := p.token()
		if scheme == "" {
			if p.i == start {
				p.i++ // not a token: skip a byte, so the loop always advances
			}
			continue
		}
		c := challenge{scheme: scheme, params: map[string]string{}}
		for {
			save := p.i
			p.skip(" \t,")
			name := p.token()
			p.skip(" \t")
			if name == "" || !p.eat('=') {
				p.i = save
				break
			}
			p.skip(" \t")
			if p.peek() == '"' {
				c.params[strings.ToLower(name)] = p.quoted()
			} else {
				v := p.token()
				for p.peek() == '=' { // a token68 such as abc== is a value too
					p.i++
					v += "="
				}
				c.params[strings.ToLower(name)] = v
			}
		}
		out = append(out, c)
	}
	return out
}

type challengeParser struct {
	s string
	i int
}

func (p *challengeParser) done() bool { return p.i >= len(p.s) }

func (p *challengeParser) peek() byte {
	if p.done() {
		return 0
	}
	return p.s[p.i]
}

func (p *challengeParser) eat(b byte) bool {
	if p.peek() == b && !p.done() {
		p.i++
		return true
	}
	return false
}

func (p *challengeParser) skip(set string) {
	for !p.done() && strings.IndexByte(set, p.s[p.i]) >= 0 {
		p.i++
	}
}

// token reads an RFC 9110 token (tchar+); token68 characters / and . are
// admitted too.
func (p *challengeParser) token() string {
	start := p.i
	for !p.done() {
		c := p.s[p.i]
		if c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || strings.IndexByte("!#$%&'*+-.^_`|~/", c) >= 0 {
			p.i++
			continue
		}
		break
	}
	return p.s[start:p.i]
}

// quoted reads a quoted-string (the opening quote is next), unescaping
// quoted-pairs.
func (p *challengeParser) quoted() string {
	p.i++ // "
	var b strings.Builder
	for !p.done() {
		c := p.s[p.i]
		p.i++
		switch c {
		case '"':
			return b.String()
		case '\\':
			if !p.done() {
				b.WriteByte(p.s[p.i])
				p.i++
			}
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}
