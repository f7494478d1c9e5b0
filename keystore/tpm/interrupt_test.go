package tpm

import (
	"bytes"
	"context"
	"crypto"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/internal/swtpmtest"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// TestStreamConnResume: an exchange interrupted by the caller's context,
// wherever the response stands, completes with finish; one whose context
// ends too late, or never, is not interrupted.
func TestStreamConnResume(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cmd := appendSignCommand(nil, 0x80000001, make([]byte, 32), sigScheme{tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA256})
	rsp := signResponse(ecdsaSig(tpm2.TPMAlgSHA256, bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)))
	splits := []int{0, 3, headerSize, headerSize + 5, len(rsp) - 1, len(rsp)}
	rest := make(chan struct{})
	served := make(chan error, 1)
	go func() {
		served <- func() error {
			c, err := l.Accept()
			if err != nil {
				return err
			}
			defer c.Close()
			got := make([]byte, len(cmd))
			for _, split := range splits {
				if _, err := io.ReadFull(c, got); err != nil {
					return err
				}
				if !bytes.Equal(got, cmd) {
					return errors.New("command garbled")
				}
				if _, err := c.Write(rsp[:split]); err != nil {
					return err
				}
				<-rest
				if _, err := c.Write(rsp[split:]); err != nil {
					return err
				}
			}
			return nil
		}()
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sc := newStreamConn(c)
	defer sc.close()
	for _, split := range splits[:len(splits)-1] {
		ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
		start := time.Now()
		_, err := sc.roundTrip(ctx, cmd, time.Now().Add(10*time.Second))
		cancel()
		if err != errInterrupted || time.Since(start) > 2*time.Second {
			t.Fatalf("split %d: roundTrip = %v after %v, want errInterrupted after 50ms", split, err, time.Since(start))
		}
		rest <- struct{}{}
		got, err := sc.finish(time.Now().Add(10 * time.Second))
		if err != nil || !bytes.Equal(got, rsp) {
			t.Fatalf("split %d: finish = %x, %v; want the response", split, got, err)
		}
	}
	// The whole response arrives in time: the context's end later does
	// not matter.
	close(rest)
	ctx, cancel := context.WithCancel(t.Context())
	got, err := sc.roundTrip(ctx, cmd, time.Now().Add(10*time.Second))
	cancel()
	if err != nil || !bytes.Equal(got, rsp) {
		t.Fatalf("roundTrip = %x, %v; want the response", got, err)
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	// The peer is gone: an error, not an interruption.
	if _, err := sc.roundTrip(context.Background(), cmd, time.Now().Add(10*time.Second)); err == nil || err == errInterrupted {
		t.Errorf("roundTrip to a closed peer = %v", err)
	}
}

// TestInterrupted: on a stopped TPM, a caller whose context ends while its
// command is in flight returns at once with the context's error; the
// command finishes in the background when the TPM goes on (or times out),
// holding the TPM meanwhile; a dropped response of a command that changes
// the TPM's objects makes keyd start over from a fresh SRK; nothing leaks.
func TestInterrupted(t *testing.T) {
	s := swtpmtest.Start(t)
	const timeout = 2 * time.Second
	log, logged := testLogger(t)
	b := newTestBackend(t, s, Config{CommandTimeout: timeout, Logger: log})
	ctx := t.Context()
	base := inspect(t, b)
	pub := keystoretest.MustGenerate(t, b, "k")
	pub2 := keystoretest.MustGenerate(t, b, "k2")
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k", keystore.ES256, pub, d)
	// reloaded reports whether keyd started over since mark (prepare
	// flushed the objects it had lost track of).
	reloaded := func(mark int) bool {
		return strings.Contains(logged()[mark:], "flushed a transient object")
	}
	g0, _ := baseline()

	signWithin := func(what string, cctx context.Context, want error, limit time.Duration) {
		t.Helper()
		start := time.Now()
		_, err := b.Sign(cctx, "k", d, crypto.SHA256)
		if took := time.Since(start); !errors.Is(err, want) || took > limit {
			t.Errorf("%s: Sign = %v after %v, want %v within %v", what, err, took, want, limit)
		}
	}

	// A deadline while TPM2_Sign is in flight.
	s.Signal(t, syscall.SIGSTOP)
	mark := len(logged())
	cctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	signWithin("deadline, TPM stopped", cctx, context.DeadlineExceeded, 700*time.Millisecond)
	cancel()
	// The command still holds the TPM: the next caller waits until its
	// own deadline.
	cctx, cancel = context.WithTimeout(ctx, 200*time.Millisecond)
	signWithin("while a command is detached", cctx, context.DeadlineExceeded, 700*time.Millisecond)
	cancel()
	s.Signal(t, syscall.SIGCONT)
	mustSign(t, b, "k", keystore.ES256, pub, d)
	if !strings.Contains(logged(), "dropped the response") {
		t.Error("no log of the dropped response")
	}
	if reloaded(mark) {
		t.Error("keyd started over after a dropped TPM2_Sign, which changes nothing")
	}

	// A cancellation while TPM2_Sign is in flight.
	s.Signal(t, syscall.SIGSTOP)
	cctx, cancel = context.WithCancel(ctx)
	time.AfterFunc(100*time.Millisecond, cancel)
	signWithin("cancel, TPM stopped", cctx, context.Canceled, 600*time.Millisecond)
	s.Signal(t, syscall.SIGCONT)
	mustSign(t, b, "k", keystore.ES256, pub, d)

	// A key switch: the flush of the loaded key is in flight when the
	// deadline comes, so keyd no longer knows what the TPM holds.
	s.Signal(t, syscall.SIGSTOP)
	mark = len(logged())
	cctx, cancel = context.WithTimeout(ctx, 200*time.Millisecond)
	start := time.Now()
	if _, err := b.Sign(cctx, "k2", d, crypto.SHA256); !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 700*time.Millisecond {
		t.Errorf("key switch on a stopped TPM: Sign = %v after %v, want DeadlineExceeded after 200ms", err, time.Since(start))
	}
	cancel()
	s.Signal(t, syscall.SIGCONT)
	mustSign(t, b, "k2", keystore.ES256, pub2, d)
	if !reloaded(mark) {
		t.Error("keyd did not start over after a dropped TPM2_FlushContext")
	}

	// Commands not sent because the context ended between two of them:
	// a flush not sent leaves an object keyd no longer tracks.
	mark = len(logged())
	cctx, cancel = context.WithCancel(ctx)
	err := b.do(cctx, timeout, func(o *op) error {
		cancel()
		return b.flushCached(o)
	})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("do with a flush after the context ended = %v, want Canceled", err)
	}
	mustSign(t, b, "k", keystore.ES256, pub, d)
	if !reloaded(mark) {
		t.Error("keyd did not start over after a TPM2_FlushContext it did not send")
	}

	// The detached command times out: the connection is dropped, calls
	// fail fast for a while, and keyd recovers when the TPM goes on.
	s.Signal(t, syscall.SIGSTOP)
	cctx, cancel = context.WithTimeout(ctx, 200*time.Millisecond)
	signWithin("deadline before the command's timeout", cctx, context.DeadlineExceeded, 700*time.Millisecond)
	cancel()
	time.Sleep(timeout + 300*time.Millisecond)
	signWithin("after the detached command timed out", ctx, keystore.ErrUnavailable, 300*time.Millisecond)
	s.Signal(t, syscall.SIGCONT)
	recoverSign(t, b, "k", keystore.ES256, pub, 10*time.Second)

	checkFootprint(t, b, base)
	if g, _ := settle(g0); g > g0 {
		t.Errorf("goroutines %d → %d", g0, g)
	}
}
