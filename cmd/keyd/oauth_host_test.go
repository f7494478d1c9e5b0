package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// `keyd request -H 'Host: name'` reaches a virtual host through the URL's
// address, as curl does: the server gets that Host, and a proof for it.
func TestRequestHostHeader(t *testing.T) {
	f := newFakeServer(t)
	socket := startDaemon(t, f.srv.URL)
	rs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"host": r.Host, "htu": claimsOf(r.Header.Get("DPoP"))["htu"]})
	}))
	defer rs.Close()
	var stdout, stderr strings.Builder
	status := run([]string{"request", "-H", "Host: rs.example.test", "--socket", socket, "--issuer", f.srv.URL, "--client-id", "c1",
		"--dpop-keyset", "dpop", "--assertion-keyset", "assert", rs.URL + "/api"}, &stdout, &stderr)
	want := `{"host":"rs.example.test","htu":"http://rs.example.test/api"}` + "\n"
	if status != 0 || stdout.String() != want {
		t.Errorf("exit %d, stdout %q, stderr %q; want stdout %q", status, stdout.String(), stderr.String(), want)
	}
}
