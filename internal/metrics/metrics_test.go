package metrics

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/rotation"
)

// A nil *Metrics is usable, as its doc says: it records nothing, and its
// handler serves no metrics.
func TestNilMetrics(t *testing.T) {
	var m *Metrics
	m.Sign("d", "dpop", "ok", time.Millisecond)
	m.Denied("Sign")
	m.Limited("sign_rate")
	m.BackendUp(true)
	m.StreamInFlight(func() int64 { return 1 })
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != http.StatusNotFound {
		t.Errorf("nil Metrics' handler: HTTP %d, want 404", rec.Code)
	}
}

// TestStreamInFlight: the gauge reads the function at each scrape.
func TestStreamInFlight(t *testing.T) {
	m := New("soft", noVersions{})
	var n int64 = 3
	m.StreamInFlight(func() int64 { return n })
	for _, want := range []string{"keyd_sign_stream_requests_in_flight 3", "keyd_sign_stream_requests_in_flight 0"} {
		rec := httptest.NewRecorder()
		m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		if !strings.Contains(rec.Body.String(), want+"\n") {
			t.Errorf("scrape lacks %q", want)
		}
		n = 0
	}
}

type noVersions struct{}

func (noVersions) Versions(...string) []rotation.Version { return nil }
func (noVersions) Failures() int64                       { return 0 }
