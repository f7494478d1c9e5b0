package main

import (
	"context"
	"crypto/ecdsa"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/soft"
)

func TestPercentile(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 100; i++ {
		s = append(s, time.Duration(i))
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 50}, {0.99, 99}, {1, 100}, {0, 1}} {
		if got := percentile(s, c.q); got != c.want {
			t.Errorf("percentile(1..100, %v) = %v, want %v", c.q, got, c.want)
		}
	}
	if got := percentile([]time.Duration{7}, 0.99); got != 7 {
		t.Errorf("percentile of one = %v", got)
	}
}

func TestParseLists(t *testing.T) {
	c, err := parseCallers("1, 4,16,4")
	if err != nil || len(c) != 3 || c[0] != 1 || c[1] != 4 || c[2] != 16 {
		t.Errorf("parseCallers = %v, %v", c, err)
	}
	for _, bad := range []string{"", "0", "x", "1,,2", "-1"} {
		if _, err := parseCallers(bad); err == nil {
			t.Errorf("parseCallers(%q) succeeded", bad)
		}
	}
	a, err := parseAlgs("ES256,RS256")
	if err != nil || len(a) != 2 || a[1] != keystore.RS256 {
		t.Errorf("parseAlgs = %v, %v", a, err)
	}
	if _, err := parseAlgs("HS256"); err == nil {
		t.Error("parseAlgs(HS256) succeeded")
	}
}

// TestConfig checks that keyd accepts the configuration the bench writes.
func TestConfig(t *testing.T) {
	w := &workDir{
		keydSocket: "/tmp/kb1/keyd.sock", stateDir: "/tmp/kb1/state", auditLog: "/tmp/kb1/audit.jsonl",
	}
	algs := []keystore.Algorithm{keystore.ES256, keystore.RS256}
	cfg, err := parseConfig(keydConfig(w, algs, 1000), "bench.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.KeySets) != 2 || cfg.KeySets[0].Name != "b-es256" || cfg.KeySets[1].Name != "b-rs256" {
		t.Fatalf("key sets %+v", cfg.KeySets)
	}
	if cfg.LogLevel != "warn" || cfg.Backend.Soft == nil || cfg.AuditLog != w.auditLog {
		t.Fatalf("config %+v", cfg)
	}
	if cfg.KeySets[0].Allow.UIDs[0] != 1000 {
		t.Fatalf("allow %+v", cfg.KeySets[0].Allow)
	}
}

func TestMeasure(t *testing.T) {
	r := newRecorder([]int{1, 3}, 50*time.Millisecond, 1000)
	st, err := r.measure(context.Background(), 3, 10*time.Millisecond, 50*time.Millisecond, func(context.Context) error {
		time.Sleep(time.Millisecond)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if st.ops < 30 || st.p50 < time.Millisecond || st.p99 < st.p50 || st.elapsed < 50*time.Millisecond {
		t.Fatalf("stats %+v", st)
	}
}

func TestParseFlagsSlices(t *testing.T) {
	o, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if o.p11Slice != time.Second || o.p11SliceWarmup != 250*time.Millisecond || o.p11Cycles != 6 {
		t.Errorf("defaults: slice %v, warm-up %v, cycles %d", o.p11Slice, o.p11SliceWarmup, o.p11Cycles)
	}
	if !slices.Contains(o.p11Modes, modeDirectCopy) {
		t.Errorf("default modes %q lack %q", o.p11Modes, modeDirectCopy)
	}
	for _, bad := range [][]string{{"-pkcs11-slice", "10ms"}, {"-pkcs11-slice-warmup", "-1s"}, {"-pkcs11-slice", "2m"}} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

// The soft section signs with keyd's own keys while keyd holds its key
// directory's lock: it opens a copy of the key files.
func TestCopyKeyFilesWhileLocked(t *testing.T) {
	src, dst := filepath.Join(t.TempDir(), "keys"), filepath.Join(t.TempDir(), "copy")
	held, err := soft.New(soft.Config{Dir: src})
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	pub, err := held.Generate(t.Context(), "k", keystore.KeySpec{Algorithm: keystore.ES256})
	if err != nil {
		t.Fatal(err)
	}
	if err := copyKeyFiles(src, dst); err != nil {
		t.Fatal(err)
	}
	be, err := soft.New(soft.Config{Dir: dst})
	if err != nil {
		t.Fatalf("the copy of a locked key directory: %v", err)
	}
	defer be.Close()
	got, err := be.Public(t.Context(), "k")
	if err != nil {
		t.Fatal(err)
	}
	if !got.(*ecdsa.PublicKey).Equal(pub) {
		t.Error("the copied key is not the key")
	}
}
