package httpapi

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/rotation"
)

type fakeKeys map[string][]rotation.Version

func (f fakeKeys) Versions(names ...string) []rotation.Version { return f[names[0]] }
func (f fakeKeys) KeySet(name string) (rotation.KeySet, bool) {
	_, ok := f[name]
	return rotation.KeySet{Name: name}, ok
}

func encode(vs []rotation.Version) ([]byte, error) {
	var keys []json.RawMessage
	for _, v := range vs {
		if v.State.Published() {
			keys = append(keys, v.JWK)
		}
	}
	return json.Marshal(map[string]any{"keys": keys})
}

func TestJWKS(t *testing.T) {
	keys := fakeKeys{"as": {
		{Kid: "a", State: rotation.Active, JWK: json.RawMessage(`{"kid":"a"}`)},
		{Kid: "b", State: rotation.Next, JWK: json.RawMessage(`{"kid":"b"}`)},
		{Kid: "c", State: rotation.Retired, JWK: json.RawMessage(`{"kid":"c"}`)},
	}}
	healthy := true
	h := Handler(Config{Keys: keys, MaxAge: map[string]time.Duration{"as": 5 * time.Minute}, Encode: encode, Healthy: func() bool { return healthy }})

	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/jwks/as.json", nil))
	if rec.Code != 200 || rec.Header().Get("Cache-Control") != "public, max-age=300" || rec.Header().Get("Content-Type") != "application/jwk-set+json" {
		t.Fatalf("%d %v", rec.Code, rec.Header())
	}
	if rec.Body.String() != `{"keys":[{"kid":"a"},{"kid":"b"}]}` {
		t.Errorf("body %s", rec.Body)
	}
	etag := rec.Header().Get("ETag")
	req := httptest.NewRequest("GET", "/jwks/as.json", nil)
	req.Header.Set("If-None-Match", etag)
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusNotModified || rec.Body.Len() != 0 {
		t.Errorf("conditional GET: %d", rec.Code)
	}
	// A change makes a new ETag.
	keys["as"][1].State = rotation.Active
	keys["as"][0].State = rotation.Draining
	keys["as"] = append(keys["as"], rotation.Version{Kid: "d", State: rotation.Next, JWK: json.RawMessage(`{"kid":"d"}`)})
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != 200 || rec.Header().Get("ETag") == etag {
		t.Errorf("after a change: %d, etag %s", rec.Code, rec.Header().Get("ETag"))
	}

	for _, p := range []string{"/jwks/nope.json", "/jwks/as", "/jwks/as.json/x", "/other"} {
		rec = httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", p, nil))
		if rec.Code != http.StatusNotFound {
			t.Errorf("%s: %d", p, rec.Code)
		}
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/jwks/as.json", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST: %d", rec.Code)
	}

	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
	if rec.Code != 200 {
		t.Errorf("healthz %d", rec.Code)
	}
	healthy = false
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
	if rec.Code != http.StatusServiceUnavailable {
		t.Errorf("unhealthy healthz %d", rec.Code)
	}
}

// A lost active key stays in the JWK Set, named in the stale header.
func TestJWKSStaleHeader(t *testing.T) {
	keys := fakeKeys{"as": {
		{KeySet: "as", Kid: "a", State: rotation.Lost, LostFrom: rotation.Active, JWK: json.RawMessage(`{"kid":"a"}`)},
	}}
	encodePublished := func(vs []rotation.Version) ([]byte, error) {
		keys := []json.RawMessage{}
		for _, v := range rotation.Published(vs) {
			keys = append(keys, v.JWK)
		}
		return json.Marshal(map[string]any{"keys": keys})
	}
	h := Handler(Config{Keys: keys, Encode: encodePublished})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/jwks/as.json", nil))
	if rec.Code != 200 || rec.Body.String() != `{"keys":[{"kid":"a"}]}` {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	if got := rec.Header().Get(StaleHeader); got != "a" {
		t.Errorf("%s: %q, want %q", StaleHeader, got, "a")
	}
	keys["as"] = append(keys["as"], rotation.Version{KeySet: "as", Kid: "b", State: rotation.Active, ActivatedAt: time.Now(), JWK: json.RawMessage(`{"kid":"b"}`)})
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/jwks/as.json", nil))
	if rec.Body.String() != `{"keys":[{"kid":"b"}]}` || rec.Header().Get(StaleHeader) != "" {
		t.Errorf("after a new key activated: %s, %s %q", rec.Body, StaleHeader, rec.Header().Get(StaleHeader))
	}
}

// A JWK Set that cannot be encoded (a corrupt stored key) is a 500, and
// the log says why: the answer cannot.
func TestJWKSEncodeFailureLogged(t *testing.T) {
	var logged strings.Builder
	keys := fakeKeys{"as": nil}
	h := Handler(Config{Keys: keys, Logger: slog.New(slog.NewTextHandler(&logged, nil)),
		Encode: func([]rotation.Version) ([]byte, error) { return nil, errors.New("bad stored JWK") }})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/jwks/as.json", nil))
	if rec.Code != http.StatusInternalServerError {
		t.Errorf("HTTP %d, want 500", rec.Code)
	}
	if !strings.Contains(logged.String(), "bad stored JWK") || !strings.Contains(logged.String(), "keyset=as") {
		t.Errorf("log %q: want the error and the key set", logged.String())
	}
}
