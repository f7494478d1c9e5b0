package server_test

import (
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/keyd-dev/keyd/client"
)

// A caller above its sign rate gets RESOURCE_EXHAUSTED, audited; the
// refusal costs no backend call.
func TestSignRateLimit(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{signRate: 0.001, signBurst: 3})
	for i := range 3 {
		if _, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/"); err != nil {
			t.Fatalf("sign %d within the burst: %v", i, err)
		}
	}
	_, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/")
	if !errors.Is(err, client.ErrResourceExhausted) || !strings.Contains(err.Error(), "rate limit") {
		t.Fatalf("over the burst: %v", err)
	}
	recs := e.audit.records()
	if last := recs[len(recs)-1]; last.Outcome != "ResourceExhausted" || last.Kid != "" {
		t.Errorf("audit %+v", last)
	}
}

func TestMetrics(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{metrics: true, admins: []int{4242}})
	e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/")
	e.cl.DPoP("forbidden").Proof(ctx(t), "GET", "https://a.example/")
	e.cl.DPoP("dpop").Proof(ctx(t), "GET", "/relative")
	e.cl.Sign(ctx(t), client.SignRequest{KeySet: "dpop", Claims: map[string]any{"htm": "GET"}})
	e.cl.Rotate(ctx(t), "dpop", true)
	rec := httptest.NewRecorder()
	e.metrics.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{
		`keyd_sign_requests_total{backend="soft",code="ok",keyset="dpop",purpose="dpop"} 1`,
		`keyd_sign_requests_total{backend="soft",code="PermissionDenied",keyset="forbidden",purpose=""} 1`,
		`keyd_sign_requests_total{backend="soft",code="InvalidArgument",keyset="dpop",purpose="dpop"} 1`,
		`keyd_sign_duration_seconds_bucket{backend="soft",code="ok",keyset="dpop",purpose="dpop",le="5"} 1`,
		`keyd_authz_denials_total{method="Sign"} 1`,
		`keyd_authz_denials_total{method="admin"} 1`,
		`keyd_keys{keyset="dpop",state="active"} 1`,
		`keyd_active_key_age_seconds{keyset="dpop"}`,
		`keyd_key_activations_total{keyset="dpop"} 1`,
		`keyd_backend_up{backend="soft"} 1`,
		`keyd_rotation_failures_total 0`,
		`go_goroutines`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

// A key set name past the limit is refused and audited, but the audit
// record keeps only its start and its length: a caller cannot make each
// refused request write 64 KiB to the audit log.
func TestLongKeySetNameAudited(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	long := strings.Repeat("x", 40<<10)
	_, err := e.cl.Sign(ctx(t), client.SignRequest{KeySet: long, Claims: map[string]any{"htm": "GET"}})
	if !errors.Is(err, client.ErrInvalidArgument) {
		t.Fatalf("sign with a 40 KiB key set name: %v", err)
	}
	recs := e.audit.records()
	if len(recs) != 1 {
		t.Fatalf("%d audit records; want 1", len(recs))
	}
	if ks := recs[0].KeySet; len(ks) > 128 || !strings.HasPrefix(ks, "xxxx") || !strings.Contains(ks, "40960 bytes") {
		t.Errorf("audit record keyset is %d bytes (%.80q); want its start and its length", len(ks), ks)
	}
}

// A claim name is the caller's to choose, up to the 16 KiB of a claims set,
// and a policy violation names it: the audit record (and the caller's
// error) keep only its start, so that a refused request cannot write tens of
// KiB to the audit log. A name of characters that %q escapes (U+0378 is
// unassigned: 2 bytes in, 6 out) would otherwise triple in size.
func TestLongClaimNameAudited(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	for _, tc := range []struct {
		name   string
		claims map[string]any
	}{
		{"unknown claim", map[string]any{"htm": "GET", "htu": "https://a.example/", strings.Repeat("\u0378", 8000): 1}},
		{"names in two letter cases", map[string]any{"htm": "GET", "htu": "https://a.example/",
			strings.Repeat("\u0378", 3900) + "a": 1, strings.Repeat("\u0378", 3900) + "A": 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.cl.Sign(ctx(t), client.SignRequest{KeySet: "dpop", Claims: tc.claims})
			if !errors.Is(err, client.ErrInvalidArgument) {
				t.Fatalf("sign: %v", err)
			}
			if len(err.Error()) > 1<<10 {
				t.Errorf("the caller's error is %d bytes: %.120s…", len(err.Error()), err)
			}
			recs := e.audit.records()
			last := recs[len(recs)-1]
			if last.Outcome != "InvalidArgument" || len(last.Reason) > 1<<10 {
				t.Errorf("audit record: outcome %s, reason of %d bytes: %.120s…", last.Outcome, len(last.Reason), last.Reason)
			}
		})
	}
}
