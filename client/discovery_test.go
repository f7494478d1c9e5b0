package client_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/keyd-dev/keyd/client"
)

// Discover tries RFC 8414's location first, with the issuer's path after
// the well-known segment, then OpenID Connect's, after the path; the
// document's issuer must be the issuer asked for.
func TestDiscover(t *testing.T) {
	var mu sync.Mutex
	var paths []string
	docs := map[string]func(base string) map[string]string{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		paths = append(paths, r.URL.Path)
		mu.Unlock()
		switch r.URL.Path {
		case "/.well-known/oauth-authorization-server/entra":
			http.Error(w, "unknown tenant", http.StatusBadRequest)
			return
		case "/.well-known/oauth-authorization-server/portal":
			w.Header().Set("Content-Type", "text/html")
			w.Write([]byte("<html>sign in</html>"))
			return
		}
		doc, ok := docs[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		json.NewEncoder(w).Encode(doc("http://" + r.Host))
	}))
	defer srv.Close()
	good := func(issuer string) func(string) map[string]string {
		return func(base string) map[string]string {
			return map[string]string{"issuer": base + issuer, "token_endpoint": base + "/t", "revocation_endpoint": base + "/r"}
		}
	}
	docs["/.well-known/oauth-authorization-server/tenant/a"] = good("/tenant/a")
	docs["/oidc/.well-known/openid-configuration"] = good("/oidc")
	docs["/entra/.well-known/openid-configuration"] = good("/entra")
	docs["/portal/.well-known/openid-configuration"] = good("/portal")
	docs["/.well-known/oauth-authorization-server/liar"] = good("/someone-else")
	docs["/.well-known/oauth-authorization-server/notoken"] = func(base string) map[string]string { return map[string]string{"issuer": base + "/notoken"} }

	ctx := context.Background()
	reset := func() { mu.Lock(); paths = nil; mu.Unlock() }

	m, err := client.Discover(ctx, nil, srv.URL+"/tenant/a")
	if err != nil {
		t.Fatal(err)
	}
	if m.TokenEndpoint != srv.URL+"/t" || m.RevocationEndpoint != srv.URL+"/r" || m.Endpoint().TokenURL != srv.URL+"/t" {
		t.Errorf("metadata %+v", m)
	}
	reset()
	if _, err := client.Discover(ctx, srv.Client(), srv.URL+"/oidc"); err != nil {
		t.Fatal(err)
	}
	if strings.Join(paths, " ") != "/.well-known/oauth-authorization-server/oidc /oidc/.well-known/openid-configuration" {
		t.Errorf("fetched %q", paths)
	}

	// A server that answers RFC 8414's location with a client error other
	// than 404, or with a page that is no metadata, is asked at OpenID
	// Connect's location too.
	for _, issuer := range []string{srv.URL + "/entra", srv.URL + "/portal"} {
		if _, err := client.Discover(ctx, nil, issuer); err != nil {
			t.Errorf("Discover(%s) = %v; want the OpenID Connect document", issuer, err)
		}
	}

	for _, tc := range []struct{ issuer, want string }{
		{srv.URL + "/liar", `names issuer "` + srv.URL + `/someone-else"`},
		{srv.URL + "/notoken", "names no token_endpoint"},
		{srv.URL + "/missing", "openid-configuration: HTTP 404 Not Found"},
		{"ftp://x/", "must be an absolute http(s) URL"},
		{srv.URL + "/?q=1", "must be an absolute http(s) URL"},
	} {
		_, err := client.Discover(ctx, nil, tc.issuer)
		if !errors.Is(err, client.ErrDiscovery) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Discover(%s) = %v, want an ErrDiscovery containing %q", tc.issuer, err, tc.want)
		}
	}
}
