package main

import (
	"math"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/keyd-dev/keyd/keystore"
)

func TestParseExports(t *testing.T) {
	out := "noise\nexport A=/tmp/x\\ y\nexport B='pkcs11:token=keyd'\n  export C=plain\n"
	m, err := parseExports(out)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"A": "/tmp/x y", "B": "pkcs11:token=keyd", "C": "plain"}
	if !reflect.DeepEqual(m, want) {
		t.Fatalf("parseExports = %v, want %v", m, want)
	}
	if _, err := parseExports("export A=$'\\n'\n"); err == nil {
		t.Error("ANSI-C quoting accepted")
	}
}

func TestParseBackends(t *testing.T) {
	got, explicit, err := parseBackends("tpm, soft")
	if err != nil || !explicit || !reflect.DeepEqual(got, []string{"soft", "tpm"}) {
		t.Fatalf("parseBackends = %v, %v, %v", got, explicit, err)
	}
	if _, _, err := parseBackends("soft,hsm"); err == nil {
		t.Error("unknown backend accepted")
	}
	got, explicit, err = parseBackends("")
	if err != nil || explicit || len(got) == 0 || got[0] != "soft" {
		t.Fatalf("default backends = %v, %v, %v", got, explicit, err)
	}
}

// TestHWConfigs checks that keyd accepts the pkcs11 and tpm configurations
// the bench writes.
func TestHWConfigs(t *testing.T) {
	w := &workDir{keydSocket: "/tmp/kb1/keyd.sock", stateDir: "/tmp/kb1/state", auditLog: "/tmp/kb1/audit.jsonl"}
	algs := []keystore.Algorithm{keystore.ES256, keystore.RS256, keystore.EdDSA}
	p11 := "  pkcs11:\n    module: \"/usr/lib/softhsm/libsofthsm2.so\"\n    uri: \"pkcs11:token=keyd-bench\"\n    pin_file: \"/tmp/kb1/pin\"\n    max_sessions: 2\n"
	cfg, err := parseConfig(keydConfigFor(w, p11, algs, 1000), "p11.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if b := cfg.Backend.PKCS11; b == nil || b.MaxSessions != 2 || len(cfg.KeySets) != 3 || cfg.KeySets[2].Name != "b-eddsa" {
		t.Fatalf("config %+v", cfg)
	}
	cfg, err = parseConfig(keydConfigFor(w, "  tpm:\n    address: \"tcp://127.0.0.1:2321\"\n", algs[:2], 1000), "tpm.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if b := cfg.Backend.TPM; b == nil || b.Address != "tcp://127.0.0.1:2321" {
		t.Fatalf("config %+v", cfg)
	}
	if string(keydConfig(w, algs[:1], 7)) != string(keydConfigFor(w, "  soft: {}\n", algs[:1], 7)) {
		t.Error("keydConfig differs from keydConfigFor with the soft backend")
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{3, 1, 2}, 2}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

func TestSectionGoals(t *testing.T) {
	r := func(alg, mode string, n int, ops, p50 float64) result {
		return result{Alg: alg, Mode: mode, Callers: n, OpsPerSec: ops, P50us: p50}
	}
	p := &hwSection{Backend: "pkcs11", Algs: []string{"ES256", "RS256"}, Callers: []int{1, 16}, Results: []result{
		r("ES256", modeDirect, 16, 1000, 1), r("ES256", modeKeyd, 16, 700, 1),
		r("RS256", modeDirect, 16, 100, 1), r("RS256", modeKeyd, 16, 95, 1),
	}}
	p.Rounds = []goalRound{
		{Alg: "ES256", Callers: 16, Round: 1, Direct: r("ES256", modeDirect, 16, 1000, 1), Keyd: r("ES256", modeKeyd, 16, 900, 1)},
		{Alg: "ES256", Callers: 16, Round: 2, Direct: r("ES256", modeDirect, 16, 1000, 1), Keyd: r("ES256", modeKeyd, 16, 850, 1)},
	}
	g := p.compute()
	if len(g) != 2 || g[0].Value != 0.85 || !g[0].Met || g[1].Value != 0.95 || !g[1].Met {
		t.Fatalf("pkcs11 goals %+v", g)
	}
	// An interleaved measurement decides over the rounds.
	p.P11Interleaved = []*p11Interleaved{{Alg: "ES256", Callers: 16, Cycles: 2, SliceMs: 300, WarmupMs: 100,
		Modes:     []string{modeDirect, modeDirectCopy, modeBareRelay, modeKeyd},
		OpsPerSec: map[string]float64{modeDirect: 1000, modeDirectCopy: 1500, modeBareRelay: 800, modeKeyd: 600},
		PerCycle:  map[string][]float64{modeDirect: {900, 1100}, modeDirectCopy: {1400, 1600}, modeBareRelay: {810, 790}, modeKeyd: {450, 770}},
	}}
	g = p.compute()
	if g[0].Value != 0.6 || g[0].Met || !strings.Contains(g[0].Name, "interleaved, 2 cycles") || !strings.Contains(g[0].Name, "median of 3 alternating rounds: 0.85") ||
		!strings.Contains(g[0].Name, "the bare relay: 0.80; over direct copy") || !strings.Contains(g[0].Name, "nothing else: 0.53") || !strings.Contains(g[0].Name, "the same SoftHSM work per signature: 0.40") || g[1].Value != 0.95 {
		t.Fatalf("pkcs11 goals with interleaved %+v", g)
	}
	if got := p.P11Interleaved[0].cycleRatios(modeKeyd); len(got) != 2 || math.Abs(got[0]-0.5) > 1e-9 || math.Abs(got[1]-0.7) > 1e-9 {
		t.Errorf("keyd cycle ratios %v, want [0.5 0.7]", got)
	}
	var out strings.Builder
	printP11Interleaved(&out, p.P11Interleaved)
	if !strings.Contains(out.String(), "keyd 600/s = 0.60 (cycles 0.50–0.70, median 0.60)") || !strings.Contains(out.String(), "after 100 ms unmeasured") {
		t.Errorf("printed %q", out.String())
	}
	tp := &hwSection{Backend: "tpm", Algs: []string{"ES256", "RS256"}, Callers: []int{1}, Results: []result{
		r("ES256", modeDirect, 1, 1, 400), r("ES256", modeKeyd, 1, 1, 500), r("ES256", modeDirectAgain, 1, 1, 600),
	}}
	g = tp.compute()
	if len(g) != 2 || g[0].Value != 1.0 || !g[0].Met || g[1].Status[:3] != "n/a" {
		t.Fatalf("tpm goals %+v", g)
	}
	skipped := &hwSection{Backend: "tpm", Skipped: "not installed"}
	for _, x := range skipped.compute() {
		if x.Met || x.Status[:3] != "n/a" {
			t.Fatalf("skipped section goal %+v", x)
		}
	}
}

func TestSortResults(t *testing.T) {
	sec := &hwSection{Algs: []string{"ES256", "RS256"}, Callers: []int{1, 4}, Modes: []string{modeDirect, modeKeyd}}
	sec.Results = []result{{Alg: "RS256", Callers: 1, Mode: modeKeyd}, {Alg: "ES256", Callers: 4, Mode: modeDirect},
		{Alg: "ES256", Callers: 1, Mode: modeKeyd}, {Alg: "ES256", Callers: 1, Mode: modeDirect}}
	sortResults(sec)
	var got []string
	for _, x := range sec.Results {
		got = append(got, x.Alg+"/"+x.Mode+"/"+string(rune('0'+x.Callers)))
	}
	want := []string{"ES256/direct/1", "ES256/keyd/1", "ES256/direct/4", "RS256/keyd/1"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("sorted %v, want %v", got, want)
	}
}

func TestCPUOf(t *testing.T) {
	x := 0
	for i := range 1_000_000 {
		x += i
	}
	_ = x
	if c := cpuOf(os.Getpid()); c <= 0 {
		t.Errorf("cpuOf(self) = %v", c)
	}
	if c := cpuOf(0); c != -1 {
		t.Errorf("cpuOf(0) = %v", c)
	}
}

func TestRawToDER(t *testing.T) {
	raw := make([]byte, 64)
	raw[0], raw[31], raw[32], raw[63] = 0x80, 1, 0, 2
	der, err := rawToDER(raw)
	if err != nil {
		t.Fatal(err)
	}
	// r has its high bit set: a 0x00 sign byte; s has leading zeros: minimal.
	if der[0] != 0x30 || der[2] != 0x02 || der[3] != 33 || der[4] != 0 || der[3+1+33] != 0x02 || der[3+1+33+1] != 1 {
		t.Fatalf("DER % x", der)
	}
}

// TestP11GoalRelayOverDirectCopy checks that the goal line's "one socket
// round trip and nothing else" figure of the bare relay compares it with
// direct copy, which signs the same session copies the relay signs, and not
// with direct, which signs the token objects (a relay exactly as fast as
// direct copy adds nothing).
func TestP11GoalRelayOverDirectCopy(t *testing.T) {
	r := func(mode string, ops float64) result {
		return result{Alg: "ES256", Mode: mode, Callers: 16, OpsPerSec: ops, P50us: 1}
	}
	p := &hwSection{Backend: "pkcs11", Algs: []string{"ES256"}, Callers: []int{16}, Results: []result{
		r(modeDirect, 1000), r(modeDirectCopy, 1500), r(modeBareRelay, 1500), r(modeKeyd, 900),
	}}
	const want = "the same SoftHSM work one socket round trip away and nothing else: 1.00]"
	if g := p.compute(); !strings.Contains(g[0].Name, want) {
		t.Errorf("sweep: goal %q, want it to contain %q", g[0].Name, want)
	}
	p.P11Interleaved = []*p11Interleaved{{Alg: "ES256", Callers: 16, Cycles: 1, SliceMs: 300,
		Modes:     []string{modeDirect, modeDirectCopy, modeBareRelay, modeKeyd},
		OpsPerSec: map[string]float64{modeDirect: 1000, modeDirectCopy: 1500, modeBareRelay: 1500, modeKeyd: 900},
		PerCycle:  map[string][]float64{modeDirect: {1000}, modeDirectCopy: {1500}, modeBareRelay: {1500}, modeKeyd: {900}},
	}}
	if g := p.compute(); !strings.Contains(g[0].Name, want) {
		t.Errorf("interleaved: goal %q, want it to contain %q", g[0].Name, want)
	}
}

// TestP11GoalKeydSessions checks that a pkcs11 goal is not judged when keyd
// ran with other max_sessions than direct's (-pkcs11-keyd-sessions): the
// goal compares the two at p11Sessions each.
func TestP11GoalKeydSessions(t *testing.T) {
	r := func(mode string, ops float64) result {
		return result{Alg: "ES256", Mode: mode, Callers: 16, OpsPerSec: ops, P50us: 1}
	}
	p := &hwSection{Backend: "pkcs11", Algs: []string{"ES256"}, Callers: []int{16}, KeydSessions: 4,
		Results: []result{r(modeDirect, 1000), r(modeKeyd, 1200)}}
	if g := p.compute(); g[0].Met || !strings.HasPrefix(g[0].Status, "n/a") {
		t.Errorf("keyd with 4 sessions against direct with %d: goal %+v", p11Sessions, g[0])
	}
	p.KeydSessions = p11Sessions
	if g := p.compute(); !g[0].Met || g[0].Status != "met" {
		t.Errorf("keyd with %d sessions: goal %+v", p11Sessions, g[0])
	}
}
