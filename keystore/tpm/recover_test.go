package tpm

import (
	"context"
	"crypto"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/internal/swtpmtest"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// twoKeys returns a backend on a fresh swtpm with injector in, its
// footprint after New, and keys k1 and k2 (ES256).
func twoKeys(t *testing.T, in *injector) (*Backend, tpmInfo, map[string]crypto.PublicKey) {
	t.Helper()
	s := swtpmtest.Start(t)
	b, err := newTestBackendErr(t, s, Config{}, in.hook)
	if err != nil {
		t.Fatal(err)
	}
	base := inspect(t, b)
	return b, base, map[string]crypto.PublicKey{"k1": keystoretest.MustGenerate(t, b, "k1"), "k2": keystoretest.MustGenerate(t, b, "k2")}
}

// TestFlushFailureLeaksNoSlot (T3): a TPM2_FlushContext of the cached key
// that fails (TPM_RC_RETRY past the retries) leaves the key loaded; keyd
// must not forget it there, or every such failure takes one of swtpm's
// three slots for good and signing ends in TPM_RC_OBJECT_MEMORY.
func TestFlushFailureLeaksNoSlot(t *testing.T) {
	in := &injector{}
	b, base, pubs := twoKeys(t, in)
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k1", keystore.ES256, pubs["k1"], d)
	for i := range 3 {
		// Switching keys flushes the cached one first: make it fail.
		in.arm(tpm2.TPMCCFlushContext, uint32(tpm2.TPMRCRetry), maxRetries+1)
		id := []string{"k2", "k1"}[i%2]
		if _, err := b.Sign(t.Context(), id, d, crypto.SHA256); !errors.Is(err, keystore.ErrUnavailable) {
			t.Fatalf("sign %s with the flush failing: %v, want ErrUnavailable", id, err)
		}
		if got := in.count(); got != maxRetries+1 {
			t.Fatalf("the flush was answered TPM_RC_RETRY %d times, want %d", got, maxRetries+1)
		}
	}
	in.arm(0, 0, 0)
	for _, id := range []string{"k2", "k1", "k2"} {
		mustSign(t, b, id, keystore.ES256, pubs[id], d)
	}
	checkFootprint(t, b, base)
}

// TestObjectMemoryRecovers (T3): TPM_RC_OBJECT_MEMORY (no free slot, as
// when something keyd lost track of is still loaded) makes keyd flush the
// TPM's transient objects and run the command once more.
func TestObjectMemoryRecovers(t *testing.T) {
	in := &injector{}
	b, base, pubs := twoKeys(t, in)
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	in.arm(tpm2.TPMCCLoad, uint32(tpm2.TPMRCObjectMemory), 1)
	mustSign(t, b, "k1", keystore.ES256, pubs["k1"], d)
	if in.count() != 1 {
		t.Fatalf("TPM2_Load was answered TPM_RC_OBJECT_MEMORY %d times, want 1", in.count())
	}
	checkFootprint(t, b, base)
}

// TestLoadRefusalIsNotLoss (T6): a TPM2_Load refused for a reason that says
// nothing about the blob (the TPM needs a self-test, is in field upgrade)
// is ErrUnavailable, never ErrKeyLost — the rotation layer records a lost
// key for good — and the key signs again once the TPM accepts it. A blob
// the TPM finds wrong (an integrity error on inPrivate) stays ErrKeyLost.
func TestLoadRefusalIsNotLoss(t *testing.T) {
	in := &injector{}
	b, base, pubs := twoKeys(t, in)
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	for _, rc := range []tpm2.TPMRC{tpm2.TPMRCNeedsTest, tpm2.TPMRCUpgrade, tpm2.TPMRCFailure} {
		dropCache(t, b)
		in.arm(tpm2.TPMCCLoad, uint32(rc), 1)
		_, err := b.Sign(t.Context(), "k1", d, crypto.SHA256)
		if !errors.Is(err, keystore.ErrUnavailable) || errors.Is(err, keystore.ErrKeyLost) {
			t.Errorf("TPM2_Load answered %#x: Sign = %v, want ErrUnavailable and not ErrKeyLost", uint32(rc), err)
		}
		mustSign(t, b, "k1", keystore.ES256, pubs["k1"], d)
	}
	dropCache(t, b)
	integrityP1 := uint32(tpm2.TPMRCIntegrity) + 0x040 + 0x100 // TPM_RC_INTEGRITY on parameter 1 (inPrivate)
	in.arm(tpm2.TPMCCLoad, integrityP1, 1)
	if _, err := b.Sign(t.Context(), "k2", d, crypto.SHA256); !errors.Is(err, keystore.ErrKeyLost) {
		t.Errorf("TPM2_Load answered TPM_RC_INTEGRITY on inPrivate: Sign = %v, want ErrKeyLost", err)
	}
	in.arm(0, 0, 0)
	checkFootprint(t, b, base)
}

// TestStaleFlushHandle (T2): TPM2_FlushContext of a handle that no longer
// names a loaded object (TPM_RC_HANDLE on parameter 1: the TPM was reset
// and started by someone else) is a stale state, re-initialised and run
// once more, not an internal error.
func TestStaleFlushHandle(t *testing.T) {
	in := &injector{}
	b, base, pubs := twoKeys(t, in)
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k1", keystore.ES256, pubs["k1"], d)
	handleP1 := uint32(tpm2.TPMRCHandle) + 0x040 + 0x100
	in.arm(tpm2.TPMCCFlushContext, handleP1, 1)
	mustSign(t, b, "k2", keystore.ES256, pubs["k2"], d)
	if in.count() != 1 {
		t.Fatalf("the flush was answered TPM_RC_HANDLE %d times, want 1", in.count())
	}
	checkFootprint(t, b, base)
}

// TestProbeFailureFailsStart (T5, T9): a start-up probe that meets a passing
// condition — the TPM still testing after the retries, or the caller
// giving up — fails New instead of refusing PS256 (or RSA-3072) for the
// process's lifetime.
func TestProbeFailureFailsStart(t *testing.T) {
	s := swtpmtest.Start(t)
	in := &injector{}
	in.arm(tpm2.TPMCCSign, uint32(tpm2.TPMRCTesting), maxRetries+1)
	b, err := newTestBackendErr(t, s, Config{}, in.hook)
	if err == nil {
		t.Fatalf("New with the PS256 self-test answered TPM_RC_TESTING: nil error; algorithms %v, refused %v", b.algs, b.refused)
	}
	if !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("New with the PS256 self-test answered TPM_RC_TESTING: %v, want ErrUnavailable", err)
	}

	ctx, cancel := context.WithCancel(t.Context())
	in = &injector{}
	in.arm(tpm2.TPMCCTestParms, 0, 1)
	in.before = cancel
	cfg := Config{Address: s.Addr(), StateDir: t.TempDir() + "/state", CommandTimeout: 5 * time.Second}
	cfg.Logger, _ = testLogger(t)
	b, err = newBackend(ctx, cfg, in.hook)
	if err == nil {
		b.Close()
		t.Fatalf("New cancelled during the probe: nil error; algorithms %v, refused %v", b.algs, b.refused)
	}
	if !errors.Is(err, context.Canceled) {
		t.Errorf("New cancelled during the probe: %v, want context.Canceled", err)
	}

	// And with nothing injected, PS256 passes (swtpm uses salt = hash
	// length), so the failures above came from the injected conditions.
	b = newTestBackend(t, s, Config{})
	if !slices.Contains(b.algs, keystore.PS256) {
		t.Fatalf("algorithms %v, want PS256 among them", b.algs)
	}
}

// TestStaleHandleTwice: a handle error that the re-initialisation does
// not cure (the TPM answers TPM_RC_HANDLE on the key's handle again after
// a fresh SRK and load) fails Sign with ErrUnavailable, a passing TPM
// state, not with a bare TPM code the server answers as an internal error;
// the key is not reported lost, and signs once the TPM behaves.
func TestStaleHandleTwice(t *testing.T) {
	in := &injector{}
	b, base, pubs := twoKeys(t, in)
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k1", keystore.ES256, pubs["k1"], d)
	handleH1 := uint32(tpm2.TPMRCHandle) + 0x100 // TPM_RC_HANDLE, handle 1
	in.arm(tpm2.TPMCCSign, handleH1, 2)
	if _, err := b.Sign(t.Context(), "k1", d, crypto.SHA256); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("Sign answered TPM_RC_HANDLE twice = %v, want ErrUnavailable", err)
	}
	if in.count() != 2 {
		t.Errorf("TPM2_Sign answered TPM_RC_HANDLE %d times, want 2 (one re-initialisation)", in.count())
	}
	mustSign(t, b, "k1", keystore.ES256, pubs["k1"], d)
	checkFootprint(t, b, base)
}

// TestResetDuringPrepare (T2): a TPM reset that lands while keyd is
// re-initialising the TPM (after it listed the transient objects, before
// TPM2_CreatePrimary) is a call that hit a reset like any other: keyd
// starts the TPM, re-creates the SRK and runs the call a second time,
// instead of failing it with ErrUnavailable.
func TestResetDuringPrepare(t *testing.T) {
	s, in, b := hookedBackend(t)
	base := inspect(t, b)
	pub := keystoretest.MustGenerate(t, b, "k")
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k", keystore.ES256, pub, d)

	// The next call re-initialises the TPM (as after a lost connection);
	// the TPM is reset just before its TPM2_CreatePrimary.
	disconnect(t, b)
	in.mu.Lock()
	in.before = func() { s.Reset(t) }
	in.mu.Unlock()
	in.arm(tpm2.TPMCCCreatePrimary, 0, 1)
	sig, err := b.Sign(t.Context(), "k", d, crypto.SHA256)
	if in.count() != 1 {
		t.Fatalf("the TPM was reset before %d TPM2_CreatePrimary, want 1", in.count())
	}
	if err != nil {
		t.Errorf("Sign whose re-initialisation met a TPM reset = %v, want a signature (one re-run after the reset)", err)
	} else if err := keystoretest.VerifyDER(keystore.ES256, pub, d, sig); err != nil {
		t.Error(err)
	}
	checkFootprint(t, b, base)
}

// TestSelfTestLeavesNoObject (T3): the PS256 self-test's key — loaded
// from software or generated in the TPM — is flushed whether New succeeds
// or fails, even when its TPM2_FlushContext fails (TPM_RC_RETRY past the
// retries): a failed start must not leave one of swtpm's three slots taken
// (Close flushes keyd's objects), and a good one leaves only the SRK.
func TestSelfTestLeavesNoObject(t *testing.T) {
	refuseLoadExternal := func(cmd []byte) bool {
		return tpm2.TPMCC(commandCode(cmd)) == tpm2.TPMCCLoadExternal
	}
	for _, tc := range []struct {
		name   string
		refuse func(cmd []byte) bool // commands answered TPM_RC_COMMAND_CODE
		cc     tpm2.TPMCC            // answered rc maxRetries+1 times
		rc     tpm2.TPMRC
	}{
		{"ExternalKeyFlushFails", nil, tpm2.TPMCCFlushContext, tpm2.TPMRCRetry},
		{"TPMKeyFlushFails", refuseLoadExternal, tpm2.TPMCCFlushContext, tpm2.TPMRCRetry},
		{"ExternalKeySignFails", nil, tpm2.TPMCCSign, tpm2.TPMRCTesting},
		{"TPMKeySignFails", refuseLoadExternal, tpm2.TPMCCSign, tpm2.TPMRCTesting},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := swtpmtest.Start(t)
			in := &injector{}
			in.arm(tc.cc, uint32(tc.rc), maxRetries+1)
			hook := func(cmd []byte) ([]byte, bool, error) {
				if tc.refuse != nil && tc.refuse(cmd) {
					return errorResponse(uint32(tpm2.TPMRCCommandCode)), true, nil
				}
				return in.hook(cmd)
			}
			b, err := newTestBackendErr(t, s, Config{}, hook)
			if err == nil {
				t.Fatalf("New with %v answered %#x: nil error; algorithms %v", tc.cc, uint32(tc.rc), b.algs)
			}
			if !errors.Is(err, keystore.ErrUnavailable) {
				t.Errorf("New with %v answered %#x: %v, want ErrUnavailable", tc.cc, uint32(tc.rc), err)
			}
			if in.count() != maxRetries+1 {
				t.Fatalf("%v answered %#x %d times, want %d", tc.cc, uint32(tc.rc), in.count(), maxRetries+1)
			}
			// New closed its connection: tpm2-tools can connect.
			if out := s.Tool(t, "tpm2_getcap", "handles-transient"); strings.TrimSpace(out) != "" {
				t.Errorf("transient objects left after a failed New: %s", out)
			}

			in.arm(0, 0, 0)
			b, err = newTestBackendErr(t, s, Config{}, hook)
			if err != nil {
				t.Fatalf("New once the TPM answers: %v", err)
			}
			if info := inspect(t, b); len(info.transients) != 1 {
				t.Errorf("after New the TPM holds %#x; want only the SRK", info.transients)
			}
			b.Close()
			if out := s.Tool(t, "tpm2_getcap", "handles-transient"); strings.TrimSpace(out) != "" {
				t.Errorf("transient objects left after Close: %s", out)
			}
		})
	}
}

// TestUnusableAnswerIsUnavailable: a TPM_RC_SUCCESS response that go-tpm
// cannot parse (a device or transport fault: here a parameter area shorter
// than the response says) and the TPM's field-upgrade and reboot-needed
// states fail Generate, Sign and Health with ErrUnavailable, which the
// server answers UNAVAILABLE, not with an error wrapping no sentinel, which
// it answers INTERNAL; the key is not reported lost, and everything works
// once the TPM answers properly.
func TestUnusableAnswerIsUnavailable(t *testing.T) {
	var (
		mu     sync.Mutex
		cc     tpm2.TPMCC
		answer []byte
		seen   int
	)
	arm := func(c tpm2.TPMCC, rsp []byte) {
		mu.Lock()
		cc, answer, seen = c, rsp, 0
		mu.Unlock()
	}
	hook := func(cmd []byte) ([]byte, bool, error) {
		mu.Lock()
		defer mu.Unlock()
		if answer == nil || tpm2.TPMCC(commandCode(cmd)) != cc {
			return nil, false, nil
		}
		seen++
		rsp := answer
		answer = nil
		return rsp, true, nil
	}
	s := swtpmtest.Start(t)
	b, err := newTestBackendErr(t, s, Config{}, hook)
	if err != nil {
		t.Fatal(err)
	}
	base := inspect(t, b)
	pub := keystoretest.MustGenerate(t, b, "k")
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k", keystore.ES256, pub, d)

	// TPM_RC_SUCCESS with a 4-byte parameter size claiming 9 bytes, and
	// none after it.
	short := []byte{0x80, 0x02, 0, 0, 0, 14, 0, 0, 0, 0, 0, 0, 0, 9}
	generate := func() error {
		_, err := b.Generate(t.Context(), "new", keystore.KeySpec{Algorithm: keystore.ES256})
		return err
	}
	for _, tc := range []struct {
		name       string
		cc         tpm2.TPMCC
		rsp        []byte
		disconnect bool // so that the call prepares the TPM first
		dropCache  bool // so that Sign loads the key
		call       func() error
	}{
		{"Generate/Create", tpm2.TPMCCCreate, short, false, false, generate},
		{"Generate/GetCapability", tpm2.TPMCCGetCapability, short, true, false, generate},
		{"Generate/CreatePrimary", tpm2.TPMCCCreatePrimary, short, true, false, generate},
		{"Generate/Upgrade", tpm2.TPMCCCreate, errorResponse(uint32(tpm2.TPMRCUpgrade)), false, false, generate},
		{"Generate/Reboot", tpm2.TPMCCCreate, errorResponse(uint32(tpm2.TPMRCReboot)), false, false, generate},
		{"Sign/Load", tpm2.TPMCCLoad, short, false, true, func() error {
			_, err := b.Sign(t.Context(), "k", d, crypto.SHA256)
			return err
		}},
		{"Health/ReadPublic", tpm2.TPMCCReadPublic, short, false, false, func() error { return b.Health(t.Context()) }},
	} {
		if tc.disconnect {
			disconnect(t, b)
		}
		if tc.dropCache {
			dropCache(t, b)
		}
		arm(tc.cc, tc.rsp)
		err := tc.call()
		mu.Lock()
		n := seen
		mu.Unlock()
		if n != 1 {
			t.Fatalf("%s: the command was answered by the test %d times, want 1", tc.name, n)
		}
		if !errors.Is(err, keystore.ErrUnavailable) || errors.Is(err, keystore.ErrKeyLost) {
			t.Errorf("%s: %v, want ErrUnavailable (and not ErrKeyLost)", tc.name, err)
		} else {
			t.Logf("%s: %v", tc.name, err)
		}
	}
	arm(0, nil)
	mustSign(t, b, "k", keystore.ES256, pub, d)
	keystoretest.MustGenerate(t, b, "k2")
	if err := b.Health(t.Context()); err != nil {
		t.Errorf("Health: %v", err)
	}
	checkFootprint(t, b, base)
}
