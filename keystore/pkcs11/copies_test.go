package pkcs11

import (
	"bytes"
	"crypto"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// lastSignedWith returns the object handle of f's last C_SignInit.
func (f *faultModule) lastSignedWith() p11.ObjectHandle {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.signedWith
}

// Each key signs through one session copy made inside the token, as
// protected as the key (P16: private, sensitive, never extractable, the
// secret unreadable), made once and used by every later signature.
func TestSessionCopy(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	h := rawSession(t, b)
	defer b.lib.ctx.CloseSession(h)
	for i, alg := range []keystore.Algorithm{keystore.ES256, keystore.RS256, keystore.EdDSA} {
		id := "k-" + string(alg)
		pub, err := b.Generate(t.Context(), id, keystore.KeySpec{Algorithm: alg})
		if err != nil {
			t.Fatal(err)
		}
		for range 5 {
			if err := signVerifyAlg(t, b, id, alg, pub); err != nil {
				t.Fatal(err)
			}
		}
		copies := rawCopies(t, b, h, id)
		if len(copies) != 1 {
			t.Fatalf("%s: %d session copies after 5 signatures; want 1", alg, len(copies))
		}
		if n := f.copies.Load(); n != int32(i+1) {
			t.Errorf("%s: %d C_CopyObject calls for %d keys; want one per key", alg, n, i+1)
		}
		if got := f.lastSignedWith(); got != copies[0] {
			t.Errorf("%s: C_SignInit used object %d; want the session copy %d", alg, got, copies[0])
		}
		checkProtected(t, b, h, copies[0], false)
		a, err := b.lib.ctx.GetAttributeValue(h, copies[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_ID, nil)})
		if err != nil {
			t.Fatal(err)
		}
		b.mu.RLock()
		want := b.known[id]
		b.mu.RUnlock()
		if string(a[0].Value) != string(want) {
			t.Errorf("%s: the copy's CKA_ID %x; want the key's %x", alg, a[0].Value, want)
		}
	}
}

// signVerifyAlg signs a digest of alg with id and verifies the signature.
func signVerifyAlg(t *testing.T, b *Backend, id string, alg keystore.Algorithm, pub crypto.PublicKey) error {
	t.Helper()
	d := keystoretest.Digest(alg, []byte("copy test "+id))
	sig, err := b.Sign(t.Context(), id, d, alg.SignerOpts())
	if err != nil {
		return err
	}
	return keystoretest.VerifyDER(alg, pub, d, sig)
}

// Destroy destroys the key's session copy with its token objects: no copy
// of a destroyed key stays in the token's memory until the login ends.
func TestSessionCopyDestroyed(t *testing.T) {
	checkGoroutines(t)
	b, _ := faultBackend(t, newFaultModule(), options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	h := rawSession(t, b)
	defer b.lib.ctx.CloseSession(h)
	if n := len(rawCopies(t, b, h, "k")); n != 1 {
		t.Fatalf("%d session copies after a signature; want 1", n)
	}
	if err := b.Destroy(t.Context(), "k"); err != nil {
		t.Fatal(err)
	}
	if n := len(rawCopies(t, b, h, "k")); n != 0 {
		t.Errorf("%d session copies after Destroy; want 0", n)
	}
	if n := len(rawFind(t, b, h, "k", p11.CKO_PRIVATE_KEY)); n != 0 {
		t.Errorf("%d private token objects after Destroy; want 0", n)
	}
}

// A recovery that keeps the anchor (a stale handle, a dead pooled session)
// finds the copy again instead of making another: copies do not pile up in
// the token's memory.
func TestSessionCopyKeptAcrossRecovery(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	for range 3 {
		f.set("SignInit", times(1, p11.CKR_OBJECT_HANDLE_INVALID))
		signOK(t, b, "k", pub)
	}
	h := rawSession(t, b)
	defer b.lib.ctx.CloseSession(h)
	if n := len(rawCopies(t, b, h, "k")); n != 1 {
		t.Errorf("%d session copies after 3 recoveries; want 1", n)
	}
	if n := f.copies.Load(); n != 1 {
		t.Errorf("%d C_CopyObject calls; want 1", n)
	}
}

// A recovery that cannot tell whether the anchor lives (C_GetSessionInfo
// fails with a code that says neither "session gone" nor "device gone")
// does not open another beside it: the old one would stay open for good,
// its copies in the token's memory. It initializes the module again, which
// closes every session.
func TestSessionCopyAnchorInDoubt(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	inits := f.inits.Load()
	for range 3 {
		f.set("GetSessionInfo", times(1, p11.CKR_GENERAL_ERROR))
		f.set("Sign", times(1, p11.CKR_SESSION_HANDLE_INVALID))
		signOK(t, b, "k", pub)
	}
	h := rawSession(t, b)
	defer b.lib.ctx.CloseSession(h)
	if n := len(rawCopies(t, b, h, "k")); n != 1 {
		t.Errorf("%d session copies after 3 recoveries with the anchor in doubt; want 1", n)
	}
	if n := f.inits.Load() - inits; n != 3 {
		t.Errorf("%d C_Initialize calls for 3 recoveries with the anchor in doubt; want 3", n)
	}
	keyIntact(t, b, "k", pub)
}

// A logout destroys the private session objects, the copies with them: the
// recovery logs in again and makes a new copy.
func TestSessionCopyAfterLogout(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	b, _ := faultBackend(t, f, options{})
	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	h := rawSession(t, b)
	defer b.lib.ctx.CloseSession(h)
	if err := b.lib.ctx.Logout(h); err != nil {
		t.Fatal(err)
	}
	if n := len(rawCopies(t, b, h, "k")); n != 0 {
		t.Fatalf("%d session copies after the logout; want 0 (SoftHSM destroys them)", n)
	}
	signOK(t, b, "k", pub)
	if n := len(rawCopies(t, b, h, "k")); n != 1 {
		t.Errorf("%d session copies after signing again; want 1", n)
	}
	if n := f.logins.Load(); n != 2 {
		t.Errorf("%d C_Login calls; want 2", n)
	}
}

// A token whose policy refuses C_CopyObject is signed with through the
// token objects: asked once, never again, and every signature works.
func TestSessionCopyRefused(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	f.set("CopyObject", always(p11.CKR_ACTION_PROHIBITED))
	cfg := newToken(t).config(t)
	logs := &lockedBuffer{}
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	b := openBackend(t, cfg, f.options(options{}))
	pub := keystoretest.MustGenerate(t, b, "k")
	pub2 := keystoretest.MustGenerate(t, b, "k2")
	for range 5 {
		signOK(t, b, "k", pub)
		signOK(t, b, "k2", pub2)
	}
	if n := f.copies.Load(); n != 1 {
		t.Errorf("%d C_CopyObject calls; want 1 (refused once, then not asked again)", n)
	}
	if n := strings.Count(logs.String(), "does not copy keys into session objects"); n != 1 {
		t.Errorf("the refusal was logged %d times; want once:\n%s", n, logs)
	}
	h := rawSession(t, b)
	defer b.lib.ctx.CloseSession(h)
	privs := rawFind(t, b, h, "k2", p11.CKO_PRIVATE_KEY)
	if len(privs) != 1 || f.lastSignedWith() != privs[0] {
		t.Errorf("C_SignInit used object %d; want k2's token object %v", f.lastSignedWith(), privs)
	}
}

// Config.NoSessionCopies: no C_CopyObject at all, the token objects sign.
func TestNoSessionCopies(t *testing.T) {
	checkGoroutines(t)
	f := newFaultModule()
	tok := newToken(t)
	cfg := tok.config(t)
	cfg.NoSessionCopies = true
	logs := &lockedBuffer{}
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	b := openBackend(t, cfg, f.options(options{}))
	if !strings.Contains(logs.String(), "session_copies=false") {
		t.Errorf("the start-up line does not say session_copies=false:\n%s", logs)
	}
	pub := keystoretest.MustGenerate(t, b, "k")
	for range 3 {
		signOK(t, b, "k", pub)
	}
	if n := f.copies.Load(); n != 0 {
		t.Errorf("%d C_CopyObject calls; want 0", n)
	}
	h := rawSession(t, b)
	defer b.lib.ctx.CloseSession(h)
	if n := len(rawCopies(t, b, h, "k")); n != 0 {
		t.Errorf("%d session copies; want 0", n)
	}
}

// A key whose token objects another tool deleted, so that only keyd's
// session copy is left: Destroy says ErrNotFound (the copy is no key on the
// token) and destroys the copy; Generate of the same ID refuses it (IDs are
// never reused) instead of taking the copy for an object already there.
func TestOnlyCopyLeft(t *testing.T) {
	checkGoroutines(t)
	b, _ := faultBackend(t, newFaultModule(), options{})
	h := rawSession(t, b)
	defer b.lib.ctx.CloseSession(h)
	deleteTokenObjects := func(id string) {
		for _, class := range []uint{p11.CKO_PRIVATE_KEY, p11.CKO_PUBLIC_KEY} {
			for _, o := range rawFind(t, b, h, id, class) {
				if err := b.lib.ctx.DestroyObject(h, o); err != nil {
					t.Fatal(err)
				}
			}
		}
	}

	pub := keystoretest.MustGenerate(t, b, "k")
	signOK(t, b, "k", pub)
	deleteTokenObjects("k")
	if err := b.Destroy(t.Context(), "k"); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Destroy with only the copy left = %v; want ErrNotFound", err)
	}
	if n := len(rawCopies(t, b, h, "k")); n != 0 {
		t.Errorf("%d session copies after Destroy; want 0", n)
	}

	pub = keystoretest.MustGenerate(t, b, "g")
	signOK(t, b, "g", pub)
	deleteTokenObjects("g")
	if _, err := b.Generate(t.Context(), "g", keystore.KeySpec{Algorithm: keystore.ES256}); !errors.Is(err, keystore.ErrAlreadyExists) {
		t.Fatalf("Generate of a known ID whose key is gone = %v; want ErrAlreadyExists (IDs are never reused), never the old copy taken for a key", err)
	}
	if n := len(rawFind(t, b, h, "g", p11.CKO_PRIVATE_KEY)); n != 0 {
		t.Errorf("%d private keys on the token for g; want none made", n)
	}
}

// lockedBuffer is a log destination safe for the Backend's goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
