package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// p11Interleaved is the pkcs11 goal's pair measured side by side: direct,
// the bare relay (when it runs) and keyd, each for a short slice in turn,
// cycle after cycle, so that all see the same moments of a shared machine.
// A 2-second run of each, one after the other, can meet a stretch where the
// host gives the VM a third less (direct ES256 at 16 callers measured
// 14.5k to 25k ops/s within minutes), which moves a ratio of separate runs
// more than anything keyd does.
type p11Interleaved struct {
	Alg     string `json:"alg"`
	Callers int    `json:"callers"`
	Cycles  int    `json:"cycles"`
	SliceMs int    `json:"slice_ms"`
	// WarmupMs is the unmeasured run before each slice: a daemon that sat
	// idle through the other modes' slices measured 0.1 lower without it
	// (keyd ES256 0.61 → 0.70 with 100 ms, the bare relay 0.78 → 0.83).
	WarmupMs int `json:"warmup_ms"`
	// Modes is the order of the first cycle; each next cycle starts with
	// the next mode, so that no mode always follows the same one.
	Modes []string `json:"modes"`
	// OpsPerSec is each mode's ops over its time, all cycles together.
	OpsPerSec map[string]float64 `json:"ops_per_sec"`
	// PerCycle is each mode's ops/s in each cycle.
	PerCycle map[string][]float64 `json:"per_cycle_ops_per_sec"`
}

// ratio returns mode's ops/s over direct's, all cycles together.
func (x *p11Interleaved) ratio(mode string) float64 {
	return div(x.OpsPerSec[mode], x.OpsPerSec[modeDirect])
}

// cycleRatios returns mode's ops/s over direct's in each cycle.
func (x *p11Interleaved) cycleRatios(mode string) []float64 {
	var out []float64
	for i, d := range x.PerCycle[modeDirect] {
		if m := x.PerCycle[mode]; i < len(m) && d > 0 {
			out = append(out, m[i]/d)
		}
	}
	return out
}

// p11Interleave runs the given modes' operations at n callers in cycles
// slices each (after one warm-up cycle), rotating the order every cycle;
// each slice is measured after warmup of the same operation.
func p11Interleave(ctx context.Context, rec *recorder, alg string, n, cycles int, slice, warmup time.Duration, modes []string, ops map[string]op) (*p11Interleaved, error) {
	x := &p11Interleaved{Alg: alg, Callers: n, Cycles: cycles, SliceMs: int(slice / time.Millisecond), WarmupMs: int(warmup / time.Millisecond),
		Modes: modes, OpsPerSec: map[string]float64{}, PerCycle: map[string][]float64{}}
	count := map[string]int{}
	took := map[string]time.Duration{}
	for c := -1; c < cycles; c++ {
		for j := range modes {
			m := modes[(max(c, 0)+j)%len(modes)]
			st, err := rec.measure(ctx, n, warmup, slice, ops[m])
			if err != nil {
				return nil, fmt.Errorf("%s %s interleaved: %w", alg, m, err)
			}
			if c < 0 {
				continue // warm-up
			}
			count[m] += st.ops
			took[m] += st.elapsed
			x.PerCycle[m] = append(x.PerCycle[m], st.opsPerSec())
		}
	}
	for _, m := range modes {
		x.OpsPerSec[m] = float64(count[m]) / took[m].Seconds()
	}
	return x, nil
}

// printP11Interleaved writes the interleaved measurements.
func printP11Interleaved(w io.Writer, xs []*p11Interleaved) {
	if len(xs) == 0 {
		return
	}
	fmt.Fprintf(w, "\ninterleaved at %d callers (%d cycles; in each, a %d ms slice of every mode after %d ms unmeasured, the order rotating; ratios to direct):\n",
		xs[0].Callers, xs[0].Cycles, xs[0].SliceMs, xs[0].WarmupMs)
	for _, x := range xs {
		parts := []string{fmt.Sprintf("direct %.0f/s", x.OpsPerSec[modeDirect])}
		for _, m := range x.Modes {
			if m == modeDirect {
				continue
			}
			rs := x.cycleRatios(m)
			parts = append(parts, fmt.Sprintf("%s %.0f/s = %.2f (cycles %.2f–%.2f, median %.2f)",
				m, x.OpsPerSec[m], x.ratio(m), slices.Min(rs), slices.Max(rs), median(rs)))
		}
		fmt.Fprintf(w, "  %s: %s\n", x.Alg, strings.Join(parts, "; "))
	}
}
