package daemon

import (
	"context"
	"crypto"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/keystore"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// downBackend is a backend whose health check fails (a wiped token, a
// frozen TPM) after a short while, as a slow device does.
type downBackend struct{ keystore.Backend }

func (downBackend) Health(ctx context.Context) error {
	select {
	case <-time.After(300 * time.Millisecond):
	case <-ctx.Done():
	}
	return errors.New("device gone")
}

// A15, before ready: a caller that connects as soon as the socket exists
// (it does before Serve) must not be told SERVING while the first health
// check of a backend that is down is still running.
func TestHealthNotServingBeforeFirstCheck(t *testing.T) {
	cfg := daemonConfig(t, "")
	d, stop := serveWith(t, cfg, Options{}, func(d *Daemon) { d.backend = downBackend{d.backend} })
	defer stop()
	cl, err := client.Dial(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := healthpb.NewHealthClient(cl.Conn()).Check(cctx, &healthpb.HealthCheckRequest{Service: "keyd.backend." + d.backend.Name()})
	if err != nil {
		t.Fatal(err)
	}
	if r.Status == healthpb.HealthCheckResponse_SERVING {
		t.Error("health reported SERVING while the first check of a backend that is down was running")
	}
}

// A15: once the daemon says it is ready, health must not report SERVING
// for a backend that is down.
func TestHealthNotServingWhenBackendDownAtStart(t *testing.T) {
	cfg := daemonConfig(t, "")
	type answer struct {
		st  healthpb.HealthCheckResponse_ServingStatus
		err error
	}
	got := make(chan answer, 3)
	_, cancel, done := run(t, cfg, Options{Ready: func(socket string) {
		cl, err := client.Dial(socket)
		if err != nil {
			got <- answer{err: err}
			return
		}
		defer cl.Close()
		cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer ccancel()
		for _, svc := range []string{"", "keyd.v1.KeyService", "keyd.backend.soft"} {
			r, err := healthpb.NewHealthClient(cl.Conn()).Check(cctx, &healthpb.HealthCheckRequest{Service: svc})
			if err != nil {
				got <- answer{err: err}
				continue
			}
			got <- answer{st: r.Status}
		}
	}}, func(d *Daemon) { d.backend = downBackend{d.backend} })
	for range 3 {
		select {
		case a := <-got:
			if a.err != nil {
				t.Errorf("health check: %v", a.err)
			} else if a.st == healthpb.HealthCheckResponse_SERVING {
				t.Errorf("health reports SERVING once ready although the backend's health check fails")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("not ready within 10 s")
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("serve: %v", err)
	}
}

// A watcher of the health service (a load balancer, kubelet's gRPC probe)
// or of WatchKeys must not hold up a graceful stop for the full 10 s
// forced-stop timeout: the daemon ends its long-lived streams at shutdown.
func TestShutdownNotHeldByWatchers(t *testing.T) {
	for _, kind := range []string{"health", "keys"} {
		t.Run(kind, func(t *testing.T) {
			cfg := daemonConfig(t, "")
			_, cancel, done := run(t, cfg, Options{}, nil)
			cl, err := client.Dial(cfg.Socket)
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			wctx, wcancel := context.WithCancel(context.Background())
			defer wcancel()
			switch kind {
			case "health":
				w, err := healthpb.NewHealthClient(cl.Conn()).Watch(wctx, &healthpb.HealthCheckRequest{})
				if err != nil {
					t.Fatal(err)
				}
				if _, err := w.Recv(); err != nil {
					t.Fatal(err)
				}
			case "keys":
				w, err := keydv1.NewKeyServiceClient(cl.Conn()).WatchKeys(wctx, &keydv1.WatchKeysRequest{})
				if err != nil {
					t.Fatal(err)
				}
				if _, err := w.Recv(); err != nil {
					t.Fatal(err)
				}
			}
			stopWithin(t, cancel, done, 3*time.Second, 20*time.Second, "with one open "+kind+" watcher")
		})
	}
}

// countingBackend counts health checks and signatures.
type countingBackend struct {
	keystore.Backend
	health, sign *atomic.Int64
}

func (b countingBackend) Health(ctx context.Context) error {
	b.health.Add(1)
	if hc, ok := b.Backend.(healthChecker); ok {
		return hc.Health(ctx)
	}
	return nil
}

func (b countingBackend) Sign(ctx context.Context, id string, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	b.sign.Add(1)
	return b.Backend.Sign(ctx, id, digest, opts)
}

// A15: polling health reads a cached status: 200 checks cause no backend
// health check and no signature. The counting backend is the one the
// daemon's health checks use (a check that signed, as some HSM probes do,
// would count); the lifecycle manager keeps the backend New gave it, so
// callers' signatures are not counted here.
func TestHealthPollDoesNotTouchBackend(t *testing.T) {
	cfg := daemonConfig(t, "")
	var health, sign atomic.Int64
	d, stop := serveWith(t, cfg, Options{}, func(d *Daemon) {
		d.backend = countingBackend{Backend: d.backend, health: &health, sign: &sign}
	})
	defer stop()
	cl, err := client.Dial(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	hc := healthpb.NewHealthClient(cl.Conn())
	cctx, ccancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer ccancel()
	// The first check completes before Serve is ready; wait for it.
	if _, err := hc.Check(cctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	h0, s0 := health.Load(), sign.Load()
	if h0 == 0 {
		// Else the counts below would hold whatever the polls did.
		t.Fatal("the counting backend saw not even the first health check: the test does not watch the daemon's backend")
	}
	start := time.Now()
	for range 200 {
		r, err := hc.Check(cctx, &healthpb.HealthCheckRequest{Service: "keyd.backend." + d.backend.Name()})
		if err != nil || r.Status != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health: %v %v", r, err)
		}
	}
	took := time.Since(start)
	// The periodic check runs every healthInterval whatever the polling.
	periodic := int64(took/healthInterval) + 1
	if n := health.Load() - h0; n > periodic {
		t.Errorf("200 health polls in %v made %d backend health checks, want at most %d (the periodic ones)", took, n, periodic)
	}
	if n := sign.Load() - s0; n != 0 {
		t.Errorf("200 health polls made %d signatures", n)
	}
	t.Logf("200 health polls in %v", took)
}

// injectingBackend's health check fails with an error whose text holds a
// newline and a systemd assignment, as a token label might.
type injectingBackend struct{ keystore.Backend }

func (injectingBackend) Health(ctx context.Context) error {
	return errors.New("token \"x\nREADY=1\nMAINPID=1\" gone")
}

// The status line (systemd's STATUS=, see Options.Status) says whether
// the backend is healthy once the daemon serves, and that it stops; it is
// one line whatever the backend's error says.
func TestStatusLine(t *testing.T) {
	cfg := daemonConfig(t, "")
	lines := make(chan string, 10)
	_, cancel, done := run(t, cfg, Options{Status: func(l string) { lines <- l }},
		func(d *Daemon) { d.backend = injectingBackend{d.backend} })
	next := func() string {
		select {
		case l := <-lines:
			return l
		case <-time.After(10 * time.Second):
			t.Fatal("no status line within 10 s")
			return ""
		}
	}
	l := next()
	if !strings.HasPrefix(l, "serving on "+cfg.Socket+"; backend soft unavailable") || !strings.Contains(l, "gone") {
		t.Errorf("first status line %q: want it to say the backend is unavailable", l)
	}
	if strings.ContainsAny(l, "\n\r") {
		t.Errorf("status line %q has a line break", l)
	}
	cancel()
	if l := next(); l != "stopping: finishing the calls in flight" {
		t.Errorf("status line at stop: %q", l)
	}
	if err := <-done; err != nil {
		t.Errorf("serve: %v", err)
	}
	select {
	case l := <-lines:
		t.Errorf("status line after stop: %q", l)
	default:
	}
}

// A healthy backend: one line that says so.
func TestStatusLineHealthy(t *testing.T) {
	cfg := daemonConfig(t, "")
	lines := make(chan string, 10)
	_, cancel, done := run(t, cfg, Options{Status: func(l string) { lines <- l }}, nil)
	select {
	case l := <-lines:
		if want := "serving on " + cfg.Socket + "; backend soft healthy; 1 key set(s)"; l != want {
			t.Errorf("status line %q, want %q", l, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no status line within 10 s")
	}
	cancel()
	<-done
}
