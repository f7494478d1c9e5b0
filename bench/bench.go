package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/policy"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/soft"
)

// The modes, in the order each (alg, callers) pair runs them.
const (
	modeEcho      = "echo"       // bare gRPC unary call (health Check) to the echo child
	modeBare      = "bare sign"  // backend.Sign alone, in-process
	modeInproc    = "in-process" // a whole DPoP proof in-process with the same key
	modeEchoProof = "echo+proof" // diagnostic: the echo child makes the in-process proof in its handler
	modeKeydUnary = "keyd unary" // a DPoP proof through keyd, one unary Sign call each
	modeKeyd      = "keyd"       // a DPoP proof through keyd over the client's SignStream (the default)
)

var modes = []string{modeEcho, modeBare, modeInproc, modeEchoProof, modeKeydUnary, modeKeyd}

// benchmark sets everything up, measures, and tears everything down (on
// error and interruption too).
func benchmark(ctx context.Context, o options) (_ *report, err error) {
	if err := ensureKeyd(ctx, o); err != nil {
		return nil, err
	}
	w, err := newWorkDir()
	if err != nil {
		return nil, err
	}
	defer w.remove()

	cfgText := keydConfig(w, o.algs, os.Geteuid())
	cfg, err := parseConfig(cfgText, w.configPath)
	if err != nil {
		return nil, fmt.Errorf("the bench's keyd configuration: %w", err)
	}
	if err := os.WriteFile(w.configPath, cfgText, 0o600); err != nil {
		return nil, err
	}

	progress("starting keyd (%s) and the echo server in %s…", o.keyd, w.dir)
	keyd, err := startChild("keyd", w.keydLog, o.keyd, "serve", "--config", w.configPath)
	if err != nil {
		return nil, err
	}
	defer keyd.stop()
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	echo, err := startChild("echo server", w.echoLog, self, "-echo-server", w.echoSocket, w.echoKeys, strings.Join(algStrings(o.algs), ","))
	if err != nil {
		return nil, err
	}
	defer echo.stop()
	if err := waitServing(ctx, keyd, w.keydSocket, 60*time.Second); err != nil {
		return nil, err
	}
	if err := waitServing(ctx, echo, w.echoSocket, 20*time.Second); err != nil {
		return nil, err
	}
	// Whatever fails from here on, say whether a child died.
	defer func() {
		if err == nil {
			return
		}
		for _, c := range []*child{keyd, echo} {
			if c.exited() {
				err = fmt.Errorf("%w (%s exited: %v)%s", err, c.name, c.err, c.logTail())
			}
		}
	}()

	rep := &report{
		GoVersion: runtime.Version(), GOMAXPROCS: runtime.GOMAXPROCS(0), NumCPU: runtime.NumCPU(), CPU: cpuModel(),
		Keyd: o.keyd, Duration: o.duration.String(), Warmup: o.warmup.String(),
		KeydPID: keyd.pid(), Algs: algStrings(o.algs), Callers: o.callers,
	}
	if rep.RSS.IdleKiB, _, err = procStatus(keyd.pid()); err != nil {
		return nil, err
	}

	kc, err := client.Dial(w.keydSocket)
	if err != nil {
		return nil, err
	}
	defer kc.Close()
	uc, err := client.Dial(w.keydSocket, client.WithUnarySign())
	if err != nil {
		return nil, err
	}
	defer uc.Close()
	ec, err := client.Dial(w.echoSocket)
	if err != nil {
		return nil, err
	}
	defer ec.Close()
	health := healthpb.NewHealthClient(ec.Conn())

	// The same keys keyd uses, in a copy of its key directory: keyd holds
	// the directory's lock. Only Sign is called on them.
	copyDir := filepath.Join(w.dir, "keys-copy")
	if err := copyKeyFiles(cfg.SoftDir(), copyDir); err != nil {
		return nil, err
	}
	be, err := soft.New(soft.Config{Dir: copyDir})
	if err != nil {
		return nil, err
	}
	defer be.Close()

	htu, err := policy.NormalizeHTU(proofURL)
	if err != nil {
		return nil, err
	}

	// Prepare and validate every algorithm before measuring anything.
	type algSetup struct {
		alg keystore.Algorithm
		in  *inproc
		dp  *client.DPoP
		udp *client.DPoP
	}
	var setups []algSetup
	for i, alg := range o.algs {
		name := keySetName(alg)
		v, err := activeVersion(cfg.StateDir, name)
		if err != nil {
			return nil, err
		}
		pol, err := cfg.KeySets[i].Policy()
		if err != nil {
			return nil, err
		}
		in, err := newInproc(be, pol, v)
		if err != nil {
			return nil, err
		}
		dp := kc.DPoP(name)
		if err := validate(ctx, kc, dp, in, alg, name, htu); err != nil {
			return nil, fmt.Errorf("%s: %w", alg, err)
		}
		if err := validateEchoProof(ctx, ec, alg, htu); err != nil {
			return nil, fmt.Errorf("%s: %w", alg, err)
		}
		setups = append(setups, algSetup{alg: alg, in: in, dp: dp, udp: uc.DPoP(name)})
	}
	progress("validated keyd's, the in-process and the echo+proof proofs with go-jose (%d algorithms)", len(setups))

	// keyd's memory, sampled all along; keydLoad marks the keyd runs.
	var keydLoad atomic.Bool
	var rssMu sync.Mutex
	sample := func() {
		rss, _, err := procStatus(keyd.pid())
		if err != nil {
			return
		}
		rssMu.Lock()
		defer rssMu.Unlock()
		rep.RSS.MaxKiB = max(rep.RSS.MaxKiB, rss)
		if keydLoad.Load() {
			rep.RSS.MaxLoadKiB = max(rep.RSS.MaxLoadKiB, rss)
		}
	}
	samplerDone := make(chan struct{})
	samplerCtx, stopSampler := context.WithCancel(ctx)
	go func() {
		defer close(samplerDone)
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-samplerCtx.Done():
				return
			case <-t.C:
				sample()
			}
		}
	}()
	defer func() { stopSampler(); <-samplerDone }()

	rec := newRecorder(o.callers, o.duration, 100_000)
	for _, s := range setups {
		ops := map[string]op{
			modeEcho: func(ctx context.Context) error {
				_, err := health.Check(ctx, &healthpb.HealthCheckRequest{})
				return err
			},
			modeBare: s.in.bareSign,
			modeInproc: func(ctx context.Context) error {
				_, err := s.in.proof(ctx, proofMethod, proofURL)
				return err
			},
			modeEchoProof: func(ctx context.Context) error {
				return echoProof(ctx, ec, s.alg, new(wrapperspb.StringValue))
			},
			modeKeydUnary: func(ctx context.Context) error {
				_, err := s.udp.Proof(ctx, proofMethod, proofURL)
				return err
			},
			modeKeyd: func(ctx context.Context) error {
				_, err := s.dp.Proof(ctx, proofMethod, proofURL)
				return err
			},
		}
		for _, n := range o.callers {
			for _, m := range modes {
				progress("%s %s %d caller%s…", s.alg, m, n, plural(n))
				if m == modeKeyd || m == modeKeydUnary {
					keydLoad.Store(true)
				}
				st, err := rec.measure(ctx, n, o.warmup, o.duration, ops[m])
				if m == modeKeyd || m == modeKeydUnary {
					sample()
					keydLoad.Store(false)
				}
				if err != nil {
					return nil, fmt.Errorf("%s %s %d callers: %w", s.alg, m, n, err)
				}
				rep.Results = append(rep.Results, result{
					Alg: string(s.alg), Mode: m, Callers: n, Ops: st.ops,
					Seconds: st.elapsed.Seconds(), OpsPerSec: st.opsPerSec(),
					P50us: us(st.p50), P99us: us(st.p99), MeanUs: us(st.mean),
				})
			}
		}
	}
	stopSampler()
	<-samplerDone
	sample()
	if rep.RSS.EndKiB, rep.RSS.HWMKiB, err = procStatus(keyd.pid()); err != nil {
		return nil, err
	}
	if keyd.exited() {
		return nil, errors.New("keyd exited during the run")
	}
	if fi, err := os.Stat(w.auditLog); err == nil {
		rep.AuditBytes = fi.Size()
	}
	rep.compute()
	return rep, nil
}

// validate checks samples of keyd's and the in-process signer's proofs with
// go-jose against the JWKS keyd publishes, and that both use the same key.
func validate(ctx context.Context, kc *client.Client, dp *client.DPoP, in *inproc, alg keystore.Algorithm, keyset, htu string) error {
	jtis := map[string]bool{}
	if err := validateKeyd(ctx, kc, dp, alg, keyset, in.kid, htu, jtis); err != nil {
		return err
	}
	return validateLocal(ctx, in, alg, in.kid, htu, jtis)
}

// validateKeyd checks samples of keyd's proofs with go-jose against the JWKS
// keyd publishes: signed by kid, the active key. jtis collects the jti of
// every proof checked, which must not repeat.
func validateKeyd(ctx context.Context, kc *client.Client, dp *client.DPoP, alg keystore.Algorithm, keyset, kid, htu string, jtis map[string]bool) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	raw, err := kc.JWKS(ctx, keyset)
	if err != nil {
		return fmt.Errorf("jwks: %w", err)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(raw, &set); err != nil {
		return fmt.Errorf("jwks: %w", err)
	}
	for range 4 {
		p, err := dp.Proof(ctx, proofMethod, proofURL)
		if err != nil {
			return fmt.Errorf("keyd proof: %w", err)
		}
		if p.Kid != kid {
			return fmt.Errorf("keyd signed with kid %s; its metadata says the active key is %s", p.Kid, kid)
		}
		jti, err := verifyProof(p.JWT, alg, kid, &set, proofMethod, htu)
		if err != nil {
			return fmt.Errorf("keyd proof does not verify: %w\n  token: %s", err, p.JWT)
		}
		if jtis[jti] {
			return fmt.Errorf("keyd proof repeats jti %s", jti)
		}
		jtis[jti] = true
	}
	return nil
}

// validateLocal checks samples of in's proofs with go-jose: against their
// header jwk, whose thumbprint must be kid (in's own key).
func validateLocal(ctx context.Context, in *inproc, alg keystore.Algorithm, kid, htu string, jtis map[string]bool) error {
	for range 4 {
		t, err := in.proof(ctx, proofMethod, proofURL)
		if err != nil {
			return fmt.Errorf("in-process proof: %w", err)
		}
		jti, err := verifyProof(t, alg, "", nil, proofMethod, htu)
		if err != nil {
			return fmt.Errorf("in-process proof does not verify: %w\n  token: %s", err, t)
		}
		if got := headerKid(t); got != kid {
			return fmt.Errorf("in-process proof carries the key %s, want %s", got, kid)
		}
		if jtis[jti] {
			return fmt.Errorf("in-process proof repeats jti %s", jti)
		}
		jtis[jti] = true
	}
	return nil
}

// echoProof asks the echo child for a proof made in its handler.
func echoProof(ctx context.Context, ec *client.Client, alg keystore.Algorithm, resp *wrapperspb.StringValue) error {
	return ec.Conn().Invoke(ctx, proofEchoMethod, wrapperspb.String(string(alg)), resp)
}

func validateEchoProof(ctx context.Context, ec *client.Client, alg keystore.Algorithm, htu string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var resp wrapperspb.StringValue
	if err := echoProof(ctx, ec, alg, &resp); err != nil {
		return fmt.Errorf("echo+proof: %w", err)
	}
	if _, err := verifyProof(resp.Value, alg, "", nil, proofMethod, htu); err != nil {
		return fmt.Errorf("echo+proof proof does not verify: %w\n  token: %s", err, resp.Value)
	}
	return nil
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

func algStrings(as []keystore.Algorithm) []string {
	out := make([]string, len(as))
	for i, a := range as {
		out[i] = string(a)
	}
	return out
}

// copyKeyFiles copies the key files (*.key) of the soft key directory src
// into dst (created 0700), as the soft keystore wants them: mode 0600.
func copyKeyFiles(src, dst string) error {
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return err
	}
	names, err := filepath.Glob(filepath.Join(src, "*.key"))
	if err != nil {
		return err
	}
	for _, name := range names {
		b, err := os.ReadFile(name)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dst, filepath.Base(name)), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}
