package client_test

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"golang.org/x/oauth2"

	"github.com/keyd-dev/keyd/client"
)

// A token or revocation endpoint that redirects is not followed: a 307 or
// 308 would send the form (refresh token, code, client assertion) and the
// DPoP proof to wherever Location says, and the proof's htu is for the
// endpoint anyway. The redirect is an error naming the status.
func TestEndpointRedirectNotFollowed(t *testing.T) {
	elsewhere := newFakeAS(t)
	f := newFakeAS(t)
	mux := http.NewServeMux()
	mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, elsewhere.url()+"/token", http.StatusTemporaryRedirect)
	})
	mux.HandleFunc("/revoke", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, elsewhere.url()+"/revoke", http.StatusPermanentRedirect)
	})
	redirector := httptest.NewServer(mux)
	defer redirector.Close()
	o, _ := newOAuth(t, f, func(c *client.OAuthConfig) {
		c.Issuer, c.TokenURL, c.RevocationURL = "", redirector.URL+"/token", redirector.URL+"/revoke"
	})

	_, err := o.Refresh(ctx(t), "rt-secret")
	var rerr *oauth2.RetrieveError
	if !errors.As(err, &rerr) || rerr.Response.StatusCode != http.StatusTemporaryRedirect || !strings.Contains(err.Error(), "redirects to "+elsewhere.url()+"/token") {
		t.Errorf("refresh through a redirect: err = %v, want a RetrieveError with the 307", err)
	}
	if err := o.Revoke(ctx(t), "rt-secret", "refresh_token"); !errors.As(err, &rerr) || rerr.Response.StatusCode != http.StatusPermanentRedirect {
		t.Errorf("revocation through a redirect: err = %v, want a RetrieveError with the 308", err)
	}
	for _, a := range elsewhere.seen() {
		t.Errorf("the redirect target received %s with form %v", a.path, a.form)
	}
}
