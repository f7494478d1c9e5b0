package pkcs11

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// The test token's PINs (softhsm-test/new-token.sh uses the same).
const (
	testSOPIN   = "1111"
	testUserPIN = "2222"
	testLabel   = "keyd"
)

// needSoftHSM skips the test when SoftHSM2 is missing, or fails it when
// KEYD_REQUIRE_HW=1 (make test and CI), so a missing device cannot pass
// silently. It returns the module path.
func needSoftHSM(t *testing.T) string {
	t.Helper()
	missing := func(format string, args ...any) {
		t.Helper()
		if os.Getenv("KEYD_REQUIRE_HW") == "1" {
			t.Fatalf("KEYD_REQUIRE_HW=1 and "+format+" (run softhsm-test/install-softhsm.sh)", args...)
		}
		t.Skipf(format+"; skipping (set KEYD_REQUIRE_HW=1 to fail instead)", args...)
	}
	if _, err := exec.LookPath("softhsm2-util"); err != nil {
		missing("softhsm2-util is not installed")
	}
	if m := os.Getenv("KEYD_PKCS11_MODULE"); m != "" {
		if _, err := os.Stat(m); err != nil {
			missing("KEYD_PKCS11_MODULE=%s: %v", m, err)
		}
		return m
	}
	for _, m := range []string{
		"/usr/lib/softhsm/libsofthsm2.so",
		"/usr/lib/" + runtime.GOARCH + "-linux-gnu/softhsm/libsofthsm2.so",
		"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
		"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
		"/usr/local/lib/softhsm/libsofthsm2.so",
	} {
		if _, err := os.Stat(m); err == nil {
			return m
		}
	}
	missing("libsofthsm2.so not found")
	return ""
}

// testToken is a fresh SoftHSM2 token in a directory of its own.
type testToken struct {
	module string
	dir    string // the token directory (directories.tokendir)
	conf   string
}

// newToken makes a token in t.TempDir(), labelled testLabel with the test
// PINs, and points SOFTHSM2_CONF at it for the rest of the test. SoftHSM
// reads SOFTHSM2_CONF at C_Initialize, so every Backend on another token must
// be closed (the module finalized) before the next test opens this one.
func newToken(t *testing.T) *testToken {
	t.Helper()
	module := needSoftHSM(t)
	base := t.TempDir()
	tok := &testToken{module: module, dir: filepath.Join(base, "tokens"), conf: filepath.Join(base, "softhsm2.conf")}
	if err := os.Mkdir(tok.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := "directories.tokendir = " + tok.dir + "\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
	if err := os.WriteFile(tok.conf, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", testLabel, "--so-pin", testSOPIN, "--pin", testUserPIN)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+tok.conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	t.Setenv("SOFTHSM2_CONF", tok.conf)
	return tok
}

// config returns a Config for the token with a pool of two sessions.
func (tok *testToken) config(t *testing.T) Config {
	return Config{
		Module:      tok.module,
		URI:         "pkcs11:token=" + testLabel,
		PIN:         PIN{s: testUserPIN},
		MaxSessions: 2,
		Logger:      testLogger(t),
	}
}

// wipe removes the token's files, as an operator deleting the token
// directory would (P1).
func (tok *testToken) wipe(t *testing.T) {
	t.Helper()
	entries, err := os.ReadDir(tok.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(tok.dir, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
}

// openBackend opens a Backend on tok and closes it when the test ends.
func openBackend(t *testing.T, cfg Config, o options) *Backend {
	t.Helper()
	b, err := open(t.Context(), cfg, o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return b
}

// testLogger logs to t while the test runs.
func testLogger(t *testing.T) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

// checkGoroutines fails the test if the goroutine count has not returned to
// what it is now by the end of the test (after the Backends are closed:
// call it before opening them), or if the OS thread count grew by more than
// threadSlack. The Go runtime keeps idle threads instead of ending them, so
// the thread count cannot fall back; a thread held by a call that never
// returned (a leak) is also a goroutine that never ended.
func checkGoroutines(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	threadsBefore := threads(t)
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Errorf("goroutines: %d after the test, %d before\n%s", n, before, buf)
		}
		if n := threads(t); n > threadsBefore+threadSlack {
			t.Errorf("OS threads: %d after the test, %d before; want at most %d more", n, threadsBefore, threadSlack)
		}
	})
}

// threadSlack is how many OS threads a test may leave beyond those it
// started with: the runtime's idle ones, never more than the calls that
// were inside the module at once (the pool of two, a recovery, a health
// probe; see the package documentation).
const threadSlack = 4

// threads returns the process's OS thread count.
func threads(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no Threads line in /proc/self/status")
	return 0
}

// rawSession opens a session with the module directly, behind the Backend's
// back, as another part of the application would. It shares the
// application's login.
func rawSession(t *testing.T, b *Backend) p11.SessionHandle {
	t.Helper()
	b.mu.RLock()
	slot := b.slot
	b.mu.RUnlock()
	h, err := b.lib.ctx.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	if err != nil {
		t.Fatalf("raw C_OpenSession: %v", err)
	}
	return h
}

// rawFind finds the token objects labelled keyd:<id> in a raw session.
func rawFind(t *testing.T, b *Backend, h p11.SessionHandle, id string, class uint) []p11.ObjectHandle {
	t.Helper()
	return rawFindOn(t, b, h, id, class, true)
}

// rawCopies finds the session objects labelled keyd:<id> in a raw session:
// the key's session copies (session objects are visible to every session
// of the process).
func rawCopies(t *testing.T, b *Backend, h p11.SessionHandle, id string) []p11.ObjectHandle {
	t.Helper()
	return rawFindOn(t, b, h, id, p11.CKO_PRIVATE_KEY, false)
}

func rawFindOn(t *testing.T, b *Backend, h p11.SessionHandle, id string, class uint, token bool) []p11.ObjectHandle {
	t.Helper()
	ctx := b.lib.ctx
	if err := ctx.FindObjectsInit(h, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, class),
		p11.NewAttribute(p11.CKA_TOKEN, token),
		p11.NewAttribute(p11.CKA_LABEL, labelPrefix+id),
	}); err != nil {
		t.Fatal(err)
	}
	hs, _, err := ctx.FindObjects(h, 10)
	if err != nil {
		t.Fatal(err)
	}
	if err := ctx.FindObjectsFinal(h); err != nil {
		t.Fatal(err)
	}
	return hs
}

// probed adds keystoretest's private material probe to a Backend.
type probed struct{ *Backend }

// PrivateMaterialProbe reads the private key object's attributes through
// PKCS#11 (P16): token, private, sensitive, never extractable, can sign and
// nothing else, a keyd CKA_ID, and no secret attribute readable
// (CKR_ATTRIBUTE_SENSITIVE). It also tries to make the key extractable or
// not sensitive, which the token must refuse.
func (p probed) PrivateMaterialProbe(t *testing.T, id string) {
	t.Helper()
	checkPrivateMaterial(t, p.Backend, id)
}

func checkPrivateMaterial(t *testing.T, b *Backend, id string) {
	t.Helper()
	h := rawSession(t, b)
	defer b.lib.ctx.CloseSession(h)
	privs := rawFind(t, b, h, id, p11.CKO_PRIVATE_KEY)
	if len(privs) != 1 {
		t.Fatalf("%d private key objects labelled %q, want 1", len(privs), labelPrefix+id)
	}
	checkProtected(t, b, h, privs[0], true)
}

// checkProtected checks the private key object priv as
// checkPrivateMaterial says; token is the CKA_TOKEN it must have.
func checkProtected(t *testing.T, b *Backend, h p11.SessionHandle, priv p11.ObjectHandle, token bool) {
	t.Helper()
	ctx := b.lib.ctx
	want := map[uint]bool{
		p11.CKA_TOKEN:             token,
		p11.CKA_PRIVATE:           true,
		p11.CKA_SENSITIVE:         true,
		p11.CKA_ALWAYS_SENSITIVE:  true,
		p11.CKA_EXTRACTABLE:       false,
		p11.CKA_NEVER_EXTRACTABLE: true,
		p11.CKA_SIGN:              true,
		p11.CKA_DECRYPT:           false,
		p11.CKA_UNWRAP:            false,
		p11.CKA_DERIVE:            false,
	}
	names := map[uint]string{
		p11.CKA_TOKEN: "CKA_TOKEN", p11.CKA_PRIVATE: "CKA_PRIVATE", p11.CKA_SENSITIVE: "CKA_SENSITIVE",
		p11.CKA_ALWAYS_SENSITIVE: "CKA_ALWAYS_SENSITIVE", p11.CKA_EXTRACTABLE: "CKA_EXTRACTABLE",
		p11.CKA_NEVER_EXTRACTABLE: "CKA_NEVER_EXTRACTABLE", p11.CKA_SIGN: "CKA_SIGN", p11.CKA_DECRYPT: "CKA_DECRYPT",
		p11.CKA_UNWRAP: "CKA_UNWRAP", p11.CKA_DERIVE: "CKA_DERIVE",
	}
	for attr, w := range want {
		a, err := ctx.GetAttributeValue(h, priv, []*p11.Attribute{p11.NewAttribute(attr, nil)})
		if err != nil {
			t.Errorf("%s: %v", names[attr], err)
			continue
		}
		if got := len(a[0].Value) == 1 && a[0].Value[0] != 0; got != w {
			t.Errorf("%s = %v, want %v", names[attr], got, w)
		}
	}
	a, err := ctx.GetAttributeValue(h, priv, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_ID, nil), p11.NewAttribute(p11.CKA_KEY_TYPE, nil),
	})
	if err != nil {
		t.Fatal(err)
	}
	if !ownID(a[0].Value) || len(a[0].Value) != len(idPrefix)+idRandom {
		t.Errorf("CKA_ID = %q, want %q and %d random bytes", a[0].Value, idPrefix, idRandom)
	}
	secret := []uint{p11.CKA_VALUE}
	if ulong(a[1].Value) == p11.CKK_RSA {
		secret = []uint{p11.CKA_PRIVATE_EXPONENT, p11.CKA_PRIME_1, p11.CKA_PRIME_2, p11.CKA_EXPONENT_1, p11.CKA_EXPONENT_2, p11.CKA_COEFFICIENT}
	}
	for _, attr := range secret {
		v, err := ctx.GetAttributeValue(h, priv, []*p11.Attribute{p11.NewAttribute(attr, nil)})
		if !isCode(err, p11.CKR_ATTRIBUTE_SENSITIVE) {
			t.Errorf("reading secret attribute 0x%x: %v (%d bytes); want CKR_ATTRIBUTE_SENSITIVE", attr, err, valueLen(v))
		}
	}
	for attr, v := range map[uint]bool{p11.CKA_EXTRACTABLE: true, p11.CKA_SENSITIVE: false} {
		if err := ctx.SetAttributeValue(h, priv, []*p11.Attribute{p11.NewAttribute(attr, v)}); err == nil {
			t.Errorf("setting %s to %v succeeded; the token must refuse it", names[attr], v)
		}
	}
}

func valueLen(a []*p11.Attribute) int {
	if len(a) == 0 {
		return 0
	}
	return len(a[0].Value)
}

// TestContract runs the keystore contract suite on a fresh SoftHSM2 token
// per subtest, with the private material probe after each Generate.
func TestContract(t *testing.T) {
	needSoftHSM(t)
	checkGoroutines(t)
	keystoretest.Run(t, func(t *testing.T) keystore.Backend {
		tok := newToken(t)
		return probed{openBackend(t, tok.config(t), options{})}
	})
}

// TestSoftHSMAlgorithms: SoftHSM 2.6 offers every algorithm keyd knows, EdDSA
// included (CKM_EDDSA), so the contract suite tests them all.
func TestSoftHSMAlgorithms(t *testing.T) {
	tok := newToken(t)
	b := openBackend(t, tok.config(t), options{})
	if got, want := b.Algorithms(), keystore.Algorithms(); !equalAlgs(got, want) {
		t.Errorf("Algorithms() = %v, want %v", got, want)
	}
	if err := b.Health(t.Context()); err != nil {
		t.Errorf("Health: %v", err)
	}
}

func equalAlgs(a, b []keystore.Algorithm) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestTokenSelection: the URI selects by label, serial or slot; a URI that
// matches no token fails New with ErrUnavailable and lists the tokens.
func TestTokenSelection(t *testing.T) {
	tok := newToken(t)
	cfg := tok.config(t)
	b := openBackend(t, cfg, options{})
	ti, err := b.lib.ctx.GetTokenInfo(b.slot)
	if err != nil {
		t.Fatal(err)
	}
	slot := b.slot
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	for _, uri := range []string{
		"pkcs11:serial=" + ti.SerialNumber,
		"pkcs11:slot-id=" + strconv.FormatUint(uint64(slot), 10),
		"pkcs11:token=" + testLabel + ";manufacturer=SoftHSM%20project;model=SoftHSM%20v2",
	} {
		c := cfg
		c.URI = uri
		b, err := New(t.Context(), c)
		if err != nil {
			t.Errorf("New(%s): %v", uri, err)
			continue
		}
		if b.slot != slot {
			t.Errorf("New(%s) chose slot %d, want %d", uri, b.slot, slot)
		}
		if err := b.Close(); err != nil {
			t.Error(err)
		}
	}
	c := cfg
	c.URI = "pkcs11:token=nosuch"
	_, err = New(t.Context(), c)
	if !errors.Is(err, keystore.ErrUnavailable) || !strings.Contains(err.Error(), `"keyd"`) {
		t.Errorf("New with no matching token = %v; want ErrUnavailable listing the token keyd", err)
	}
}

// TestConfigErrors: New reports every configuration problem at once, before
// it loads anything.
func TestConfigErrors(t *testing.T) {
	_, err := New(context.Background(), Config{URI: "pkcs11:object=x", MaxSessions: -1})
	if err == nil {
		t.Fatal("New with an empty config succeeded")
	}
	for _, want := range []string{"module", "token=, serial= or slot-id=", "pin", "max_sessions"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	pin := PIN{s: "1234"}
	for name, cfg := range map[string]Config{
		"relative module": {Module: "libsofthsm2.so", URI: "pkcs11:token=x", PIN: pin},
		"missing module":  {Module: "/nonexistent/lib.so", URI: "pkcs11:token=x", PIN: pin},
		"not a library":   {Module: "/etc/hostname", URI: "pkcs11:token=x", PIN: pin},
		"pin in uri":      {Module: "/etc/hostname", URI: "pkcs11:token=x?pin-value=1234", PIN: pin},
	} {
		_, err := New(context.Background(), cfg)
		if err == nil {
			t.Errorf("%s: New succeeded", name)
			continue
		}
		if strings.Contains(err.Error(), "1234") {
			t.Errorf("%s: error %q shows the PIN", name, err)
		}
	}
}

// TestConfigNoPINInOutput: printing or logging a Config never shows the PIN.
func TestConfigNoPINInOutput(t *testing.T) {
	cfg := Config{Module: "/m.so", URI: "pkcs11:token=x", PIN: PIN{s: "s3cret-pin"}}
	var buf bytes.Buffer
	slog.New(slog.NewJSONHandler(&buf, nil)).Info("config", "cfg", cfg, "pin", cfg.PIN)
	slog.New(slog.NewTextHandler(&buf, nil)).Info("config", "cfg", cfg, "pin", cfg.PIN)
	if strings.Contains(buf.String(), "s3cret") {
		t.Errorf("slog output shows the PIN: %s", buf.String())
	}
	if !strings.Contains(buf.String(), redacted) {
		t.Errorf("slog output does not say %s: %s", redacted, buf.String())
	}
}

// LoseKey destroys the objects of key id on the token with a session of its
// own, as another tool would.
func (p probed) LoseKey(t *testing.T, id string) {
	t.Helper()
	h := rawSession(t, p.Backend)
	defer p.lib.ctx.CloseSession(h)
	for _, class := range []uint{p11.CKO_PRIVATE_KEY, p11.CKO_PUBLIC_KEY} {
		for _, o := range rawFind(t, p.Backend, h, id, class) {
			if err := p.lib.ctx.DestroyObject(h, o); err != nil {
				t.Fatal(err)
			}
		}
	}
}
