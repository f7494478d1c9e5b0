package client_test

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/client"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
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

// noWatch refuses every WatchKeys: a watcher of it retries with a growing
// backoff.
type noWatch struct {
	keydv1.UnimplementedKeyServiceServer
}

func (noWatch) WatchKeys(*keydv1.WatchKeysRequest, grpc.ServerStreamingServer[keydv1.WatchKeysResponse]) error {
	return status.Error(codes.Unavailable, "not now")
}

// A watcher waiting out its reconnection backoff (up to 5 s) ends when the
// client is closed, not when the wait is over.
func TestKeyWatcherEndsWithCloseDuringBackoff(t *testing.T) {
	kc, err := client.Dial(serveKeys(t, noWatch{}))
	if err != nil {
		t.Fatal(err)
	}
	before := watcherGoroutines()
	kc.WatchKeys(context.Background(), []string{"dpop"})
	time.Sleep(3200 * time.Millisecond) // the backoff has grown past 1.6 s
	start := time.Now()
	kc.Close()
	for watcherGoroutines() > before {
		if time.Since(start) > time.Second {
			t.Fatalf("the watcher still runs %v after Close", time.Since(start).Round(time.Millisecond))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Every call on a closed client is ErrUnavailable: unary ones were gRPC's
// Canceled, which matches no sentinel, while stream Signs were
// ErrUnavailable already.
func TestClosedClientCallsUnavailable(t *testing.T) {
	kc := startKeyd(t, "https://as.example")
	if _, err := kc.JWKS(ctx(t)); err != nil {
		t.Fatal(err)
	}
	kc.Close()
	big := strings.Repeat("x", 40<<10) // too large for the stream: a unary Sign
	_, serr := kc.Sign(ctx(t), client.SignRequest{KeySet: "dpop", Claims: map[string]any{"htm": "GET", "htu": "https://a.example/" + big}})
	_, jerr := kc.JWKS(ctx(t))
	for name, err := range map[string]error{"unary Sign": serr, "JWKS": jerr} {
		if !errors.Is(err, client.ErrUnavailable) {
			t.Errorf("%s on a closed client: %v, want ErrUnavailable", name, err)
		}
	}
}
