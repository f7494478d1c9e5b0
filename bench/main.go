// Command bench is `make bench`: it measures a DPoP proof signed through
// keyd against the same soft key signed in-process and against a bare gRPC
// unary echo over the same kind of socket, for each algorithm and number of
// concurrent callers, all in one run, and reports ops/s, p50/p99, keyd's RSS
// and the ratios the performance goals are stated in.
//
//	go run ./bench [-duration 3s] [-callers 1,4,16] [-algs ES256,RS256] [-keyd bin/keyd] [-json out.json]
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
	keyd     string // absolute path of the keyd binary
	build    bool   // build keyd when the binary is missing
	jsonOut  string
	root     string // repository root
}

func main() {
	// Child mode: the bare gRPC echo server.
	if len(os.Args) > 1 && os.Args[1] == "-echo-server" {
		if err := serveEcho(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "bench echo server: %v\n", err)
			os.Exit(1)
		}
		return
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
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // a second signal kills at once; the children die with us (Pdeathsig)
	}()
	rep, err := benchmark(ctx, opts)
	if err != nil {
		if ctx.Err() != nil {
			fmt.Fprintf(os.Stderr, "bench: interrupted: %v\n", err)
		} else {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		}
		return 1
	}
	rep.print(os.Stdout)
	if opts.jsonOut != "" {
		if err := rep.writeJSON(opts.jsonOut); err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			return 1
		}
	}
	return 0
}

func parseFlags(args []string) (options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	dur := fs.Duration("duration", 3*time.Second, "measured time of each run (plus a short warm-up)")
	callers := fs.String("callers", "1,4,16", "comma-separated numbers of concurrent callers")
	algs := fs.String("algs", "ES256,RS256", "comma-separated JWS algorithms (dpop key sets)")
	keyd := fs.String("keyd", "", "keyd binary (default bin/keyd in the repository root; built when missing)")
	jsonOut := fs.String("json", "", "also write the results as JSON to this file")
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	if fs.NArg() > 0 {
		return options{}, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	o := options{duration: *dur, jsonOut: *jsonOut, build: true}
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
