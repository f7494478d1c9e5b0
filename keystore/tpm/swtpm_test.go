package tpm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// swtpm is a swtpm process this test started on loopback ports. It runs
// as a child of the test binary with SIGKILL as its parent-death signal, so
// it never outlives the test, even one that panics or times out; t.Cleanup
// also kills it by PID.
type swtpm struct {
	dir  string // TPM state directory
	port int    // command port; the control port is port+1
	cmd  *exec.Cmd
	done chan struct{}
	// noStartup starts swtpm without TPM2_Startup, as a TPM is after
	// power-on: the first command gets TPM_RC_INITIALIZE.
	noStartup bool
}

// requireTools skips the test when swtpm or the tpm2-tools it needs are
// missing, or fails it when KEYD_REQUIRE_HW=1.
func requireTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range append([]string{"swtpm", "swtpm_ioctl"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			msg := fmt.Sprintf("%s not found (run softhsm-test/install-swtpm.sh): %v", tool, err)
			if os.Getenv("KEYD_REQUIRE_HW") == "1" {
				t.Fatal("KEYD_REQUIRE_HW=1: " + msg)
			}
			t.Skip(msg)
		}
	}
}

// startSWTPM starts a fresh swtpm with its own state directory.
func startSWTPM(t testing.TB) *swtpm {
	t.Helper()
	requireTools(t)
	s := &swtpm{dir: t.TempDir()}
	var lastErr error
	for range 10 {
		port, err := freePortPair()
		if err != nil {
			t.Fatal(err)
		}
		s.port = port
		if lastErr = s.start(); lastErr == nil {
			t.Cleanup(s.kill)
			return s
		}
	}
	t.Fatalf("cannot start swtpm: %v", lastErr)
	return nil
}

// freePortPair returns a port P such that P and P+1 were free on 127.0.0.1.
func freePortPair() (int, error) {
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		p := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+1))
		l.Close()
		if err == nil {
			l2.Close()
			return p, nil
		}
	}
	return 0, errors.New("no free pair of ports")
}

func (s *swtpm) start() error {
	flags := "not-need-init,startup-clear"
	if s.noStartup {
		flags = "not-need-init"
	}
	cmd := exec.Command("swtpm", "socket", "--tpm2",
		"--tpmstate", "dir="+s.dir,
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", s.port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", s.port+1),
		"--flags", flags,
		"--log", "file="+filepath.Join(s.dir, "swtpm.log")+",level=1",
	)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	s.cmd, s.done = cmd, done
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return fmt.Errorf("swtpm exited: %s", strings.TrimSpace(stderr.String()))
		default:
		}
		// Both ports: swtpm opens the control port first, and a test
		// that dialed the command port in between was refused.
		if s.accepts(s.ctrlAddr()) && s.accepts(fmt.Sprintf("127.0.0.1:%d", s.port)) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.kill()
	return errors.New("swtpm did not open its control and command ports in 10s")
}

// accepts reports whether addr accepts a TCP connection (closed at once;
// swtpm then waits for the next).
func (s *swtpm) accepts(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// kill stops swtpm for good (SIGKILL by PID) and waits until it is gone.
func (s *swtpm) kill() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	pid := s.cmd.Process.Pid
	syscall.Kill(pid, syscall.SIGCONT)
	syscall.Kill(pid, syscall.SIGKILL)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
	}
	s.cmd = nil
}

// restart kills swtpm and starts it again on the same ports and state, as
// after a crash: TPM2_Startup(CLEAR) runs, transient objects are gone.
func (s *swtpm) restart(t *testing.T) {
	t.Helper()
	s.kill()
	var err error
	for range 50 {
		if err = s.start(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond) // the port may still be held
	}
	t.Fatalf("restart swtpm: %v", err)
}

func (s *swtpm) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(s.cmd.Process.Pid, sig); err != nil {
		t.Fatal(err)
	}
}

func (s *swtpm) addr() string     { return fmt.Sprintf("tcp://127.0.0.1:%d", s.port) }
func (s *swtpm) ctrlAddr() string { return fmt.Sprintf("127.0.0.1:%d", s.port+1) }
func (s *swtpm) tcti() string     { return fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", s.port) }

// reset power-cycles the TPM through the control port (swtpm_ioctl -i):
// the next command gets TPM_RC_INITIALIZE until TPM2_Startup.
func (s *swtpm) reset(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "swtpm_ioctl", "--tcp", s.ctrlAddr(), "-i").CombinedOutput(); err != nil {
		t.Fatalf("swtpm_ioctl -i: %v: %s", err, out)
	}
}

// tool runs a tpm2-tools command against swtpm. swtpm serves one
// connection at a time: no backend may be connected meanwhile.
func (s *swtpm) tool(t *testing.T, name string, args ...string) string {
	t.Helper()
	requireTools(t, name)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI="+s.tcti())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// newTestBackend opens a backend on s with a fresh state directory (or dir)
// and closes it at cleanup.
func newTestBackend(t *testing.T, s *swtpm, cfg Config) *Backend {
	t.Helper()
	b, err := newTestBackendErr(t, s, cfg, nil)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return b
}

func newTestBackendErr(t *testing.T, s *swtpm, cfg Config, hook func([]byte) ([]byte, bool, error)) (*Backend, error) {
	t.Helper()
	cfg.Address = s.addr()
	if cfg.StateDir == "" {
		cfg.StateDir = filepath.Join(t.TempDir(), "state")
	}
	if cfg.CommandTimeout == 0 {
		cfg.CommandTimeout = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger, _ = testLogger(t)
	}
	b, err := newBackend(t.Context(), cfg, hook)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { b.Close() })
	return b, nil
}

// injector answers the next n commands with code cc by rc, then lets
// every command through to the TPM.
type injector struct {
	mu   sync.Mutex
	cc   tpm2.TPMCC
	rc   uint32
	n    int
	seen int
	// before, if set, runs instead of answering (the command then goes
	// to the TPM).
	before func()
}

func (in *injector) hook(cmd []byte) ([]byte, bool, error) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if tpm2.TPMCC(commandCode(cmd)) != in.cc || in.n == 0 {
		return nil, false, nil
	}
	in.n--
	in.seen++
	if in.before != nil {
		in.before()
		return nil, false, nil
	}
	return errorResponse(in.rc), true, nil
}

func (in *injector) arm(cc tpm2.TPMCC, rc uint32, n int) {
	in.mu.Lock()
	in.cc, in.rc, in.n, in.seen = cc, rc, n, 0
	in.mu.Unlock()
}

func (in *injector) count() int {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.seen
}

// createHold is a test hook that, while on, keeps every TPM2_Create
// waiting, and so the TPM taken, as a slow key generation would.
type createHold struct {
	on      atomic.Bool
	entered chan struct{} // a TPM2_Create is waiting
	block   chan struct{}
	release func() // stops holding and lets the waiting commands go
}

func newCreateHold(t *testing.T) *createHold {
	h := &createHold{entered: make(chan struct{}, 1), block: make(chan struct{})}
	h.release = sync.OnceFunc(func() {
		h.on.Store(false)
		close(h.block)
	})
	t.Cleanup(h.release)
	return h
}

func (h *createHold) hook(cmd []byte) ([]byte, bool, error) {
	if tpm2.TPMCC(commandCode(cmd)) == tpm2.TPMCCCreate && h.on.Load() {
		select {
		case h.entered <- struct{}{}:
		default:
		}
		<-h.block
	}
	return nil, false, nil
}

// tpmInfo is what the TPM says about keyd's footprint.
type tpmInfo struct {
	transients []tpm2.TPMHandle // loaded transient objects
	avail      uint32           // TPM_PT_HR_TRANSIENT_AVAIL
	lockout    uint32           // TPM_PT_LOCKOUT_COUNTER
}

// inspect reads the TPM's transient objects and lockout counter through
// b's own connection (swtpm would block a second one).
func inspect(t *testing.T, b *Backend) tpmInfo {
	t.Helper()
	var info tpmInfo
	err := b.do(t.Context(), b.cmdTimeout, func(o *op) error {
		var err error
		if info.transients, err = transientHandles(o); err != nil {
			return err
		}
		if info.avail, err = property(o, tpm2.TPMPTHRTransientAvail); err != nil {
			return err
		}
		info.lockout, err = property(o, tpm2.TPMPTLockoutCounter)
		return err
	})
	if err != nil {
		t.Fatalf("inspect the TPM: %v", err)
	}
	return info
}

// dropCache flushes the key b keeps loaded, so only the SRK remains.
func dropCache(t *testing.T, b *Backend) {
	t.Helper()
	if err := b.do(t.Context(), b.cmdTimeout, b.flushCached); err != nil {
		t.Fatalf("flush the cached key: %v", err)
	}
}

// disconnect closes b's connection without flushing anything, as a crash
// of the connection would, so tpm2-tools can use swtpm.
func disconnect(t *testing.T, b *Backend) {
	t.Helper()
	if err := b.acquire(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer b.release()
	if b.st.conn != nil {
		b.st.conn.close()
		b.st.conn = nil
	}
	b.invalidate()
}

// checkFootprint flushes the cached key and checks that the TPM then holds
// only the SRK, with as many free slots as base (taken after New), and that
// the lockout counter is 0: no slot leaked, no authorization failed.
func checkFootprint(t *testing.T, b *Backend, base tpmInfo) {
	t.Helper()
	dropCache(t, b)
	info := inspect(t, b)
	if len(info.transients) != 1 || info.avail != base.avail {
		t.Errorf("TPM holds transient objects %#x (%d slots free); want only the SRK (%d free, as after New)", info.transients, info.avail, base.avail)
	}
	if info.lockout != 0 {
		t.Errorf("TPM_PT_LOCKOUT_COUNTER = %d, want 0", info.lockout)
	}
}

// baseline returns the goroutine and thread counts.
func baseline() (int, int) {
	time.Sleep(50 * time.Millisecond)
	return runtime.NumGoroutine(), threads()
}

// settle waits up to a second for the goroutine count to fall to at most
// n and returns it, with the thread count.
func settle(n int) (int, int) {
	var g int
	for range 50 {
		if g = runtime.NumGoroutine(); g <= n {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return g, threads()
}

func threads() int {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for line := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return -1
}

// testLogger returns a logger that writes to t.Log (seen with -v or on
// failure) and a function returning everything logged so far.
func testLogger(t *testing.T) (*slog.Logger, func() string) {
	w := &logWriter{t: t}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug})), w.String
}

type logWriter struct {
	t   *testing.T
	mu  sync.Mutex
	buf strings.Builder
}

func (w *logWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func (w *logWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}
