package client_test

import (
	"context"
	"testing"
	"time"
)

// Breaking out of a Watch iteration (here after the first event, as a
// caller that wants the current snapshot only does) must end the
// WatchKeys stream. Otherwise each such loop leaves a stream open on the
// connection until the context ends, and once the daemon's per-connection
// limit of 64 concurrent streams is reached, every other call of the
// client waits.
func TestWatchBreakEndsStream(t *testing.T) {
	kc := startKeyd(t, "https://as.example")
	// A context that outlives the loops, as a service's does.
	long, cancelLong := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancelLong()
	for i := range 70 {
		got := false
		for _, err := range kc.Watch(long, "dpop") {
			if err != nil {
				t.Fatalf("watch %d: %v", i, err)
			}
			got = true
			break
		}
		if !got {
			t.Fatalf("watch %d: no event", i)
		}
	}
	c, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := kc.ListKeys(c, "dpop"); err != nil {
		t.Fatalf("ListKeys after 70 watches the caller broke out of: %v", err)
	}
}
