package tpm

import (
	"context"
	"crypto"
	"errors"
	"net"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/internal/keyfile"
	"github.com/keyd-dev/keyd/internal/swtpmtest"
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
	s := swtpmtest.Start(t)
	hold := newCreateHold(t)
	b, err := newTestBackendErr(t, s, Config{}, hold.hook)
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
	hold.on.Store(true)
	genDone := make(chan error, 1)
	go func() {
		_, err := b.Generate(ctx, "slow", keystore.KeySpec{Algorithm: keystore.ES256})
		genDone <- err
	}()
	<-hold.entered

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
	hold.release()
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

// swtpmTransients lists the transient objects swtpm holds, through a
// connection of the test's own (no backend may be connected).
func swtpmTransients(t *testing.T, s *swtpmtest.SWTPM) []tpm2.TPMHandle {
	t.Helper()
	var c net.Conn
	var err error
	for range 50 { // swtpm may still be closing the backend's connection
		if c, err = net.DialTimeout("tcp", s.Addr()[len("tcp://"):], time.Second); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	hs, err := transientHandles(&directTPM{c: c})
	if err != nil {
		t.Fatal(err)
	}
	return hs
}

// TestCloseFlushesForgottenObjects (T3): Close promises to flush keyd's
// objects from the TPM. After a caller gave up while a TPM2_Load was in
// flight, keyd no longer knows what it loaded (it "forgets" and lets the
// next prepare flush everything); a Close at that point must still leave
// swtpm's transient slots as it found them — swtpm keeps transient
// objects after the connection closes.
func TestCloseFlushesForgottenObjects(t *testing.T) {
	s := swtpmtest.Start(t)
	d := keystoretest.Digest(keystore.ES256, []byte("m"))

	// The ordinary case: Close leaves nothing behind.
	b := newTestBackend(t, s, Config{})
	pub := keystoretest.MustGenerate(t, b, "k")
	mustSign(t, b, "k", keystore.ES256, pub, d)
	b.Close()
	if hs := swtpmTransients(t, s); len(hs) != 0 {
		t.Fatalf("after an ordinary Close swtpm holds transient objects %#x", hs)
	}

	// A Sign whose caller gives up while its TPM2_Load is in flight.
	var armed atomic.Bool
	var cancel context.CancelFunc
	hook := func(cmd []byte) ([]byte, bool, error) {
		if tpm2.TPMCC(commandCode(cmd)) == tpm2.TPMCCLoad && armed.CompareAndSwap(true, false) {
			cancel()
			time.Sleep(50 * time.Millisecond) // the caller sees its context end first
		}
		return nil, false, nil
	}
	b, err := newTestBackendErr(t, s, Config{}, hook)
	if err != nil {
		t.Fatal(err)
	}
	pub1 := keystoretest.MustGenerate(t, b, "k1")
	keystoretest.MustGenerate(t, b, "k2")
	mustSign(t, b, "k1", keystore.ES256, pub1, d)
	cctx, stop := context.WithCancel(t.Context())
	defer stop()
	cancel = stop
	armed.Store(true)
	if _, err := b.Sign(cctx, "k2", d, crypto.SHA256); !errors.Is(err, context.Canceled) {
		t.Fatalf("Sign cancelled during TPM2_Load = %v, want context.Canceled", err)
	}
	b.Close()
	if hs := swtpmTransients(t, s); len(hs) != 0 {
		t.Errorf("after Close swtpm still holds transient objects %#x (of 3 slots): Close left keyd's SRK and key loaded", hs)
	}
}

// A Generate whose key the TPM was still making when Close began stores
// nothing once the TPM answers: the state directory is released with no
// write under way, and no key file appears after Close.
func TestGenerateDuringClose(t *testing.T) {
	s := swtpmtest.Start(t)
	hold := newCreateHold(t)
	b, err := newTestBackendErr(t, s, Config{}, hold.hook)
	if err != nil {
		t.Fatal(err)
	}
	hold.on.Store(true)
	genDone := make(chan error, 1)
	go func() {
		_, err := b.Generate(t.Context(), "late", keystore.KeySpec{Algorithm: keystore.ES256})
		genDone <- err
	}()
	<-hold.entered
	closed := make(chan struct{})
	go func() {
		b.Close()
		close(closed)
	}()
	waitForStack(t, "tpm.(*Backend).Close")
	hold.release()
	<-closed
	if err := <-genDone; !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Generate that Close overtook = %v; want ErrClosed", err)
	}
	if ids, err := keyfile.List(b.dir, keySuffix); err != nil || len(ids) != 0 {
		t.Errorf("key files after Close: %v, %v; want none", ids, err)
	}
}

// A key whose file disappeared while it is loaded (deleted by hand, a
// restore without it) keeps its ID: Generate does not make another key
// under it, and Destroy destroys it (tombstone, and no more signatures)
// rather than answer that it does not exist.
func TestLoadedKeyWhoseFileIsGone(t *testing.T) {
	s := swtpmtest.Start(t)
	b := newTestBackend(t, s, Config{})
	ctx := t.Context()
	pub := keystoretest.MustGenerate(t, b, "k")
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k", keystore.ES256, pub, d)
	if err := os.Remove(b.keyPath("k")); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Generate(ctx, "k", keystore.KeySpec{Algorithm: keystore.ES256}); !errors.Is(err, keystore.ErrAlreadyExists) {
		t.Errorf("Generate of an ID whose key is loaded = %v; want ErrAlreadyExists", err)
	}
	if err := b.Destroy(ctx, "k"); err != nil {
		t.Errorf("Destroy of a loaded key whose file is gone = %v; want nil", err)
	}
	if _, err := b.Sign(ctx, "k", d, crypto.SHA256); err == nil {
		t.Error("the destroyed key still signs")
	}
	if _, err := os.Lstat(b.tombstonePath("k")); err != nil {
		t.Errorf("no tombstone after Destroy: %v", err)
	}
}
