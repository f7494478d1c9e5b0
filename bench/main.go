// Command bench is `make bench`: it measures a DPoP proof signed through
// keyd against the same soft key signed in-process and against a bare gRPC
// unary echo over the same kind of socket, for each algorithm and number of
// concurrent callers, all in one run, and reports ops/s, p50/p99, keyd's RSS
// and the ratios the performance goals are stated in. Then, with the same
// method, keyd on a SoftHSM2 token against that token signed in-process
// (miekg/pkcs11 and crypto11), and keyd on swtpm against TPM2_Sign through
// go-tpm (see hw.go).
//
//	go run ./bench [-duration 2s] [-backends soft,pkcs11,tpm] [-callers 1,4,16] [-algs ES256,RS256]
//	    [-pkcs11-callers 1,2,8,16] [-pkcs11-algs ES256,RS256,EdDSA] [-tpm-callers 1,4] [-tpm-algs ES256,RS256]
//	    [-keyd bin/keyd] [-json out.json]
//
// -backends defaults to soft plus each of pkcs11 and tpm whose tools
// (SoftHSM2; swtpm) are installed; naming one explicitly lets the
// softhsm-test scripts install what it needs.
//
// Everything runs on this machine: the real keyd binary (built if missing)
// on a temporary configuration, state directory and socket; an echo server
// that is this program re-executed with -echo-server, serving the standard
// gRPC health service with keyd's server options but none of its
// interceptors; and the in-process signer, which opens the soft key keyd
// generated and does per proof what keyd's Sign handler does, minus the
// transport (and minus the audit record, which is keyd's own cost). A
// diagnostic mode, echo+proof, has the echo server make that same proof in
// its handler: it separates what any gRPC signer pays from what is keyd's.
//
// The machine is shared and noisy: compare the ratios of one run, never
// absolute times across runs. The exit status is 0 whether or not a goal is
// met (this is a report); it is non-zero only when something failed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/keyd-dev/keyd/keystore"
)

// The URL every proof is for, as a service calling a resource server would.
const (
	proofMethod = "GET"
	proofURL    = "https://api.example.com/resource"
)

// Goals of the issue.
const (
	goalRatio  = 1.10 // keyd ES256 p50 ≤ 1.1 × (in-process p50 + echo p50), at 1 caller
	goalRSSKiB = 40 * 1024
)

type options struct {
	duration time.Duration
	warmup   time.Duration
	callers  []int
	algs     []keystore.Algorithm

	backends   []string
	explicit   bool          // -backends was given
	hwWarmup   time.Duration // warm-up of the pkcs11 and tpm runs
	p11Callers []int
	p11Algs    []keystore.Algorithm
	tpmCallers []int
	tpmAlgs    []keystore.Algorithm
	goalRounds int // extra alternating rounds of the pkcs11 and tpm goals' pairs
	keydP11    int // keyd's max_sessions in the pkcs11 section
	p11Modes   []string
	tpmSlices  int    // alternating slices of the interleaved tpm measurement (0: none)
	p11Cycles  int    // cycles of the interleaved pkcs11 goal measurement (0: none)
	cpuProfile string // the bench process's CPU profile
	// p11Slice is each mode's measured slice in a cycle, after
	// p11SliceWarmup of the same operation, not measured.
	p11Slice, p11SliceWarmup time.Duration

	keyd    string // absolute path of the keyd binary
	build   bool   // build keyd when the binary is missing
	jsonOut string
	root    string // repository root
}

// children are the modes in which the bench re-executes itself as a
// child process: the bare gRPC echo server (procs.go), and the relays
// (p11relay.go, tpmrelay.go).
var children = map[string]func(args []string) error{
	"-echo-server":    serveEcho,
	"-pkcs11-relay":   servePKCS11Relay,
	"-tpm-relay":      serveTPMRelay,
	"-tpm-grpc-relay": serveTPMGRPCRelay,
}

func main() {
	if len(os.Args) > 1 {
		if serve := children[os.Args[1]]; serve != nil {
			if err := serve(os.Args[2:]); err != nil {
				fmt.Fprintf(os.Stderr, "bench %s: %v\n", strings.TrimPrefix(os.Args[1], "-"), err)
				os.Exit(1)
			}
			return
		}
	}
	os.Exit(run())
}

func run() int {
	opts, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return 2
	}
	// The first signal cancels the run, which then cleans up; a second one
	// exits at once after the emergency clean-up (swtpm, temporary
	// directories); the children die with us (Pdeathsig).
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		<-sigs
		fmt.Fprintln(os.Stderr, "bench: interrupted; cleaning up (a second signal exits at once)")
		cancel()
		<-sigs
		runEmergency()
		os.Exit(130)
	}()

	if opts.cpuProfile != "" {
		f, err := os.Create(opts.cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: -cpuprofile: %v\n", err)
			return 2
		}
		defer f.Close()
		defer pprof.StopCPUProfile()
	}

	failed := false
	var rep *report
	if slices.Contains(opts.backends, "soft") {
		rep, err = benchmark(ctx, opts)
		if err != nil {
			if ctx.Err() != nil {
				fmt.Fprintf(os.Stderr, "bench: interrupted: %v\n", err)
				return 1
			}
			fmt.Fprintf(os.Stderr, "bench: soft: %v\n", err)
			failed = true
			rep = nil
		}
	}
	if rep == nil {
		rep = &report{
			GoVersion: runtime.Version(), GOMAXPROCS: runtime.GOMAXPROCS(0), NumCPU: runtime.NumCPU(), CPU: cpuModel(),
			Keyd: opts.keyd, Duration: opts.duration.String(), Warmup: opts.warmup.String(),
		}
	}
	rep.Backends = opts.backends
	for _, b := range []string{"pkcs11", "tpm"} {
		if !slices.Contains(opts.backends, b) {
			continue
		}
		var sec *hwSection
		if why := opts.missing(b); why != "" {
			sec = &hwSection{Backend: b, Skipped: why}
		} else {
			if err := ensureKeyd(ctx, opts); err != nil {
				fmt.Fprintf(os.Stderr, "bench: %v\n", err)
				return 1
			}
			var err error
			if b == "pkcs11" {
				sec, err = benchPKCS11(ctx, opts)
			} else {
				sec, err = benchTPM(ctx, opts)
			}
			if err != nil {
				if ctx.Err() != nil {
					fmt.Fprintf(os.Stderr, "bench: interrupted: %s: %v\n", b, err)
					return 1
				}
				fmt.Fprintf(os.Stderr, "bench: %s: %v\n", b, err)
				sectionError(sec, err)
				failed = true
			}
		}
		if b == "pkcs11" {
			rep.PKCS11 = sec
		} else {
			rep.TPM = sec
		}
	}
	rep.compute()
	rep.print(os.Stdout)
	if opts.jsonOut != "" {
		if err := rep.writeJSON(opts.jsonOut); err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			return 1
		}
	}
	if failed {
		return 1
	}
	return 0
}

// missing says why backend b cannot run ("" if it can): only when the
// backends were not named explicitly, a missing tool skips its section.
func (o options) missing(b string) string {
	if o.explicit {
		return ""
	}
	switch b {
	case "pkcs11":
		if _, ok := softhsmModule(); !ok {
			return "SoftHSM2 is not installed (make deps, or -backends ...,pkcs11 to let the script install it)"
		}
	case "tpm":
		if !swtpmInstalled() {
			return "swtpm is not installed (make deps, or -backends ...,tpm to let the script install it)"
		}
	}
	return ""
}

func parseFlags(args []string) (options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	dur := fs.Duration("duration", 2*time.Second, "measured time of each run (plus a short warm-up)")
	backends := fs.String("backends", "", "comma-separated sections to run: soft, pkcs11, tpm (default: soft, and pkcs11 and tpm when SoftHSM2 and swtpm are installed)")
	callers := fs.String("callers", "1,4,16", "soft: comma-separated numbers of concurrent callers")
	algs := fs.String("algs", "ES256,RS256", "soft: comma-separated JWS algorithms (dpop key sets)")
	p11Callers := fs.String("pkcs11-callers", "1,2,8,16", "pkcs11: comma-separated numbers of concurrent callers")
	p11Algs := fs.String("pkcs11-algs", "ES256,RS256,EdDSA", "pkcs11: comma-separated JWS algorithms")
	tpmCallers := fs.String("tpm-callers", "1,4", "tpm: comma-separated numbers of concurrent callers")
	tpmAlgs := fs.String("tpm-algs", "ES256,RS256", "tpm: comma-separated JWS algorithms (ES256, RS256)")
	keydP11 := fs.Int("pkcs11-keyd-sessions", p11Sessions, "pkcs11: keyd's max_sessions (the direct modes always use 2), for experiments")
	goalRounds := fs.Int("goal-rounds", 2, "pkcs11 and tpm: extra alternating rounds of direct and keyd at the goals' callers (pkcs11 16, tpm 1); the goals use the median")
	keyd := fs.String("keyd", "", "keyd binary (default bin/keyd in the repository root; built when missing)")
	jsonOut := fs.String("json", "", "also write the results as JSON to this file")
	p11ModeList := fs.String("pkcs11-modes", strings.Join(p11Modes, ","), "pkcs11: comma-separated modes to run, for experiments")
	p11Cycles := fs.Int("pkcs11-cycles", 6, "pkcs11: cycles of the interleaved goal measurement at 16 callers, each a slice of direct, direct copy, bare relay and keyd in turn (0: skip it)")
	p11Slice := fs.Duration("pkcs11-slice", time.Second, "pkcs11: measured length of each mode's slice in the interleaved measurement")
	p11SliceWarmup := fs.Duration("pkcs11-slice-warmup", 250*time.Millisecond, "pkcs11: unmeasured warm-up before each slice (a daemon that sat idle through the other modes' slices needs it)")
	tpmSlices := fs.Int("tpm-slices", 12, "tpm: alternating 250 ms slices of each side in the interleaved measurement on two swtpm instances (0: skip it)")
	cpuProfile := fs.String("cpuprofile", "", "write this process's CPU profile (the callers' side) to this file, for experiments")
	fs.Func("keyd-env", "NAME=VALUE to add to keyd's environment (repeatable; e.g. GOMAXPROCS=4), for experiments", func(v string) error {
		if k, _, ok := strings.Cut(v, "="); !ok || k == "" {
			return fmt.Errorf("want NAME=VALUE, not %q", v)
		}
		keydEnv = append(keydEnv, v)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	if fs.NArg() > 0 {
		return options{}, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	o := options{duration: *dur, jsonOut: *jsonOut, build: true, goalRounds: *goalRounds, keydP11: *keydP11, cpuProfile: *cpuProfile, tpmSlices: *tpmSlices, p11Cycles: *p11Cycles,
		p11Slice: *p11Slice, p11SliceWarmup: *p11SliceWarmup}
	if o.p11Slice < 50*time.Millisecond || o.p11Slice > time.Minute || o.p11SliceWarmup < 0 || o.p11SliceWarmup > time.Minute {
		return o, fmt.Errorf("-pkcs11-slice %v, -pkcs11-slice-warmup %v: want 50ms to 1m, and 0 to 1m", o.p11Slice, o.p11SliceWarmup)
	}
	if o.p11Cycles < 0 || o.p11Cycles > 1000 {
		return o, fmt.Errorf("-pkcs11-cycles %d: want 0 to 1000", o.p11Cycles)
	}
	if o.tpmSlices < 0 || o.tpmSlices > 1000 {
		return o, fmt.Errorf("-tpm-slices %d: want 0 to 1000", o.tpmSlices)
	}
	for _, m := range strings.Split(*p11ModeList, ",") {
		if m = strings.TrimSpace(m); !slices.Contains(p11Modes, m) {
			return o, fmt.Errorf("-pkcs11-modes: unknown mode %q (known: %s)", m, strings.Join(p11Modes, ", "))
		}
		o.p11Modes = append(o.p11Modes, m)
	}
	if o.keydP11 < 1 || o.keydP11 > 64 {
		return o, fmt.Errorf("-pkcs11-keyd-sessions %d: want 1 to 64", o.keydP11)
	}
	if o.goalRounds < 0 || o.goalRounds > 20 {
		return o, fmt.Errorf("-goal-rounds %d: want 0 to 20", o.goalRounds)
	}
	if o.duration < 100*time.Millisecond {
		return o, fmt.Errorf("-duration %v: at least 100ms", o.duration)
	}
	o.warmup = min(300*time.Millisecond, o.duration/4)
	var err error
	if o.callers, err = parseCallers(*callers); err != nil {
		return o, err
	}
	if o.algs, err = parseAlgs(*algs); err != nil {
		return o, err
	}
	o.hwWarmup = min(200*time.Millisecond, o.duration/4)
	if o.p11Callers, err = parseCallers(*p11Callers); err != nil {
		return o, fmt.Errorf("pkcs11: %w", err)
	}
	if o.p11Algs, err = parseAlgs(*p11Algs); err != nil {
		return o, fmt.Errorf("pkcs11: %w", err)
	}
	if o.tpmCallers, err = parseCallers(*tpmCallers); err != nil {
		return o, fmt.Errorf("tpm: %w", err)
	}
	if o.tpmAlgs, err = parseAlgs(*tpmAlgs); err != nil {
		return o, fmt.Errorf("tpm: %w", err)
	}
	for _, a := range o.tpmAlgs {
		if a != keystore.ES256 && a != keystore.RS256 {
			return o, fmt.Errorf("-tpm-algs: %s: the tpm section measures ES256 and RS256", a)
		}
	}
	if o.backends, o.explicit, err = parseBackends(*backends); err != nil {
		return o, err
	}
	if o.root, err = repoRoot(); err != nil {
		return o, err
	}
	if *keyd == "" {
		o.keyd = filepath.Join(o.root, "bin", "keyd")
	} else if o.keyd, err = filepath.Abs(*keyd); err != nil {
		return o, err
	}
	return o, nil
}

func parseCallers(s string) ([]int, error) {
	var out []int
	seen := map[int]bool{}
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > 1024 {
			return nil, fmt.Errorf("-callers: %q is not a number from 1 to 1024", f)
		}
		if !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	return out, nil
}

func parseAlgs(s string) ([]keystore.Algorithm, error) {
	var out []keystore.Algorithm
	seen := map[keystore.Algorithm]bool{}
	for _, f := range strings.Split(s, ",") {
		a, err := keystore.ParseAlgorithm(strings.TrimSpace(f))
		if err != nil {
			return nil, fmt.Errorf("-algs: %w", err)
		}
		if !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	return out, nil
}

// parseBackends reads -backends; empty means soft plus the hardware
// backends whose tools are installed.
func parseBackends(s string) (out []string, explicit bool, err error) {
	if strings.TrimSpace(s) == "" {
		out = []string{"soft"}
		if _, ok := softhsmModule(); ok {
			out = append(out, "pkcs11")
		}
		if swtpmInstalled() {
			out = append(out, "tpm")
		}
		return out, false, nil
	}
	seen := map[string]bool{}
	for _, f := range strings.Split(s, ",") {
		f = strings.ToLower(strings.TrimSpace(f))
		if !slices.Contains(allBackends, f) {
			return nil, true, fmt.Errorf("-backends: %q: want soft, pkcs11 or tpm", f)
		}
		seen[f] = true
	}
	for _, b := range allBackends {
		if seen[b] {
			out = append(out, b)
		}
	}
	return out, true, nil
}

// repoRoot walks up from the working directory to the directory whose go.mod
// declares the keyd module.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && modulePath(string(b)) == "github.com/keyd-dev/keyd" {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("not inside the keyd repository (no go.mod of github.com/keyd-dev/keyd above %s)", dir)
		}
		d = parent
	}
}

func modulePath(gomod string) string {
	for _, line := range strings.Split(gomod, "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "module"); ok {
			return strings.Trim(strings.TrimSpace(rest), `"`)
		}
	}
	return ""
}

// keySetName is the bench key set of alg: b-es256, b-rs256, ...
func keySetName(alg keystore.Algorithm) string { return "b-" + strings.ToLower(string(alg)) }

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
}
