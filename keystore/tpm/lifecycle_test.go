package tpm

import (
	"context"
	"crypto"
	"errors"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// waitForStack waits (at most 5 s) until some goroutine's stack contains
// frame, and fails the test otherwise.
func waitForStack(t *testing.T, frame string) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for range 250 {
		n := runtime.Stack(buf, true)
		if strings.Contains(string(buf[:n]), frame) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no goroutine reached %s", frame)
}

// TestSignAfterDestroy: a Sign that looked up its key before Destroy, and
// waits for the TPM (held by a slow command) until after Destroy has
// returned, must not then load the destroyed key and sign with it.
// Destroy's comment says "a Sign cannot use the key any more".
func TestSignAfterDestroy(t *testing.T) {
	s := startSWTPM(t)
	var stuck atomic.Bool
	block := make(chan struct{})
	unblock := sync.OnceFunc(func() { close(block) })
	t.Cleanup(unblock)
	entered := make(chan struct{}, 1)
	hook := func(cmd []byte) ([]byte, bool, error) {
		if tpm2.TPMCC(commandCode(cmd)) == tpm2.TPMCCCreate && stuck.Load() {
			select {
			case entered <- struct{}{}:
			default:
			}
			<-block
		}
		return nil, false, nil
	}
	b, err := newTestBackendErr(t, s, Config{}, hook)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	pub := keystoretest.MustGenerate(t, b, "k")
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k", keystore.ES256, pub, d)
	keystoretest.MustGenerate(t, b, "other")
	// Load "other", so that "k" is not the cached key any more.
	if _, err := b.Sign(ctx, "other", d, crypto.SHA256); err != nil {
		t.Fatal(err)
	}

	// A slow command (TPM2_Create) holds the TPM.
	stuck.Store(true)
	genDone := make(chan error, 1)
	go func() {
		_, err := b.Generate(ctx, "slow", keystore.KeySpec{Algorithm: keystore.ES256})
		genDone <- err
	}()
	<-entered

	// A Sign by k, queued behind it (it has its key blob already).
	type result struct {
		sig []byte
		err error
	}
	signDone := make(chan result, 1)
	go func() {
		sig, err := b.Sign(ctx, "k", d, crypto.SHA256)
		signDone <- result{sig, err}
	}()
	waitForStack(t, "tpm.(*Backend).acquire")

	// Destroy k. Its best-effort flush cannot get the TPM in time; the
	// key file is gone and the tombstone written: Destroy succeeds.
	dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err = b.Destroy(dctx, "k")
	cancel()
	if err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	if _, err := b.Public(ctx, "k"); !errors.Is(err, keystore.ErrNotFound) {
		t.Fatalf("Public after Destroy = %v, want ErrNotFound", err)
	}

	// The slow command completes; the queued Sign runs after Destroy
	// returned.
	stuck.Store(false)
	unblock()
	if err := <-genDone; err != nil {
		t.Fatalf("Generate: %v", err)
	}
	r := <-signDone
	if r.err == nil {
		verr := keystoretest.VerifyDER(keystore.ES256, pub, d, r.sig)
		t.Errorf("Sign that got the TPM after Destroy(k) returned a signature by the destroyed key k (verifies: %v); want ErrNotFound", verr == nil)
	} else if !errors.Is(r.err, keystore.ErrNotFound) {
		t.Errorf("Sign after Destroy = %v, want ErrNotFound", r.err)
	}
	// And the destroyed key is not left loaded in the TPM.
	if err := b.acquire(ctx); err != nil {
		t.Fatal(err)
	}
	cached := b.st.cached.id
	b.release()
	if cached == "k" {
		t.Errorf("the destroyed key k is loaded in the TPM after Destroy returned")
	}
}
