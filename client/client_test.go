package client

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestOrigin(t *testing.T) {
	cases := map[string]string{
		"https://AS.example.com/token?x=1": "https://as.example.com:443",
		"https://as.example.com:443/a":     "https://as.example.com:443",
		"http://as.example.com/":           "http://as.example.com:80",
		"http://as.example.com:8080/x#f":   "http://as.example.com:8080",
		"https://[::1]:8443/x":             "https://[::1]:8443",
		"ftp://as.example.com/":            "",
		"/relative":                        "",
		"https://user:pw@as.example.com/x": "https://as.example.com:443",
	}
	for in, want := range cases {
		if got := Origin(in); got != want {
			t.Errorf("Origin(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestNonceStorePerOrigin(t *testing.T) {
	var s NonceStore
	s.Set("https://as.example.com/token", "n1")
	s.Set("https://rs.example.com/api", "n2")
	s.Set("https://as.example.com/token", "")
	if got := s.Get("https://AS.example.com:443/other"); got != "n1" {
		t.Errorf("as nonce %q", got)
	}
	if got := s.Get("https://rs.example.com/x"); got != "n2" {
		t.Errorf("rs nonce %q", got)
	}
	if got := s.Get("http://as.example.com/token"); got != "" {
		t.Errorf("other scheme shares a nonce: %q", got)
	}
	u, _ := url.Parse("https://as.example.com/token")
	s.Observe(&http.Response{Header: http.Header{"Dpop-Nonce": {"n3"}}, Request: &http.Request{URL: u}})
	if got := s.Get("https://as.example.com/"); got != "n3" {
		t.Errorf("observed nonce %q", got)
	}
	for i := range 2 * maxOrigins {
		s.Set(fmt.Sprintf("https://h%d.example.com/", i), "n")
	}
	if len(s.m) > maxOrigins {
		t.Errorf("store grew to %d origins", len(s.m))
	}
}

func TestAccessTokenHash(t *testing.T) {
	// RFC 9449 §7.1 example: the ath of this access token.
	const tok = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
	if got := AccessTokenHash(tok); got != "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo" {
		t.Errorf("ath %s", got)
	}
}

func TestErrorsMapBack(t *testing.T) {
	cases := map[codes.Code]error{
		codes.InvalidArgument:    ErrInvalidArgument,
		codes.PermissionDenied:   ErrPermissionDenied,
		codes.Unauthenticated:    ErrUnauthenticated,
		codes.FailedPrecondition: ErrFailedPrecondition,
		codes.NotFound:           ErrNotFound,
		codes.Unavailable:        ErrUnavailable,
		codes.DataLoss:           ErrKeyLost,
		codes.ResourceExhausted:  ErrResourceExhausted,
		codes.DeadlineExceeded:   ErrDeadlineExceeded,
		codes.Internal:           ErrInternal,
	}
	for c, want := range cases {
		err := fromStatus(status.Error(c, "msg"))
		if !errors.Is(err, want) {
			t.Errorf("%v does not match %v", c, want)
		}
		if status.Code(err) != c {
			t.Errorf("%v: status code lost", c)
		}
		for c2, other := range cases {
			if c2 != c && errors.Is(err, other) {
				t.Errorf("%v also matches %v", c, other)
			}
		}
	}
}
