package daemon

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/rotation"
)

// Serve stops the key lifecycle and waits for it before it closes the
// backend and the store: a scheduled rotation running at shutdown finishes
// first, and is recorded.
func TestServeWaitsForLifecycle(t *testing.T) {
	cfg := daemonConfig(t, "    token_lifetime: 1s\n    rotation: {period: 1s, drain: 1s, retain: 1s}\n")
	var armed atomic.Bool
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	failpoint := func(name string) {
		if name == "rotate.after_generate" && armed.Load() {
			once.Do(func() {
				close(entered)
				<-release
			})
		}
	}
	var first []rotation.Version
	_, cancel, done := run(t, cfg, Options{Failpoint: failpoint}, func(d *Daemon) {
		first = d.Manager().Versions("d")
		armed.Store(true)
	})
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("no scheduled rotation within 10 s")
	}
	cancel()
	select {
	case err := <-done:
		close(release)
		t.Fatalf("Serve returned (%v) while a scheduled rotation was still running", err)
	case <-time.After(300 * time.Millisecond):
	}
	close(release)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(backgroundWait + 5*time.Second):
		t.Fatal("Serve did not return")
	}

	// The rotation that was running is recorded.
	store, err := rotation.OpenStore(cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	vs, err := store.Load()
	if err != nil {
		t.Fatal(err)
	}
	if len(vs) <= len(first) {
		t.Errorf("%d versions recorded after the rotation, %d before: the rotation running at shutdown was lost", len(vs), len(first))
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
