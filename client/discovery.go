package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/oauth2"
)

// Metadata is the part of an authorization server's metadata (RFC 8414,
// OpenID Connect Discovery 1.0) that an OAuth client of keyd uses.
type Metadata struct {
	Issuer                string `json:"issuer"`
	AuthorizationEndpoint string `json:"authorization_endpoint,omitempty"`
	TokenEndpoint         string `json:"token_endpoint"`
	RevocationEndpoint    string `json:"revocation_endpoint,omitempty"`
	IntrospectionEndpoint string `json:"introspection_endpoint,omitempty"`
	UserinfoEndpoint      string `json:"userinfo_endpoint,omitempty"`
	JWKSURI               string `json:"jwks_uri,omitempty"`

	TokenEndpointAuthMethodsSupported []string `json:"token_endpoint_auth_methods_supported,omitempty"`
	DPoPSigningAlgValuesSupported     []string `json:"dpop_signing_alg_values_supported,omitempty"`
	GrantTypesSupported               []string `json:"grant_types_supported,omitempty"`
	CodeChallengeMethodsSupported     []string `json:"code_challenge_methods_supported,omitempty"`
}

// Endpoint returns the metadata's endpoints as an oauth2.Endpoint, for code
// that also uses golang.org/x/oauth2 directly.
func (m *Metadata) Endpoint() oauth2.Endpoint {
	return oauth2.Endpoint{AuthURL: m.AuthorizationEndpoint, TokenURL: m.TokenEndpoint, AuthStyle: oauth2.AuthStyleInParams}
}

// maxMetadataSize bounds a metadata document.
const maxMetadataSize = 1 << 20

// ErrDiscovery is matched by every error of Discover.
var ErrDiscovery = errors.New("authorization server metadata")

// Discover fetches the metadata of the authorization server whose issuer
// identifier is issuer: first from the RFC 8414 location
// (/.well-known/oauth-authorization-server, inserted before the issuer's
// path), then, if that is not found, from the OpenID Connect location
// (issuer + /.well-known/openid-configuration). The document's issuer must
// equal issuer exactly (RFC 8414 §3.3) and it must name a token endpoint.
// httpClient nil means http.DefaultClient. Errors match ErrDiscovery.
func Discover(ctx context.Context, httpClient *http.Client, issuer string) (*Metadata, error) {
	if httpClient == nil {
		httpClient = http.DefaultClient
	}
	u, err := url.Parse(issuer)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("%w: issuer %q must be an absolute http(s) URL without query or fragment", ErrDiscovery, issuer)
	}
	path := strings.TrimSuffix(u.EscapedPath(), "/")
	rfc8414 := u.Scheme + "://" + u.Host + "/.well-known/oauth-authorization-server" + path
	oidc := u.Scheme + "://" + u.Host + path + "/.well-known/openid-configuration"

	var errs []error
	for _, loc := range []string{rfc8414, oidc} {
		m, missing, err := fetchMetadata(ctx, httpClient, loc)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrDiscovery, loc, err)
		}
		if missing != "" {
			errs = append(errs, fmt.Errorf("%s: %s", loc, missing))
			continue
		}
		if m.Issuer != issuer {
			return nil, fmt.Errorf("%w: %s names issuer %q, not %q", ErrDiscovery, loc, m.Issuer, issuer)
		}
		if m.TokenEndpoint == "" {
			return nil, fmt.Errorf("%w: %s names no token_endpoint", ErrDiscovery, loc)
		}
		for name, e := range map[string]string{
			"token_endpoint": m.TokenEndpoint, "authorization_endpoint": m.AuthorizationEndpoint,
			"revocation_endpoint": m.RevocationEndpoint,
		} {
			if e == "" {
				continue
			}
			if eu, err := url.Parse(e); err != nil || (eu.Scheme != "https" && eu.Scheme != "http") || eu.Host == "" {
				return nil, fmt.Errorf("%w: %s: %s %q is not an absolute http(s) URL", ErrDiscovery, loc, name, e)
			}
		}
		return m, nil
	}
	return nil, fmt.Errorf("%w for issuer %s: %w", ErrDiscovery, issuer, errors.Join(errs...))
}

// fetchMetadata GETs one metadata document. missing says why there is
// none at loc — a client error (404, but also the 400 or 403 some servers
// give a path they do not serve) or an answer that is not a metadata
// document — which makes Discover try the next location; err is a failure
// that trying another location would not cure (a server error, a
// transport failure, an oversized document).
func fetchMetadata(ctx context.Context, httpClient *http.Client, loc string) (m *Metadata, missing string, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, loc, nil)
	if err != nil {
		return nil, "", err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := httpClient.Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxMetadataSize+1))
	if err != nil {
		return nil, "", err
	}
	switch {
	case resp.StatusCode >= 400 && resp.StatusCode < 500:
		return nil, "HTTP " + resp.Status, nil
	case resp.StatusCode != http.StatusOK:
		return nil, "", fmt.Errorf("HTTP %s", resp.Status)
	case len(body) > maxMetadataSize:
		return nil, "", fmt.Errorf("document is larger than %d bytes", maxMetadataSize)
	}
	m = new(Metadata)
	if err := json.Unmarshal(body, m); err != nil {
		return nil, fmt.Sprintf("not a metadata document (%v)", err), nil
	}
	return m, "", nil
}
