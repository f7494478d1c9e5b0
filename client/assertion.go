package client

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"

	"github.com/go-jose/go-jose/v4"
)

// ClientAssertion returns a private_key_jwt client assertion (RFC 7523)
// signed by the active key of keyset, a key set of purpose client_assertion.
// The daemon sets iss, sub and aud from its configuration and a fresh jti,
// iat and exp: call it once per token request, including retries.
func (c *Client) ClientAssertion(ctx context.Context, keyset string) (string, error) {
	s, err := c.Sign(ctx, SignRequest{KeySet: keyset, Purpose: "client_assertion"})
	if err != nil {
		return "", err
	}
	return s.JWT, nil
}

// OpaqueSigner returns a go-jose OpaqueSigner backed by the active key of
// keyset (a key set of purpose jwt, typically), for code that builds its
// JWTs with go-jose. The signer is pinned to the key that is active now; its
// Public().KeyID is that kid, so go-jose writes it into the header, and the
// daemon checks header and claims against the key set's policy before
// signing. The OpaqueSigner interface has no context, so ctx bounds every
// signature the signer makes.
func (c *Client) OpaqueSigner(ctx context.Context, keyset string) (jose.OpaqueSigner, error) {
	k, err := c.ActiveKey(ctx, keyset)
	if err != nil {
		return nil, err
	}
	var jwk jose.JSONWebKey
	if err := jwk.UnmarshalJSON(k.JWK); err != nil {
		return nil, fmt.Errorf("public key of %s: %w", k.Kid, err)
	}
	jwk.KeyID, jwk.Algorithm, jwk.Use = k.Kid, k.Alg, "sig"
	return &opaqueSigner{c: c, keyset: keyset, jwk: jwk, ctx: ctx}, nil
}

type opaqueSigner struct {
	c      *Client
	keyset string
	jwk    jose.JSONWebKey
	ctx    context.Context
}

func (s *opaqueSigner) Public() *jose.JSONWebKey { j := s.jwk; return &j }

func (s *opaqueSigner) Algs() []jose.SignatureAlgorithm {
	return []jose.SignatureAlgorithm{jose.SignatureAlgorithm(s.jwk.Algorithm)}
}

// SignPayload signs the JWS signing input go-jose built.
func (s *opaqueSigner) SignPayload(payload []byte, alg jose.SignatureAlgorithm) ([]byte, error) {
	if string(alg) != s.jwk.Algorithm {
		return nil, fmt.Errorf("%w: key %s signs %s, not %s", ErrInvalidArgument, s.jwk.KeyID, s.jwk.Algorithm, alg)
	}
	signed, err := s.c.SignInput(s.ctx, s.keyset, s.jwk.KeyID, payload)
	if err != nil {
		return nil, err
	}
	i := strings.LastIndexByte(signed.JWT, '.')
	if i < 0 || signed.JWT[:i] != string(payload) {
		return nil, fmt.Errorf("%w: keyd returned a token for a different signing input", ErrInternal)
	}
	return base64.RawURLEncoding.DecodeString(signed.JWT[i+1:])
}
