package client

import (
	"bytes"
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/oauth2"

	"github.com/keyd-dev/keyd/internal/policy"
)

// OAuthConfig describes an OAuth 2.0 client whose keys are in keyd: it
// authenticates with private_key_jwt (RFC 7523) signed by a client_assertion
// key set and proves possession of a dpop key set's key (RFC 9449) on every
// request, so that its access tokens are DPoP-bound. It plays the part of
// golang.org/x/oauth2's Config and clientcredentials.Config.
type OAuthConfig struct {
	// ClientID is the client's identifier at the authorization server. It
	// must be the client_id configured for AssertionKeySet: keyd writes iss
	// and sub (and aud) of every assertion from its configuration, and a
	// mismatch is an ErrInvalidArgument before anything is sent. Empty means
	// the client_id of the key set, learned from its first assertion
	// (AuthCodeURL needs it set).
	ClientID string
	// AssertionKeySet names the client_assertion key set that signs the
	// client assertions.
	AssertionKeySet string
	// DPoPKeySet names the dpop key set that signs the DPoP proofs.
	DPoPKeySet string

	// Issuer is the authorization server's issuer identifier. When
	// TokenURL is empty, the endpoints come from its metadata (Discover).
	Issuer string
	// TokenURL, AuthURL and RevocationURL override (or, without Issuer,
	// replace) the discovered endpoints.
	TokenURL      string
	AuthURL       string
	RevocationURL string
	// RedirectURL is the redirect_uri of authorization code requests.
	RedirectURL string

	// Scopes are requested by client credentials and AuthCodeURL.
	Scopes []string
	// Resources are RFC 8707 resource indicators sent with client
	// credentials requests and by AuthCodeURL: absolute URIs without a
	// fragment (OAuth refuses others). Repeated Scopes are sent once.
	Resources []string
	// EndpointParams are extra parameters of client credentials requests.
	EndpointParams url.Values

	// HTTPClient makes the requests to the authorization server (and is
	// the base of Client). Nil means http.DefaultClient.
	HTTPClient *http.Client
	// ASTimeout bounds each request to the authorization server
	// (discovery, token, revocation) when HTTPClient sets no Timeout of
	// its own: a server that accepts and never answers must not hold
	// every caller of a TokenSource for good. Zero means 30 s.
	ASTimeout time.Duration

	// AllowBearer accepts a token_type other than DPoP (a server that does
	// not bind the token) with a warning on Logger, and sends it as a bearer
	// token. By default such a token is an error matching ErrNotDPoPBound.
	AllowBearer bool
	// Logger receives warnings; nil means slog.Default().
	Logger *slog.Logger

	// ExpiryMargin is how long before its expiry a cached token is
	// replaced; default 30s, and at most half the token's lifetime. With
	// WatchKeys, a token bound to a draining key is replaced as long
	// before that key retires, if that comes first.
	ExpiryMargin time.Duration
}

// Errors of the OAuth client, besides *oauth2.RetrieveError for an error
// response of the authorization server (match it with errors.As: an answer
// that is no OAuth error response comes wrapped, with a short message).
var (
	// ErrNotDPoPBound: the authorization server answered with a token_type
	// other than DPoP, so the token is not bound to keyd's key.
	ErrNotDPoPBound = errors.New("access token is not DPoP-bound")
	// ErrRepeatedNonceChallenge: the server asked for a new DPoP nonce
	// again after the one retry with the nonce it had sent.
	ErrRepeatedNonceChallenge = errors.New("the server asked for a DPoP nonce again after the retry with its nonce")
	// ErrNoRefreshToken: a token must be refreshed but has no refresh token.
	ErrNoRefreshToken = errors.New("no refresh token")
)

// ExtraBoundKid is the member of a token's Extra (and of `keyd token`'s
// output) that holds the kid — the RFC 7638 thumbprint, DPoP's jkt — of the
// key the token is bound to. Read it with BoundKid.
const ExtraBoundKid = "keyd_dpop_kid"

// BoundKid returns the kid (jkt) of the DPoP key that tok is bound to, or ""
// when tok did not come from an OAuth of this package (a token restored
// from storage loses it: x/oauth2 does not serialize Extra).
func BoundKid(tok *oauth2.Token) string {
	if tok == nil {
		return ""
	}
	s, _ := tok.Extra(ExtraBoundKid).(string)
	return s
}

// OAuth is an OAuth 2.0 client whose client assertions and DPoP proofs keyd
// signs. It remembers the DPoP nonces of the authorization server and of
// resource servers (apart, per origin) and what it learned of their clocks.
// It is safe for concurrent use.
type OAuth struct {
	kc   *Client
	cfg  OAuthConfig
	meta *Metadata
	http *http.Client
	log  *slog.Logger
	// endpoints is http that does not follow redirects, for the token
	// and revocation endpoints: see post.
	endpoints *http.Client

	tokenURL, authURL, revocationURL string

	asNonces NonceStore // from the token and revocation endpoints
	rsNonces NonceStore // from resource servers (Transport)
	clock    clockOffsets

	mu       sync.Mutex
	clientID string // cfg.ClientID, or learned from the first assertion

	keys keyFollower // WatchKeys: the DPoP key set's lifecycle, and the token sources that follow it
}

// OAuth returns an OAuth client for cfg. When cfg.TokenURL is empty it
// fetches the metadata of cfg.Issuer (Discover).
func (c *Client) OAuth(ctx context.Context, cfg OAuthConfig) (*OAuth, error) {
	var missing []string
	if cfg.AssertionKeySet == "" {
		missing = append(missing, "AssertionKeySet")
	}
	if cfg.DPoPKeySet == "" {
		missing = append(missing, "DPoPKeySet")
	}
	if cfg.Issuer == "" && cfg.TokenURL == "" {
		missing = append(missing, "Issuer or TokenURL")
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("%w: OAuthConfig needs %s", ErrInvalidArgument, strings.Join(missing, ", "))
	}
	for _, r := range cfg.Resources {
		// RFC 8707 §2: an absolute URI without a fragment.
		if u, err := url.Parse(r); err != nil || !u.IsAbs() || u.Fragment != "" || strings.Contains(r, "#") {
			return nil, fmt.Errorf("%w: resource %q: a resource indicator is an absolute URI without a fragment (RFC 8707)", ErrInvalidArgument, r)
		}
	}
	cfg.Scopes = dedupe(cfg.Scopes)
	o := &OAuth{kc: c, cfg: cfg, http: cfg.HTTPClient, log: cfg.Logger, clientID: cfg.ClientID,
		tokenURL: cfg.TokenURL, authURL: cfg.AuthURL, revocationURL: cfg.RevocationURL}
	if o.http == nil {
		o.http = http.DefaultClient
	}
	if o.log == nil {
		o.log = slog.Default()
	}
	as := *o.http
	if as.Timeout == 0 {
		as.Timeout = cfg.ASTimeout
		if as.Timeout <= 0 {
			as.Timeout = defaultASTimeout
		}
	}
	endpoints := as
	endpoints.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	o.endpoints = &endpoints
	if cfg.Issuer != "" && cfg.TokenURL == "" {
		m, err := Discover(ctx, &as, cfg.Issuer)
		if err != nil {
			return nil, err
		}
		o.meta = m
		o.tokenURL = m.TokenEndpoint
		o.authURL = cmp.Or(cfg.AuthURL, m.AuthorizationEndpoint)
		o.revocationURL = cmp.Or(cfg.RevocationURL, m.RevocationEndpoint)
	}
	for name, u := range map[string]string{"TokenURL": o.tokenURL, "AuthURL": o.authURL, "RevocationURL": o.revocationURL, "RedirectURL": cfg.RedirectURL} {
		if u == "" {
			continue
		}
		if pu, err := url.Parse(u); err != nil || (pu.Scheme != "https" && pu.Scheme != "http") || pu.Host == "" {
			return nil, fmt.Errorf("%w: %s %q is not an absolute http(s) URL", ErrInvalidArgument, name, u)
		}
	}
	return o, nil
}

// dedupe returns ss without its repeated values, in their first order.
func dedupe(ss []string) []string {
	var out []string
	for _, s := range ss {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}

// Metadata returns the authorization server's metadata, or nil when the
// endpoints were configured rather than discovered.
func (o *OAuth) Metadata() *Metadata { return o.meta }

// TokenURL returns the token endpoint.
func (o *OAuth) TokenURL() string { return o.tokenURL }

// --- grants ---

// ClientCredentialsToken gets a new token with the client credentials grant
// (RFC 6749 §4.4), requesting Scopes and Resources. Use ClientCredentials
// for a source that caches it.
func (o *OAuth) ClientCredentialsToken(ctx context.Context) (*oauth2.Token, error) {
	v := url.Values{"grant_type": {"client_credentials"}}
	if len(o.cfg.Scopes) > 0 {
		v.Set("scope", strings.Join(o.cfg.Scopes, " "))
	}
	for _, r := range o.cfg.Resources {
		v.Add("resource", r)
	}
	for k, vs := range o.cfg.EndpointParams {
		v[k] = append([]string(nil), vs...)
	}
	return o.RequestToken(ctx, v)
}

// ClientCredentials returns a source of client credentials tokens that
// caches each token until shortly before it expires (see ExpiryMargin).
// ctx bounds every request the source makes.
func (o *OAuth) ClientCredentials(ctx context.Context) *TokenSource {
	return o.track(&TokenSource{o: o, ctx: ctx, lock: make(chan struct{}, 1), fetch: func(ctx context.Context, _ *oauth2.Token) (*oauth2.Token, error) {
		return o.ClientCredentialsToken(ctx)
	}})
}

// AuthCodeURL returns the URL of an authorization request (RFC 6749 §4.1)
// with PKCE (RFC 7636, S256): send the user there, and give the code that
// comes back to RedirectURL, with the same verifier, to Exchange. verifier
// is the caller's (oauth2.GenerateVerifier makes one); extra adds
// parameters. ClientID must be set.
func (o *OAuth) AuthCodeURL(state, verifier string, extra url.Values) (string, error) {
	if o.authURL == "" {
		return "", fmt.Errorf("%w: no authorization endpoint (set AuthURL or an Issuer whose metadata has one)", ErrInvalidArgument)
	}
	if o.cfg.ClientID == "" {
		return "", fmt.Errorf("%w: AuthCodeURL needs ClientID", ErrInvalidArgument)
	}
	u, err := url.Parse(o.authURL)
	if err != nil {
		return "", fmt.Errorf("%w: AuthURL: %v", ErrInvalidArgument, err)
	}
	v := u.Query()
	v.Set("response_type", "code")
	v.Set("client_id", o.cfg.ClientID)
	if o.cfg.RedirectURL != "" {
		v.Set("redirect_uri", o.cfg.RedirectURL)
	}
	if len(o.cfg.Scopes) > 0 {
		v.Set("scope", strings.Join(o.cfg.Scopes, " "))
	}
	for _, r := range o.cfg.Resources {
		v.Add("resource", r)
	}
	if state != "" {
		v.Set("state", state)
	}
	if verifier != "" {
		v.Set("code_challenge", oauth2.S256ChallengeFromVerifier(verifier))
		v.Set("code_challenge_method", "S256")
	}
	for k, vs := range extra {
		v[k] = append([]string(nil), vs...)
	}
	u.RawQuery = v.Encode()
	return u.String(), nil
}

// Exchange trades an authorization code for a token (RFC 6749 §4.1.3),
// with the PKCE verifier the caller used for AuthCodeURL ("" for none) and
// RedirectURL.
func (o *OAuth) Exchange(ctx context.Context, code, verifier string) (*oauth2.Token, error) {
	v := url.Values{"grant_type": {"authorization_code"}, "code": {code}}
	if o.cfg.RedirectURL != "" {
		v.Set("redirect_uri", o.cfg.RedirectURL)
	}
	if verifier != "" {
		v.Set("code_verifier", verifier)
	}
	return o.RequestToken(ctx, v)
}

// Refresh uses a refresh token (RFC 6749 §6). The new token's
// RefreshToken is empty when the server did not rotate it: keep using the
// old one (TokenSource does).
func (o *OAuth) Refresh(ctx context.Context, refreshToken string) (*oauth2.Token, error) {
	if refreshToken == "" {
		return nil, ErrNoRefreshToken
	}
	return o.RequestToken(ctx, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refreshToken}})
}

// TokenSource returns a source that starts with tok and, once it is about
// to expire, refreshes it with its refresh token (keeping that refresh
// token when the server sends no new one). ctx bounds every refresh.
func (o *OAuth) TokenSource(ctx context.Context, tok *oauth2.Token) *TokenSource {
	return o.track(&TokenSource{o: o, ctx: ctx, lock: make(chan struct{}, 1), tok: tok, fetch: func(ctx context.Context, cur *oauth2.Token) (*oauth2.Token, error) {
		if cur == nil || cur.RefreshToken == "" {
			return nil, fmt.Errorf("the token expired: %w", ErrNoRefreshToken)
		}
		next, err := o.Refresh(ctx, cur.RefreshToken)
		if err != nil {
			return nil, err
		}
		if next.RefreshToken == "" {
			next.RefreshToken = cur.RefreshToken
		}
		return next, nil
	}})
}

// Revoke revokes token (RFC 7009) at the revocation endpoint, with the same
// client authentication and DPoP proof as token requests. hint is
// "access_token", "refresh_token" or "" for none. Revoking a refresh token
// usually revokes the access tokens of its grant too.
func (o *OAuth) Revoke(ctx context.Context, token, hint string) error {
	if o.revocationURL == "" {
		return fmt.Errorf("%w: no revocation endpoint (set RevocationURL or an Issuer whose metadata has one)", ErrInvalidArgument)
	}
	v := url.Values{"token": {token}}
	if hint != "" {
		v.Set("token_type_hint", hint)
	}
	_, err := o.post(ctx, o.revocationURL, v)
	return err
}

// RequestToken sends a token request with the grant parameters in params
// (grant_type and the grant's own), adding the client assertion, client_id
// and a DPoP proof. A server that answers use_dpop_nonce gets exactly one
// retry with its nonce; a server that rejects the proof or the assertion
// while its Date header shows a clock more than 5s away from ours gets one
// retry with iat (and the assertion's exp) on its clock. Each attempt has a
// new assertion and a new proof, each with its own jti. The result is
// checked to be a DPoP token (see AllowBearer) and carries BoundKid.
func (o *OAuth) RequestToken(ctx context.Context, params url.Values) (*oauth2.Token, error) {
	r, err := o.post(ctx, o.tokenURL, params)
	if err != nil {
		return nil, err
	}
	return o.parseToken(r)
}

// --- the token endpoint exchange ---

// endpointResponse is a successful (2xx) answer of the authorization
// server, its body read.
type endpointResponse struct {
	resp *http.Response
	body []byte
	kid  string // of the proof that got it
}

// defaultASTimeout is OAuthConfig.ASTimeout's default.
const defaultASTimeout = 30 * time.Second

// maxResponseSize bounds what is read of an authorization server's answer.
const maxResponseSize = 1 << 20

// post sends params to endpoint with client authentication and DPoP,
// retrying as RequestToken says. A redirect is not followed: it would send
// the form (client assertion, refresh token, code) and the proof on to
// wherever its Location points, and the proof's htu is endpoint's.
func (o *OAuth) post(ctx context.Context, endpoint string, params url.Values) (*endpointResponse, error) {
	var nonceRetried, skewRetried bool
	// At most three attempts: the first, one for a nonce, one for the clock.
	for range 3 {
		r, err := o.postOnce(ctx, endpoint, params)
		if err != nil {
			return nil, err
		}
		if r.resp.StatusCode >= 200 && r.resp.StatusCode < 300 {
			return r, nil
		}
		rerr := retrieveError(r.resp, r.body)
		if loc := r.resp.Header.Get("Location"); loc != "" && r.resp.StatusCode >= 300 && r.resp.StatusCode < 400 {
			return nil, fmt.Errorf("%s redirects to %s, which a client does not follow with its credentials (configure the endpoint the redirect names): %w", endpoint, loc, answerError(endpoint, rerr))
		}
		switch {
		case isNonceChallenge(r.resp, rerr):
			if nonceRetried {
				return nil, fmt.Errorf("%s: %w: %w", endpoint, ErrRepeatedNonceChallenge, rerr)
			}
			if r.resp.Header.Get("DPoP-Nonce") == "" {
				return nil, fmt.Errorf("%s asked for a DPoP nonce without sending one: %w", endpoint, rerr)
			}
			nonceRetried = true
			continue
		case !skewRetried && (rerr.ErrorCode == "invalid_dpop_proof" || rerr.ErrorCode == "invalid_client") &&
			o.clock.learn(endpoint, r.resp, time.Now()):
			skewRetried = true
			continue
		}
		return nil, answerError(endpoint, rerr)
	}
	return nil, fmt.Errorf("%s: gave up after three attempts", endpoint) // unreachable: every third answer returns
}

// postOnce makes one attempt: a new assertion, a new proof, one request.
func (o *OAuth) postOnce(ctx context.Context, endpoint string, params url.Values) (*endpointResponse, error) {
	offset := o.clock.get(endpoint)
	assertion, clientID, err := o.assertion(ctx, offset)
	if err != nil {
		return nil, err
	}
	proof, err := o.proof(ctx, proofParams{method: http.MethodPost, url: endpoint, nonce: o.asNonces.Get(endpoint), offset: offset})
	if err != nil {
		return nil, err
	}
	form := url.Values{}
	for k, vs := range params {
		form[k] = vs
	}
	form.Set("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
	form.Set("client_assertion", assertion)
	form.Set("client_id", clientID)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidArgument, err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("DPoP", proof.JWT)
	resp, err := o.endpoints.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseSize))
	if err != nil {
		return nil, fmt.Errorf("%s: reading the response: %w", endpoint, err)
	}
	o.asNonces.Observe(resp)
	return &endpointResponse{resp: resp, body: body, kid: proof.Kid}, nil
}

// retrieveError is the OAuth error in a token endpoint answer (RFC 6749
// §5.2), or, for a 401 without one, in its WWW-Authenticate challenge.
func retrieveError(resp *http.Response, body []byte) *oauth2.RetrieveError {
	e := &oauth2.RetrieveError{Response: resp, Body: body}
	var v struct {
		Error            string `json:"error"`
		ErrorDescription string `json:"error_description"`
		ErrorURI         string `json:"error_uri"`
	}
	if json.Unmarshal(body, &v) == nil && v.Error != "" {
		e.ErrorCode, e.ErrorDescription, e.ErrorURI = v.Error, v.ErrorDescription, v.ErrorURI
		return e
	}
	if p, ok := dpopChallenge(resp.Header); ok && p["error"] != "" {
		e.ErrorCode, e.ErrorDescription = p["error"], p["error_description"]
	}
	return e
}

// answerError is rerr, or, for an answer that is no OAuth error response
// (a proxy's HTML page), an error that unwraps to rerr whose message names
// endpoint and the status and quotes the start of the body: the message of
// such a RetrieveError holds the whole body, raw.
func answerError(endpoint string, rerr *oauth2.RetrieveError) error {
	if rerr.ErrorCode != "" {
		return rerr
	}
	return &answerErr{endpoint: endpoint, rerr: rerr}
}

type answerErr struct {
	endpoint string
	rerr     *oauth2.RetrieveError
}

// maxErrorExcerpt bounds how much of an answer's body an error quotes.
const maxErrorExcerpt = 200

func (e *answerErr) Error() string {
	msg := fmt.Sprintf("%s answered HTTP %s, not an OAuth error response", e.endpoint, e.rerr.Response.Status)
	if b := e.rerr.Body; len(b) > maxErrorExcerpt {
		msg += fmt.Sprintf(": %q (%d bytes more)", b[:maxErrorExcerpt], len(b)-maxErrorExcerpt)
	} else if len(b) > 0 {
		msg += fmt.Sprintf(": %q", b)
	}
	return msg
}

func (e *answerErr) Unwrap() error { return e.rerr }

// isNonceChallenge reports whether an error answer asks for a DPoP nonce:
// error use_dpop_nonce in the body (an authorization server) or in a DPoP
// WWW-Authenticate challenge (a resource server).
func isNonceChallenge(resp *http.Response, rerr *oauth2.RetrieveError) bool {
	if rerr != nil && rerr.ErrorCode == "use_dpop_nonce" {
		return true
	}
	p, ok := dpopChallenge(resp.Header)
	return ok && p["error"] == "use_dpop_nonce"
}

// parseToken checks a token response and makes an oauth2.Token of it.
func (o *OAuth) parseToken(r *endpointResponse) (*oauth2.Token, error) {
	var raw map[string]any
	dec := json.NewDecoder(bytes.NewReader(r.body))
	dec.UseNumber()
	if err := dec.Decode(&raw); err != nil {
		return nil, fmt.Errorf("token response from %s is not a JSON object: %w", o.tokenURL, err)
	}
	str := func(k string) string { s, _ := raw[k].(string); return s }
	tok := &oauth2.Token{AccessToken: str("access_token"), TokenType: str("token_type"), RefreshToken: str("refresh_token")}
	if tok.AccessToken == "" {
		return nil, fmt.Errorf("token response from %s has no access_token", o.tokenURL)
	}
	var expiresIn string
	switch v := raw["expires_in"].(type) {
	case json.Number:
		expiresIn = v.String()
	case string: // some servers send a string
		expiresIn = v
	}
	// Some servers send a fraction (3599.98, 3600.0): it is a lifetime all
	// the same, not a token that never expires.
	if secs, err := strconv.ParseFloat(strings.TrimSpace(expiresIn), 64); err == nil && secs > 0 {
		secs = min(secs, float64(math.MaxInt64/int64(time.Second)))
		tok.ExpiresIn = max(1, int64(secs))
		tok.Expiry = time.Now().Add(time.Duration(secs * float64(time.Second)))
	}
	if !strings.EqualFold(tok.TokenType, "DPoP") {
		if !o.cfg.AllowBearer {
			return nil, fmt.Errorf("%w: %s answered token_type %q: is DPoP required for client %s there? (OAuthConfig.AllowBearer accepts such tokens)",
				ErrNotDPoPBound, o.tokenURL, tok.TokenType, o.currentClientID())
		}
		o.log.Warn("the authorization server issued a token that is not DPoP-bound; it will be sent as a bearer token",
			"token_endpoint", o.tokenURL, "token_type", tok.TokenType)
	} else {
		raw[ExtraBoundKid] = r.kid
	}
	raw[extraResponse] = maps.Clone(raw)
	return tok.WithExtra(raw), nil
}

// extraResponse is the Extra member that holds the whole response: a name
// no server sends.
const extraResponse = "\x00keyd:response"

// TokenResponse returns the members of the token endpoint's JSON response
// that tok came from (numbers as json.Number), plus ExtraBoundKid for a
// DPoP token; nil for a token that did not come from an OAuth of this
// package.
func TokenResponse(tok *oauth2.Token) map[string]any {
	if tok == nil {
		return nil
	}
	m, _ := tok.Extra(extraResponse).(map[string]any)
	return maps.Clone(m)
}

func (o *OAuth) currentClientID() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.clientID
}

// --- signing through keyd ---

// assertionLifetime is exp - iat of an assertion whose iat the client sets
// (on a server's clock); otherwise keyd fills both.
const assertionLifetime = 60

// assertion signs a new client assertion (with a new jti) and returns it
// with the client_id it is for. A non-zero offset puts iat and exp on the
// server's clock.
func (o *OAuth) assertion(ctx context.Context, offset time.Duration) (string, string, error) {
	req := SignRequest{KeySet: o.cfg.AssertionKeySet, Purpose: "client_assertion"}
	if offset != 0 {
		iat := time.Now().Add(offset).Unix()
		req.Claims = map[string]any{"iat": iat, "exp": iat + assertionLifetime}
	}
	s, err := o.kc.Sign(ctx, req)
	if err != nil {
		if offset != 0 {
			return "", "", fmt.Errorf("client assertion with iat on the server's clock (%v from ours; keyd accepts a caller's iat only within the key set's iat_skew): %w", offset, err)
		}
		return "", "", fmt.Errorf("client assertion: %w", err)
	}
	iss, err := jwtClaim(s.JWT, "iss")
	if err != nil {
		return "", "", fmt.Errorf("%w: client assertion from keyd: %v", ErrInternal, err)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.clientID == "" {
		o.clientID = iss
	}
	if iss != o.clientID {
		return "", "", fmt.Errorf("%w: client_id %q does not match key set %s, whose assertions are for client_id %q",
			ErrInvalidArgument, o.clientID, o.cfg.AssertionKeySet, iss)
	}
	return s.JWT, iss, nil
}

// jwtClaim returns a string claim of a compact JWT, unverified.
func jwtClaim(jwt, name string) (string, error) {
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return "", errors.New("not a compact JWS")
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return "", err
	}
	var claims map[string]any
	if err := json.Unmarshal(b, &claims); err != nil {
		return "", err
	}
	s, ok := claims[name].(string)
	if !ok {
		return "", fmt.Errorf("no %s claim", name)
	}
	return s, nil
}

type proofParams struct {
	method, url string
	accessToken string
	nonce       string
	kid         string
	offset      time.Duration
}

// proof signs a DPoP proof. Unlike DPoP.Proof it can put iat on a server's
// clock (offset), within the dpop key set's iat_skew.
func (o *OAuth) proof(ctx context.Context, p proofParams) (Proof, error) {
	htu, err := policy.NormalizeHTU(p.url)
	if err != nil {
		return Proof{}, fmt.Errorf("%w: %v", ErrInvalidArgument, err)
	}
	claims := map[string]any{"htm": p.method, "htu": htu}
	if p.accessToken != "" {
		claims["ath"] = AccessTokenHash(p.accessToken)
	}
	if p.nonce != "" {
		claims["nonce"] = p.nonce
	}
	if p.offset != 0 {
		claims["iat"] = time.Now().Add(p.offset).Unix()
	}
	s, err := o.kc.Sign(ctx, SignRequest{KeySet: o.cfg.DPoPKeySet, Kid: p.kid, Claims: claims, Purpose: "dpop"})
	if err != nil {
		if p.offset != 0 {
			return Proof{}, fmt.Errorf("DPoP proof with iat on the server's clock (%v from ours; keyd accepts a caller's iat only within the key set's iat_skew): %w", p.offset, err)
		}
		return Proof{}, fmt.Errorf("DPoP proof: %w", err)
	}
	return Proof{JWT: s.JWT, Kid: s.Kid}, nil
}

// --- the token cache ---

// TokenSource is an oauth2.TokenSource that keeps its token until shortly
// before it expires and then gets a new one (client credentials) or
// refreshes it (TokenSource). Concurrent callers share one request. The
// tokens carry the kid they are bound to (BoundKid), which Transport proves
// with. When the client follows its DPoP key set (OAuth.WatchKeys), a
// token is also replaced once its key can no longer prove for it: see
// WatchKeys.
type TokenSource struct {
	o     *OAuth
	ctx   context.Context
	fetch func(ctx context.Context, cur *oauth2.Token) (*oauth2.Token, error)

	// lock is held (a value in it) by whoever reads or replaces tok,
	// during a fetch too; a channel, so that a caller can stop waiting
	// for it (TokenContext).
	lock chan struct{}
	tok  *oauth2.Token
}

// acquire takes s's lock, or gives up when ctx ends.
func (s *TokenSource) acquire(ctx context.Context) error {
	select {
	case s.lock <- struct{}{}:
		return nil
	default:
	}
	select {
	case s.lock <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%w: waiting for the access token being fetched: %w", ErrDeadlineExceeded, ctx.Err())
	}
}

// hold takes s's lock, however long that takes.
func (s *TokenSource) hold() { s.lock <- struct{}{} }

func (s *TokenSource) release() { <-s.lock }

// defaultExpiryMargin is OAuthConfig.ExpiryMargin's default.
const defaultExpiryMargin = 30 * time.Second

// Token returns the cached token, or a new one when it is about to expire
// or its DPoP key is about to stop signing.
func (s *TokenSource) Token() (*oauth2.Token, error) {
	return s.TokenContext(context.Background())
}

// TokenContext is Token for a caller that stops waiting when ctx ends:
// while another call fetches a token (which OAuthConfig.ASTimeout bounds),
// or while it fetches one itself. A fetch it started goes on for the
// others, bounded by the source's own context.
func (s *TokenSource) TokenContext(ctx context.Context) (*oauth2.Token, error) {
	if err := s.acquire(ctx); err != nil {
		return nil, err
	}
	defer s.release()
	if s.tok != nil && s.usable(s.tok, time.Now()) {
		return s.tok, nil
	}
	tok, err := s.fetch(s.ctx, s.tok)
	if err != nil {
		return nil, err
	}
	s.tok = tok
	return tok, nil
}

// Invalidate drops tok from the cache if it is the cached token, so that
// the next Token call gets a new one (a resource server said the token is
// invalid, say). A refreshing source keeps tok's refresh token.
func (s *TokenSource) Invalidate(tok *oauth2.Token) {
	s.hold()
	defer s.release()
	s.invalidateLocked(tok)
}

func (s *TokenSource) invalidateLocked(tok *oauth2.Token) {
	if s.tok == tok && tok != nil {
		// Expired, so Token refreshes it rather than returning it.
		stale := *tok
		stale.Expiry = time.Unix(1, 0)
		s.tok = &stale
	}
}

// usable reports whether tok may still be handed out at now: it is not
// about to expire, and, as far as the client follows the DPoP key set, its
// key is not about to stop signing.
func (s *TokenSource) usable(tok *oauth2.Token, now time.Time) bool {
	return s.fresh(tok, now) && s.o.boundKeyUsable(BoundKid(tok), now, s.margin(tok))
}

func (s *TokenSource) fresh(tok *oauth2.Token, now time.Time) bool {
	if tok.AccessToken == "" {
		return false
	}
	if tok.Expiry.IsZero() {
		return true
	}
	return now.Before(tok.Expiry.Add(-s.margin(tok)))
}

// margin is how long before its end tok is replaced: ExpiryMargin, at most
// half its lifetime.
func (s *TokenSource) margin(tok *oauth2.Token) time.Duration {
	margin := s.o.cfg.ExpiryMargin
	if margin <= 0 {
		margin = defaultExpiryMargin
	}
	if tok.ExpiresIn > 0 {
		margin = min(margin, time.Duration(tok.ExpiresIn)*time.Second/2)
	}
	return margin
}

// --- what a client learns of servers' clocks ---

// skewThreshold is the smallest clock difference the client corrects.
const skewThreshold = 5 * time.Second

// clockOffsets remembers, per origin, how far a server's clock is from
// ours (server - local), as learned from the Date header of a response
// that rejected a proof or an assertion.
type clockOffsets struct {
	mu sync.Mutex
	m  map[string]time.Duration
}

func (c *clockOffsets) get(rawURL string) time.Duration {
	o := Origin(rawURL)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[o]
}

// learn records the offset resp's Date header shows (received at now) and
// reports whether it differs from the one in use by more than
// skewThreshold, which makes a retry worth it.
func (c *clockOffsets) learn(rawURL string, resp *http.Response, now time.Time) bool {
	o := Origin(rawURL)
	date, err := http.ParseTime(resp.Header.Get("Date"))
	if o == "" || err != nil {
		return false
	}
	// Date has whole seconds: the server's clock was in [date, date+1s).
	offset := date.Add(500 * time.Millisecond).Sub(now).Round(time.Second)
	if offset.Abs() < skewThreshold {
		offset = 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if (offset - c.m[o]).Abs() < skewThreshold {
		return false
	}
	if c.m == nil {
		c.m = map[string]time.Duration{}
	}
	if _, ok := c.m[o]; !ok && len(c.m) >= maxOrigins {
		for k := range c.m {
			delete(c.m, k)
			break
		}
	}
	c.m[o] = offset
	return true
}
