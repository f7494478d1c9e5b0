package daemon

import (
	"context"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/config"
	"github.com/keyd-dev/keyd/rotation"
)

// Serve stops the key lifecycle and waits for it before it closes the
// backend and the store: a scheduled rotation running at shutdown finishes
// first, and is recorded.
func TestServeWaitsForLifecycle(t *testing.T) {
	cfg := daemonConfig(t, "    token_lifetime: 1s\n    rotation: {period: 1s, drain: 1s, retain: 1s}\n")
	hold := holdRotation(t)
	var first []rotation.Version
	_, cancel, done := run(t, cfg, Options{Failpoint: hold.failpoint}, func(d *Daemon) {
		first = d.Manager().Versions("d")
		hold.armed.Store(true)
	})
	select {
	case <-hold.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("no scheduled rotation within 10 s")
	}
	stopWhileHeld(t, cfg, hold, cancel, done, first, 300*time.Millisecond)
}

// stopWhileHeld stops the daemon while hold holds a rotation and checks
// that Serve does not return for held (and the rotation's end), then that
// it returns once the rotation is released, and that the rotation, which
// makes a new active key, was recorded.
func stopWhileHeld(t *testing.T, cfg *config.Config, hold *rotationHold, cancel context.CancelFunc, done <-chan error, first []rotation.Version, held time.Duration) {
	t.Helper()
	cancel()
	select {
	case err := <-done:
		hold.release()
		t.Fatalf("Serve returned (%v) while a rotation was still running: it released the state directory and closed the backend under it", err)
	case <-time.After(held):
	}
	hold.release()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(backgroundWait + 5*time.Second):
		t.Fatal("Serve did not return")
	}
	store, err := rotation.OpenStore(cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	vs, err := store.Load()
	if err != nil {
		t.Fatal(err)
	}
	var active []string
	for _, v := range vs {
		if v.State == rotation.Active {
			active = append(active, v.Kid)
		}
	}
	if len(first) != 1 || len(active) != 1 || active[0] == first[0].Kid {
		t.Errorf("active kids %v after the rotation, %v before: the rotation running at shutdown was lost", active, first)
	}
}

// When the main socket's server fails by itself, Serve stops the admin
// socket's server too before it closes the backend: a connection already
// open there is not served any more, rather than served against a closed
// backend and store.
func TestMainSocketFailureStopsTheOthers(t *testing.T) {
	cfg := daemonConfig(t, "admin_socket: {dir}/admin.sock\n")
	d, _, done := run(t, cfg, Options{}, nil)
	adm, err := client.Dial(cfg.AdminSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer adm.Close()
	hc := healthpb.NewHealthClient(adm.Conn())
	check := func() error {
		c, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := hc.Check(c, &healthpb.HealthCheckRequest{})
		return err
	}
	if err := check(); err != nil {
		t.Fatal(err)
	}
	d.lis.Close() // the main socket fails
	select {
	case err := <-done:
		if err == nil {
			t.Error("Serve returned nil after its socket failed")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its socket failed")
	}
	if err := check(); err == nil {
		t.Error("the admin socket's open connection is still served after Serve returned")
	}
}

// rotationHold holds the first rotation after armed at its
// rotate.after_generate failpoint until release (or the test's end).
type rotationHold struct {
	armed   atomic.Bool
	entered chan struct{} // closed when the rotation is held
	release func()
	gate    chan struct{}
	once    sync.Once
}

func holdRotation(t *testing.T) *rotationHold {
	h := &rotationHold{entered: make(chan struct{}), gate: make(chan struct{})}
	var once sync.Once
	h.release = func() { once.Do(func() { close(h.gate) }) }
	t.Cleanup(h.release)
	return h
}

func (h *rotationHold) failpoint(name string) {
	if name == "rotate.after_generate" && h.armed.Load() {
		h.once.Do(func() {
			close(h.entered)
			<-h.gate
		})
	}
}

// At shutdown every listener stops taking new calls at once: a call still
// running on the admin socket (a rotation) must not keep the main socket
// answering new callers while it finishes.
func TestShutdownStopsEveryListenerAtOnce(t *testing.T) {
	cfg := daemonConfig(t, "admin_socket: {dir}/admin.sock\n")
	hold := holdRotation(t)
	_, cancel, done := run(t, cfg, Options{Failpoint: hold.failpoint}, func(*Daemon) { hold.armed.Store(true) })
	adm, err := client.Dial(cfg.AdminSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer adm.Close()
	rotated := make(chan error, 1)
	go func() {
		ctx, c := context.WithTimeout(context.Background(), 30*time.Second)
		defer c()
		_, err := adm.Rotate(ctx, "d", true)
		rotated <- err
	}()
	select {
	case <-hold.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the rotation did not start within 10 s")
	}
	cancel()
	time.Sleep(300 * time.Millisecond)

	cl, err := client.Dial(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if c, err := proofCode(cl, 2*time.Second); err == nil {
		t.Errorf("a new caller got a proof (%v) on the main socket after shutdown began", c)
	}

	hold.release()
	if err := <-rotated; err != nil {
		t.Errorf("the rotation running at shutdown: %v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Serve did not return")
	}
}

// fullAuditFIFO makes cfg's audit log a FIFO whose reader does not read
// and whose pipe is full, so that the daemon's next audit write blocks;
// drain empties the pipe once, letting that write through. The test's end
// drains it too.
func fullAuditFIFO(t *testing.T, cfg *config.Config) (drain func()) {
	t.Helper()
	cfg.AuditLog = filepath.Join(filepath.Dir(cfg.Socket), "audit.fifo")
	if err := syscall.Mkfifo(cfg.AuditLog, 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := syscall.Open(cfg.AuditLog, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	w, err := syscall.Open(cfg.AuditLog, syscall.O_WRONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for range 1 << 10 {
		if _, err := syscall.Write(w, buf); err != nil {
			break
		}
	}
	syscall.Close(w)
	drain = func() {
		for range 1 << 10 {
			if _, err := syscall.Read(r, buf); err != nil {
				return
			}
		}
	}
	t.Cleanup(func() {
		drain()
		syscall.Close(r)
	})
	return drain
}

// proofInFlight asks d for a proof on a new client (closed at the test's
// end) and returns once d is serving it, with the channel of its outcome.
func proofInFlight(t *testing.T, d *Daemon) <-chan error {
	t.Helper()
	cl, err := client.Dial(d.cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	signed := make(chan error, 1)
	go func() {
		_, err := proofCode(cl, time.Minute)
		signed <- err
	}()
	for i := 0; d.srv.StreamItemsInFlight() == 0; i++ {
		if i == 1000 {
			t.Fatal("the proof was not taken from the stream within 10 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return signed
}

// A14 at shutdown: an audit sink that stopped taking writes (the reader
// of a FIFO stalled, a hung mount) holds a signature's record. Stopping
// keyd must still end within its bounds; the caller gets no signature.
func TestShutdownBoundedWhenAuditBlocked(t *testing.T) {
	t.Parallel()
	cfg := daemonConfig(t, "")
	fullAuditFIFO(t, cfg)
	d, cancel, done := run(t, cfg, Options{}, nil)
	signed := proofInFlight(t, d)
	// The metric of requests in flight counts it.
	rec := httptest.NewRecorder()
	d.metrics.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if !strings.Contains(rec.Body.String(), "\nkeyd_sign_stream_requests_in_flight 1\n") {
		t.Error("/metrics does not count the SignStream request in flight (keyd_sign_stream_requests_in_flight 1)")
	}
	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(10*time.Second + backgroundWait + 10*time.Second): // the forced stop, the wait for the call, and a few seconds for the audit log
		t.Fatalf("Serve still running %v after it was told to stop, behind a blocked audit sink", time.Since(start))
	}
	if err := <-signed; err == nil {
		t.Error("a proof whose record could not be written was returned")
	}
}

// A call still running when the graceful stop gives up (gRPC's Stop does
// not wait for its handlers) uses the backend and the store too: Serve
// waits for it, as for the key lifecycle, before it closes them. An admin
// rotation running at shutdown finishes, and is recorded.
func TestServeWaitsForCallsAfterForcedStop(t *testing.T) {
	t.Parallel()
	cfg := daemonConfig(t, "admin_socket: {dir}/admin.sock\n")
	hold := holdRotation(t)
	var first []rotation.Version
	_, cancel, done := run(t, cfg, Options{Failpoint: hold.failpoint}, func(d *Daemon) {
		first = d.Manager().Versions("d")
		hold.armed.Store(true)
	})
	adm, err := client.Dial(cfg.AdminSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer adm.Close()
	go func() {
		ctx, c := context.WithTimeout(context.Background(), time.Minute)
		defer c()
		adm.Rotate(ctx, "d", true) // cut off by the forced stop
	}()
	select {
	case <-hold.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the rotation did not start within 10 s")
	}
	stopWhileHeld(t, cfg, hold, cancel, done, first, 11*time.Second) // past the forced stop
}

// A client keeps its SignStream open between signatures. When nothing is
// being signed, such streams must not hold the graceful stop until its
// 10 s timeout: every restart would take that long, and callers that
// connect meanwhile are refused.
func TestStopNotHeldByIdleSignStream(t *testing.T) {
	t.Parallel()
	cfg := daemonConfig(t, "")
	_, cancel, done := run(t, cfg, Options{}, nil)
	cl, err := client.Dial(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if _, err := proofCode(cl, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	stopWithin(t, cancel, done, 5*time.Second, 30*time.Second, "with an idle SignStream open")
}

// stopWithin cancels Serve's context and checks that Serve returns nil
// within limit (an error) and at all within giveUp (fatal); what says
// what was open.
func stopWithin(t *testing.T, cancel context.CancelFunc, done <-chan error, limit, giveUp time.Duration, what string) {
	t.Helper()
	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
		if took := time.Since(start); took > limit {
			t.Errorf("Serve took %v to stop %s", took.Round(time.Millisecond), what)
		}
	case <-time.After(giveUp):
		t.Fatalf("Serve did not return within %v %s", giveUp, what)
	}
}

// A request being served on a SignStream when the stop begins is not an
// idle stream: the stop waits for its answer (here, its audit record is
// held for a moment).
func TestStopWaitsForStreamRequestInFlight(t *testing.T) {
	t.Parallel()
	cfg := daemonConfig(t, "")
	drain := fullAuditFIFO(t, cfg)
	d, cancel, done := run(t, cfg, Options{}, nil)
	signed := proofInFlight(t, d)
	cancel()
	time.Sleep(700 * time.Millisecond)
	drain()
	if err := <-signed; err != nil {
		t.Errorf("the proof in flight when the stop began: %v", err)
	}
	if err := <-done; err != nil {
		t.Errorf("Serve: %v", err)
	}
}
