package client

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"

	"github.com/keyd-dev/keyd/internal/jsonstr"
	"github.com/keyd-dev/keyd/internal/policy"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// DPoP makes DPoP proofs (RFC 9449) with the keys of one dpop key set and
// remembers the nonces servers hand out, per origin. It is safe for
// concurrent use.
type DPoP struct {
	c      *Client
	keyset string
	nonces *NonceStore
}

// DPoP returns a prover for keyset, a key set of purpose dpop.
func (c *Client) DPoP(keyset string) *DPoP {
	return &DPoP{c: c, keyset: keyset, nonces: &NonceStore{}}
}

// Nonces is the prover's nonce store.
func (p *DPoP) Nonces() *NonceStore { return p.nonces }

// ProofOption adjusts one proof.
type ProofOption func(*proofOptions)

type proofOptions struct {
	accessToken string
	nonce       *string
	kid         string
}

// WithAccessToken binds the proof to an access token through its ath claim
// (base64url SHA-256 of the token), as resource requests need. Empty: none.
func WithAccessToken(token string) ProofOption {
	return func(o *proofOptions) { o.accessToken = token }
}

// WithNonce sets the proof's nonce instead of the one remembered for the
// URL's origin. An empty nonce means none.
func WithNonce(nonce string) ProofOption {
	return func(o *proofOptions) { o.nonce = &nonce }
}

// WithKid proves with the key version kid (a draining key that an access
// token is bound to) instead of the active key.
func WithKid(kid string) ProofOption {
	return func(o *proofOptions) { o.kid = kid }
}

// Proof is a signed DPoP proof.
type Proof struct {
	JWT string
	// Kid is the RFC 7638 thumbprint of the proof's key: the jkt an access
	// token bound to it carries in cnf.
	Kid string
}

// Proof returns a proof for an HTTP request with method to rawURL. The
// proof's htu is rawURL without query and fragment (and without userinfo
// and default port); its nonce is the one last seen from rawURL's origin
// unless WithNonce says otherwise; jti and iat are set by the daemon.
func (p *DPoP) Proof(ctx context.Context, method, rawURL string, opts ...ProofOption) (Proof, error) {
	var o proofOptions
	for _, opt := range opts {
		opt(&o)
	}
	htu, err := policy.NormalizeHTU(rawURL)
	if err != nil {
		return Proof{}, fmt.Errorf("%w: %v", ErrInvalidArgument, err)
	}
	if method == "" {
		return Proof{}, fmt.Errorf("%w: htm: the HTTP method is required", ErrInvalidArgument)
	}
	ath := ""
	if o.accessToken != "" {
		ath = AccessTokenHash(o.accessToken)
	}
	nonce := ""
	if o.nonce != nil {
		nonce = *o.nonce
	} else {
		nonce = p.nonces.Get(rawURL)
	}
	s, err := p.c.sign(ctx, &keydv1.SignRequest{Keyset: p.keyset, Kid: o.kid, Purpose: "dpop", Claims: dpopClaims(method, htu, ath, nonce)})
	if err != nil {
		return Proof{}, err
	}
	return Proof{JWT: s.JWT, Kid: s.Kid}, nil
}

// dpopClaims returns the claims of a proof as JSON, the bytes json.Marshal
// writes for the map {"htm", "htu", and "ath" and "nonce" unless empty}
// (keys in order, strings escaped as encoding/json does), without its
// reflection: a service builds one per request it sends.
func dpopClaims(htm, htu, ath, nonce string) []byte {
	b := make([]byte, 0, 32+len(htm)+len(htu)+len(ath)+len(nonce))
	if ath != "" {
		b = append(b, `{"ath":`...)
		b = jsonstr.Append(b, ath, true)
		b = append(b, `,"htm":`...)
	} else {
		b = append(b, `{"htm":`...)
	}
	b = jsonstr.Append(b, htm, true)
	b = append(b, `,"htu":`...)
	b = jsonstr.Append(b, htu, true)
	if nonce != "" {
		b = append(b, `,"nonce":`...)
		b = jsonstr.Append(b, nonce, true)
	}
	return append(b, '}')
}

// AccessTokenHash is the ath of a DPoP proof: base64url (no padding) of the
// SHA-256 of the ASCII access token.
func AccessTokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// NonceStore remembers the latest DPoP-Nonce of each origin
// (scheme://host:port). It is safe for concurrent use. The zero value is
// ready to use.
type NonceStore struct {
	mu sync.Mutex
	m  map[string]string
}

// maxOrigins bounds the store; past it, a new origin's nonce takes the
// place of an arbitrary other's (a client talks to a handful of servers,
// and a dropped nonce costs one more round trip).
const maxOrigins = 256

// Origin returns the origin of rawURL, lower-cased, with the default port
// made explicit, or "" when rawURL is not an absolute http(s) URL.
func Origin(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return ""
	}
	scheme := strings.ToLower(u.Scheme)
	host := strings.ToLower(u.Hostname())
	port := u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[scheme]
	}
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return scheme + "://" + host + ":" + port
}

// Get returns the nonce last seen from rawURL's origin, or "".
func (s *NonceStore) Get(rawURL string) string {
	o := Origin(rawURL)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.m[o]
}

// Set records nonce for rawURL's origin. An empty nonce is ignored.
func (s *NonceStore) Set(rawURL, nonce string) {
	o := Origin(rawURL)
	if o == "" || nonce == "" {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]string{}
	}
	if _, ok := s.m[o]; !ok && len(s.m) >= maxOrigins {
		for k := range s.m {
			delete(s.m, k)
			break
		}
	}
	s.m[o] = nonce
}

// Observe records the DPoP-Nonce header of resp, if any, for the origin of
// resp's request. Call it on every response from a DPoP server.
func (s *NonceStore) Observe(resp *http.Response) {
	if resp == nil || resp.Request == nil || resp.Request.URL == nil {
		return
	}
	if n := resp.Header.Get("DPoP-Nonce"); n != "" {
		s.Set(resp.Request.URL.String(), n)
	}
}
