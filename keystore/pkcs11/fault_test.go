package pkcs11

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyd-dev/keyd/internal/ecdsasig"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
	"github.com/keyd-dev/keyd/keystore/pkcs11/internal/cgoblock"
)

// faultModule wraps the real module (SoftHSM2) to inject CKR codes, count
// calls and block inside C_Sign, for the faults SoftHSM cannot produce.
type faultModule struct {
	module

	mu     sync.Mutex
	inject map[string]func() error // by call name: an error to return instead of calling
	block  chan struct{}           // while non-nil, C_Sign waits (inside C) for it to close
	noMech map[uint]bool           // mechanisms hidden from C_GetMechanismList
	info   map[uint]p11.MechanismInfo

	logins, opens, signs, copies, inits atomic.Int32
	inSign, maxInSign                   atomic.Int32

	// With gen set (trackHandles), the module generation in which each
	// object handle was last handed out, and the C_SignInit calls that
	// used a handle not handed out since the last C_Initialize.
	gen   func() uint64
	found map[p11.ObjectHandle]uint64
	stale []string

	// signedWith is the object handle of the last C_SignInit.
	signedWith p11.ObjectHandle

	// tokenInfo, if set, changes what C_GetTokenInfo returns.
	tokenInfo func(p11.TokenInfo) p11.TokenInfo
}

// trackHandles makes f check that C_SignInit only uses object handles that
// C_FindObjects or C_GenerateKeyPair handed out since the module was last
// initialized; gen returns the module's generation (read inside the
// module's calls, where it cannot change).
func (f *faultModule) trackHandles(gen func() uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.gen, f.found = gen, map[p11.ObjectHandle]uint64{}
}

func (f *faultModule) handedOut(hs ...p11.ObjectHandle) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.gen == nil {
		return
	}
	for _, h := range hs {
		f.found[h] = f.gen()
	}
}

func (f *faultModule) staleUses() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.stale)
}

func (f *faultModule) FindObjects(sh p11.SessionHandle, max int) ([]p11.ObjectHandle, bool, error) {
	hs, more, err := f.module.FindObjects(sh, max)
	f.handedOut(hs...)
	return hs, more, err
}

func newFaultModule() *faultModule {
	return &faultModule{inject: map[string]func() error{}, noMech: map[uint]bool{}, info: map[uint]p11.MechanismInfo{}}
}

// wrap returns options that put f around the module.
func (f *faultModule) options(o options) options {
	o.wrap = func(m module) module {
		f.module = m
		return f
	}
	return o
}

// set makes call fail with what h returns (nil h, or h returning nil:
// the real call).
func (f *faultModule) set(call string, h func() error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if h == nil {
		delete(f.inject, call)
		return
	}
	f.inject[call] = h
}

func (f *faultModule) clear() {
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.inject)
}

func (f *faultModule) fault(call string) error {
	f.mu.Lock()
	h := f.inject[call]
	f.mu.Unlock()
	if h == nil {
		return nil
	}
	return h()
}

// always fails every call with code.
func always(code uint) func() error {
	return func() error { return p11.Error(code) }
}

// times fails the next n calls with code.
func times(n int, code uint) func() error {
	var left atomic.Int32
	left.Store(int32(n))
	return func() error {
		if left.Add(-1) >= 0 {
			return p11.Error(code)
		}
		return nil
	}
}

// sequence fails the next calls with codes in turn (0: the real call),
// then lets every call through.
func sequence(codes ...uint) func() error {
	var mu sync.Mutex
	return func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(codes) == 0 {
			return nil
		}
		c := codes[0]
		codes = codes[1:]
		if c == 0 {
			return nil
		}
		return p11.Error(c)
	}
}

func (f *faultModule) GetAttributeValue(sh p11.SessionHandle, o p11.ObjectHandle, a []*p11.Attribute) ([]*p11.Attribute, error) {
	if err := f.fault("GetAttributeValue"); err != nil {
		return nil, err
	}
	return f.module.GetAttributeValue(sh, o, a)
}

func (f *faultModule) Initialize(opts ...p11.InitializeOption) error {
	f.inits.Add(1)
	if err := f.fault("Initialize"); err != nil {
		return err
	}
	return f.module.Initialize(opts...)
}

func (f *faultModule) Login(sh p11.SessionHandle, userType uint, pin string) error {
	f.logins.Add(1)
	if err := f.fault("Login"); err != nil {
		return err
	}
	return f.module.Login(sh, userType, pin)
}

func (f *faultModule) OpenSession(slot, flags uint) (p11.SessionHandle, error) {
	f.opens.Add(1)
	if err := f.fault("OpenSession"); err != nil {
		return 0, err
	}
	return f.module.OpenSession(slot, flags)
}

func (f *faultModule) GetSessionInfo(sh p11.SessionHandle) (p11.SessionInfo, error) {
	if err := f.fault("GetSessionInfo"); err != nil {
		return p11.SessionInfo{}, err
	}
	return f.module.GetSessionInfo(sh)
}

func (f *faultModule) GetTokenInfo(slot uint) (p11.TokenInfo, error) {
	if err := f.fault("GetTokenInfo"); err != nil {
		return p11.TokenInfo{}, err
	}
	ti, err := f.module.GetTokenInfo(slot)
	f.mu.Lock()
	change := f.tokenInfo
	f.mu.Unlock()
	if err == nil && change != nil {
		ti = change(ti)
	}
	return ti, err
}

func (f *faultModule) GetMechanismList(slot uint) ([]*p11.Mechanism, error) {
	list, err := f.module.GetMechanismList(slot)
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*p11.Mechanism
	for _, m := range list {
		if !f.noMech[m.Mechanism] {
			out = append(out, m)
		}
	}
	return out, err
}

func (f *faultModule) GetMechanismInfo(slot uint, m []*p11.Mechanism) (p11.MechanismInfo, error) {
	f.mu.Lock()
	info, ok := f.info[m[0].Mechanism]
	f.mu.Unlock()
	if ok {
		return info, nil
	}
	return f.module.GetMechanismInfo(slot, m)
}

func (f *faultModule) FindObjectsInit(sh p11.SessionHandle, temp []*p11.Attribute) error {
	if err := f.fault("FindObjectsInit"); err != nil {
		return err
	}
	return f.module.FindObjectsInit(sh, temp)
}

func (f *faultModule) SignInit(sh p11.SessionHandle, m []*p11.Mechanism, o p11.ObjectHandle) error {
	if err := f.fault("SignInit"); err != nil {
		return err
	}
	f.mu.Lock()
	hidden := len(m) == 1 && f.noMech[m[0].Mechanism]
	f.mu.Unlock()
	if hidden {
		// A token without the mechanism refuses it.
		return p11.Error(p11.CKR_MECHANISM_INVALID)
	}
	f.mu.Lock()
	f.signedWith = o
	if f.gen != nil {
		if g, ok := f.found[o]; !ok || g != f.gen() {
			f.stale = append(f.stale, fmt.Sprintf("C_SignInit with object handle %d, handed out in generation %d (found: %v), now %d", o, g, ok, f.gen()))
		}
	}
	f.mu.Unlock()
	return f.module.SignInit(sh, m, o)
}

func (f *faultModule) Sign(sh p11.SessionHandle, msg []byte) ([]byte, error) {
	f.signs.Add(1)
	n := f.inSign.Add(1)
	defer f.inSign.Add(-1)
	for {
		m := f.maxInSign.Load()
		if n <= m || f.maxInSign.CompareAndSwap(m, n) {
			break
		}
	}
	f.mu.Lock()
	block := f.block
	f.mu.Unlock()
	for block != nil {
		select {
		case <-block:
			block = nil
		default:
			cgoblock.Sleep(2 * time.Millisecond) // hung in the module: an OS thread is held
		}
	}
	if err := f.fault("Sign"); err != nil {
		// A failed C_Sign ends the signing operation (PKCS#11 2.40
		// §5.11): end it for real, so that the session is as a module
		// that failed would leave it.
		_, _ = f.module.Sign(sh, msg)
		return nil, err
	}
	return f.module.Sign(sh, msg)
}

func (f *faultModule) GenerateKeyPair(sh p11.SessionHandle, m []*p11.Mechanism, pub, priv []*p11.Attribute) (p11.ObjectHandle, p11.ObjectHandle, error) {
	if err := f.fault("GenerateKeyPair"); err != nil {
		return 0, 0, err
	}
	ph, kh, err := f.module.GenerateKeyPair(sh, m, pub, priv)
	if err == nil {
		f.handedOut(ph, kh)
	}
	return ph, kh, err
}

func (f *faultModule) DestroyObject(sh p11.SessionHandle, oh p11.ObjectHandle) error {
	if err := f.fault("DestroyObject"); err != nil {
		return err
	}
	return f.module.DestroyObject(sh, oh)
}

func (f *faultModule) CopyObject(sh p11.SessionHandle, o p11.ObjectHandle, a []*p11.Attribute) (p11.ObjectHandle, error) {
	f.copies.Add(1)
	if err := f.fault("CopyObject"); err != nil {
		return 0, err
	}
	h, err := f.module.CopyObject(sh, o, a)
	if err == nil {
		f.handedOut(h)
	}
	return h, err
}

// waitIdle waits until no call holds a pooled session (abandoned calls
// finish in the background).
func waitIdle(t *testing.T, b *Backend) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(b.sem) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d pooled sessions still busy", len(b.sem))
		}
		time.Sleep(time.Millisecond)
	}
}

// faultBackend opens a Backend on a fresh token through a faultModule.
func faultBackend(t *testing.T, f *faultModule, o options) (*Backend, *testToken) {
	t.Helper()
	tok := newToken(t)
	return openBackend(t, tok.config(t), f.options(o)), tok
}

// signOK signs with key id and verifies the signature.
func signOK(t *testing.T, b *Backend, id string, pub crypto.PublicKey) {
	t.Helper()
	if err := signVerify(t.Context(), b, id, pub); err != nil {
		t.Fatal(err)
	}
}

func signVerify(ctx context.Context, b *Backend, id string, pub crypto.PublicKey) error {
	d := keystoretest.Digest(keystore.ES256, []byte("fault test "+id))
	sig, err := b.Sign(ctx, id, d, crypto.SHA256)
	if err != nil {
		return fmt.Errorf("Sign(%q): %w", id, err)
	}
	return keystoretest.VerifyDER(keystore.ES256, pub, d, sig)
}

// keyIntact checks the key is still listed and signs (no key was lost).
func keyIntact(t *testing.T, b *Backend, id string, pub crypto.PublicKey) {
	t.Helper()
	ids, err := b.List(t.Context())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	found := false
	for _, x := range ids {
		found = found || x == id
	}
	if !found {
		t.Fatalf("List = %q: key %q is gone", ids, id)
	}
	got, err := b.Public(t.Context(), id)
	if err != nil {
		t.Fatalf("Public(%q): %v", id, err)
	}
	if !got.(interface{ Equal(crypto.PublicKey) bool }).Equal(pub) {
		t.Fatalf("Public(%q) changed", id)
	}
	signOK(t, b, id, pub)
}

// P1: the token directory is deleted under a running Backend. SoftHSM keeps
// the session logged in and the slot listed, but the objects are gone and
// C_GetTokenInfo fails (CKR_GENERAL_ERROR). Once Health has seen that, Sign
// of the key the Backend knew fails with ErrKeyLost (DATA_LOSS) — never a
// signature from the key's session copy or cached handle — and Health
// keeps reporting ErrUnavailable; List fails rather than report an empty
// token; Generate makes no replacement.
func TestTokenWiped(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	// No recheck by time: only what Health saw stops the session copy.
	b, tok := faultBackend(t, f, options{recoverBackoff: time.Millisecond, recheck: time.Hour})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	if err := b.Health(t.Context()); err != nil {
		t.Fatalf("Health before the wipe: %v", err)
	}

	tok.wipe(t)
	if err := b.Health(t.Context()); !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("Health after the wipe = %v; want ErrUnavailable", err)
	}
	// Public answers from the cache without touching the token: that
	// must not pass for a sign that the token works again.
	_, _ = b.Public(t.Context(), "k")
	for i := range 3 {
		_, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256)
		if !errors.Is(err, keystore.ErrKeyLost) {
			t.Fatalf("Sign #%d after the wipe = %v; want ErrKeyLost", i, err)
		}
		if i == 0 {
			t.Logf("Sign after the wipe: %v", err)
		}
		if err := b.Health(t.Context()); !errors.Is(err, keystore.ErrUnavailable) {
			t.Fatalf("Health after the wipe = %v; want ErrUnavailable", err)
		}
	}
	if _, err := b.Public(t.Context(), "k"); !errors.Is(err, keystore.ErrKeyLost) {
		t.Errorf("Public after the wipe = %v; want ErrKeyLost", err)
	}
	if ids, err := b.List(t.Context()); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("List after the wipe = %q, %v; want ErrUnavailable", ids, err)
	}
	if _, err := b.Generate(t.Context(), "k2", keystore.KeySpec{Algorithm: keystore.ES256}); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("Generate after the wipe = %v; want ErrUnavailable", err)
	}
	if n := f.logins.Load(); n != 1 {
		t.Errorf("%d C_Login calls; want 1 (the login was never lost)", n)
	}
}

// P1 without a health probe: the session copy of a key signs on in
// SoftHSM's memory after the token directory is gone, but only until keyd
// looks at the key's token object again (recheck): from then on Sign
// fails with ErrKeyLost.
func TestTokenWipedRecheck(t *testing.T) {
	checkGoroutines(t)
	const recheck = 50 * time.Millisecond
	b, tok := faultBackend(t, newFaultModule(), options{recoverBackoff: time.Millisecond, recheck: recheck})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	tok.wipe(t)
	time.Sleep(recheck + 10*time.Millisecond)
	for i := range 3 {
		if _, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256); !errors.Is(err, keystore.ErrKeyLost) {
			t.Fatalf("Sign #%d %v after the wipe = %v; want ErrKeyLost", i, recheck, err)
		}
	}
}

// P1, a key this Backend never saw: after a restart (a new Backend), a wiped
// token gives ErrNotFound, which keyd's rotation layer turns into a lost key.
func TestTokenWipedUnknownKey(t *testing.T) {
	checkGoroutines(t)
	tok := newToken(t)
	b := openBackend(t, tok.config(t), options{})
	keystoretest.MustGenerate(t, b, "k")
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	b = openBackend(t, tok.config(t), options{})
	tok.wipe(t)
	if _, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Sign = %v; want ErrNotFound", err)
	}
	if err := b.Health(t.Context()); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("Health = %v; want ErrUnavailable", err)
	}
}

// A key destroyed behind keyd's back (another tool) is lost, not replaced:
// its session copy signs until keyd looks at the token object again
// (recheck), then Sign fails with ErrKeyLost and the copy is destroyed.
func TestKeyDestroyedElsewhere(t *testing.T) {
	checkGoroutines(t)
	const recheck = 50 * time.Millisecond
	tok := newToken(t)
	b := openBackend(t, tok.config(t), options{recheck: recheck})
	pub := keystoretest.MustGenerate(t, b, "k")
	keep := keystoretest.MustGenerate(t, b, "keep")
	signOK(t, b, "k", pub)
	h := rawSession(t, b)
	defer b.lib.ctx.CloseSession(h)
	if n := len(rawCopies(t, b, h, "k")); n != 1 {
		t.Fatalf("%d session copies of k after signing; want 1", n)
	}
	for _, o := range rawFind(t, b, h, "k", p11.CKO_PRIVATE_KEY) {
		if err := b.lib.ctx.DestroyObject(h, o); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(recheck + 10*time.Millisecond)
	if _, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256); !errors.Is(err, keystore.ErrKeyLost) {
		t.Errorf("Sign %v after the destroy = %v; want ErrKeyLost", recheck, err)
	}
	if n := len(rawCopies(t, b, h, "k")); n != 0 {
		t.Errorf("%d session copies of k after it was found lost; want 0", n)
	}
	keyIntact(t, b, "keep", keep)
	if err := b.Health(t.Context()); err != nil {
		t.Errorf("Health: %v", err)
	}
}

// P2, for real: the module is finalized and initialized again behind the
// Backend's back (an HSM restart), so every session and handle it holds is
// stale. The next Sign recovers transparently: a new anchor, one login,
// handles found again by CKA_ID. Then the module is only finalized: the
// Backend initializes it again itself.
func TestModuleReinitialized(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)

	raw := b.lib.ctx
	if err := raw.Finalize(); err != nil {
		t.Fatal(err)
	}
	if err := raw.Initialize(); err != nil {
		t.Fatal(err)
	}
	signOK(t, b, "k", pub)
	if n := f.logins.Load(); n != 2 {
		t.Errorf("%d C_Login calls after one re-initialization; want 2", n)
	}

	if err := raw.Finalize(); err != nil {
		t.Fatal(err)
	}
	signOK(t, b, "k", pub)
	if n := f.logins.Load(); n != 3 {
		t.Errorf("%d C_Login calls after the second recovery; want 3", n)
	}
	keyIntact(t, b, "k", pub)
	if err := b.Health(t.Context()); err != nil {
		t.Errorf("Health: %v", err)
	}
}

// P2 under load: signers keep going while another Backend in the process
// re-initializes the module under them (through the registry, as every
// re-initialization in the process does). Each call either succeeds or, at
// worst, fails with ErrUnavailable — never a false ErrKeyLost or
// ErrNotFound, although SoftHSM hands out the same session handle numbers
// again after C_Initialize; recoveries are shared (a handful of logins, not
// one per caller); afterwards everything works.
func TestConcurrentRecovery(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{recoverBackoff: 20 * time.Millisecond})
	pub := keystoretest.MustGenerate(t, b, "k")
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var ok, unavailable atomic.Int32
	for range 8 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				err := signVerify(t.Context(), b, "k", pub)
				switch {
				case err == nil:
					ok.Add(1)
				case errors.Is(err, keystore.ErrUnavailable):
					unavailable.Add(1)
				default:
					t.Errorf("Sign during re-initialization: %v", err)
					return
				}
			}
		})
	}
	for range 3 {
		time.Sleep(20 * time.Millisecond)
		b.lib.mu.Lock()
		seen := b.lib.gen
		b.lib.mu.Unlock()
		if _, err := b.lib.reinitialize(b.lib.ctx, seen, 5*time.Second); err != nil {
			t.Error(err)
		}
	}
	time.Sleep(20 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("%d signatures, %d ErrUnavailable, %d logins", ok.Load(), unavailable.Load(), f.logins.Load())
	if n := f.logins.Load(); n > 1+3*2 {
		t.Errorf("%d C_Login calls for 3 re-initializations; recoveries are not shared", n)
	}
	// A recovery whose retry met the next re-initialization holds the
	// following one off for recoverBackoff: wait that out.
	time.Sleep(30 * time.Millisecond)
	keyIntact(t, b, "k", pub)
}

// P2 with the module re-initialized by another part of the process, which
// logged in again: this Backend's next calls run on sessions opened after
// the re-initialization, which are logged in and work, so no error ever
// tells it to recover. Its cached object handles are from before, and
// SoftHSM numbers handles afresh after C_Initialize, in the order objects
// are touched: here k2's public and private objects are touched first, so
// k1's old private handle now names k2's private key. Every signature must
// still come from a handle found since the re-initialization, and verify.
func TestCachedHandleAfterReinitElsewhere(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, tok := faultBackend(t, f, options{})
	f.trackHandles(func() uint64 { return b.lib.gen })
	pubs := map[string]crypto.PublicKey{}
	for _, id := range []string{"k1", "k2"} {
		pubs[id] = keystoretest.MustGenerate(t, b, id)
	}
	for _, id := range []string{"k1", "k2"} {
		signOK(t, b, id, pubs[id])
	}
	b.lib.mu.Lock()
	seen := b.lib.gen
	b.lib.mu.Unlock()
	if _, err := b.lib.reinitialize(b.lib.ctx, seen, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	h := rawSession(t, b)
	if err := b.lib.ctx.Login(h, p11.CKU_USER, tok.config(t).PIN.s); err != nil {
		t.Fatal(err)
	}
	rawFind(t, b, h, "k2", p11.CKO_PUBLIC_KEY)
	rawFind(t, b, h, "k2", p11.CKO_PRIVATE_KEY)
	b.drainIdle() // the next calls open sessions of the new generation
	for range 3 {
		for _, id := range []string{"k1", "k2"} {
			if err := signVerify(t.Context(), b, id, pubs[id]); err != nil {
				t.Errorf("after the re-initialization elsewhere: %v", err)
			}
		}
	}
	for _, s := range f.staleUses() {
		t.Error(s)
	}
	_ = b.lib.ctx.CloseSession(h)
}

// Stale session handles, for real: the pool's idle sessions are closed
// behind the Backend's back (CKR_SESSION_HANDLE_INVALID on next use); then
// every session of the application is closed, which also logs out.
func TestStaleSessions(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)

	var idle []*session
	for len(b.idle) > 0 {
		idle = append(idle, <-b.idle)
	}
	if len(idle) == 0 {
		t.Fatal("no idle session in the pool")
	}
	for _, s := range idle {
		if err := b.lib.ctx.CloseSession(s.h); err != nil {
			t.Fatal(err)
		}
		b.idle <- s
	}
	signOK(t, b, "k", pub)
	if n := f.logins.Load(); n != 1 {
		t.Errorf("%d C_Login calls; want 1 (the anchor kept the login)", n)
	}

	b.mu.RLock()
	slot := b.slot
	b.mu.RUnlock()
	if err := b.lib.ctx.CloseAllSessions(slot); err != nil {
		t.Fatal(err)
	}
	signOK(t, b, "k", pub)
	if n := f.logins.Load(); n != 2 {
		t.Errorf("%d C_Login calls; want 2 (one after all sessions were closed)", n)
	}
	keyIntact(t, b, "k", pub)
}

// P2 and subtle bug 1, injected: each session-class or device code makes the
// Backend evict the session, recover and retry once. Once: the call succeeds.
// Always: ErrUnavailable after exactly two attempts, Health NOT_SERVING; once
// the fault clears, the next call works and Health is fine again.
func TestRecoverInjected(t *testing.T) {
	codes := map[string]uint{
		"CKR_SESSION_HANDLE_INVALID":   p11.CKR_SESSION_HANDLE_INVALID,
		"CKR_SESSION_CLOSED":           p11.CKR_SESSION_CLOSED,
		"CKR_USER_NOT_LOGGED_IN":       p11.CKR_USER_NOT_LOGGED_IN,
		"CKR_OBJECT_HANDLE_INVALID":    p11.CKR_OBJECT_HANDLE_INVALID,
		"CKR_DEVICE_REMOVED":           p11.CKR_DEVICE_REMOVED,
		"CKR_TOKEN_NOT_PRESENT":        p11.CKR_TOKEN_NOT_PRESENT,
		"CKR_CRYPTOKI_NOT_INITIALIZED": p11.CKR_CRYPTOKI_NOT_INITIALIZED,
	}
	for name, c := range codes {
		t.Run(name, func(t *testing.T) {
			checkGoroutines(t)
			f := newFaultModule()
			b, _ := faultBackend(t, f, options{recoverBackoff: 50 * time.Millisecond})
			pub := keystoretest.MustGenerate(t, b, "k")
			signOK(t, b, "k", pub)

			f.set("Sign", times(1, c))
			before := f.signs.Load()
			signOK(t, b, "k", pub)
			if n := f.signs.Load() - before; n != 2 {
				t.Errorf("%d C_Sign calls for one fault; want 2 (retry once)", n)
			}

			f.set("Sign", always(c))
			before = f.signs.Load()
			_, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256)
			if !errors.Is(err, keystore.ErrUnavailable) || !isCode(err, c) {
				t.Fatalf("Sign with a lasting %s = %v; want ErrUnavailable carrying the code", name, err)
			}
			if n := f.signs.Load() - before; n != 2 {
				t.Errorf("%d C_Sign calls; want 2 (one retry, no loop)", n)
			}
			if err := b.Health(t.Context()); !errors.Is(err, keystore.ErrUnavailable) {
				t.Errorf("Health after the failure = %v; want ErrUnavailable", err)
			}
			logins := f.logins.Load()
			if logins > 3 {
				t.Errorf("%d C_Login calls for two recoveries", logins)
			}

			f.clear()
			keyIntact(t, b, "k", pub)
			if err := b.Health(t.Context()); err != nil {
				t.Errorf("Health after the fault cleared: %v", err)
			}
		})
	}
}

// P2 on the other paths: a lasting fault in C_OpenSession, C_FindObjectsInit,
// C_GetSessionInfo or C_GenerateKeyPair also ends in ErrUnavailable, and the
// key survives.
func TestRecoverInjectedOtherCalls(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{recoverBackoff: time.Millisecond})
	pub := keystoretest.MustGenerate(t, b, "k")
	for _, call := range []string{"OpenSession", "FindObjectsInit", "GetSessionInfo"} {
		f.set(call, always(p11.CKR_SESSION_HANDLE_INVALID))
		b.mu.Lock()
		clear(b.cache) // make Sign look the key up
		b.mu.Unlock()
		b.drainIdle()
		var err error
		if call == "GetSessionInfo" {
			_, err = b.List(t.Context()) // Sign of a key it finds needs no session info
		} else {
			_, err = b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256)
		}
		if !errors.Is(err, keystore.ErrUnavailable) {
			t.Errorf("call with %s failing = %v; want ErrUnavailable", call, err)
		}
		f.clear()
		time.Sleep(2 * time.Millisecond) // past the recovery backoff
		keyIntact(t, b, "k", pub)
	}
	f.set("GenerateKeyPair", always(p11.CKR_DEVICE_ERROR))
	if _, err := b.Generate(t.Context(), "k2", keystore.KeySpec{Algorithm: keystore.ES256}); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("Generate with C_GenerateKeyPair failing = %v; want ErrUnavailable", err)
	}
	f.clear()
	time.Sleep(2 * time.Millisecond)
	keyIntact(t, b, "k", pub)
	if _, err := b.Generate(t.Context(), "k2", keystore.KeySpec{Algorithm: keystore.ES256}); err != nil {
		t.Errorf("Generate after the fault cleared: %v", err)
	}
}

// P2: a failed recovery is not retried at once: callers in the next second
// get ErrUnavailable without touching the device again.
func TestRecoverBackoff(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{recoverBackoff: time.Hour})
	pub := keystoretest.MustGenerate(t, b, "k")
	f.set("Sign", always(p11.CKR_DEVICE_REMOVED))
	f.set("OpenSession", always(p11.CKR_DEVICE_REMOVED)) // the anchor cannot come back
	if _, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256); !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("Sign = %v; want ErrUnavailable", err)
	}
	opens := f.opens.Load()
	for range 20 {
		if _, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256); !errors.Is(err, keystore.ErrUnavailable) {
			t.Fatalf("Sign = %v; want ErrUnavailable", err)
		}
	}
	if n := f.opens.Load() - opens; n > 20 {
		t.Errorf("%d C_OpenSession calls for 20 Signs during the backoff; want at most one each (no recovery storm)", n)
	}
	if err := b.Health(t.Context()); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("Health = %v; want ErrUnavailable", err)
	}
	f.clear()
	b.dev.Lock()
	b.opts.recoverBackoff = 0
	b.lastFail = time.Time{}
	b.dev.Unlock()
	keyIntact(t, b, "k", pub)
}

// P3, for real: a wrong PIN. New makes exactly one C_Login and returns a
// locked Backend; every call and Health fail with ErrLocked
// (FAILED_PRECONDITION) and none calls C_Login again.
func TestWrongPIN(t *testing.T) {
	checkGoroutines(t)
	tok := newToken(t)
	f := newFaultModule()
	cfg := tok.config(t)
	cfg.PIN = PIN{s: "9999"}
	b := openBackend(t, cfg, f.options(options{}))
	ctx := t.Context()
	var errs []error
	_, err := b.Generate(ctx, "k", keystore.KeySpec{Algorithm: keystore.ES256})
	errs = append(errs, err)
	_, err = b.Sign(ctx, "k", make([]byte, 32), crypto.SHA256)
	errs = append(errs, err)
	_, err = b.Public(ctx, "k")
	errs = append(errs, err)
	_, err = b.List(ctx)
	errs = append(errs, err, b.Destroy(ctx, "k"), b.Health(ctx), b.Health(ctx))
	for i, err := range errs {
		if !errors.Is(err, keystore.ErrLocked) {
			t.Errorf("call %d = %v; want ErrLocked", i, err)
		}
	}
	if msg := errs[1].Error(); !strings.Contains(msg, "CKR_PIN_INCORRECT") || !strings.Contains(msg, "restart") || strings.Contains(msg, "9999") {
		t.Errorf("locked error %q should name CKR_PIN_INCORRECT, say to restart and not show the PIN", msg)
	}
	if n := f.logins.Load(); n != 1 {
		t.Errorf("%d C_Login calls; want exactly 1", n)
	}
}

// The locked error says where the refused PIN came from, so the operator
// fixes the right thing: here an environment variable, not a pin_file.
func TestWrongPINNamesItsSource(t *testing.T) {
	tok := newToken(t)
	t.Setenv("KEYD_TEST_WRONG_PIN", "9999")
	pin, err := PINFromEnv("KEYD_TEST_WRONG_PIN")
	if err != nil {
		t.Fatal(err)
	}
	cfg := tok.config(t)
	cfg.PIN = pin
	b := openBackend(t, cfg, newFaultModule().options(options{}))
	err = b.Health(t.Context())
	if !errors.Is(err, keystore.ErrLocked) {
		t.Fatalf("Health = %v; want ErrLocked", err)
	}
	if msg := err.Error(); !strings.Contains(msg, "environment variable KEYD_TEST_WRONG_PIN") || strings.Contains(msg, "pin_file") || strings.Contains(msg, "9999") {
		t.Errorf("locked error %q should name the environment variable KEYD_TEST_WRONG_PIN (not pin_file) and not show the PIN", msg)
	}
	if n := strings.Count(err.Error(), "CKR_PIN_INCORRECT"); n != 1 {
		t.Errorf("locked error %q names CKR_PIN_INCORRECT %d times; want once", err, n)
	}
}

// P3, injected: a token that says its PIN is locked or expired, or that
// refuses the login with a code that says nothing (a module may report a
// wrong PIN so): one C_Login, then locked.
func TestPINLockedInjected(t *testing.T) {
	for name, c := range map[string]uint{"CKR_PIN_LOCKED": p11.CKR_PIN_LOCKED, "CKR_PIN_EXPIRED": p11.CKR_PIN_EXPIRED,
		"CKR_FUNCTION_FAILED": p11.CKR_FUNCTION_FAILED, "CKR_GENERAL_ERROR": p11.CKR_GENERAL_ERROR} {
		t.Run(name, func(t *testing.T) {
			checkGoroutines(t)
			f := newFaultModule()
			f.set("Login", always(c))
			b, _ := faultBackend(t, f, options{})
			for range 3 {
				if _, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256); !errors.Is(err, keystore.ErrLocked) {
					t.Errorf("Sign = %v; want ErrLocked", err)
				}
			}
			if err := b.Health(t.Context()); !errors.Is(err, keystore.ErrLocked) || !strings.Contains(err.Error(), name) {
				t.Errorf("Health = %v; want ErrLocked naming %s", err, name)
			}
			if n := f.logins.Load(); n != 1 {
				t.Errorf("%d C_Login calls; want 1", n)
			}
		})
	}
}

// P3 + P4: the PIN changes on the HSM while keyd runs and the login is lost
// (a logout elsewhere). The recovery tries the PIN once, the token refuses
// it, and the Backend locks: two C_Login calls in all, however many calls
// follow.
func TestPINChangedWhileRunning(t *testing.T) {
	for name, c := range map[string]uint{"CKR_PIN_INCORRECT": p11.CKR_PIN_INCORRECT, "CKR_FUNCTION_FAILED": p11.CKR_FUNCTION_FAILED} {
		t.Run(name, func(t *testing.T) { pinChangedWhileRunning(t, c) })
	}
}

func pinChangedWhileRunning(t *testing.T, refusal uint) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{recoverBackoff: time.Millisecond})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)

	h := rawSession(t, b)
	if err := b.lib.ctx.Logout(h); err != nil {
		t.Fatal(err)
	}
	f.set("Login", always(refusal))
	for range 5 {
		if _, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256); !errors.Is(err, keystore.ErrLocked) {
			t.Fatalf("Sign = %v; want ErrLocked", err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	if err := b.Health(t.Context()); !errors.Is(err, keystore.ErrLocked) {
		t.Errorf("Health = %v; want ErrLocked", err)
	}
	if n := f.logins.Load(); n != 2 {
		t.Errorf("%d C_Login calls; want 2 (start, one recovery)", n)
	}
	if err := b.lib.ctx.CloseSession(h); err != nil {
		t.Fatal(err)
	}
}

// P4, for real: another part of the application logs in (already logged in
// is success) and logs out. The next calls log in again once, find the
// handles again (the old ones stay invalid after a new login) and succeed;
// List does not report an empty token while logged out.
func TestLogoutElsewhere(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, tok := faultBackend(t, f, options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)

	h := rawSession(t, b)
	if err := b.lib.ctx.Login(h, p11.CKU_USER, testUserPIN); !isCode(err, p11.CKR_USER_ALREADY_LOGGED_IN) {
		t.Fatalf("second login = %v; want CKR_USER_ALREADY_LOGGED_IN", err)
	}
	if err := b.lib.ctx.Logout(h); err != nil {
		t.Fatal(err)
	}
	ids, err := b.List(t.Context())
	if err != nil || len(ids) != 1 {
		t.Fatalf("List after a logout elsewhere = %q, %v; want [k]", ids, err)
	}
	signOK(t, b, "k", pub)
	if n := f.logins.Load(); n != 2 {
		t.Errorf("%d C_Login calls; want 2", n)
	}
	if err := b.lib.ctx.CloseSession(h); err != nil {
		t.Fatal(err)
	}

	// A second Backend on the same token in the same process shares the
	// module and the login (CKR_USER_ALREADY_LOGGED_IN is success).
	b2 := openBackend(t, tok.config(t), options{})
	signOK(t, b2, "k", pub)
	if err := b2.Close(); err != nil {
		t.Fatal(err)
	}
	keyIntact(t, b, "k", pub)
}

// P6: many concurrent callers (RELIABILITY.md's 500) and a pool of four
// sessions. Every call succeeds, at most four are ever inside C_Sign, and
// no more than the pool and the anchor are ever opened. Then, with the
// device slow, callers whose deadline passes while they wait for a session
// get DeadlineExceeded.
func TestSessionPoolBounded(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	tok := newToken(t)
	cfg := tok.config(t)
	cfg.MaxSessions = 4
	b := openBackend(t, cfg, f.options(options{}))
	pub := keystoretest.MustGenerate(t, b, "k")
	opens := f.opens.Load()

	var wg sync.WaitGroup
	for range 500 {
		wg.Go(func() {
			for range 2 {
				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				err := signVerify(ctx, b, "k", pub)
				cancel()
				if err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if n := f.maxInSign.Load(); n > 4 {
		t.Errorf("%d calls inside C_Sign at once; want at most 4 (MaxSessions)", n)
	}
	if n := f.opens.Load(); n > 5 {
		t.Errorf("%d C_OpenSession calls (%d before the load); want at most 5 (anchor + pool of 4)", n, opens)
	}

	release := make(chan struct{})
	f.mu.Lock()
	f.block = release
	f.mu.Unlock()
	var timedOut atomic.Int32
	for range 32 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
			defer cancel()
			_, err := b.Sign(ctx, "k", keystoretest.Digest(keystore.ES256, []byte("m")), crypto.SHA256)
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Sign with the device blocked = %v; want DeadlineExceeded", err)
			}
			timedOut.Add(1)
		})
	}
	wg.Wait()
	f.mu.Lock()
	f.block = nil
	f.mu.Unlock()
	close(release)
	waitIdle(t, b)
	if n := f.opens.Load(); n > 5 {
		t.Errorf("%d C_OpenSession calls; want at most 5", n)
	}
	keyIntact(t, b, "k", pub)

	// CKR_SESSION_COUNT from the token (another application took the
	// sessions) is ErrUnavailable, without a recovery.
	b.drainIdle()
	f.set("OpenSession", always(p11.CKR_SESSION_COUNT))
	logins := f.logins.Load()
	if _, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256); !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("Sign with CKR_SESSION_COUNT = %v; want ErrUnavailable", err)
	}
	if f.logins.Load() != logins {
		t.Error("CKR_SESSION_COUNT caused a login")
	}
	f.clear()
}

// P7: the HSM hangs inside C_Sign. Callers return at their deadline with
// DeadlineExceeded; only the pool's two calls are inside the module, so the
// OS thread count stays bounded however many callers come; Health reports
// the hang; when the device answers again the stuck calls finish, the
// goroutines go back to baseline and signing works.
func TestHungDevice(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{hangAfter: 100 * time.Millisecond})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	threadsBefore := threads(t)

	release := make(chan struct{})
	f.mu.Lock()
	f.block = release
	f.mu.Unlock()
	// RELIABILITY.md's 10 000 requests, in waves of 2 000 concurrent
	// callers (the race detector allows 8 128 live goroutines).
	const callers, wave = 10000, 2000
	maxThreads := 0
	var failed atomic.Int32
	for w := range callers / wave {
		var wg sync.WaitGroup
		start := time.Now()
		for range wave {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
				defer cancel()
				_, err := b.Sign(ctx, "k", keystoretest.Digest(keystore.ES256, []byte("m")), crypto.SHA256)
				if !errors.Is(err, context.DeadlineExceeded) && failed.Add(1) <= 3 {
					t.Errorf("Sign with the device hung = %v; want DeadlineExceeded", err)
				}
			})
		}
		maxThreads = max(maxThreads, threads(t))
		wg.Wait()
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("wave %d: callers took %v to return; their deadline was 100ms", w, d)
		}
	}
	if n := failed.Load(); n > 0 {
		t.Errorf("%d of %d callers did not get DeadlineExceeded", n, callers)
	}
	if maxThreads > threadsBefore+4 {
		t.Errorf("%d OS threads while callers waited on the hung device, %d before: not bounded by the pool", maxThreads, threadsBefore)
	}
	if n := f.inSign.Load(); n != 2 {
		t.Errorf("%d calls inside C_Sign; want 2 (the pool)", n)
	}
	if n := threads(t); n > threadsBefore+4 {
		t.Errorf("%d OS threads with the device hung, %d before: not bounded by the pool", n, threadsBefore)
	} else {
		t.Logf("%d callers, device hung: %d OS threads (%d before, at most %d while they waited), %d calls in the module", callers, n, threadsBefore, maxThreads, f.inSign.Load())
	}
	time.Sleep(150 * time.Millisecond)
	if err := b.Health(t.Context()); !errors.Is(err, keystore.ErrUnavailable) || !strings.Contains(err.Error(), "running for") {
		t.Errorf("Health with the device hung = %v; want ErrUnavailable saying a call is running", err)
	}

	f.mu.Lock()
	f.block = nil
	f.mu.Unlock()
	close(release)
	waitIdle(t, b)
	keyIntact(t, b, "k", pub)
	if err := b.Health(t.Context()); err != nil {
		t.Errorf("Health after the device answered: %v", err)
	}
}

// P7: Close with a call hung in the device does not finalize the module
// under it (undefined behaviour) and says so, within its wait.
func TestCloseWithHungCall(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	tok := newToken(t)
	b, err := open(t.Context(), tok.config(t), f.options(options{closeWait: 100 * time.Millisecond}))
	if err != nil {
		t.Fatal(err)
	}
	pub := keystoretest.MustGenerate(t, b, "k")
	release := make(chan struct{})
	f.mu.Lock()
	f.block = release
	f.mu.Unlock()
	done := make(chan error, 1)
	go func() { done <- signVerify(context.Background(), b, "k", pub) }()
	for f.inSign.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	if err := b.Close(); err == nil || !strings.Contains(err.Error(), "not finalized") {
		t.Errorf("Close with a hung call = %v; want an error saying the module was not finalized", err)
	}
	close(release)
	<-done
	// The module is still initialized (users = 1); finalize it as keyd's
	// process exit would, so the next test starts clean.
	if err := b.lib.release(b.m, time.Second); err != nil {
		t.Error(err)
	}
}

// P15: the mechanism probe. A token without CKM_EDDSA does not list EdDSA,
// and Generate of an EdDSA key fails at once with ErrUnsupportedAlgorithm
// naming the mechanism (key-set creation, never the first Sign); a token
// whose RSA keys stop at 2048 bits refuses 3072. Without CKM_RSA_PKCS_PSS,
// PS256 is refused at Generate and a PSS Sign with an RSA key is refused
// before the token sees it.
func TestMechanismProbe(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	f.noMech[ckmEdDSA] = true
	f.noMech[p11.CKM_RSA_PKCS_PSS] = true
	f.info[p11.CKM_RSA_PKCS_KEY_PAIR_GEN] = p11.MechanismInfo{MinKeySize: 1024, MaxKeySize: 2048, Flags: p11.CKF_GENERATE_KEY_PAIR}
	b, _ := faultBackend(t, f, options{})
	want := []keystore.Algorithm{keystore.ES256, keystore.ES384, keystore.RS256}
	if got := b.Algorithms(); !equalAlgs(got, want) {
		t.Errorf("Algorithms() = %v, want %v", got, want)
	}
	for _, tt := range []struct {
		spec keystore.KeySpec
		want string
	}{
		{keystore.KeySpec{Algorithm: keystore.EdDSA}, "CKM_EDDSA"},
		{keystore.KeySpec{Algorithm: keystore.PS256}, "CKM_RSA_PKCS_PSS"},
		{keystore.KeySpec{Algorithm: keystore.RS256, RSABits: 3072}, "1024 to 2048 bits"},
	} {
		_, err := b.Generate(t.Context(), "k", tt.spec)
		if !errors.Is(err, keystore.ErrUnsupportedAlgorithm) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Generate(%v) = %v; want ErrUnsupportedAlgorithm mentioning %s", tt.spec, err, tt.want)
		}
	}
	if ids, err := b.List(t.Context()); err != nil || len(ids) != 0 {
		t.Errorf("List = %q, %v; a refused Generate left a key", ids, err)
	}
	pub, err := b.Generate(t.Context(), "rsa", keystore.KeySpec{Algorithm: keystore.RS256})
	if err != nil {
		t.Fatal(err)
	}
	d := keystoretest.Digest(keystore.PS256, []byte("m"))
	signs := f.signs.Load()
	if _, err := b.Sign(t.Context(), "rsa", d, keystore.PS256.SignerOpts()); !errors.Is(err, keystore.ErrUnsupportedAlgorithm) {
		t.Errorf("PS256 Sign on a token without PSS = %v; want ErrUnsupportedAlgorithm", err)
	}
	if f.signs.Load() != signs {
		t.Error("the refused PS256 Sign reached C_Sign")
	}
	sig, err := b.Sign(t.Context(), "rsa", d, crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := keystoretest.VerifyDER(keystore.RS256, pub, d, sig); err != nil {
		t.Error(err)
	}
}

// P12 through the token: ES256 and ES384 signatures from SoftHSM (raw r||s
// converted to DER) verify, including those whose r or s has a leading zero
// byte (about one in 128 of each size), with enough rounds to be sure to
// meet some; those are also converted back to a JWS's padded r‖s, which
// must verify.
func TestECDSAManySignatures(t *testing.T) {
	checkGoroutines(t)
	tok := newToken(t)
	b := openBackend(t, tok.config(t), options{})
	for _, alg := range []keystore.Algorithm{keystore.ES256, keystore.ES384} {
		pub, err := b.Generate(t.Context(), "k-"+strings.ToLower(string(alg)), keystore.KeySpec{Algorithm: alg})
		if err != nil {
			t.Fatal(err)
		}
		short := 0
		const rounds = 2000
		size := alg.Hash().Size()
		for i := range rounds {
			d := keystoretest.Digest(alg, fmt.Appendf(nil, "m%d", i))
			sig, err := b.Sign(t.Context(), "k-"+strings.ToLower(string(alg)), d, alg.SignerOpts())
			if err != nil {
				t.Fatal(err)
			}
			if err := keystoretest.VerifyDER(alg, pub, d, sig); err != nil {
				t.Fatalf("%s round %d: %v", alg, i, err)
			}
			var rs struct{ R, S *big.Int }
			if _, err := asn1.Unmarshal(sig, &rs); err != nil {
				t.Fatal(err)
			}
			if rs.R.BitLen() <= 8*(size-1) || rs.S.BitLen() <= 8*(size-1) {
				short++
				// What a JWS carries: r‖s, each left-padded to the
				// curve's size, which must verify as such.
				raw, err := ecdsasig.Raw(sig, size)
				if err != nil || len(raw) != 2*size {
					t.Fatalf("%s round %d: r‖s of %d bytes, %v; want %d", alg, i, len(raw), err, 2*size)
				}
				r, s := new(big.Int).SetBytes(raw[:size]), new(big.Int).SetBytes(raw[size:])
				if !ecdsa.Verify(pub.(*ecdsa.PublicKey), d, r, s) {
					t.Fatalf("%s round %d: the padded r‖s does not verify", alg, i)
				}
			}
		}
		t.Logf("%s: %d of %d signatures had an r or s with a leading zero byte", alg, short, rounds)
		if short == 0 {
			// About 16 expected (2 in 256 per signature): none means the
			// test no longer sees them.
			t.Errorf("%s: no r or s with a leading zero byte in %d signatures", alg, rounds)
		}
	}
}

// P5: C_Logout is no authorization boundary: on SoftHSM 2.6 a C_Sign that
// was initialized before a logout (by any part of the application) still
// returns a signature. keyd never logs out to withhold signatures (the
// module interface it calls through has no Logout at all); revocation is
// enforced above the backend, which discards a signature made with a key
// revoked mid-sign (internal/server TestRevokedWhileSigningIsDiscarded).
func TestLogoutIsNoBoundary(t *testing.T) {
	checkGoroutines(t)
	if _, ok := reflect.TypeFor[module]().MethodByName("Logout"); ok {
		t.Error("the module interface has Logout: keyd must not use C_Logout as a boundary")
	}
	srcs, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range srcs {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte(".Logout(")) {
			t.Errorf("%s calls Logout", f)
		}
	}

	// What a token does with a sign in flight across a logout, for real.
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	a, other := rawSession(t, b), rawSession(t, b)
	defer b.lib.ctx.CloseSession(a)
	defer b.lib.ctx.CloseSession(other)
	priv := rawFind(t, b, a, "k", p11.CKO_PRIVATE_KEY)
	if len(priv) != 1 {
		t.Fatalf("found %d private keys", len(priv))
	}
	d := keystoretest.Digest(keystore.ES256, []byte("in flight across a logout"))
	if err := b.lib.ctx.SignInit(a, []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA, nil)}, priv[0]); err != nil {
		t.Fatal(err)
	}
	if err := b.lib.ctx.Logout(other); err != nil {
		t.Fatal(err)
	}
	raw, err := b.lib.ctx.Sign(a, d)
	if err != nil {
		t.Logf("this module refuses a sign in flight after a logout (%v); keyd does not depend on it either way", err)
	} else {
		der, err := ecdsaDER(raw, 32)
		if err == nil {
			err = keystoretest.VerifyDER(keystore.ES256, pub, d, der)
		}
		if err != nil {
			t.Fatalf("signature after the logout: %v", err)
		}
		t.Log("the module signed after the logout: a logout does not stop a signature in flight")
	}
	// keyd logs in again by itself (P4) and goes on signing.
	signOK(t, b, "k", pub)
}

// copyPublicObject creates, in a raw session, a token public key object
// with key id's CKA_ID, EC parameters and point, labelled label: what
// `pkcs11-tool --write-object --type pubkey --id …` leaves on a token.
func copyPublicObject(t *testing.T, b *Backend, h p11.SessionHandle, id, label string) {
	t.Helper()
	ctx := b.lib.ctx
	pubs := rawFind(t, b, h, id, p11.CKO_PUBLIC_KEY)
	if len(pubs) != 1 {
		t.Fatalf("%d public objects labelled %q", len(pubs), labelPrefix+id)
	}
	a, err := ctx.GetAttributeValue(h, pubs[0], []*p11.Attribute{
		p11.NewAttribute(p11.CKA_ID, nil), p11.NewAttribute(p11.CKA_EC_PARAMS, nil), p11.NewAttribute(p11.CKA_EC_POINT, nil),
	})
	if err != nil {
		t.Fatal(err)
	}
	tmpl := []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PUBLIC_KEY), p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_EC),
		p11.NewAttribute(p11.CKA_TOKEN, true), p11.NewAttribute(p11.CKA_VERIFY, true),
		a[0], a[1], a[2],
	}
	if label != "" {
		tmpl = append(tmpl, p11.NewAttribute(p11.CKA_LABEL, label))
	}
	if _, err := ctx.CreateObject(h, tmpl); err != nil {
		t.Fatalf("C_CreateObject: %v", err)
	}
}

// forgetHandles empties b's handle cache, so the next call finds the key
// on the token again, as a new Backend would.
func forgetHandles(b *Backend) {
	b.mu.Lock()
	clear(b.cache)
	b.mu.Unlock()
}

// P1, P10: another public key object with the key's CKA_ID (a tool's
// convention) is not keyd's and does not make the key lost; two public
// objects with keyd's label are an error keyd will not guess through, but
// not a lost key either (the rotation layer records a lost key for good);
// only the public object gone, seen twice, is ErrKeyLost.
func TestForeignPublicObject(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	h := rawSession(t, b)
	defer b.lib.ctx.CloseSession(h)

	copyPublicObject(t, b, h, "k", "")
	copyPublicObject(t, b, h, "k", "imported by a tool")
	forgetHandles(b)
	keyIntact(t, b, "k", pub)

	copyPublicObject(t, b, h, "k", labelPrefix+"k")
	forgetHandles(b)
	err := signVerify(t.Context(), b, "k", pub)
	if err == nil || errors.Is(err, keystore.ErrKeyLost) || !strings.Contains(err.Error(), "several public key objects") {
		t.Errorf("Sign with two public objects labelled keyd:k: %v; want an error naming them, not ErrKeyLost", err)
	}

	for _, o := range rawFind(t, b, h, "k", p11.CKO_PUBLIC_KEY) {
		if err := b.lib.ctx.DestroyObject(h, o); err != nil {
			t.Fatal(err)
		}
	}
	forgetHandles(b)
	if err := signVerify(t.Context(), b, "k", pub); !errors.Is(err, keystore.ErrKeyLost) {
		t.Errorf("Sign with keyd's public object gone: %v, want ErrKeyLost", err)
	}
}

// P10: Generate's second attempt (after a dead session) looks for the key
// the first one may have made. A stale handle there is no proof that the
// objects labelled keyd:<id> are someone else's: the call fails with
// ErrUnavailable (retryable), not ErrAlreadyExists.
func TestGenerateAdoptStaleHandle(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	// The first GetAttributeValue (reading the new public key) meets a
	// dead session; on the second attempt both objects' CKA_ID reads
	// meet stale handles.
	f.set("GetAttributeValue", sequence(p11.CKR_SESSION_HANDLE_INVALID, p11.CKR_OBJECT_HANDLE_INVALID, p11.CKR_OBJECT_HANDLE_INVALID))
	_, err := b.Generate(t.Context(), "k", keystore.KeySpec{Algorithm: keystore.ES256})
	if !errors.Is(err, keystore.ErrUnavailable) || errors.Is(err, keystore.ErrAlreadyExists) {
		t.Fatalf("Generate with stale handles on its second attempt: %v, want ErrUnavailable", err)
	}
	f.clear()
	pub := keystoretest.MustGenerate(t, b, "k2")
	keyIntact(t, b, "k2", pub)
}

// P2, P3: the anchor session dies and, by the time keyd opens a new one,
// another token sits in the slot (same label, another serial: a token
// swapped in its reader). keyd must not send its PIN there: the recovery
// fails with ErrUnavailable naming both serials, without a C_Login; with
// keyd's token back, keyd signs again.
func TestTokenSwappedInSlot(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{recoverBackoff: time.Millisecond})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	logins := f.logins.Load()

	f.mu.Lock()
	f.tokenInfo = func(ti p11.TokenInfo) p11.TokenInfo {
		ti.SerialNumber = "0123456789abcdef"
		return ti
	}
	f.mu.Unlock()
	f.set("GetSessionInfo", always(p11.CKR_SESSION_HANDLE_INVALID))
	f.set("Sign", times(1, p11.CKR_SESSION_HANDLE_INVALID))
	err := signVerify(t.Context(), b, "k", pub)
	if !errors.Is(err, keystore.ErrUnavailable) || !strings.Contains(err.Error(), "0123456789abcdef") {
		t.Errorf("Sign with another token in the slot: %v; want ErrUnavailable naming its serial", err)
	}
	if n := f.logins.Load(); n != logins {
		t.Errorf("%d C_Login calls with another token in the slot; want none", n-logins)
	}

	f.mu.Lock()
	f.tokenInfo = nil
	f.mu.Unlock()
	f.clear()
	time.Sleep(2 * time.Millisecond)
	keyIntact(t, b, "k", pub)
	if n := f.logins.Load(); n > logins+1 {
		t.Errorf("%d C_Login calls to recover on keyd's token; want at most 1", n-logins)
	}
}

// P2, P7: the device goes away and C_Initialize then hangs (a network HSM
// that does not answer). Health and Sign with deadlines return
// ErrUnavailable (or their deadline) in time instead of waiting for the
// recovery, which goes on in the background; health therefore reports
// NOT_SERVING. Once the module answers, keyd signs again and no goroutine
// is left.
func TestRecoveryHangs(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)

	const hang = 2 * time.Second
	released := make(chan struct{})
	var once sync.Once
	f.set("GetSessionInfo", always(p11.CKR_DEVICE_REMOVED))
	f.set("Initialize", func() error {
		cgoblock.Sleep(hang) // inside C, as a hung module would be
		once.Do(func() { close(released) })
		return nil
	})
	for _, call := range []struct {
		name string
		run  func(context.Context) error
	}{
		{"Health", b.Health},
		{"Sign", func(ctx context.Context) error { return signVerify(ctx, b, "k", pub) }},
		{"Health again", b.Health},
	} {
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		start := time.Now()
		err := call.run(ctx)
		took := time.Since(start)
		cancel()
		if !errors.Is(err, keystore.ErrUnavailable) && !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("%s while the recovery hangs: %v; want ErrUnavailable or the deadline", call.name, err)
		}
		if took > time.Second {
			t.Errorf("%s while the recovery hangs took %v; want about its 200ms deadline", call.name, took)
		}
	}
	select {
	case <-released:
	case <-time.After(10 * time.Second):
		t.Fatal("the hung C_Initialize never returned")
	}
	f.clear()
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := signVerify(t.Context(), b, "k", pub)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Sign after the module answers again: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	keyIntact(t, b, "k", pub)
}

// A fault that only C_Sign meets, and that re-initializing the module does
// not cure (CKR_DEVICE_ERROR on every C_Sign), keeps Health failing: once a
// failure is recorded the probe signs, and only a probe that signs clears
// it. A probe that only asked for the session and token info used to pass
// and report the Backend healthy while every signature failed. Once the
// fault is gone, Health heals without any Sign.
func TestHealthSignFault(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{recoverBackoff: time.Millisecond})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	if err := b.Health(t.Context()); err != nil {
		t.Fatalf("Health before the fault: %v", err)
	}

	f.set("Sign", always(p11.CKR_DEVICE_ERROR))
	if _, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256); !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("Sign with C_Sign failing = %v; want ErrUnavailable", err)
	}
	inits := f.inits.Load()
	for i := range 5 {
		time.Sleep(5 * time.Millisecond) // past recoverBackoff: a fresh probe each time
		// A call that succeeds without signing (Public, from the
		// cache) does not clear the failure either.
		if _, err := b.Public(t.Context(), "k"); err != nil {
			t.Fatalf("Public: %v", err)
		}
		if err := b.Health(t.Context()); !errors.Is(err, keystore.ErrUnavailable) {
			t.Fatalf("Health #%d with C_Sign failing = %v; want ErrUnavailable", i, err)
		}
	}
	// The probe's failed signatures are recorded, not recovered from:
	// Sign recovered already, and re-initializing the module every probe
	// would break every other session on it.
	if n := f.inits.Load() - inits; n != 0 {
		t.Errorf("%d C_Initialize calls by 5 health probes; want 0", n)
	}

	f.clear()
	time.Sleep(5 * time.Millisecond)
	if err := b.Health(t.Context()); err != nil {
		t.Fatalf("Health once C_Sign works again = %v; want nil", err)
	}
	if err := b.Health(t.Context()); err != nil {
		t.Fatalf("Health again = %v; want nil", err)
	}
	signOK(t, b, "k", pub)
}

// A fault that recovery does not cure re-initializes the module once, not
// on every call: after a recovery whose retry failed again, recoveries wait
// recoverBackoff, as after a failed one.
func TestFutileRecoveryBacksOff(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{recoverBackoff: time.Hour})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	inits := f.inits.Load()
	f.set("Sign", always(p11.CKR_DEVICE_ERROR))
	for i := range 5 {
		if _, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256); !errors.Is(err, keystore.ErrUnavailable) {
			t.Fatalf("Sign #%d with C_Sign failing = %v; want ErrUnavailable", i, err)
		}
	}
	if n := f.inits.Load() - inits; n != 1 {
		t.Errorf("%d C_Initialize calls for 5 failing signatures; want 1", n)
	}
}

// The signing health probe uses a mechanism the token offers: on a token
// with RSA-PSS but not RSA PKCS #1 v1.5, an RSA key is probed with PS256,
// and the probe clears a failure once the token signs again.
func TestHealthProbeMechanism(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	f.noMech[p11.CKM_RSA_PKCS] = true
	f.noMech[p11.CKM_ECDSA] = true
	f.noMech[ckmEdDSA] = true
	b, _ := faultBackend(t, f, options{recoverBackoff: time.Millisecond})
	if slices.Contains(b.Algorithms(), keystore.RS256) || !slices.Contains(b.Algorithms(), keystore.PS256) {
		t.Fatalf("algorithms %v; want PS256 without RS256", b.Algorithms())
	}
	if _, err := b.Generate(t.Context(), "r", keystore.KeySpec{Algorithm: keystore.PS256}); err != nil {
		t.Fatal(err)
	}
	f.set("Sign", times(2, p11.CKR_DEVICE_ERROR))
	d := keystoretest.Digest(keystore.PS256, []byte("m"))
	if _, err := b.Sign(t.Context(), "r", d, keystore.PS256.SignerOpts()); !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("Sign with C_Sign failing twice = %v; want ErrUnavailable", err)
	}
	time.Sleep(5 * time.Millisecond)
	signs := f.signs.Load()
	if err := b.Health(t.Context()); err != nil {
		t.Fatalf("Health once the token signs again = %v; want nil", err)
	}
	if n := f.signs.Load() - signs; n != 1 {
		t.Errorf("the health probe made %d C_Sign calls; want 1 (with RSA-PSS)", n)
	}
}

// While a session copy is being made (the anchor busy for a moment), Health
// waits for the anchor instead of reporting a recovery in progress.
func TestHealthWhileCopying(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	entered, release := make(chan struct{}), make(chan struct{})
	f.set("CopyObject", func() error {
		close(entered)
		<-release
		return nil
	})
	signed := make(chan error, 1)
	go func() { signed <- signVerify(t.Context(), b, "k", pub) }()
	<-entered
	f.set("CopyObject", nil)
	health := make(chan error, 1)
	go func() { health <- b.Health(t.Context()) }()
	time.Sleep(50 * time.Millisecond)
	close(release)
	if err := <-health; err != nil {
		t.Errorf("Health while a copy was made = %v; want nil", err)
	}
	if err := <-signed; err != nil {
		t.Error(err)
	}
}

// A token that fails every C_Sign with a code recovering does not help
// (CKR_FUNCTION_FAILED) is UNAVAILABLE to callers and to Health alike, until
// a signature succeeds again: Health used to pass, since nothing recorded
// the failure and the probe never signed.
func TestHealthFunctionFailed(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{recoverBackoff: time.Millisecond})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	f.set("Sign", always(p11.CKR_FUNCTION_FAILED))
	healthFollowsSigns(t, b, f, pub, "with C_Sign failing", "once C_Sign works again")
}

// healthFollowsSigns checks, with f's faults set, that three Signs of key
// "k" fail with ErrUnavailable and Health says so after each; then, with
// the faults cleared, that Health passes and a Sign verifies with pub.
func healthFollowsSigns(t *testing.T, b *Backend, f *faultModule, pub crypto.PublicKey, during, after string) {
	t.Helper()
	for i := range 3 {
		if _, err := b.Sign(t.Context(), "k", make([]byte, 32), crypto.SHA256); !errors.Is(err, keystore.ErrUnavailable) {
			t.Fatalf("Sign #%d %s = %v; want ErrUnavailable", i, during, err)
		}
		time.Sleep(5 * time.Millisecond)
		if err := b.Health(t.Context()); !errors.Is(err, keystore.ErrUnavailable) {
			t.Fatalf("Health #%d %s = %v; want ErrUnavailable", i, during, err)
		}
	}
	f.clear()
	time.Sleep(5 * time.Millisecond)
	if err := b.Health(t.Context()); err != nil {
		t.Fatalf("Health %s = %v; want nil", after, err)
	}
	signOK(t, b, "k", pub)
}

// P7: the device hangs in every call, C_OpenSession included (a
// network HSM gone away). A Sign that finds a free place in the pool but
// no idle session must still return at its deadline, though opening the
// session hangs.
func TestSignDeadlineWhileOpenSessionHangs(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	if b.n < 2 {
		t.Skipf("pool of %d", b.n)
	}
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	b.drainIdle() // the next Sign must open a session

	release := make(chan struct{})
	f.set("OpenSession", hangUntil(release))
	defer func() {
		select {
		case <-release:
		default:
			close(release)
		}
		waitIdle(t, b)
	}()
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := b.Sign(ctx, "k", keystoretest.Digest(keystore.ES256, []byte("m")), crypto.SHA256)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Sign with C_OpenSession hung = %v; want DeadlineExceeded", err)
		}
	case <-time.After(2 * time.Second):
		t.Errorf("Sign with a 100ms deadline still blocked after %v (in C_OpenSession)", time.Since(start).Round(time.Millisecond))
		close(release)
		<-done
	}
}

// An object of another application (a CKO_DATA object, which has
// no CKA_ID) that carries keyd's label for a key must not stop keyd from
// destroying its own key, and must be left alone.
func TestDestroyWithForeignDataObject(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	keystoretest.MustGenerate(t, b, "k")
	h := rawSession(t, b)
	defer b.lib.ctx.CloseSession(h)
	obj, err := b.lib.ctx.CreateObject(h, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_DATA),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, false),
		p11.NewAttribute(p11.CKA_LABEL, labelPrefix+"k"),
		p11.NewAttribute(p11.CKA_APPLICATION, "other"),
		p11.NewAttribute(p11.CKA_VALUE, []byte("not keyd's")),
	})
	if err != nil {
		t.Fatalf("C_CreateObject: %v", err)
	}
	if err := b.Destroy(t.Context(), "k"); err != nil {
		t.Errorf("Destroy with a foreign data object labelled keyd:k = %v; want nil", err)
	}
	if got := rawFind(t, b, h, "k", p11.CKO_PRIVATE_KEY); len(got) != 0 {
		t.Errorf("the private key is still on the token: %v", got)
	}
	if _, err := b.lib.ctx.GetAttributeValue(h, obj, []*p11.Attribute{p11.NewAttribute(p11.CKA_VALUE, nil)}); err != nil {
		t.Errorf("the foreign data object is gone: %v", err)
	}
}

// A token that refuses every new session (CKR_SESSION_COUNT:
// another application holds them) fails every Sign with ErrUnavailable;
// Health must not report the Backend serving meanwhile.
func TestHealthWhileSessionsRefused(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{recoverBackoff: time.Millisecond})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	b.drainIdle()
	f.set("OpenSession", always(p11.CKR_SESSION_COUNT))
	healthFollowsSigns(t, b, f, pub, "with CKR_SESSION_COUNT", "once sessions open again")
}

// P7: the device hangs in C_OpenSession only (the anchor still answers).
// A Sign abandoned at its deadline leaves the call hung in the module;
// Health must report it once it has run for hangAfter, as it does for a
// hung C_Sign, instead of reporting the Backend serving.
func TestHealthSeesHungOpenSession(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{hangAfter: 100 * time.Millisecond})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	b.drainIdle() // the next Sign must open a session

	release := make(chan struct{})
	f.set("OpenSession", hangUntil(release))
	released := false
	unblock := func() {
		if !released {
			released = true
			close(release)
			waitIdle(t, b)
			f.clear()
		}
	}
	defer unblock()

	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	if _, err := b.Sign(ctx, "k", keystoretest.Digest(keystore.ES256, []byte("m")), crypto.SHA256); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Sign with C_OpenSession hung = %v; want DeadlineExceeded", err)
	}
	var err error
	for range 100 { // up to about 5 s: the hang shows after 100 ms
		if err = b.Health(t.Context()); err != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !errors.Is(err, keystore.ErrUnavailable) || !strings.Contains(err.Error(), "running for") {
		t.Errorf("Health with C_OpenSession hung = %v; want ErrUnavailable saying a call is running", err)
	}

	unblock()
	keyIntact(t, b, "k", pub)
	if err := b.Health(t.Context()); err != nil {
		t.Errorf("Health after the device answered: %v", err)
	}
}

// liveSessions counts the sessions open in the module (SoftHSM numbers
// them from 1), by asking the module directly.
func liveSessions(b *Backend) int {
	n := 0
	for h := p11.SessionHandle(1); h <= 256; h++ {
		if _, err := b.lib.ctx.GetSessionInfo(h); err == nil {
			n++
		}
	}
	return n
}

// fillPool signs concurrently until the pool has opened all its sessions
// and they are idle.
func fillPool(t *testing.T, b *Backend, pub crypto.PublicKey) {
	t.Helper()
	for range 50 {
		if len(b.idle) == b.n {
			return
		}
		var wg sync.WaitGroup
		for range 2 * b.n {
			wg.Go(func() {
				for range 10 {
					if err := signVerify(t.Context(), b, "k", pub); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		waitIdle(t, b)
	}
	t.Fatalf("the pool has %d idle sessions after many concurrent signs; want %d", len(b.idle), b.n)
}

// P2: only the anchor session dies (closed behind keyd's
// back; the pool's sessions and the login live on). The light recovery
// opens a new anchor; the pool's idle sessions, alive, must be closed or
// kept, not forgotten while open: each such recovery would leak the pool's
// sessions on the token. The sessions open in the module stay the anchor
// plus the pool's idle ones.
func TestAnchorDiesAloneNoSessionLeak(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{recoverBackoff: time.Millisecond})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	logins := f.logins.Load()
	for i := range 4 {
		waitIdle(t, b)
		if got, want := liveSessions(b), 1+len(b.idle); got != want {
			t.Fatalf("round %d: %d sessions open in the module; want %d (the anchor and %d idle)", i, got, want, len(b.idle))
		}
		fillPool(t, b, pub)
		b.dev.Lock()
		anchor := b.anchor
		b.dev.Unlock()
		if err := b.lib.ctx.CloseSession(anchor); err != nil {
			t.Fatal(err)
		}
		signOK(t, b, "k", pub)
		time.Sleep(2 * time.Millisecond) // past recoverBackoff
	}
	waitIdle(t, b)
	if got, want := liveSessions(b), 1+len(b.idle); got != want {
		t.Errorf("%d sessions open in the module after 4 anchor losses; want %d (the anchor and %d idle): sessions leaked", got, want, len(b.idle))
	}
	if n := f.logins.Load() - logins; n > 4 {
		t.Errorf("%d C_Login calls for 4 anchor losses", n)
	}
	keyIntact(t, b, "k", pub)
}

// Close racing a heavy recovery of another Backend on the same module:
// that recovery holds the module for C_Finalize and C_Initialize, and
// C_Initialize hangs (a network HSM gone away). Close must still return
// within its wait (saying the module was not finalized), not hang for as
// long as the module does.
func TestCloseWhileOtherBackendReinitializes(t *testing.T) {
	checkGoroutines(t)
	tok := newToken(t)
	const closeWait = 300 * time.Millisecond
	f1 := newFaultModule()
	b1, err := open(t.Context(), tok.config(t), f1.options(options{closeWait: closeWait}))
	if err != nil {
		t.Fatal(err)
	}
	f2 := newFaultModule()
	b2 := openBackend(t, tok.config(t), f2.options(options{}))
	pub := keystoretest.MustGenerate(t, b1, "k")
	signOK(t, b1, "k", pub)

	const hang = 4 * time.Second
	entered, released := make(chan struct{}), make(chan struct{})
	var once sync.Once
	f2.set("GetSessionInfo", always(p11.CKR_DEVICE_REMOVED))
	f2.set("Initialize", func() error {
		once.Do(func() { close(entered) })
		cgoblock.Sleep(hang) // inside C, as a hung module would be
		return nil
	})
	defer func() {
		<-released
		// b1's user of the module is still counted if its Close gave
		// up: drop it, as keyd's process exit would, after b2 closed.
		t.Cleanup(func() {
			b1.lib.mu.Lock()
			users := b1.lib.users
			b1.lib.mu.Unlock()
			if users > 0 {
				if err := b1.lib.release(b1.m, time.Second); err != nil {
					t.Error(err)
				}
			}
		})
	}()
	go func() {
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		_ = b2.Health(ctx) // the recovery goes on in the background
		<-entered
		b2.dev.Lock() // held by the recovery until C_Initialize returns
		b2.dev.Unlock()
		f2.clear()
		close(released)
	}()
	<-entered

	start := time.Now()
	err = b1.Close()
	took := time.Since(start)
	t.Logf("Close while another Backend re-initializes the module: %v after %v", err, took.Round(time.Millisecond))
	if took > hang/2 {
		t.Errorf("Close took %v with its wait at %v: it waited for the other Backend's hung C_Initialize", took.Round(time.Millisecond), closeWait)
	}
}

// P7 at start: the module hangs in C_Login (a network HSM that stops
// answering). New returns ErrUnavailable when its context ends instead of
// hanging the daemon's start for good; the Backend opened once the module
// answers is closed, and the token works for the next New.
func TestNewReturnsWhileLoginHangs(t *testing.T) {
	checkGoroutines(t)
	tok := newToken(t)
	f := newFaultModule()
	release := make(chan struct{})
	f.set("Login", hangUntil(release))
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	b, err := openWithin(ctx, tok.config(t), f.options(options{}))
	took := time.Since(start)
	if !errors.Is(err, keystore.ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("New with C_Login hung = %v, %v; want ErrUnavailable saying the deadline passed", b, err)
	}
	if took > 5*time.Second {
		t.Errorf("New took %v with a 300ms deadline", took.Round(time.Millisecond))
	}
	close(release)
	// The late Backend is closed: the module has no user left.
	for i := 0; libUsers(tok.config(t).Module) > 0; i++ {
		if i == 500 {
			t.Fatal("the Backend opened after the deadline was not closed within 5 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	f.clear()
	b2 := openBackend(t, tok.config(t), options{})
	pub := keystoretest.MustGenerate(t, b2, "k")
	signOK(t, b2, "k", pub)
}

// libUsers returns the number of Backends using the module at path.
func libUsers(path string) int {
	libraries.Lock()
	l := libraries.m[path]
	libraries.Unlock()
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.users
}

// hangUntil makes a call hang inside C, as a device that stopped answering
// would, until release is closed; the call then goes through.
func hangUntil(release <-chan struct{}) func() error {
	return func() error {
		for {
			select {
			case <-release:
				return nil
			default:
				cgoblock.Sleep(2 * time.Millisecond) // hung in the module
			}
		}
	}
}

// Close racing a recovery of this Backend that finds the device gone and
// must re-initialize the module: Close takes the pool's places first, and
// the recovery, waiting for those places (quiesce) while it holds the
// anchor, used to keep them both waiting until Close gave up, leaving the
// module initialized and this Backend counted as its user for good. The
// recovery gives up at once when the Backend closes, and Close finishes.
func TestCloseDuringRecovery(t *testing.T) {
	checkGoroutines(t)
	tok := newToken(t)
	const closeWait = 300 * time.Millisecond
	f := newFaultModule()
	b, err := open(t.Context(), tok.config(t), f.options(options{closeWait: closeWait}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// A Close that gave up leaves the module initialized: finalize
		// it, so that the next test's token is the one SoftHSM reads.
		if libUsers(b.lib.path) > 0 {
			if err := b.lib.release(b.m, time.Second); err != nil {
				t.Error(err)
			}
		}
	})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)

	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	// The recovery asks whether the anchor lives; the module answers
	// only once Close has begun, and says the device is gone.
	f.set("GetSessionInfo", func() error {
		once.Do(func() { close(entered) })
		<-release
		return p11.Error(p11.CKR_DEVICE_REMOVED)
	})
	f.set("SignInit", times(1, p11.CKR_SESSION_HANDLE_INVALID))
	signed := make(chan error, 1)
	go func() { signed <- signVerify(t.Context(), b, "k", pub) }()
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the recovery never asked about the anchor")
	}
	closed := make(chan error, 1)
	start := time.Now()
	go func() { closed <- b.Close() }()
	for i := 0; len(b.sem) < b.n; i++ {
		if i == 5000 {
			t.Fatal("Close did not take the pool's places")
		}
		time.Sleep(time.Millisecond)
	}
	close(release)
	err = <-closed
	took := time.Since(start)
	if err != nil {
		t.Errorf("Close during a recovery: %v (after %v)", err, took.Round(time.Millisecond))
	}
	if n := libUsers(b.lib.path); n != 0 {
		t.Errorf("the module has %d user(s) after Close; want 0 (finalized)", n)
	}
	if err := <-signed; !errors.Is(err, keystore.ErrClosed) && !errors.Is(err, keystore.ErrUnavailable) {
		t.Errorf("Sign whose recovery met Close: %v; want ErrClosed or ErrUnavailable", err)
	}
	f.clear()
}

// A Sign or Public racing keyd's own Destroy of the key is not a loss:
// while Destroy runs (its private key gone, its public key not yet), the
// key answers ErrNotFound, never ErrKeyLost, which the rotation layer
// records for good as DATA_LOSS.
func TestDestroyRacingSignNotLost(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)

	entered, release := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	// The second C_DestroyObject is the public key's (the private key
	// goes first): hold it until the racing calls have answered.
	f.set("DestroyObject", func() error {
		if calls.Add(1) == 2 {
			close(entered)
			<-release
		}
		return nil
	})
	destroyed := make(chan error, 1)
	go func() { destroyed <- b.Destroy(t.Context(), "k") }()
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		close(release)
		t.Fatal("Destroy never reached the public key")
	}
	d := keystoretest.Digest(keystore.ES256, []byte("racing destroy"))
	_, serr := b.Sign(t.Context(), "k", d, crypto.SHA256)
	_, perr := b.Public(t.Context(), "k")
	close(release)
	if err := <-destroyed; err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	f.clear()
	for what, err := range map[string]error{"Sign": serr, "Public": perr} {
		if !errors.Is(err, keystore.ErrNotFound) || errors.Is(err, keystore.ErrKeyLost) {
			t.Errorf("%s during Destroy of the key: %v; want ErrNotFound, not ErrKeyLost", what, err)
		}
	}
	if _, err := b.Sign(t.Context(), "k", d, crypto.SHA256); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Sign after Destroy: %v; want ErrNotFound", err)
	}
}

// P4 during List: another part of the application logs out after List
// checked the login, just before its search or just before it read the
// labels of the keys found. Logged out, the search sees no private key, and
// the handles found died with the login (CKR_OBJECT_HANDLE_INVALID, which
// List took for "destroyed meanwhile"): List used to return a token
// without keys, as if they were all gone. It logs in again and finds them.
func TestListLogoutDuringList(t *testing.T) {
	for _, call := range []string{"FindObjectsInit", "GetAttributeValue"} {
		t.Run(call, func(t *testing.T) {
			checkGoroutines(t)
			f := newFaultModule()
			b, _ := faultBackend(t, f, options{})
			want := []string{"k0", "k1", "k2"}
			for _, id := range want {
				keystoretest.MustGenerate(t, b, id)
			}
			h := rawSession(t, b)
			defer b.lib.ctx.CloseSession(h)
			var once sync.Once
			f.set(call, func() error {
				once.Do(func() {
					if err := b.lib.ctx.Logout(h); err != nil {
						t.Errorf("C_Logout elsewhere: %v", err)
					}
				})
				return nil
			})
			ids, err := b.List(t.Context())
			f.clear()
			if err != nil && !errors.Is(err, keystore.ErrUnavailable) {
				t.Fatalf("List with a logout before %s: %v; want the keys or ErrUnavailable", call, err)
			}
			if err == nil && !slices.Equal(ids, want) {
				t.Fatalf("List with a logout before %s = %q; want %q", call, ids, want)
			}
			ids, err = b.List(t.Context())
			if err != nil || !slices.Equal(ids, want) {
				t.Fatalf("List after = %q, %v; want %q", ids, err, want)
			}
		})
	}
}

// SoftHSM 2.6 fails a C_GenerateKeyPair that a search of the token's
// objects on another session runs into (CKR_GENERAL_ERROR, or
// CKR_TEMPLATE_INCONSISTENT, which keyd reports as ErrUnsupportedAlgorithm;
// the retry after a recovery fails the same way and marks the Backend
// unhealthy). A rotation's Generate while the daemon lists its keys, or
// looks up one it has not cached, must still succeed.
func TestGenerateWhileSearching(t *testing.T) {
	checkGoroutines(t)
	tok := newToken(t)
	b := openBackend(t, tok.config(t), options{})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, search := range []func() error{
		func() error { _, err := b.List(t.Context()); return err },
		func() error { _, err := b.Public(t.Context(), "absent"); return err },
	} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 100000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				_ = search()
			}
		}()
	}
	failed := 0
	for i := range 40 {
		id := fmt.Sprintf("r%d", i)
		if _, err := b.Generate(t.Context(), id, keystore.KeySpec{Algorithm: keystore.ES256}); err != nil {
			failed++
			t.Errorf("Generate(%s) while searching: %v", id, err)
		}
	}
	close(stop)
	wg.Wait()
	if failed > 0 {
		t.Logf("%d of 40 key generations failed", failed)
	}
	if err := b.Health(t.Context()); err != nil {
		t.Errorf("Health after generating while searching: %v", err)
	}
}

// A Sign with a cached key whose session copy keyd's own Destroy deletes
// between the Sign's lookup and its C_SignInit (which then fails with
// CKR_OBJECT_HANDLE_INVALID) answers ErrNotFound without a recovery: a
// recovery drops every key's cached handle and closes the other signers'
// idle sessions, for one key that is simply gone.
func TestDestroyRacingCachedSignNoRecovery(t *testing.T) {
	t.Run("SessionCopy", func(t *testing.T) { destroyRacingCachedSign(t, false) })
	t.Run("TokenObject", func(t *testing.T) { destroyRacingCachedSign(t, true) })
}

func destroyRacingCachedSign(t *testing.T, noCopies bool) {
	checkGoroutines(t)
	f := newFaultModule()
	tok := newToken(t)
	cfg := tok.config(t)
	cfg.NoSessionCopies = noCopies
	b := openBackend(t, cfg, f.options(options{}))
	pub := keystoretest.MustGenerate(t, b, "k")
	otherPub := keystoretest.MustGenerate(t, b, "other")
	signOK(t, b, "k", pub)
	signOK(t, b, "other", otherPub)
	b.mu.RLock()
	ep := b.epoch
	b.mu.RUnlock()

	var once sync.Once
	var derr error
	f.set("SignInit", func() error {
		once.Do(func() { derr = b.Destroy(t.Context(), "k") })
		return nil
	})
	d := keystoretest.Digest(keystore.ES256, []byte("racing destroy"))
	_, err := b.Sign(t.Context(), "k", d, crypto.SHA256)
	f.clear()
	if derr != nil {
		t.Fatalf("Destroy: %v", derr)
	}
	if !errors.Is(err, keystore.ErrNotFound) || errors.Is(err, keystore.ErrKeyLost) {
		t.Errorf("Sign whose copy Destroy deleted: %v; want ErrNotFound", err)
	}
	b.mu.RLock()
	now, cached := b.epoch, b.cache["other"] != nil
	b.mu.RUnlock()
	if now != ep || !cached {
		t.Errorf("Sign racing Destroy of its key recovered (epoch %d → %d, other key still cached: %v); want ErrNotFound without a recovery", ep, now, cached)
	}
	signOK(t, b, "other", otherPub)
	if err := b.Health(t.Context()); err != nil {
		t.Errorf("Health: %v", err)
	}
}

// A C_GenerateKeyPair that does not return (a wedged HSM) holds the objects
// lock: calls that must search the token wait for it, but only until their
// deadline.
func TestGenerateHangsCallersKeepDeadline(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	keystoretest.MustGenerate(t, b, "k2")
	signOK(t, b, "k", pub)

	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	f.set("GenerateKeyPair", func() error {
		once.Do(func() { close(entered) })
		return hangUntil(release)()
	})
	generated := make(chan error, 1)
	go func() {
		_, err := b.Generate(context.Background(), "slow", keystore.KeySpec{Algorithm: keystore.ES256})
		generated <- err
	}()
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("Generate never reached C_GenerateKeyPair")
	}
	forgetHandles(b) // k2 and k must be searched for again

	d := keystoretest.Digest(keystore.ES256, []byte("while generating"))
	calls := map[string]func(context.Context) error{
		"Sign of an uncached key": func(ctx context.Context) error { _, err := b.Sign(ctx, "k2", d, crypto.SHA256); return err },
		"Public":                  func(ctx context.Context) error { _, err := b.Public(ctx, "k"); return err },
		"List":                    func(ctx context.Context) error { _, err := b.List(ctx); return err },
		"Destroy":                 func(ctx context.Context) error { return b.Destroy(ctx, "k2") },
		"Generate of another key": func(ctx context.Context) error {
			_, err := b.Generate(ctx, "other", keystore.KeySpec{Algorithm: keystore.ES256})
			return err
		},
	}
	for what, call := range calls {
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		ch := make(chan error, 1)
		go func() { ch <- call(ctx) }()
		select {
		case err := <-ch:
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("%s while C_GenerateKeyPair hangs: %v; want DeadlineExceeded", what, err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("%s while C_GenerateKeyPair hangs: still waiting 10 s after its 100 ms deadline", what)
		}
		cancel()
	}
	close(release)
	if err := <-generated; err != nil {
		t.Errorf("Generate after the device answered: %v", err)
	}
	f.clear()
	waitIdle(t, b)
	keyIntact(t, b, "k", pub)
}
