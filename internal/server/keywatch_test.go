package server_test

import (
	"context"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/client"
)

// The client's KeyWatcher follows rotations without polling, and survives
// a daemon restart.
func TestKeyWatcher(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	changes := make(chan client.KeyEvent, 64)
	w := e.cl.WatchKeys(ctx, []string{"dpop"}, client.OnKeyChange(func(ev client.KeyEvent) { changes <- ev }))
	sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
	defer scancel()
	if err := w.Synced(sctx); err != nil {
		t.Fatal(err)
	}
	first, ok := w.Active("dpop")
	if !ok {
		t.Fatal("no active key in the view")
	}
	rot, err := e.cl.Rotate(sctx, "dpop", false)
	if err != nil {
		t.Fatal(err)
	}
	waitFor := func(cond func() bool) {
		t.Helper()
		for i := 0; i < 200 && !cond(); i++ {
			time.Sleep(10 * time.Millisecond)
		}
		if !cond() {
			t.Fatal("the view did not follow")
		}
	}
	waitFor(func() bool { a, _ := w.Active("dpop"); return a.Kid == rot.Active.Kid })
	if !w.Signable(first.Kid) {
		t.Error("draining key not signable in the view")
	}
	if _, err := e.cl.Revoke(sctx, first.Kid, ""); err != nil {
		t.Fatal(err)
	}
	waitFor(func() bool { return !w.Signable(first.Kid) })
	if len(changes) < 3 {
		t.Errorf("%d change callbacks", len(changes))
	}
	// The stream breaks with the daemon and comes back with it.
	e.grpc.Stop()
	e.serve(t)
	var r2 client.Rotation
	for i := 0; ; i++ { // the client's connection comes back
		if r2, err = e.cl.Rotate(sctx, "dpop", false); err == nil || i == 100 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	waitFor(func() bool { a, _ := w.Active("dpop"); return a.Kid == r2.Active.Kid })
}

// A watcher that may see no key set still gets SYNCED.
func TestWatchKeysNothingVisibleStillSyncs(t *testing.T) {
	e := newEnv(t, defaultSets[3:], envOpts{}) // only "forbidden" (uid 4242)
	c, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := e.cl.WatchKeys(c, nil).Synced(c); err != nil {
		t.Errorf("watch with no visible key set never synced: %v", err)
	}
}
