package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ThalesGroup/crypto11"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/config"
	"github.com/keyd-dev/keyd/internal/policy"
	"github.com/keyd-dev/keyd/keystore"
	kp11 "github.com/keyd-dev/keyd/keystore/pkcs11"
)

// Backends the bench knows, in the order it runs them.
var allBackends = []string{"soft", "pkcs11", "tpm"}

// Modes of the pkcs11 section, in the order each (alg, callers) pair runs
// them.
const (
	modeDirect      = "direct"       // C_SignInit+C_Sign through miekg/pkcs11, 2 pooled sessions, cached handle
	modeDirectCopy  = "direct copy"  // the same on a session copy of the key, as keyd signs (see p11direct.go)
	modeCrypto11    = "crypto11"     // the same key through ThalesGroup/crypto11 (FindKeyPair, Sign), 2 sessions
	modeKeydBackend = "keyd backend" // diagnostic: keyd's keystore/pkcs11 Backend.Sign in-process, 2 sessions
	modeDirectProof = "direct proof" // the whole DPoP proof in-process, signed by the direct signer (pkcs11: direct copy's, keyd's SoftHSM work)
	modeBareRelay   = "bare relay"   // direct copy's signature made in a relay process, over a Unix socket (see p11relay.go)
	modeDirectAgain = "direct again" // tpm: direct TPM2_Sign once more, after keyd let the TPM go
)

var p11Modes = []string{modeDirect, modeDirectCopy, modeCrypto11, modeKeydBackend, modeDirectProof, modeBareRelay, modeKeydUnary, modeKeyd}

// Sessions of every pool in the pkcs11 section (the "two sessions").
const p11Sessions = 2

// Goals of the issues.
const (
	goalP11ES256 = 0.80 // keyd ES256 ops/s ≥ 0.80 × direct ops/s at 16 callers
	goalP11RS256 = 0.90 // keyd RS256 ops/s ≥ 0.90 × direct ops/s at 16 callers
	goalP11N     = 16
	goalTPMP50   = 1.05 // keyd p50 ≤ 1.05 × direct TPM2_Sign p50, at 1 caller
)

// ---- emergency clean-up -------------------------------------------------

// emergency holds what must be undone even when a second signal makes the
// bench exit at once: the swtpm daemon (not our child, so Pdeathsig does
// not reach it) and temporary directories. Children started with
// startChild die with the bench anyway.
var emergency struct {
	sync.Mutex
	next int
	fns  map[int]func()
}

// atEmergency registers fn and returns the function that unregisters it.
func atEmergency(fn func()) (cancel func()) {
	emergency.Lock()
	defer emergency.Unlock()
	if emergency.fns == nil {
		emergency.fns = map[int]func(){}
	}
	id := emergency.next
	emergency.next++
	emergency.fns[id] = fn
	return func() {
		emergency.Lock()
		delete(emergency.fns, id)
		emergency.Unlock()
	}
}

// runEmergency runs every registered function, newest first.
func runEmergency() {
	emergency.Lock()
	var ids []int
	for id := range emergency.fns {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	fns := emergency.fns
	emergency.fns = nil
	emergency.Unlock()
	for i := len(ids) - 1; i >= 0; i-- {
		fns[ids[i]]()
	}
}

// ---- tools and scripts --------------------------------------------------

// softhsmModule returns the SoftHSM2 module path if SoftHSM2 is installed.
func softhsmModule() (string, bool) {
	if _, err := exec.LookPath("softhsm2-util"); err != nil {
		return "", false
	}
	for _, p := range []string{"/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
		"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so", "/usr/local/lib/softhsm/libsofthsm2.so"} {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, true
		}
	}
	return "", false
}

func swtpmInstalled() bool {
	for _, t := range []string{"swtpm", "swtpm_ioctl"} {
		if _, err := exec.LookPath(t); err != nil {
			return false
		}
	}
	return true
}

// runScript runs one of softhsm-test's scripts with extra environment and
// returns the exports it prints.
func runScript(ctx context.Context, o options, env []string, script string, args ...string) (map[string]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute) // it may install packages
	defer cancel()
	path := filepath.Join(o.root, "softhsm-test", script)
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s %s: %w\n%s", script, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return parseExports(out.String())
}

// parseExports reads the "export NAME=VALUE" lines the scripts print
// (values quoted by printf %q, which for the paths they print means at most
// backslash escapes or single quotes).
func parseExports(s string) (map[string]string, error) {
	m := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		rest, ok := strings.CutPrefix(line, "export ")
		if !ok {
			continue
		}
		k, v, ok := strings.Cut(rest, "=")
		if !ok {
			return nil, fmt.Errorf("bad export line %q", line)
		}
		switch {
		case len(v) >= 2 && v[0] == '\'' && v[len(v)-1] == '\'':
			v = v[1 : len(v)-1]
		case strings.HasPrefix(v, "$'"):
			return nil, fmt.Errorf("export %s: cannot read the quoting of %q", k, v)
		default:
			var b strings.Builder
			for i := 0; i < len(v); i++ {
				if v[i] == '\\' && i+1 < len(v) {
					i++
				}
				b.WriteByte(v[i])
			}
			v = b.String()
		}
		m[k] = v
	}
	return m, sc.Err()
}

// keydConfigFor is the configuration of keyd on backend (the YAML lines
// under "backend:") with one dpop key set per algorithm.
func keydConfigFor(w *workDir, backend string, algs []keystore.Algorithm, uid int) []byte {
	var b bytes.Buffer
	q := strconv.Quote
	fmt.Fprintf(&b, "socket: %s\n", q(w.keydSocket))
	fmt.Fprintf(&b, "socket_mode: \"0600\"\n")
	fmt.Fprintf(&b, "state_dir: %s\n", q(w.stateDir))
	fmt.Fprintf(&b, "audit_log: %s\n", q(w.auditLog))
	fmt.Fprintf(&b, "log_level: warn\n")
	fmt.Fprintf(&b, "backend:\n%s", backend)
	fmt.Fprintf(&b, "keysets:\n")
	for _, a := range algs {
		fmt.Fprintf(&b, "  - name: %s\n    purpose: dpop\n    alg: %s\n    allow:\n      uids: [%d]\n", keySetName(a), a, uid)
	}
	return b.Bytes()
}

// startKeyd writes cfgText, starts keyd on it and waits until it serves.
func startKeyd(ctx context.Context, o options, w *workDir, cfgText []byte, timeout time.Duration) (*config.Config, *child, error) {
	cfg, err := parseConfig(cfgText, w.configPath)
	if err != nil {
		return nil, nil, fmt.Errorf("the bench's keyd configuration: %w", err)
	}
	if err := os.WriteFile(w.configPath, cfgText, 0o600); err != nil {
		return nil, nil, err
	}
	keyd, err := startChild("keyd", w.keydLog, o.keyd, "serve", "--config", w.configPath)
	if err != nil {
		return nil, nil, err
	}
	if err := waitServing(ctx, keyd, w.keydSocket, timeout); err != nil {
		keyd.stop()
		return nil, nil, err
	}
	return cfg, keyd, nil
}

// keydClients dials keyd twice: over the SignStream (the default) and unary.
func keydClients(socket string) (stream, unary *client.Client, err error) {
	if stream, err = client.Dial(socket); err != nil {
		return nil, nil, err
	}
	if unary, err = client.Dial(socket, client.WithUnarySign()); err != nil {
		stream.Close()
		return nil, nil, err
	}
	return stream, unary, nil
}

// hwRun measures one mode and appends the result to sec, with the CPU time
// per operation of this process, keyd and swtpm (when they run) during the
// measured phase.
func hwRun(ctx context.Context, o options, rec *recorder, sec *hwSection, alg keystore.Algorithm, mode string, n int, fn op) error {
	r, err := hwMeasure(ctx, o, rec, sec, alg, mode, n, fn, "")
	if err != nil {
		return err
	}
	sec.Results = append(sec.Results, r)
	return nil
}

// hwMeasure measures one mode; note is added to the progress line.
func hwMeasure(ctx context.Context, o options, rec *recorder, sec *hwSection, alg keystore.Algorithm, mode string, n int, fn op, note string) (result, error) {
	progress("%s %s %s %d caller%s%s…", sec.Backend, alg, mode, n, plural(n), note)
	fail := func(err error) (result, error) {
		return result{}, fmt.Errorf("%s %s %s %d callers: %w", sec.Backend, alg, mode, n, err)
	}
	if o.hwWarmup > 0 {
		if _, err := rec.phase(ctx, n, o.hwWarmup, fn); err != nil {
			return fail(err)
		}
	}
	keydPID, swtpmPID, relayPID := sec.KeydPID, sec.swtpmPID, 0
	if !sec.keydUp {
		keydPID = 0
	}
	if mode == modeBareRelay {
		relayPID = sec.relayPID
	}
	self := os.Getpid()
	self0, keyd0, swtpm0, relay0 := cpuOf(self), cpuOf(keydPID), cpuOf(swtpmPID), cpuOf(relayPID)
	st, err := rec.measure(ctx, n, 0, o.duration, fn)
	if err != nil {
		return fail(err)
	}
	self1, keyd1, swtpm1, relay1 := cpuOf(self), cpuOf(keydPID), cpuOf(swtpmPID), cpuOf(relayPID)
	per := func(a, b time.Duration) float64 {
		if a < 0 || b < 0 {
			return 0
		}
		return us(b-a) / float64(st.ops)
	}
	r := result{
		Alg: string(alg), Mode: mode, Callers: n, Ops: st.ops,
		Seconds: st.elapsed.Seconds(), OpsPerSec: st.opsPerSec(),
		P50us: us(st.p50), P99us: us(st.p99), MeanUs: us(st.mean),
		CPUSelfUs: per(self0, self1),
	}
	if keydPID != 0 {
		r.CPUKeydUs = per(keyd0, keyd1)
	}
	if swtpmPID != 0 {
		r.CPUSwtpmUs = per(swtpm0, swtpm1)
	}
	if relayPID != 0 {
		r.CPURelayUs = per(relay0, relay1)
	}
	return r, nil
}

// cpuOf returns the CPU time process pid has used so far, the sum of its
// threads' run time (/proc/<pid>/task/*/schedstat, in ns), or -1 if pid is
// 0 or it cannot be read. A thread that exited between two reads would make
// the difference too small; Go programs' and swtpm's threads live on.
func cpuOf(pid int) time.Duration {
	if pid <= 0 {
		return -1
	}
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return -1
	}
	var total time.Duration
	for _, t := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, t.Name(), "schedstat"))
		if err != nil {
			continue // the thread exited
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			continue
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return -1
		}
		total += time.Duration(ns)
	}
	return total
}

// keydFailed adds why keyd exited, if it did, to err.
func keydFailed(err error, keyd *child) error {
	if err != nil && keyd != nil && keyd.exited() {
		return fmt.Errorf("%w (keyd exited: %v)%s", err, keyd.err, keyd.logTail())
	}
	return err
}

// ---- pkcs11 ---------------------------------------------------------------

// benchPKCS11 is the pkcs11 section: a fresh SoftHSM2 token, keyd on it, and
// the same keys signed in-process directly, through crypto11 and through
// keyd's own backend package.
func benchPKCS11(ctx context.Context, o options) (sec *hwSection, err error) {
	sec = &hwSection{Backend: "pkcs11", Algs: algStrings(o.p11Algs), Callers: o.p11Callers, Modes: p11Modes, KeydSessions: o.keydP11}
	w, err := newWorkDir()
	if err != nil {
		return sec, err
	}
	defer atEmergency(w.remove)()
	defer w.remove()

	progress("pkcs11: making a fresh SoftHSM2 token in %s…", w.dir)
	ex, err := runScript(ctx, o, []string{"SOFTHSM_TEST_DIR=" + filepath.Join(w.dir, "softhsm")}, "new-token.sh", "keyd-bench")
	if err != nil {
		return sec, err
	}
	for _, k := range []string{"SOFTHSM2_CONF", "KEYD_PKCS11_MODULE", "KEYD_PKCS11_TOKEN", "KEYD_PKCS11_URI", "KEYD_PKCS11_PIN_FILE"} {
		if ex[k] == "" {
			return sec, fmt.Errorf("new-token.sh printed no %s", k)
		}
	}
	module, token, pinFile := ex["KEYD_PKCS11_MODULE"], ex["KEYD_PKCS11_TOKEN"], ex["KEYD_PKCS11_PIN_FILE"]
	pinBytes, err := os.ReadFile(pinFile)
	if err != nil {
		return sec, err
	}
	pin := strings.TrimRight(string(pinBytes), "\r\n")
	// For keyd (startChild passes the environment on) and for this process.
	prevConf, hadConf := os.LookupEnv("SOFTHSM2_CONF")
	os.Setenv("SOFTHSM2_CONF", ex["SOFTHSM2_CONF"])
	defer func() {
		if hadConf {
			os.Setenv("SOFTHSM2_CONF", prevConf)
		} else {
			os.Unsetenv("SOFTHSM2_CONF")
		}
	}()

	q := strconv.Quote
	backend := fmt.Sprintf("  pkcs11:\n    module: %s\n    uri: %s\n    pin_file: %s\n    max_sessions: %d\n",
		q(module), q(ex["KEYD_PKCS11_URI"]), q(pinFile), o.keydP11)
	progress("pkcs11: starting keyd on token %q (generating %s)…", token, strings.Join(sec.Algs, ", "))
	cfg, keyd, err := startKeyd(ctx, o, w, keydConfigFor(w, backend, o.p11Algs, os.Geteuid()), 2*time.Minute)
	if err != nil {
		return sec, err
	}
	defer keyd.stop()
	defer func() { err = keydFailed(err, keyd) }()
	sec.KeydPID, sec.keydUp = keyd.pid(), true

	kc, uc, err := keydClients(w.keydSocket)
	if err != nil {
		return sec, err
	}
	defer kc.Close()
	defer uc.Close()

	// In this process, after keyd made the keys (this process only signs).
	// crypto11 first: it refuses a module someone else initialized; the
	// others accept one, and the last to close (crypto11) finalizes it.
	c11, c11Err := crypto11.Configure(&crypto11.Config{Path: module, TokenLabel: token, Pin: pin, MaxSessions: p11Sessions + 1})
	if c11Err != nil {
		sec.NA = append(sec.NA, fmt.Sprintf("crypto11: Configure failed: %v", c11Err))
	} else {
		defer c11.Close()
	}
	direct, err := openP11Direct(module, token, pin, p11Sessions, false)
	if err != nil {
		return sec, fmt.Errorf("direct pkcs11: %w", err)
	}
	defer direct.close()
	directCopy, err := openP11Direct(module, token, pin, p11Sessions, true)
	if err != nil {
		return sec, fmt.Errorf("direct pkcs11 with session copies: %w", err)
	}
	defer directCopy.close()
	kcfg, err := cfg.PKCS11Config()
	if err != nil {
		return sec, err
	}
	kcfg.MaxSessions = p11Sessions // the diagnostic mode always has 2, as direct
	kb, err := kp11.New(ctx, kcfg)
	if err != nil {
		return sec, fmt.Errorf("keyd's pkcs11 backend in-process: %w", err)
	}
	defer kb.Close()

	htu, err := policy.NormalizeHTU(proofURL)
	if err != nil {
		return sec, err
	}
	type setup struct {
		alg  keystore.Algorithm
		id   string
		in   bareInput
		c11  *c11Signer
		pf   *inproc
		dp   *client.DPoP
		udp  *client.DPoP
		name string
		pub  crypto.PublicKey
	}
	var setups []setup
	for i, alg := range o.p11Algs {
		name := keySetName(alg)
		v, err := activeVersion(cfg.StateDir, name)
		if err != nil {
			return sec, err
		}
		pub, err := publicOf(v)
		if err != nil {
			return sec, err
		}
		s := setup{alg: alg, id: v.ID, in: newBareInput(alg), name: name, dp: kc.DPoP(name), udp: uc.DPoP(name), pub: pub}
		for _, d := range []*p11Direct{direct, directCopy} {
			if err := d.addKey(v.ID, alg); err != nil {
				return sec, fmt.Errorf("%s: direct pkcs11 (copies %v): %w", alg, d.copies, err)
			}
			sig, err := d.signRaw(v.ID, s.in.raw)
			if err == nil {
				err = verifyRaw(pub, s.in.digest, s.in.msg, sig)
			}
			if err != nil {
				return sec, fmt.Errorf("%s: direct pkcs11 signature (copies %v): %w", alg, d.copies, err)
			}
		}
		if c11 != nil {
			cs, err := c11Find(c11, v.ID)
			if err == nil {
				var sig []byte
				if sig, err = cs.sign(s.in); err == nil {
					err = verifyRaw(pub, s.in.digest, s.in.msg, sig)
				}
			}
			if err != nil {
				sec.NA = append(sec.NA, fmt.Sprintf("crypto11 %s: n/a: %v", alg, err))
			} else {
				s.c11 = &cs
			}
		}
		sig, err := kb.Sign(ctx, v.ID, s.in.digest, s.in.opts)
		if err == nil {
			err = verifyRaw(pub, s.in.digest, s.in.msg, sig)
		}
		if err != nil {
			return sec, fmt.Errorf("%s: keyd's backend in-process: %w", alg, err)
		}
		pol, err := cfg.KeySets[i].Policy()
		if err != nil {
			return sec, err
		}
		// Signed as keyd signs: on a session copy of the key.
		if s.pf, err = newInproc(directCopy, pol, v); err != nil {
			return sec, err
		}
		if err := validate(ctx, kc, s.dp, s.pf, alg, name, htu); err != nil {
			return sec, fmt.Errorf("%s: %w", alg, err)
		}
		if err := validateKeyd(ctx, uc, s.udp, alg, name, v.Kid, htu, map[string]bool{}); err != nil {
			return sec, fmt.Errorf("%s (unary): %w", alg, err)
		}
		setups = append(setups, s)
	}
	var relay *p11RelayClient
	if slices.Contains(o.p11Modes, modeBareRelay) {
		var keys []string
		for _, s := range setups {
			keys = append(keys, s.id+":"+string(s.alg))
		}
		self, err := os.Executable()
		if err != nil {
			return sec, err
		}
		socket := filepath.Join(w.dir, "relay.sock")
		rc, err := startChild("pkcs11 relay", filepath.Join(w.dir, "relay.log"), self, "-pkcs11-relay", socket, module, token, pinFile, strings.Join(keys, ","))
		if err != nil {
			return sec, err
		}
		defer rc.stop()
		if err := waitSocket(ctx, rc, socket, 20*time.Second); err != nil {
			return sec, err
		}
		sec.relayPID = rc.pid()
		relay = newP11RelayClient(socket)
		defer relay.close()
		for i, s := range setups {
			sig, err := relay.sign(byte(i), s.in.raw)
			if err == nil {
				err = verifyRaw(s.pub, s.in.digest, s.in.msg, sig)
			}
			if err != nil {
				return sec, fmt.Errorf("%s: bare relay signature: %w%s", s.alg, err, rc.logTail())
			}
		}
	}
	progress("pkcs11: validated every mode's signatures against keyd's keys (%d algorithms)", len(setups))
	if relay != nil {
		sec.Notes = append(sec.Notes, "bare relay = direct copy's signature made by a relay process (a 2-session pool signing with session copies, one goroutine per connection) over a Unix socket, one connection per caller: no proof, no gRPC, no policy or audit; the daemon CPU column of that mode is the relay's")
	}

	rec := newRecorder(o.p11Callers, o.duration, 100_000)
	opsOf := make([]map[string]op, len(setups)) // each setup's operation by mode
	for i, s := range setups {
		ops := map[string]op{
			modeDirect: func(context.Context) error {
				_, err := direct.signRaw(s.id, s.in.raw)
				return err
			},
			modeDirectCopy: func(context.Context) error {
				_, err := directCopy.signRaw(s.id, s.in.raw)
				return err
			},
			modeKeydBackend: func(ctx context.Context) error {
				_, err := kb.Sign(ctx, s.id, s.in.digest, s.in.opts)
				return err
			},
			modeDirectProof: func(ctx context.Context) error {
				_, err := s.pf.proof(ctx, proofMethod, proofURL)
				return err
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
		if relay != nil {
			ops[modeBareRelay] = func(context.Context) error {
				_, err := relay.sign(byte(i), s.in.raw)
				return err
			}
		}
		if s.c11 != nil {
			ops[modeCrypto11] = func(context.Context) error {
				_, err := s.c11.sign(s.in)
				return err
			}
		}
		opsOf[i] = ops
		for _, n := range o.p11Callers {
			for _, m := range o.p11Modes {
				if ops[m] == nil {
					continue
				}
				if err := hwRun(ctx, o, rec, sec, s.alg, m, n, ops[m]); err != nil {
					return sec, err
				}
			}
		}
	}
	// The goals' pairs once more, alternating, so that a noisy moment
	// does not decide a verdict alone.
	for round := 1; round <= o.goalRounds; round++ {
		for i, s := range setups {
			if !p11GoalPair(o, s.alg) {
				continue
			}
			note := fmt.Sprintf(" (goal round %d of %d)", round+1, o.goalRounds+1)
			ops := opsOf[i]
			d, err := hwMeasure(ctx, o, rec, sec, s.alg, modeDirect, goalP11N, ops[modeDirect], note)
			if err != nil {
				return sec, err
			}
			var rr *result
			if ops[modeBareRelay] != nil {
				r, err := hwMeasure(ctx, o, rec, sec, s.alg, modeBareRelay, goalP11N, ops[modeBareRelay], note)
				if err != nil {
					return sec, err
				}
				rr = &r
			}
			k, err := hwMeasure(ctx, o, rec, sec, s.alg, modeKeyd, goalP11N, ops[modeKeyd], note)
			if err != nil {
				return sec, err
			}
			sec.Rounds = append(sec.Rounds, goalRound{Alg: string(s.alg), Callers: goalP11N, Round: round, Direct: d, Keyd: k, Relay: rr})
		}
	}
	// And side by side, in short slices: the steadiest of the three.
	for i, s := range setups {
		if o.p11Cycles == 0 || !p11GoalPair(o, s.alg) {
			continue
		}
		var modes []string
		for _, m := range []string{modeDirect, modeDirectCopy, modeBareRelay, modeKeyd} {
			if slices.Contains(o.p11Modes, m) && opsOf[i][m] != nil {
				modes = append(modes, m)
			}
		}
		if !slices.Contains(modes, modeDirect) || !slices.Contains(modes, modeKeyd) {
			continue
		}
		progress("pkcs11 %s interleaved: %s at %d callers, %d cycles of %v slices (after %v warm-up each)…",
			s.alg, strings.Join(modes, ", "), goalP11N, o.p11Cycles, o.p11Slice, o.p11SliceWarmup)
		x, err := p11Interleave(ctx, rec, string(s.alg), goalP11N, o.p11Cycles, o.p11Slice, o.p11SliceWarmup, modes, opsOf[i])
		if err != nil {
			return sec, keydFailed(err, keyd)
		}
		sec.P11Interleaved = append(sec.P11Interleaved, x)
	}
	if sec.RSS.EndKiB, sec.RSS.HWMKiB, err = procStatus(keyd.pid()); err != nil {
		return sec, err
	}
	if keyd.exited() {
		return sec, errors.New("keyd exited during the run")
	}
	sec.Notes = append(sec.Notes,
		fmt.Sprintf("SoftHSM2 token %q (fresh, in the bench's temporary directory); keyd: backend pkcs11, max_sessions %d; keys are token objects made by keyd, labelled keyd:<id>; keyd, keyd backend, direct copy, direct proof and the bare relay sign with session copies of them (C_CopyObject inside the token), direct and crypto11 with the token objects", token, o.keydP11),
		"bare modes (direct, crypto11, keyd backend) sign a fixed SHA-256 digest (EdDSA: a 400-byte message); keyd signs a whole DPoP proof (policy, claims JSON, jti, the audit record) and returns it over gRPC",
		"keyd backend can outrun direct with more callers than sessions: it makes each C_Sign on a goroutine of its own (to be able to abandon it), which spares Go's scheduler the P hand-offs a plain pool meets when both Ps sit in cgo calls; direct is the plain pool",
	)
	return sec, nil
}

// p11GoalPair reports whether the run measures a pkcs11 goal for alg: the
// goals are ES256 and RS256 at goalP11N callers.
func p11GoalPair(o options, alg keystore.Algorithm) bool {
	return slices.Contains(o.p11Callers, goalP11N) && (alg == keystore.ES256 || alg == keystore.RS256)
}

// ---- tpm ------------------------------------------------------------------

// benchTPM is the tpm section: a fresh swtpm; direct TPM2_Sign through
// go-tpm on keys of the bench's own; then keyd on the same swtpm (swtpm
// serves one connection at a time, so never both at once); then direct
// again.
func benchTPM(ctx context.Context, o options) (sec *hwSection, err error) {
	sec = &hwSection{Backend: "tpm", Algs: algStrings(o.tpmAlgs), Callers: o.tpmCallers,
		Modes: []string{modeDirect, modeDirectProof, modeKeydUnary, modeKeyd, modeDirectAgain}}
	w, err := newWorkDir()
	if err != nil {
		return sec, err
	}
	defer atEmergency(w.remove)()
	defer w.remove()

	progress("tpm: starting swtpm in %s…", filepath.Join(w.dir, "swtpm"))
	addr, pid, stopTPM, err := startSwtpm(ctx, o, filepath.Join(w.dir, "swtpm"))
	if err != nil {
		return sec, err
	}
	defer stopTPM()
	sec.Notes = append(sec.Notes, fmt.Sprintf("swtpm pid %d on %s (fresh state)", pid, addr))
	sec.swtpmPID = pid

	htu, err := policy.NormalizeHTU(proofURL)
	if err != nil {
		return sec, err
	}
	rec := newRecorder(o.tpmCallers, o.duration, 20_000)

	// Phase 1: direct, keyd not running.
	progress("tpm: creating the direct keys (%s) with go-tpm…", strings.Join(sec.Algs, ", "))
	direct, err := dialTPMDirect(ctx, addr)
	if err != nil {
		return sec, err
	}
	defer direct.disconnect()
	type setup struct {
		alg    keystore.Algorithm
		digest []byte
		pf     *inproc
	}
	var setups []setup
	for _, alg := range o.tpmAlgs {
		if err := direct.create(alg); err != nil {
			return sec, err
		}
		in := newBareInput(alg)
		sig, k, err := direct.signTPM(alg, in.digest)
		if err != nil {
			return sec, err
		}
		der, err := tpmSigBytes(k, sig)
		if err == nil {
			err = verifyRaw(k.key, in.digest, nil, der)
		}
		if err != nil {
			return sec, fmt.Errorf("%s: direct TPM2_Sign signature: %w", alg, err)
		}
		pf, err := newInprocKey(direct, policy.Policy{Purpose: policy.DPoP}, alg, strings.ToLower(string(alg)), k.key)
		if err != nil {
			return sec, err
		}
		if err := validateLocal(ctx, pf, alg, pf.kid, htu, map[string]bool{}); err != nil {
			return sec, fmt.Errorf("%s: direct proof: %w", alg, err)
		}
		setups = append(setups, setup{alg: alg, digest: in.digest, pf: pf})
	}
	directOp := func(s setup) op {
		return func(context.Context) error {
			_, _, err := direct.signTPM(s.alg, s.digest)
			return err
		}
	}
	for _, s := range setups {
		for _, n := range o.tpmCallers {
			if err := hwRun(ctx, o, rec, sec, s.alg, modeDirect, n, directOp(s)); err != nil {
				return sec, err
			}
			if err := hwRun(ctx, o, rec, sec, s.alg, modeDirectProof, n, func(ctx context.Context) error {
				_, err := s.pf.proof(ctx, proofMethod, proofURL)
				return err
			}); err != nil {
				return sec, err
			}
		}
	}
	direct.disconnect()

	// Phase 2: keyd, owning the TPM connection.
	backend := fmt.Sprintf("  tpm:\n    address: %s\n", strconv.Quote("tcp://"+addr))
	keydConfig := keydConfigFor(w, backend, o.tpmAlgs, os.Geteuid())
	progress("tpm: starting keyd on swtpm (generating %s in the TPM)…", strings.Join(sec.Algs, ", "))
	cfg, keyd, err := startKeyd(ctx, o, w, keydConfig, 5*time.Minute)
	if err != nil {
		return sec, err
	}
	defer keyd.stop()
	defer func() {
		if sec.keydUp {
			err = keydFailed(err, keyd)
		}
	}()
	sec.KeydPID, sec.keydUp = keyd.pid(), true
	kc, uc, err := keydClients(w.keydSocket)
	if err != nil {
		return sec, err
	}
	defer kc.Close()
	defer uc.Close()
	for _, s := range setups {
		name := keySetName(s.alg)
		v, err := activeVersion(cfg.StateDir, name)
		if err != nil {
			return sec, err
		}
		dp, udp := kc.DPoP(name), uc.DPoP(name)
		jtis := map[string]bool{}
		if err := validateKeyd(ctx, kc, dp, s.alg, name, v.Kid, htu, jtis); err != nil {
			return sec, fmt.Errorf("%s: %w", s.alg, err)
		}
		if err := validateKeyd(ctx, uc, udp, s.alg, name, v.Kid, htu, jtis); err != nil {
			return sec, fmt.Errorf("%s (unary): %w", s.alg, err)
		}
		for _, n := range o.tpmCallers {
			if err := hwRun(ctx, o, rec, sec, s.alg, modeKeydUnary, n, func(ctx context.Context) error {
				_, err := udp.Proof(ctx, proofMethod, proofURL)
				return err
			}); err != nil {
				return sec, err
			}
			if err := hwRun(ctx, o, rec, sec, s.alg, modeKeyd, n, func(ctx context.Context) error {
				_, err := dp.Proof(ctx, proofMethod, proofURL)
				return err
			}); err != nil {
				return sec, err
			}
		}
	}
	if sec.RSS.EndKiB, sec.RSS.HWMKiB, err = procStatus(keyd.pid()); err != nil {
		return sec, err
	}
	if keyd.exited() {
		return sec, errors.New("keyd exited during the run")
	}
	kc.Close()
	uc.Close()
	keyd.stop() // flushes keyd's objects and lets the TPM connection go
	sec.keydUp = false

	// Phase 3: direct again, the same keys reloaded from their blobs: the
	// TPM's own latency measured on both sides of keyd's runs.
	if err := direct.reconnect(ctx); err != nil {
		return sec, fmt.Errorf("direct TPM after keyd: %w", err)
	}
	for _, s := range setups {
		if err := hwRun(ctx, o, rec, sec, s.alg, modeDirectAgain, o.tpmCallers[0], directOp(s)); err != nil {
			return sec, err
		}
	}
	direct.disconnect()

	// The goal's pairs once more: keyd (started again on the same state,
	// so its keys are reloaded) and direct, alternately, at 1 caller.
	if slices.Contains(o.tpmCallers, 1) {
		for round := 1; round <= o.goalRounds; round++ {
			note := fmt.Sprintf(" (goal round %d of %d)", round+1, o.goalRounds+1)
			_, keyd, err := startKeyd(ctx, o, w, keydConfig, 5*time.Minute)
			if err != nil {
				return sec, fmt.Errorf("goal round %d: %w", round+1, err)
			}
			sec.KeydPID, sec.keydUp = keyd.pid(), true
			kc, err := client.Dial(w.keydSocket)
			if err != nil {
				keyd.stop()
				return sec, err
			}
			ks := map[keystore.Algorithm]result{}
			for _, s := range setups {
				dp := kc.DPoP(keySetName(s.alg))
				k, err := hwMeasure(ctx, o, rec, sec, s.alg, modeKeyd, 1, func(ctx context.Context) error {
					_, err := dp.Proof(ctx, proofMethod, proofURL)
					return err
				}, note)
				if err != nil {
					kc.Close()
					err = keydFailed(err, keyd)
					keyd.stop()
					return sec, err
				}
				ks[s.alg] = k
			}
			kc.Close()
			keyd.stop()
			sec.keydUp = false
			if err := direct.reconnect(ctx); err != nil {
				return sec, fmt.Errorf("direct TPM after keyd: %w", err)
			}
			for _, s := range setups {
				d, err := hwMeasure(ctx, o, rec, sec, s.alg, modeDirect, 1, directOp(s), note)
				if err != nil {
					return sec, err
				}
				sec.Rounds = append(sec.Rounds, goalRound{Alg: string(s.alg), Callers: 1, Round: round, Direct: d, Keyd: ks[s.alg]})
			}
			direct.disconnect()
		}
	}
	if slices.Contains(o.tpmCallers, 1) && o.tpmSlices > 0 {
		var ts []tpmSetup
		for _, s := range setups {
			ts = append(ts, tpmSetup{alg: s.alg, direct: directOp(s)})
		}
		if err := tpmInterleaved(ctx, o, sec, direct, ts); err != nil {
			return sec, fmt.Errorf("interleaved: %w", err)
		}
	}
	sec.Notes = append(sec.Notes,
		"direct = one TPM2_Sign through go-tpm on a resident key of the bench's own (same template as keyd's, same SRK); keyd keeps one key loaded too (its last used), so each keyd proof also costs one TPM2_Sign",
		"keyd = a whole DPoP proof through keyd (policy, claims JSON, TPM2_Sign encoded by keyd itself, audit record, gRPC; keyd verifies the first signature after each load of a key)",
		"swtpm serves one connection at a time: direct ran before keyd started and again after it stopped, never alongside it; each goal round starts keyd again, then runs direct after it",
	)
	sortResults(sec)
	return sec, nil
}

// startSwtpm starts a fresh swtpm with its state in stateDir (installing
// swtpm first if it is missing) and returns its TCP address (host:port), its
// pid (0 if swtpm.sh did not say) and the function that stops it, which an
// emergency clean-up also runs until it has.
func startSwtpm(ctx context.Context, o options, stateDir string) (addr string, pid int, stop func(), err error) {
	var env []string
	if swtpmInstalled() {
		env = append(env, "SWTPM_NO_INSTALL=1")
	}
	ex, err := runScript(ctx, o, env, "swtpm.sh", "start", "-d", stateDir)
	if err != nil {
		return "", 0, nil, err
	}
	stopTPM := func() {
		cmd := exec.Command(filepath.Join(o.root, "softhsm-test", "swtpm.sh"), "stop", stateDir)
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "bench: swtpm.sh stop %s: %v %s\n", stateDir, err, out)
		}
	}
	unregister := atEmergency(stopTPM)
	stop = func() { stopTPM(); unregister() }
	addr, ok := strings.CutPrefix(ex["KEYD_TPM_ADDRESS"], "tcp://")
	if !ok {
		stop()
		return "", 0, nil, fmt.Errorf("swtpm.sh printed KEYD_TPM_ADDRESS=%q, want tcp://host:port", ex["KEYD_TPM_ADDRESS"])
	}
	if n, err := strconv.Atoi(ex["KEYD_TPM_PID"]); err == nil && n > 0 {
		pid = n
	}
	return addr, pid, stop, nil
}

// tpmSetup is what the interleaved measurement needs of a tpm setup.
type tpmSetup struct {
	alg    keystore.Algorithm
	direct op
}

// tpmInterleaved measures what keyd adds to a TPM2_Sign without the drift
// of the TPM's own latency over a run: a second fresh swtpm (B) next to the
// first (A, with the bench's direct keys), and short alternating slices of
// each side. First direct on A against direct on B (B's own keys), which
// shows how alike the two instances are; then direct on A against the same
// direct TPM2_Sign on B through the bare relay (see serveTPMRelay), what
// one more process hop adds, and through the gRPC relay (see
// serveTPMGRPCRelay), what keyd's transport adds; then direct on A against
// keyd on B.
func tpmInterleaved(ctx context.Context, o options, sec *hwSection, directA *tpmDirect, setups []tpmSetup) error {
	w, err := newWorkDir()
	if err != nil {
		return err
	}
	defer atEmergency(w.remove)()
	defer w.remove()
	progress("tpm: interleaved: starting a second swtpm in %s…", filepath.Join(w.dir, "swtpm"))
	addrB, _, stopTPM, err := startSwtpm(ctx, o, filepath.Join(w.dir, "swtpm"))
	if err != nil {
		return err
	}
	defer stopTPM()
	if err := directA.reconnect(ctx); err != nil {
		return err
	}
	defer directA.disconnect()

	// Calibration: direct on A and on B.
	directB, err := dialTPMDirect(ctx, addrB)
	if err != nil {
		return err
	}
	in := map[keystore.Algorithm][]byte{}
	for _, s := range setups {
		if err := directB.create(s.alg); err != nil {
			directB.disconnect()
			return err
		}
		in[s.alg] = newBareInput(s.alg).digest
	}
	results := map[keystore.Algorithm]*interleaved{}
	for _, s := range setups {
		results[s.alg] = &interleaved{Alg: string(s.alg), Slices: o.tpmSlices}
	}
	// pass alternates direct on A with directB, connected as it is, for
	// every algorithm, and keeps the two p50s with set.
	pass := func(what string, set func(x *interleaved, a, b float64)) error {
		for _, s := range setups {
			progress("tpm %s interleaved: direct on A vs %s, %d slices…", s.alg, what, o.tpmSlices)
			a, b, err := alternate(ctx, o.tpmSlices, s.direct, func(context.Context) error {
				_, _, err := directB.signTPM(s.alg, in[s.alg])
				return err
			})
			if err != nil {
				return err
			}
			set(results[s.alg], a, b)
		}
		return nil
	}
	err = pass("direct on B", func(x *interleaved, a, b float64) { x.CalAP50, x.CalBP50 = a, b })
	directB.disconnect()
	if err != nil {
		return err
	}

	// The same direct TPM2_Sign on B through a relay child (this program
	// started with -flag SOCKET addrB) that directB reaches over network.
	self, err := os.Executable()
	if err != nil {
		return err
	}
	throughRelay := func(name, flag, network string, set func(x *interleaved, a, b float64)) error {
		socket := filepath.Join(w.dir, flag+".sock")
		rc, err := startChild(name, filepath.Join(w.dir, flag+".log"), self, "-"+flag, socket, addrB)
		if err != nil {
			return err
		}
		defer rc.stop()
		if err := waitSocket(ctx, rc, socket, 20*time.Second); err != nil {
			return err
		}
		directB.network, directB.addr = network, socket
		if err := directB.reconnect(ctx); err != nil {
			return fmt.Errorf("direct TPM through the %s: %w%s", name, err, rc.logTail())
		}
		defer directB.disconnect()
		if err := pass("direct through the "+name+" to B", set); err != nil {
			return fmt.Errorf("direct TPM through the %s: %w%s", name, err, rc.logTail())
		}
		return nil
	}
	// The bare relay: one more local process hop and nothing else.
	if err := throughRelay("bare relay", "tpm-relay", "unix", func(x *interleaved, a, b float64) { x.RelayAP50, x.RelayP50 = a, b }); err != nil {
		return err
	}
	// The gRPC relay: keyd's transport, nothing of keyd's own.
	if err := throughRelay("gRPC relay", "tpm-grpc-relay", "grpc", func(x *interleaved, a, b float64) { x.GRPCAP50, x.GRPCP50 = a, b }); err != nil {
		return err
	}

	// keyd on B.
	backend := fmt.Sprintf("  tpm:\n    address: %s\n", strconv.Quote("tcp://"+addrB))
	progress("tpm: interleaved: starting keyd on the second swtpm…")
	_, keyd, err := startKeyd(ctx, o, w, keydConfigFor(w, backend, o.tpmAlgs, os.Geteuid()), 5*time.Minute)
	if err != nil {
		return err
	}
	defer keyd.stop()
	kc, err := client.Dial(w.keydSocket)
	if err != nil {
		return err
	}
	defer kc.Close()
	for _, s := range setups {
		dp := kc.DPoP(keySetName(s.alg))
		progress("tpm %s interleaved: direct on A vs keyd on B, %d slices…", s.alg, o.tpmSlices)
		a, k, err := alternate(ctx, o.tpmSlices, s.direct, func(ctx context.Context) error {
			_, err := dp.Proof(ctx, proofMethod, proofURL)
			return err
		})
		if err != nil {
			return keydFailed(err, keyd)
		}
		x := results[s.alg]
		x.DirectAP50, x.KeydP50 = a, k
		sec.Interleaved = append(sec.Interleaved, *x)
	}
	return nil
}

// interleaveSlice is the length of one side's slice in tpmInterleaved.
const interleaveSlice = 250 * time.Millisecond

// alternate runs a and b at 1 caller in n alternating slices each (after
// one warm-up slice each) and returns their p50 latencies in µs.
func alternate(ctx context.Context, n int, a, b op) (p50a, p50b float64, err error) {
	var la, lb []time.Duration
	run := func(f op, into *[]time.Duration, keep bool) error {
		end := time.Now().Add(interleaveSlice)
		for time.Now().Before(end) {
			if err := ctx.Err(); err != nil {
				return err
			}
			t0 := time.Now()
			if err := f(ctx); err != nil {
				return err
			}
			if keep {
				*into = append(*into, time.Since(t0))
			}
		}
		return nil
	}
	for i := -1; i < n; i++ {
		if err := run(a, &la, i >= 0); err != nil {
			return 0, 0, err
		}
		if err := run(b, &lb, i >= 0); err != nil {
			return 0, 0, err
		}
	}
	slices.Sort(la)
	slices.Sort(lb)
	return us(percentile(la, 0.5)), us(percentile(lb, 0.5)), nil
}

// sortResults orders sec.Results by algorithm, callers and mode, as the
// section lists them.
func sortResults(sec *hwSection) {
	idx := func(list []string, s string) int {
		if i := slices.Index(list, s); i >= 0 {
			return i
		}
		return len(list)
	}
	callerIdx := func(n int) int {
		if i := slices.Index(sec.Callers, n); i >= 0 {
			return i
		}
		return len(sec.Callers)
	}
	slices.SortStableFunc(sec.Results, func(a, b result) int {
		if d := idx(sec.Algs, a.Alg) - idx(sec.Algs, b.Alg); d != 0 {
			return d
		}
		if d := callerIdx(a.Callers) - callerIdx(b.Callers); d != 0 {
			return d
		}
		return idx(sec.Modes, a.Mode) - idx(sec.Modes, b.Mode)
	})
}
