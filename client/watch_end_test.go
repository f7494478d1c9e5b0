package client_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/client"
)

// keyd ends its WatchKeys streams when it stops, so that they do not hold
// its graceful stop. To the watcher this is the daemon going away, not the
// end of the key sets' lifecycle: Watch must yield ErrUnavailable (which a
// caller retries), not a bare io.EOF that matches none of the package's
// errors.
func TestWatchEndedByDaemonIsUnavailable(t *testing.T) {
	var kc *client.Client
	errc := make(chan error, 1)
	t.Run("daemon", func(t *testing.T) {
		// A client of its own, which outlives startKeyd's daemon (and
		// its client, closed when the daemon stops).
		var err error
		if kc, err = client.Dial(startKeyd(t, "https://as.example").Conn().Target()); err != nil {
			t.Fatal(err)
		}
		synced := make(chan struct{})
		go func() {
			for ev, err := range kc.Watch(context.Background(), "dpop") {
				if err != nil {
					errc <- err
					return
				}
				if ev.Type == "synced" {
					close(synced)
				}
			}
			errc <- nil
		}()
		select {
		case <-synced:
		case <-time.After(10 * time.Second):
			t.Fatal("no snapshot after 10s")
		}
	}) // the daemon stops here
	if kc == nil {
		return
	}
	defer kc.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, client.ErrUnavailable) {
			t.Errorf("Watch ended by the daemon stopping: %v, want ErrUnavailable", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Watch still running 15s after the daemon stopped")
	}
}
