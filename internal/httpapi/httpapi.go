// Package httpapi is keyd's optional HTTP listener: the JWK Set of each key
// set for an authorization server's jwks_uri, and a health endpoint. It
// serves public information only and takes no input but the path.
package httpapi

import (
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/keyd-dev/keyd/rotation"
)

// Versions gives the versions of a key set.
type Versions interface {
	Versions(names ...string) []rotation.Version
	KeySet(name string) (rotation.KeySet, bool)
}

// Config wires the handler.
type Config struct {
	Keys Versions
	// MaxAge is how long verifiers may cache each key set's JWK Set.
	MaxAge map[string]time.Duration
	// Encode turns versions into a JWK Set document.
	Encode func([]rotation.Version) ([]byte, error)
	// Healthy reports whether the daemon serves (nil: always).
	Healthy func() bool
	// Metrics serves /metrics (nil: not served).
	Metrics http.Handler
	// Logger gets what an HTTP answer cannot say (nil: discarded).
	Logger *slog.Logger
}

// StaleHeader names the stale keys of a JWK Set response: the kids,
// comma-separated, of keys lost from the backend that it still publishes
// (see rotation.StaleKids).
const StaleHeader = "Keyd-Stale-Kids"

// Handler returns the HTTP handler:
//
//	GET /jwks/{keyset}.json  the key set's published keys (next, active,
//	                         draining; a lost active key, named in the
//	                         StaleHeader), with Cache-Control max-age and
//	                         an ETag; 304 for a matching If-None-Match
//	GET /healthz             200 "ok", or 503 while the backend fails
//	GET /metrics             Prometheus metrics, when cfg.Metrics is set
func Handler(cfg Config) http.Handler {
	mux := http.NewServeMux()
	if cfg.Metrics != nil {
		mux.Handle("GET /metrics", cfg.Metrics)
	}
	mux.HandleFunc("GET /jwks/{file}", func(w http.ResponseWriter, r *http.Request) {
		name, ok := strings.CutSuffix(r.PathValue("file"), ".json")
		if !ok {
			http.NotFound(w, r)
			return
		}
		if _, known := cfg.Keys.KeySet(name); !known {
			http.NotFound(w, r)
			return
		}
		vs := cfg.Keys.Versions(name)
		body, err := cfg.Encode(vs)
		if err != nil {
			if cfg.Logger != nil {
				cfg.Logger.Error("cannot encode a JWK Set; answering 500", "keyset", name, "err", err)
			}
			http.Error(w, "internal error; the daemon log has the details", http.StatusInternalServerError)
			return
		}
		sum := sha256.Sum256(body)
		etag := `"` + base64.RawURLEncoding.EncodeToString(sum[:16]) + `"`
		h := w.Header()
		h.Set("Content-Type", "application/jwk-set+json")
		h.Set("ETag", etag)
		h.Set("Cache-Control", "public, max-age="+strconv.Itoa(int(cfg.MaxAge[name]/time.Second)))
		h.Set("X-Content-Type-Options", "nosniff")
		if kids := rotation.StaleKids(vs); len(kids) > 0 {
			h.Set(StaleHeader, strings.Join(kids, ","))
		}
		if match := r.Header.Get("If-None-Match"); match != "" && etagMatch(match, etag) {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		w.Write(body)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		if cfg.Healthy != nil && !cfg.Healthy() {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "backend unavailable")
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}

func etagMatch(header, etag string) bool {
	for _, t := range strings.Split(header, ",") {
		t = strings.TrimSpace(t)
		if t == "*" || strings.TrimPrefix(t, "W/") == etag {
			return true
		}
	}
	return false
}

// Server returns an http.Server for h with timeouts that keep slow or idle
// clients from holding connections.
func Server(addr string, h http.Handler) *http.Server {
	return &http.Server{
		Addr:              addr,
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
	}
}
