package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
)

type result struct {
	Alg       string  `json:"alg"`
	Mode      string  `json:"mode"`
	Callers   int     `json:"callers"`
	Ops       int     `json:"ops"`
	Seconds   float64 `json:"seconds"`
	OpsPerSec float64 `json:"ops_per_sec"`
	P50us     float64 `json:"p50_us"`
	P99us     float64 `json:"p99_us"`
	MeanUs    float64 `json:"mean_us"`
	// CPU time per operation during the measured phase (pkcs11 and tpm
	// sections): this process (callers, and the token when it signs
	// in-process), keyd, and swtpm.
	CPUSelfUs float64 `json:"cpu_self_us_per_op,omitempty"`
	CPUKeydUs float64 `json:"cpu_keyd_us_per_op,omitempty"`
	// CPURelayUs is the bare relay child's (pkcs11 section, bare relay).
	CPURelayUs float64 `json:"cpu_relay_us_per_op,omitempty"`
	CPUSwtpmUs float64 `json:"cpu_swtpm_us_per_op,omitempty"`
}

// ratio compares keyd with in-process signing plus the bare transport.
type ratio struct {
	Alg     string `json:"alg"`
	Callers int    `json:"callers"`
	// P50 is keyd p50 / (in-process p50 + echo p50): 1.0 means keyd adds
	// exactly one bare gRPC round trip to the signature.
	P50 float64 `json:"p50_ratio"`
	// Mean is the same ratio of mean latencies, the fairer one when there
	// are more callers than cores.
	Mean float64 `json:"mean_ratio"`
	// ExtraUs is keyd p50 - in-process p50 - echo p50, in µs: what keyd
	// costs beyond the signature and the transport.
	ExtraUs float64 `json:"extra_p50_us"`
	// Throughput is keyd ops/s / in-process ops/s.
	Throughput float64 `json:"throughput_ratio"`
	// EchoProofP50 is echo+proof p50 / (in-process p50 + echo p50): what
	// the sum misses when the same proof is made inside a bare gRPC handler,
	// with nothing of keyd around it.
	EchoProofP50 float64 `json:"echo_proof_p50_ratio,omitempty"`
	// KeydExtraUs is keyd p50 - echo+proof p50, in µs: keyd's own cost
	// (interceptor, authorization, lease, audit record, its messages).
	KeydExtraUs float64 `json:"keyd_over_echo_proof_p50_us,omitempty"`
}

type rssReport struct {
	IdleKiB    int64 `json:"idle_kib"`     // after start-up, before any load
	MaxLoadKiB int64 `json:"max_load_kib"` // largest VmRSS sampled during the keyd runs
	MaxKiB     int64 `json:"max_kib"`      // largest VmRSS sampled at any time
	EndKiB     int64 `json:"end_kib"`      // VmRSS after all runs
	HWMKiB     int64 `json:"hwm_kib"`      // VmHWM (peak RSS of keyd's life) after all runs
}

type goal struct {
	Name   string  `json:"name"`
	Value  float64 `json:"value"`
	Limit  float64 `json:"limit"`
	Met    bool    `json:"met"`
	Status string  `json:"status"` // met, NOT met, n/a
}

type report struct {
	GoVersion  string    `json:"go_version"`
	GOMAXPROCS int       `json:"gomaxprocs"`
	NumCPU     int       `json:"num_cpu"`
	CPU        string    `json:"cpu"`
	Keyd       string    `json:"keyd"`
	KeydPID    int       `json:"keyd_pid"`
	Duration   string    `json:"duration"`
	Warmup     string    `json:"warmup"`
	Algs       []string  `json:"algs"`
	Callers    []int     `json:"callers"`
	Results    []result  `json:"results"`
	Ratios     []ratio   `json:"ratios"`
	RSS        rssReport `json:"keyd_rss"`
	AuditBytes int64     `json:"audit_log_bytes"`
	Goals      []goal    `json:"goals"`

	// Backends are the sections run: soft (everything above), pkcs11, tpm.
	Backends []string   `json:"backends"`
	PKCS11   *hwSection `json:"pkcs11,omitempty"`
	TPM      *hwSection `json:"tpm,omitempty"`
}

// ranSoft reports whether the soft section (the original bench) ran.
func (r *report) ranSoft() bool { return len(r.Results) > 0 }

func (r *report) find(alg, mode string, callers int) (result, bool) {
	for _, x := range r.Results {
		if x.Alg == alg && x.Mode == mode && x.Callers == callers {
			return x, true
		}
	}
	return result{}, false
}

// compute fills Ratios and Goals from Results and RSS, and adds the goals
// of the other sections.
func (r *report) compute() {
	r.Goals = nil
	if r.ranSoft() {
		r.computeSoft()
	}
	for _, s := range []*hwSection{r.PKCS11, r.TPM} {
		if s != nil {
			r.Goals = append(r.Goals, s.compute()...)
		}
	}
}

// computeSoft fills Ratios and the soft section's Goals.
func (r *report) computeSoft() {
	r.Ratios = nil
	for _, alg := range r.Algs {
		for _, n := range r.Callers {
			k, ok1 := r.find(alg, modeKeyd, n)
			in, ok2 := r.find(alg, modeInproc, n)
			e, ok3 := r.find(alg, modeEcho, n)
			if !ok1 || !ok2 || !ok3 || in.P50us+e.P50us == 0 || in.OpsPerSec == 0 {
				continue
			}
			x := ratio{
				Alg: alg, Callers: n,
				P50:        k.P50us / (in.P50us + e.P50us),
				Mean:       k.MeanUs / (in.MeanUs + e.MeanUs),
				ExtraUs:    k.P50us - in.P50us - e.P50us,
				Throughput: k.OpsPerSec / in.OpsPerSec,
			}
			if ep, ok := r.find(alg, modeEchoProof, n); ok {
				x.EchoProofP50 = ep.P50us / (in.P50us + e.P50us)
				x.KeydExtraUs = k.P50us - ep.P50us
			}
			r.Ratios = append(r.Ratios, x)
		}
	}
	g := goal{Name: "ES256 p50 at 1 caller ≤ 1.10 × (in-process + echo)", Limit: goalRatio, Status: "n/a (not measured: run with ES256 and 1 caller)"}
	for _, x := range r.Ratios {
		if x.Alg == "ES256" && x.Callers == 1 {
			g.Value, g.Met = x.P50, x.P50 <= goalRatio
			g.Status = metString(g.Met)
		}
	}
	peak := max(r.RSS.HWMKiB, r.RSS.MaxKiB)
	rss := goal{Name: "keyd RSS ≤ 40 MiB (VmHWM: peak over the whole run)", Value: float64(peak) / 1024, Limit: goalRSSKiB / 1024}
	rss.Met = peak <= goalRSSKiB
	rss.Status = metString(rss.Met)
	r.Goals = append(r.Goals, g, rss)
}

func metString(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

func (r *report) print(w io.Writer) {
	fmt.Fprintf(w, "keyd bench: %s, GOMAXPROCS=%d (%d CPUs: %s); backends: %s\n", r.GoVersion, r.GOMAXPROCS, r.NumCPU, r.CPU, strings.Join(r.Backends, ", "))
	if r.ranSoft() {
		r.printSoft(w)
	}
	for _, s := range []*hwSection{r.PKCS11, r.TPM} {
		if s != nil {
			s.print(w)
		}
	}
	fmt.Fprintln(w)
	for _, g := range r.Goals {
		if strings.HasPrefix(g.Status, "n/a") {
			fmt.Fprintf(w, "goal: %s: %s\n", g.Name, g.Status)
			continue
		}
		fmt.Fprintf(w, "goal: %s: %.2f → %s\n", g.Name, g.Value, g.Status)
	}
}

func (r *report) printSoft(w io.Writer) {
	fmt.Fprintf(w, "\n==== soft — keyd's soft keystore ====\n")
	fmt.Fprintf(w, "keyd %s (pid %d); %s per run after %s warm-up; DPoP proof %s %s; soft keystore\n", r.Keyd, r.KeydPID, r.Duration, r.Warmup, proofMethod, proofURL)
	fmt.Fprint(w, `modes: echo        bare gRPC unary call (health Check) to a second process over a Unix socket,
                    keyd's server options, no interceptors: the transport alone
       bare sign   backend.Sign alone, in-process, with keyd's key
       in-process  the whole proof in-process with keyd's key: NormalizeHTU, claims JSON, policy.Prepare,
                    SigningInput, Digest, backend.Sign, EncodeSignature, Compact
       echo+proof  diagnostic: the echo server makes the in-process proof in its handler (own soft key)
       keyd unary  client.DPoP(keyset).Proof through keyd, one unary Sign call per proof
       keyd        the same over the client's SignStream (the default): one stream shared by the callers
The machine is shared and noisy: compare ratios within one run, not absolute times across runs.
With more callers than cores, in-process p50 is the bare service time (CPU-bound goroutines run in
10 ms slices and the wait shows up in p99 and the mean); compare ops/s there.

`)
	printResults(w, r.Results, 10)

	fmt.Fprintf(w, "\nratios: A = keyd p50 / (in-process p50 + echo p50)   (the goal: ≤ %.2f for ES256 at 1 caller)\n", goalRatio)
	fmt.Fprintf(w, "   A mean = the same with mean latencies (the fairer one with more callers than cores)\n")
	fmt.Fprintf(w, "        B = keyd p50 - in-process p50 - echo p50     (µs keyd adds beyond signature + transport)\n")
	fmt.Fprintf(w, "        C = keyd ops/s / in-process ops/s\n")
	fmt.Fprintf(w, "        D = echo+proof p50 / (in-process p50 + echo p50)   (the same, for a bare gRPC handler)\n")
	fmt.Fprintf(w, "        E = keyd p50 - echo+proof p50                (µs that are keyd's own)\n")
	fmt.Fprintf(w, "%-6s %7s %8s %8s %10s %8s %8s %10s\n", "alg", "callers", "A", "A mean", "B µs", "C", "D", "E µs")
	for _, x := range r.Ratios {
		fmt.Fprintf(w, "%-6s %7d %8.2f %8.2f %10.1f %8.2f %8.2f %10.1f\n", x.Alg, x.Callers, x.P50, x.Mean, x.ExtraUs, x.Throughput, x.EchoProofP50, x.KeydExtraUs)
	}

	fmt.Fprintf(w, "\nkeyd RSS: idle %.1f MiB, max under load %.1f MiB (sampled every 20 ms), at end %.1f MiB, VmHWM %.1f MiB\n",
		mib(r.RSS.IdleKiB), mib(r.RSS.MaxLoadKiB), mib(r.RSS.EndKiB), mib(r.RSS.HWMKiB))
	if r.AuditBytes > 0 {
		fmt.Fprintf(w, "keyd audit log: %.1f MiB written during the run (one JSON line per signature)\n", float64(r.AuditBytes)/(1<<20))
	}
}

func mib(kib int64) float64 { return float64(kib) / 1024 }

func (r *report) writeJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// cpuModel returns the first "model name" of /proc/cpuinfo.
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}
