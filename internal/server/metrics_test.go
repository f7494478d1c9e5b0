package server_test

import (
	"fmt"
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/keyd-dev/keyd/client"
)

// The keyset of a Sign request is the caller's to choose, and a refused
// request is counted too: a name that is not configured is counted as
// "(unknown)", not under its own label. Otherwise every name a caller makes
// up (of any length up to the gRPC message limit) would add Prometheus
// series that are never dropped: any process that can reach the socket
// would grow the daemon's memory and every scrape without bound, and write
// what it likes into /metrics.
func TestMetricsKeysetLabelIsBounded(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{metrics: true})
	long := strings.Repeat("x", 40<<10)
	for i := range 50 {
		e.cl.Sign(ctx(t), client.SignRequest{KeySet: fmt.Sprintf("made-up-%03d", i), Claims: map[string]any{"htm": "GET"}})
	}
	e.cl.Sign(ctx(t), client.SignRequest{KeySet: long, Claims: map[string]any{"htm": "GET"}})
	e.cl.Sign(ctx(t), client.SignRequest{KeySet: "forbidden", Claims: map[string]any{"htm": "GET"}})
	if _, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/"); err != nil {
		t.Fatal(err)
	}

	rec := httptest.NewRecorder()
	e.metrics.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	series := 0
	for line := range strings.SplitSeq(string(body), "\n") {
		if strings.HasPrefix(line, "keyd_sign_requests_total{") {
			series++
		}
	}
	if strings.Contains(string(body), "made-up-") || strings.Contains(string(body), long[:1024]) {
		t.Errorf("/metrics (%d bytes, %d keyd_sign_requests_total series) carries key set names callers made up", len(body), series)
	}
	// Configured key sets keep their own series.
	for _, want := range []string{
		`keyd_sign_requests_total{backend="soft",code="ok",keyset="dpop",purpose="dpop"} 1`,
		`keyd_sign_requests_total{backend="soft",code="PermissionDenied",keyset="forbidden",purpose=""} 1`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}
