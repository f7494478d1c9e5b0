package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
)

// hwSection is the report of the pkcs11 or the tpm section.
type hwSection struct {
	Backend   string     `json:"backend"`
	Skipped   string     `json:"skipped,omitempty"`
	Error     string     `json:"error,omitempty"`
	KeydPID   int        `json:"keyd_pid,omitempty"`
	Algs      []string   `json:"algs"`
	Callers   []int      `json:"callers"`
	Modes     []string   `json:"modes"`
	Results   []result   `json:"results"`
	NA        []string   `json:"not_available,omitempty"`
	Notes     []string   `json:"notes,omitempty"`
	P11Ratios []p11Ratio `json:"pkcs11_ratios,omitempty"`
	// Rounds are extra alternating runs of the goals' pairs (direct, keyd);
	// round 0 is the main sweep's.
	Rounds    []goalRound `json:"goal_rounds,omitempty"`
	TPMRatios []tpmRatio  `json:"tpm_ratios,omitempty"`
	// P11Interleaved is the pkcs11 goals' pairs measured in alternating
	// short slices.
	P11Interleaved []*p11Interleaved `json:"pkcs11_interleaved,omitempty"`
	// Interleaved is the tpm section's measurement on two swtpm
	// instances in alternating short slices.
	Interleaved []interleaved `json:"tpm_interleaved,omitempty"`
	RSS         struct {
		EndKiB int64 `json:"end_kib"`
		HWMKiB int64 `json:"hwm_kib"`
	} `json:"keyd_rss"`

	// KeydSessions is keyd's max_sessions in the pkcs11 section (0: not
	// recorded); the goals compare keyd and direct at p11Sessions each.
	KeydSessions int `json:"keyd_max_sessions,omitempty"`

	keydUp   bool // keyd runs: measure its CPU time
	swtpmPID int
	relayPID int // the bare relay child, while it runs
}

// p11Ratio compares throughputs (ops/s) of the pkcs11 modes at one number
// of callers; 0 where a mode was not measured.
type p11Ratio struct {
	Alg     string `json:"alg"`
	Callers int    `json:"callers"`
	// KeydVsDirect is keyd ops/s / direct ops/s: the goal's ratio.
	KeydVsDirect  float64 `json:"keyd_vs_direct"`
	UnaryVsDirect float64 `json:"keyd_unary_vs_direct"`
	// KeydVsCrypto11 is keyd ops/s / crypto11 ops/s.
	KeydVsCrypto11   float64 `json:"keyd_vs_crypto11,omitempty"`
	Crypto11VsDirect float64 `json:"crypto11_vs_direct,omitempty"`
	// BackendVsDirect is keyd's backend package in-process / direct.
	BackendVsDirect float64 `json:"keyd_backend_vs_direct"`
	// ProofVsCopy is direct proof / direct copy: what making a whole proof
	// in-process costs over the bare signature it makes.
	ProofVsCopy float64 `json:"direct_proof_vs_direct_copy"`
	// KeydVsProof is keyd / direct proof: the same work, through keyd.
	KeydVsProof float64 `json:"keyd_vs_direct_proof"`
	// RelayVsDirect is bare relay / direct: direct copy's signature (a
	// session copy of the key, not direct's token object) made in another
	// process, one Unix socket round trip away.
	RelayVsDirect float64 `json:"bare_relay_vs_direct"`
	// P50 is keyd p50 / direct p50.
	P50 float64 `json:"p50_keyd_vs_direct"`
}

// interleaved compares, at 1 caller, direct TPM2_Sign on one fresh swtpm
// (A) with direct on a second (B, the calibration), with direct on B through
// the bare relay and then with keyd on B,
// alternating short slices so that both sides see the same moments of the
// machine.
type interleaved struct {
	Alg     string  `json:"alg"`
	Slices  int     `json:"slices"`
	CalAP50 float64 `json:"calibration_direct_a_p50_us"`
	CalBP50 float64 `json:"calibration_direct_b_p50_us"`
	// RelayP50 is direct TPM2_Sign on B through the bare relay, beside
	// direct on A (RelayAP50).
	RelayAP50 float64 `json:"relay_direct_a_p50_us"`
	RelayP50  float64 `json:"relay_b_p50_us"`
	// GRPCP50 is direct TPM2_Sign on B through the gRPC relay, beside
	// direct on A (GRPCAP50).
	GRPCAP50   float64 `json:"grpc_relay_direct_a_p50_us"`
	GRPCP50    float64 `json:"grpc_relay_b_p50_us"`
	DirectAP50 float64 `json:"direct_a_p50_us"`
	KeydP50    float64 `json:"keyd_b_p50_us"`
}

// goalRound is one extra alternating measurement of a goal's pair.
type goalRound struct {
	Alg     string `json:"alg"`
	Callers int    `json:"callers"`
	Round   int    `json:"round"`
	Direct  result `json:"direct"`
	Keyd    result `json:"keyd"`
	// Relay is the pkcs11 bare relay, measured between direct and keyd
	// when that mode runs.
	Relay *result `json:"bare_relay,omitempty"`
}

// tpmRatio compares p50 latencies of the tpm modes at one number of callers.
type tpmRatio struct {
	Alg     string `json:"alg"`
	Callers int    `json:"callers"`
	// DirectP50us is the reference: the mean of the direct and direct-again
	// p50s where both were measured, else the direct p50.
	DirectP50us float64 `json:"direct_p50_us"`
	Keyd        float64 `json:"p50_keyd_vs_direct"`
	Unary       float64 `json:"p50_keyd_unary_vs_direct"`
	Proof       float64 `json:"p50_direct_proof_vs_direct"`
	// ExtraUs is keyd p50 - the reference, in µs.
	ExtraUs float64 `json:"keyd_extra_p50_us"`
	// KeydOps is keyd ops/s / direct ops/s.
	KeydOps float64 `json:"ops_keyd_vs_direct"`
}

func (s *hwSection) find(alg, mode string, callers int) (result, bool) {
	for _, x := range s.Results {
		if x.Alg == alg && x.Mode == mode && x.Callers == callers {
			return x, true
		}
	}
	return result{}, false
}

func div(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// compute fills the ratios and returns the section's goals.
func (s *hwSection) compute() []goal {
	switch s.Backend {
	case "pkcs11":
		return s.computeP11()
	case "tpm":
		return s.computeTPM()
	}
	return nil
}

func (s *hwSection) computeP11() []goal {
	s.P11Ratios = nil
	ops := func(alg, mode string, n int) float64 {
		r, _ := s.find(alg, mode, n)
		return r.OpsPerSec
	}
	for _, alg := range s.Algs {
		for _, n := range s.Callers {
			d := ops(alg, modeDirect, n)
			k := ops(alg, modeKeyd, n)
			if d == 0 || k == 0 {
				continue
			}
			kr, _ := s.find(alg, modeKeyd, n)
			dr, _ := s.find(alg, modeDirect, n)
			s.P11Ratios = append(s.P11Ratios, p11Ratio{
				Alg: alg, Callers: n,
				KeydVsDirect:     k / d,
				UnaryVsDirect:    ops(alg, modeKeydUnary, n) / d,
				KeydVsCrypto11:   div(k, ops(alg, modeCrypto11, n)),
				Crypto11VsDirect: ops(alg, modeCrypto11, n) / d,
				BackendVsDirect:  ops(alg, modeKeydBackend, n) / d,
				ProofVsCopy:      div(ops(alg, modeDirectProof, n), ops(alg, modeDirectCopy, n)),
				KeydVsProof:      div(k, ops(alg, modeDirectProof, n)),
				RelayVsDirect:    ops(alg, modeBareRelay, n) / d,
				P50:              div(kr.P50us, dr.P50us),
			})
		}
	}
	var goals []goal
	for _, g := range []struct {
		alg   string
		limit float64
	}{{"ES256", goalP11ES256}, {"RS256", goalP11RS256}} {
		x := goal{
			Name:   fmt.Sprintf("pkcs11 %s at %d callers: keyd ops/s ≥ %.2f × direct in-process ops/s (%d sessions)", g.alg, goalP11N, g.limit, p11Sessions),
			Limit:  g.limit,
			Status: s.naStatus(fmt.Sprintf("run pkcs11 with %s and %d callers", g.alg, goalP11N)),
		}
		for _, r := range s.P11Ratios {
			if r.Alg == g.alg && r.Callers == goalP11N {
				ratios := s.roundRatios(g.alg, goalP11N)
				x.Value = median(ratios)
				relay := median(s.relayRatios(g.alg, goalP11N))
				// The relay signs with session copies, as direct copy does:
				// only over direct copy is it one socket round trip apart.
				relayCopy := 0.0
				if c, ok := s.find(g.alg, modeDirectCopy, goalP11N); ok && c.OpsPerSec > 0 {
					if b, ok := s.find(g.alg, modeBareRelay, goalP11N); ok {
						relayCopy = b.OpsPerSec / c.OpsPerSec
					}
				}
				how := "median of %d alternating rounds"
				if len(ratios) < 2 {
					how = "%d run"
				}
				how = fmt.Sprintf(how, len(ratios))
				sameWork := 0.0
				if il := s.p11Interleaved(g.alg); il != nil {
					how = fmt.Sprintf("interleaved, %d cycles of %d ms slices (the %s: %.2f)", il.Cycles, il.SliceMs, how, x.Value)
					x.Value, relay, relayCopy = il.ratio(modeKeyd), il.ratio(modeBareRelay), 0
					if c := il.OpsPerSec[modeDirectCopy]; c > 0 {
						sameWork = il.OpsPerSec[modeKeyd] / c
						relayCopy = il.OpsPerSec[modeBareRelay] / c
					}
				}
				x.Met = x.Value >= g.limit
				x.Status = metString(x.Met)
				if s.KeydSessions != 0 && s.KeydSessions != p11Sessions {
					x.Met = false
					x.Status = fmt.Sprintf("n/a (keyd ran with max_sessions %d, direct with %d: %.2f)", s.KeydSessions, p11Sessions, x.Value)
				}
				x.Name += ", " + how
				switch {
				case relay > 0 && relayCopy > 0:
					x.Name += fmt.Sprintf(" [the bare relay: %.2f; over direct copy, the same SoftHSM work one socket round trip away and nothing else: %.2f]", relay, relayCopy)
				case relay > 0:
					x.Name += fmt.Sprintf(" [the bare relay: %.2f (session copies against direct's token objects, and one socket round trip)]", relay)
				}
				if sameWork > 0 {
					x.Name += fmt.Sprintf(" [keyd / direct copy, the same SoftHSM work per signature: %.2f]", sameWork)
				}
			}
		}
		goals = append(goals, x)
	}
	return goals
}

func (s *hwSection) computeTPM() []goal {
	s.TPMRatios = nil
	for _, alg := range s.Algs {
		for i, n := range s.Callers {
			d, ok1 := s.find(alg, modeDirect, n)
			k, ok2 := s.find(alg, modeKeyd, n)
			if !ok1 || !ok2 || d.P50us == 0 {
				continue
			}
			ref := d.P50us
			if again, ok := s.find(alg, modeDirectAgain, n); ok && i == 0 {
				ref = (d.P50us + again.P50us) / 2
			}
			u, _ := s.find(alg, modeKeydUnary, n)
			p, _ := s.find(alg, modeDirectProof, n)
			s.TPMRatios = append(s.TPMRatios, tpmRatio{
				Alg: alg, Callers: n, DirectP50us: ref,
				Keyd: k.P50us / ref, Unary: u.P50us / ref, Proof: p.P50us / ref,
				ExtraUs: k.P50us - ref, KeydOps: div(k.OpsPerSec, d.OpsPerSec),
			})
		}
	}
	var goals []goal
	for _, alg := range []string{"ES256", "RS256"} {
		x := goal{
			Name:   fmt.Sprintf("tpm %s at 1 caller: keyd p50 ≤ %.2f × direct TPM2_Sign p50", alg, goalTPMP50),
			Limit:  goalTPMP50,
			Status: s.naStatus(fmt.Sprintf("run tpm with %s and 1 caller", alg)),
		}
		if ratios := s.tpmRoundRatios(alg); len(ratios) > 0 {
			x.Value = median(ratios)
			x.Met = x.Value <= goalTPMP50
			x.Status = metString(x.Met)
			if len(ratios) > 1 {
				x.Name += fmt.Sprintf(", median of %d alternating rounds", len(ratios))
			}
		}
		for _, il := range s.Interleaved {
			if il.Alg == alg && il.DirectAP50 > 0 && il.RelayAP50 > 0 {
				x.Name += fmt.Sprintf(" [interleaved: keyd %.2f; the bare relay, one socket round trip and nothing else: %.2f; the gRPC relay: %.2f]",
					div(il.KeydP50, il.DirectAP50), div(il.RelayP50, il.RelayAP50), div(il.GRPCP50, il.GRPCAP50))
			}
		}
		goals = append(goals, x)
	}
	return goals
}

// tpmRoundRatios returns keyd p50 / direct p50 at 1 caller for alg: the
// main sweep's (direct: the mean of direct and direct again), then each
// goal round's (direct: the mean of the direct runs just before and just
// after that round's keyd).
func (s *hwSection) tpmRoundRatios(alg string) []float64 {
	var out []float64
	prev := 0.0
	for _, r := range s.TPMRatios {
		if r.Alg == alg && r.Callers == 1 {
			out = append(out, r.Keyd)
			prev = r.DirectP50us
			if again, ok := s.find(alg, modeDirectAgain, 1); ok {
				prev = again.P50us
			}
		}
	}
	if len(out) == 0 {
		return nil
	}
	for _, r := range s.Rounds {
		if r.Alg != alg || r.Callers != 1 || r.Direct.P50us == 0 {
			continue
		}
		ref := (prev + r.Direct.P50us) / 2
		out = append(out, r.Keyd.P50us/ref)
		prev = r.Direct.P50us
	}
	return out
}

// p11Interleaved returns the interleaved measurement of alg at the goal's
// callers, nil if there is none.
func (s *hwSection) p11Interleaved(alg string) *p11Interleaved {
	for _, x := range s.P11Interleaved {
		if x.Alg == alg && x.Callers == goalP11N {
			return x
		}
	}
	return nil
}

// roundRatios returns keyd ops/s / direct ops/s at n callers for alg: the
// main sweep's, then each goal round's.
func (s *hwSection) roundRatios(alg string, n int) []float64 {
	return s.ratiosOf(alg, n, modeKeyd, func(r goalRound) *result { return &r.Keyd })
}

// relayRatios is roundRatios for the bare relay (rounds that measured it).
func (s *hwSection) relayRatios(alg string, n int) []float64 {
	return s.ratiosOf(alg, n, modeBareRelay, func(r goalRound) *result { return r.Relay })
}

// ratiosOf returns mode's ops/s / direct ops/s at n callers for alg in the
// main sweep and in each goal round where pick finds it.
func (s *hwSection) ratiosOf(alg string, n int, mode string, pick func(goalRound) *result) []float64 {
	var out []float64
	d, ok1 := s.find(alg, modeDirect, n)
	m, ok2 := s.find(alg, mode, n)
	if ok1 && ok2 && d.OpsPerSec > 0 {
		out = append(out, m.OpsPerSec/d.OpsPerSec)
	}
	for _, r := range s.Rounds {
		if x := pick(r); r.Alg == alg && r.Callers == n && x != nil && r.Direct.OpsPerSec > 0 {
			out = append(out, x.OpsPerSec/r.Direct.OpsPerSec)
		}
	}
	return out
}

// median returns the median of xs (the mean of the middle two for an even
// count), 0 for none.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// naStatus says why a goal was not measured.
func (s *hwSection) naStatus(how string) string {
	switch {
	case s.Skipped != "":
		return "n/a (" + s.Backend + " skipped: " + s.Skipped + ")"
	case s.Error != "":
		return "n/a (" + s.Backend + " failed: see the error above)"
	}
	return "n/a (not measured: " + how + ")"
}

func (s *hwSection) print(w io.Writer) {
	title := map[string]string{"pkcs11": "pkcs11 — SoftHSM2", "tpm": "tpm — swtpm"}[s.Backend]
	fmt.Fprintf(w, "\n==== %s ====\n", title)
	if s.Skipped != "" {
		fmt.Fprintf(w, "skipped: %s\n", s.Skipped)
		return
	}
	if s.KeydPID != 0 {
		fmt.Fprintf(w, "keyd pid %d\n", s.KeydPID)
	}
	for _, n := range s.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
	switch s.Backend {
	case "pkcs11":
		fmt.Fprint(w, `modes: direct        in-process C_SignInit+C_Sign through miekg/pkcs11 on the same token and key:
                     2 logged-in pooled sessions, handle cached (found once by CKA_LABEL keyd:<id>);
                     CKM_ECDSA over a SHA-256 digest, CKM_RSA_PKCS over DigestInfo, CKM_EDDSA
       direct copy   the same, signing with a session copy of the key (C_CopyObject, CKA_TOKEN false),
                     as keyd does: the SoftHSM work keyd's signatures cost, which skips the token
                     object's file checks that "direct" pays on each C_SignInit
       crypto11      the same key through ThalesGroup/crypto11 v1.5.0 (FindKeyPair by label, Signer.Sign),
                     MaxSessions 3 = 2 pooled sessions + its login session
       keyd backend  diagnostic: keyd's own keystore/pkcs11 Backend.Sign in this process, max_sessions 2
       direct proof  a whole DPoP proof in-process, signed by "direct copy" (what keyd does per proof, minus
                     gRPC and the audit record)
       bare relay    direct copy's signature made by a relay process (its pool in a process of its
                     own, one goroutine per connection) over a Unix socket, one connection per caller:
                     raw bytes, no proof, no gRPC: what the least daemon costs here
       keyd unary    client.DPoP(keyset).Proof through keyd, one unary Sign call per proof
       keyd          the same over the client's SignStream (the default)
`)
	case "tpm":
		fmt.Fprint(w, `modes: direct        one TPM2_Sign through go-tpm in-process, resident key, one connection (serialized)
       direct proof  a whole DPoP proof in-process signed by "direct"
       keyd unary    client.DPoP(keyset).Proof through keyd, one unary Sign call per proof
       keyd          the same over the client's SignStream (the default)
       direct again  "direct" once more after keyd stopped (keys reloaded): the TPM's drift over the run
`)
	}
	if s.Error != "" {
		fmt.Fprintf(w, "ERROR: %s\n", s.Error)
	}
	if len(s.Results) > 0 {
		fmt.Fprintln(w)
		printHWResults(w, s.Results)
	}
	for _, n := range s.NA {
		fmt.Fprintf(w, "n/a: %s\n", n)
	}
	if len(s.P11Ratios) > 0 {
		fmt.Fprintf(w, "\nratios of ops/s: K = keyd / direct   (goal at %d callers: ES256 ≥ %.2f, RS256 ≥ %.2f)\n", goalP11N, goalP11ES256, goalP11RS256)
		fmt.Fprintf(w, "                 U = keyd unary / direct     C = keyd / crypto11     c = crypto11 / direct\n")
		fmt.Fprintf(w, "                 B = keyd backend / direct   P = direct proof / direct copy   KP = keyd / direct proof\n")
		fmt.Fprintf(w, "                 R = bare relay / direct     p50 = keyd p50 / direct p50\n")
		fmt.Fprintf(w, "%-6s %7s %6s %6s %6s %6s %6s %6s %6s %6s %7s\n", "alg", "callers", "K", "U", "C", "c", "B", "P", "KP", "R", "p50")
		for _, r := range s.P11Ratios {
			// A ratio of a mode that did not run (-pkcs11-modes) is 0: n/a.
			fmt.Fprintf(w, "%-6s %7d %6s %6s %6s %6s %6s %6s %6s %6s %7s\n", r.Alg, r.Callers, optRatio(r.KeydVsDirect), optRatio(r.UnaryVsDirect),
				optRatio(r.KeydVsCrypto11), optRatio(r.Crypto11VsDirect), optRatio(r.BackendVsDirect), optRatio(r.ProofVsCopy), optRatio(r.KeydVsProof),
				optRatio(r.RelayVsDirect), optRatio(r.P50))
		}
	}
	if len(s.Rounds) > 0 && s.Backend == "pkcs11" {
		fmt.Fprintf(w, "\ngoal rounds (direct and keyd alternately, again; round 1 is the table's):\n")
		seen := map[string]bool{}
		for _, r := range s.Rounds {
			key := fmt.Sprintf("%s/%d", r.Alg, r.Callers)
			if seen[key] {
				continue
			}
			seen[key] = true
			ratios := s.roundRatios(r.Alg, r.Callers)
			var parts []string
			for i, x := range ratios {
				d, k := s.roundPair(r.Alg, r.Callers, i)
				parts = append(parts, fmt.Sprintf("%.0f/%.0f = %.2f", k, d, x))
			}
			fmt.Fprintf(w, "  %s %d callers, keyd/direct ops/s: %s → median %.2f\n", r.Alg, r.Callers, strings.Join(parts, ", "), median(ratios))
			if rr := s.relayRatios(r.Alg, r.Callers); len(rr) > 0 {
				parts = parts[:0]
				for _, x := range rr {
					parts = append(parts, fmt.Sprintf("%.2f", x))
				}
				fmt.Fprintf(w, "  %s %d callers, bare relay/direct ops/s: %s → median %.2f\n", r.Alg, r.Callers, strings.Join(parts, ", "), median(rr))
			}
		}
	}
	printP11Interleaved(w, s.P11Interleaved)
	if len(s.TPMRatios) > 0 {
		fmt.Fprintf(w, "\nratios of p50 to the direct TPM2_Sign p50 (at the first callers count: the mean of direct and direct again)\n")
		fmt.Fprintf(w, "   (goal: keyd ≤ %.2f at 1 caller)   extra = keyd p50 - direct p50   ops = keyd ops/s / direct ops/s\n", goalTPMP50)
		fmt.Fprintf(w, "%-6s %7s %11s %7s %7s %7s %9s %6s\n", "alg", "callers", "direct µs", "keyd", "unary", "proof", "extra µs", "ops")
		for _, r := range s.TPMRatios {
			fmt.Fprintf(w, "%-6s %7d %11.1f %7.3f %7.3f %7.3f %9.1f %6.2f\n", r.Alg, r.Callers, r.DirectP50us, r.Keyd, r.Unary, r.Proof, r.ExtraUs, r.KeydOps)
		}
		if len(s.Interleaved) > 0 {
			fmt.Fprintf(w, "\ninterleaved (1 caller, two fresh swtpm A and B, %d alternating slices of each side, p50): direct on A against\n", s.Interleaved[0].Slices)
			fmt.Fprintf(w, "  direct on B (calibration); direct on B through the bare relay (one more process, raw bytes over a Unix socket);\n")
			fmt.Fprintf(w, "  direct on B through the gRPC relay (keyd's transport and options, nothing of keyd's own); keyd on B\n")
			fmt.Fprintf(w, "%-6s %-16s %12s %10s %7s %9s\n", "alg", "against", "direct A µs", "other µs", "ratio", "extra µs")
			for _, x := range s.Interleaved {
				for _, row := range []struct {
					name     string
					a, other float64
				}{
					{"direct on B", x.CalAP50, x.CalBP50},
					{"bare relay", x.RelayAP50, x.RelayP50},
					{"gRPC relay", x.GRPCAP50, x.GRPCP50},
					{"keyd", x.DirectAP50, x.KeydP50},
				} {
					if row.a == 0 || row.other == 0 {
						continue
					}
					fmt.Fprintf(w, "%-6s %-16s %12.1f %10.1f %7.3f %9.1f\n", x.Alg, row.name, row.a, row.other, row.other/row.a, row.other-row.a)
				}
			}
			fmt.Fprintf(w, "  the goal (≤ %.2f) allows %.0f%% of the TPM's latency; the bare relay is the least daemon, the gRPC relay the least gRPC daemon\n", goalTPMP50, (goalTPMP50-1)*100)
		}
		if s.Backend == "tpm" && len(s.Rounds) > 0 {
			fmt.Fprintf(w, "\ngoal rounds (keyd started again, then direct; each keyd p50 over the mean of the direct p50s around it; round 1 is the table's):\n")
			for _, alg := range s.Algs {
				ratios := s.tpmRoundRatios(alg)
				if len(ratios) == 0 {
					continue
				}
				var parts []string
				for _, x := range ratios {
					parts = append(parts, fmt.Sprintf("%.3f", x))
				}
				fmt.Fprintf(w, "  %s 1 caller, keyd/direct p50: %s → median %.3f\n", alg, strings.Join(parts, ", "), median(ratios))
			}
		}
	}
	if s.RSS.HWMKiB > 0 {
		fmt.Fprintf(w, "keyd RSS at end %.1f MiB, VmHWM %.1f MiB\n", mib(s.RSS.EndKiB), mib(s.RSS.HWMKiB))
	}
}

// roundPair returns direct and keyd ops/s of round i (0: the main sweep).
func (s *hwSection) roundPair(alg string, n, i int) (direct, keyd float64) {
	if i == 0 {
		d, _ := s.find(alg, modeDirect, n)
		k, _ := s.find(alg, modeKeyd, n)
		return d.OpsPerSec, k.OpsPerSec
	}
	j := 0
	for _, r := range s.Rounds {
		if r.Alg == alg && r.Callers == n {
			j++
			if j == i {
				return r.Direct.OpsPerSec, r.Keyd.OpsPerSec
			}
		}
	}
	return 0, 0
}

func optRatio(v float64) string {
	if v == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f", v)
}

// printResults prints a results table, a blank line between (alg, callers)
// groups; modeWidth is the width of the mode column.
func printResults(w io.Writer, rs []result, modeWidth int) {
	fmt.Fprintf(w, "%-6s %7s  %-*s %10s %10s %10s %10s %9s\n", "alg", "callers", modeWidth, "mode", "ops/s", "p50 µs", "p99 µs", "mean µs", "ops")
	prev := ""
	for _, x := range rs {
		key := fmt.Sprintf("%s/%d", x.Alg, x.Callers)
		if prev != "" && key != prev {
			fmt.Fprintln(w)
		}
		prev = key
		fmt.Fprintf(w, "%-6s %7d  %-*s %10.0f %10.1f %10.1f %10.1f %9d\n", x.Alg, x.Callers, modeWidth, x.Mode, x.OpsPerSec, x.P50us, x.P99us, x.MeanUs, x.Ops)
	}
}

// printHWResults prints a results table with the CPU time per operation of
// the bench process, keyd and swtpm.
func printHWResults(w io.Writer, rs []result) {
	fmt.Fprintf(w, "%-6s %7s  %-12s %9s %9s %9s %9s %8s  %s\n", "alg", "callers", "mode", "ops/s", "p50 µs", "p99 µs", "mean µs", "ops", "CPU µs/op: bench daemon swtpm")
	prev := ""
	cpu := func(v float64) string {
		if v == 0 {
			return "     -"
		}
		return fmt.Sprintf("%6.1f", v)
	}
	for _, x := range rs {
		key := fmt.Sprintf("%s/%d", x.Alg, x.Callers)
		if prev != "" && key != prev {
			fmt.Fprintln(w)
		}
		prev = key
		daemon := x.CPUKeydUs // keyd's, or the bare relay's in that mode
		if x.CPURelayUs > 0 {
			daemon = x.CPURelayUs
		}
		fmt.Fprintf(w, "%-6s %7d  %-12s %9.0f %9.1f %9.1f %9.1f %8d  %s %s %s\n", x.Alg, x.Callers, x.Mode, x.OpsPerSec, x.P50us, x.P99us, x.MeanUs, x.Ops,
			cpu(x.CPUSelfUs), cpu(daemon), cpu(x.CPUSwtpmUs))
	}
}

// sectionError records err in sec for the report.
func sectionError(sec *hwSection, err error) {
	if err != nil {
		sec.Error = strings.TrimSpace(err.Error())
	}
}
