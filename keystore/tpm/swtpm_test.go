package tpm

import (
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/internal/swtpmtest"
)

// newTestBackend opens a backend on s with a fresh state directory (or dir)
// and closes it at cleanup.
func newTestBackend(t *testing.T, s *swtpmtest.SWTPM, cfg Config) *Backend {
	t.Helper()
	b, err := newTestBackendErr(t, s, cfg, nil)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return b
}

// hookedBackend starts a swtpm and a Backend on it whose commands pass
// through a fresh injector.
func hookedBackend(t *testing.T) (*swtpmtest.SWTPM, *injector, *Backend) {
	t.Helper()
	s := swtpmtest.Start(t)
	in := &injector{}
	b, err := newTestBackendErr(t, s, Config{}, in.hook)
	if err != nil {
		t.Fatal(err)
	}
	return s, in, b
}

func newTestBackendErr(t *testing.T, s *swtpmtest.SWTPM, cfg Config, hook func([]byte) ([]byte, bool, error)) (*Backend, error) {
	t.Helper()
	cfg.Address = s.Addr()
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
