package config

import (
	"strings"
	"testing"
)

// sign_rate .nan (and .inf) is refused: NaN would pass "must not be
// negative" (NaN < 0 is false) and turn the per-caller rate limit off, as
// rate.Limiter allows everything at NaN.
func TestRejectsNonFiniteSignRate(t *testing.T) {
	for _, v := range []string{".nan", ".inf", "-.inf"} {
		cfg := strings.Replace(good, "admins: {uids: [0]}", "admins: {uids: [0]}\nlimits: {sign_rate: "+v+"}", 1)
		if c, err := Parse([]byte(cfg), "k.yaml"); err == nil {
			t.Errorf("sign_rate %s accepted: %v", v, c.Limits.SignRate)
		}
	}
}

// max_lifetime + iat_skew + jwks_cache must not wrap around: a wrapped,
// negative drain would pass validation.
func TestRejectsScheduleOverflow(t *testing.T) {
	cfg := strings.Replace(good, "max_lifetime: 5m", "max_lifetime: 2000000h\n    iat_skew: 1000000h", 1)
	c, err := Parse([]byte(cfg), "k.yaml")
	if err == nil {
		t.Fatalf("accepted; drain of billing-client = %v", c.KeySets[1].Schedule().Drain)
	}
}

// admin_socket gets the checks socket gets: check-config must not pass a
// path that serve cannot listen on.
func TestAdminSocketChecks(t *testing.T) {
	for name, v := range map[string]string{
		"nul":  `"/run/keyd/a\0b"`,
		"long": "/run/" + strings.Repeat("a", 120),
	} {
		cfg := strings.Replace(good, "admins: {uids: [0]}", "admins: {uids: [0]}\nadmin_socket: "+v, 1)
		if _, err := Parse([]byte(cfg), "k.yaml"); err == nil || !strings.Contains(err.Error(), "admin_socket") {
			t.Errorf("%s: err = %v", name, err)
		}
	}
}

// sign_burst alone would be ignored (sign_rate 0 is no limit at all), so an
// operator who set it would believe bursts are bounded.
func TestSignBurstNeedsSignRate(t *testing.T) {
	cfg := strings.Replace(good, "admins: {uids: [0]}", "admins: {uids: [0]}\nlimits: {sign_burst: 5}", 1)
	if _, err := Parse([]byte(cfg), "k.yaml"); err == nil || !strings.Contains(err.Error(), "limits.sign_burst: needs limits.sign_rate") {
		t.Errorf("sign_burst without sign_rate: %v, want it refused", err)
	}
	cfg = strings.Replace(good, "admins: {uids: [0]}", "admins: {uids: [0]}\nlimits: {sign_rate: 10, sign_burst: 5}", 1)
	if _, err := Parse([]byte(cfg), "k.yaml"); err != nil {
		t.Errorf("sign_burst with sign_rate: %v", err)
	}
}

// Admin calls are never served over the mutual-TLS listener, so admins
// listing identities would admit nobody while reading as if it did.
func TestAdminIdentitiesRefused(t *testing.T) {
	cfg := strings.Replace(good, "admins: {uids: [0]}", "admins: {uids: [0], identities: [\"spiffe://example.org/ops\"]}", 1)
	if _, err := Parse([]byte(cfg), "k.yaml"); err == nil || !strings.Contains(err.Error(), "admins.identities") {
		t.Errorf("admins with identities: %v, want it refused", err)
	}
}
