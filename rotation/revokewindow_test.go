package rotation_test

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/rotation"
)

// TestTimedOutRevokeRecordedWhenTheChangeEnds: a Revoke that timed out
// behind another lifecycle change is recorded once that change ends (as
// README's DEADLINE_EXCEEDED row says), not only at the scheduler's next
// periodic tick: until it is recorded the key stays in the JWK Set, and a
// restart in between forgets the revocation (the key signs again).
func TestTimedOutRevokeRecordedWhenTheChangeEnds(t *testing.T) {
	m, b := slowGenerateManager(t)
	assertKid := active(t, m, "assert").Kid

	// The daemon's scheduler, with a long interval (keyd's is up to 30s).
	runCtx, stop := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { m.Run(runCtx, time.Hour); close(ran) }()
	defer func() { stop(); <-ran }()
	waitRunIdle(t)

	rotated := hungRotation(m, b)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	_, err := m.Revoke(ctx, assertKid, "assert")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Revoke behind a hung rotation = %v, want DeadlineExceeded", err)
	}
	close(b.release)
	if err := <-rotated; err != nil {
		t.Fatal(err)
	}

	deadline := time.Now().Add(3 * time.Second)
	for {
		var st rotation.State
		for _, v := range m.Versions("assert") {
			if v.Kid == assertKid {
				st = v.State
			}
		}
		if st == rotation.Revoked {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("3s after the rotation it waited for ended, the revocation that timed out is still not recorded (%s); a restart now would let the key sign again", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitRunIdle waits until Run's first tick is over and Run waits for the
// next one (its goroutine is parked in its select).
func waitRunIdle(t *testing.T) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for start := time.Now(); time.Since(start) < 5*time.Second; time.Sleep(5 * time.Millisecond) {
		for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
			if strings.Contains(g, "[select") && strings.Contains(g, "(*Manager).Run(") && !strings.Contains(g, "(*Manager).Tick(") {
				return
			}
		}
	}
	t.Fatal("Run never waited for its next tick")
}
