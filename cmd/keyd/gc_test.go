package main

import (
	"runtime/debug"
	"testing"
)

// TestTuneGC: keyd serve collects at GOGC 200 unless the environment sets
// GOGC, which then wins (the runtime has applied it already).
func TestTuneGC(t *testing.T) {
	before := debug.SetGCPercent(100)
	defer debug.SetGCPercent(before)

	env := map[string]string{"GOGC": "150"}
	if got := tuneGC(func(k string) string { return env[k] }); got != "150 (from the environment)" {
		t.Errorf("tuneGC with GOGC=150 = %q", got)
	}
	if p := debug.SetGCPercent(100); p != 100 {
		t.Errorf("tuneGC with GOGC set changed the GC percent to %d", p)
	}

	if got := tuneGC(func(string) string { return "" }); got != "200" {
		t.Errorf("tuneGC without GOGC = %q, want 200", got)
	}
	if p := debug.SetGCPercent(100); p != serveGCPercent {
		t.Errorf("tuneGC without GOGC left the GC percent at %d, want %d", p, serveGCPercent)
	}
}
