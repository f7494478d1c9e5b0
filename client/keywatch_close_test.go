package client_test

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"
)

// watcherGoroutines counts the goroutines running a KeyWatcher's loop.
func watcherGoroutines() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), "client.(*KeyWatcher).run(")
}

// A KeyWatcher of a closed client can never see an event again: Close
// must end it, as it ends the client's other goroutines, rather than
// leave it redialling a closed connection (every 5s) for as long as the
// watch context lives.
func TestKeyWatcherEndsWithClose(t *testing.T) {
	kc := startKeyd(t, "https://as.example")
	before := watcherGoroutines()
	w := kc.WatchKeys(context.Background(), []string{"dpop"})
	if err := w.Synced(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if n := watcherGoroutines(); n != before+1 {
		t.Fatalf("%d watcher goroutines, want %d", n, before+1)
	}
	kc.Close()
	deadline := time.Now().Add(3 * time.Second)
	for watcherGoroutines() > before {
		if time.Now().After(deadline) {
			t.Fatalf("the watcher of a closed client still runs 3s after Close")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
