package metrics

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// A nil *Metrics is usable, as its doc says: it records nothing, and its
// handler serves no metrics.
func TestNilMetrics(t *testing.T) {
	var m *Metrics
	m.Sign("d", "dpop", "ok", time.Millisecond)
	m.Denied("Sign")
	m.Limited("sign_rate")
	m.BackendUp(true)
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != http.StatusNotFound {
		t.Errorf("nil Metrics' handler: HTTP %d, want 404", rec.Code)
	}
}
