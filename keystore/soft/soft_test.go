// The standard library ignores custom randomness since Go 1.26 unless this is
// set; the failing-Rand tests need it.

//go:debug cryptocustomrand=1

package soft

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/keyd-dev/keyd/internal/keyfile"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// probed adds the private-material probe to the backend for the contract
// suite: the key must be in exactly one file, 0600, owned by us, in a 0700
// directory.
type probed struct {
	*Backend
	dir string
}

func (p probed) PrivateMaterialProbe(t *testing.T, id string) {
	t.Helper()
	checkMode(t, p.dir, 0o700|fs.ModeDir)
	path := filepath.Join(p.dir, id+".key")
	fi := checkMode(t, path, 0o600)
	st := fi.Sys().(*syscall.Stat_t)
	if int(st.Uid) != os.Geteuid() {
		t.Errorf("%s is owned by uid %d, want %d", path, st.Uid, os.Geteuid())
	}
	if st.Nlink != 1 {
		t.Errorf("%s has %d links, want 1 (a temporary name was left behind)", path, st.Nlink)
	}
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), id+".key.") {
			t.Errorf("stray file %s next to key %s", e.Name(), id)
		}
	}
}

func checkMode(t *testing.T, path string, want fs.FileMode) fs.FileInfo {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode() &^ (fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky); got != want {
		t.Errorf("%s has mode %v, want %v", path, got, want)
	}
	return fi
}

func TestContract(t *testing.T) {
	keystoretest.Run(t, func(t *testing.T) keystore.Backend {
		dir := filepath.Join(t.TempDir(), "keys") // New creates it
		b := open(t, Config{Dir: dir})
		return probed{b, dir}
	})
}

// open opens a backend and closes it at the end of the test.
func open(t *testing.T, cfg Config) *Backend {
	t.Helper()
	b, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%+v): %v", cfg, err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

func generate(t *testing.T, b *Backend, id string, alg keystore.Algorithm) crypto.PublicKey {
	t.Helper()
	pub, err := b.Generate(t.Context(), id, keystore.KeySpec{Algorithm: alg})
	if err != nil {
		t.Fatalf("Generate(%q, %s): %v", id, alg, err)
	}
	return pub
}

func signVerify(t *testing.T, b *Backend, id string, alg keystore.Algorithm, pub crypto.PublicKey) {
	t.Helper()
	d := keystoretest.Digest(alg, []byte("soft test"))
	sig, err := b.Sign(t.Context(), id, d, alg.SignerOpts())
	if err != nil {
		t.Fatalf("Sign(%q): %v", id, err)
	}
	if err := keystoretest.VerifyDER(alg, pub, d, sig); err != nil {
		t.Fatalf("Sign(%q): %v", id, err)
	}
}

// dirNames lists the file names in dir but the directory's lock file.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		if e.Name() != lockFile {
			names = append(names, e.Name())
		}
	}
	return names
}

func TestModes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "keys")
	b := open(t, Config{Dir: dir})
	checkMode(t, dir, 0o700|fs.ModeDir)
	for _, alg := range []keystore.Algorithm{keystore.ES256, keystore.EdDSA} {
		id := "mode-" + string(alg)
		generate(t, b, id, alg)
		checkMode(t, filepath.Join(dir, id+".key"), 0o600)
	}
	if err := b.Destroy(t.Context(), "mode-ES256"); err != nil {
		t.Fatal(err)
	}
	fi := checkMode(t, filepath.Join(dir, "mode-ES256.destroyed"), 0o600)
	if fi.Size() != 0 {
		t.Errorf("tombstone has %d bytes, want 0", fi.Size())
	}
	if got, want := dirNames(t, dir), []string{"mode-ES256.destroyed", "mode-EdDSA.key"}; !slices.Equal(got, want) {
		t.Errorf("directory holds %q, want %q", got, want)
	}
}

func TestPersistence(t *testing.T) {
	dir := t.TempDir()
	b := open(t, Config{Dir: dir})
	pubs := map[string]crypto.PublicKey{}
	algs := map[string]keystore.Algorithm{"p-es256": keystore.ES256, "p-es384": keystore.ES384, "p-eddsa": keystore.EdDSA}
	for id, alg := range algs {
		pubs[id] = generate(t, b, id, alg)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}

	b = open(t, Config{Dir: dir})
	if got := b.loadedIDs(); len(got) != 0 {
		t.Errorf("keys loaded before use: %q", got)
	}
	ids, err := b.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"p-eddsa", "p-es256", "p-es384"}; !slices.Equal(ids, want) {
		t.Errorf("List after reopen = %q, want %q", ids, want)
	}
	for id, alg := range algs {
		pub, err := b.Public(t.Context(), id)
		if err != nil {
			t.Fatalf("Public(%q) after reopen: %v", id, err)
		}
		if !pub.(interface{ Equal(crypto.PublicKey) bool }).Equal(pubs[id]) {
			t.Errorf("Public(%q) after reopen differs", id)
		}
		signVerify(t, b, id, alg, pubs[id])
	}
}

// S1: a key file others can read, a symlink, a non-regular file or a file of
// another user is refused on load, naming the path and the problem.
func TestInsecureKeyFile(t *testing.T) {
	tests := []struct {
		name    string
		spoil   func(t *testing.T, path string)
		problem string
	}{
		{"mode0644", chmod(0o644), "mode 0644"},
		{"mode0640", chmod(0o640), "mode 0640"},
		{"mode0604", chmod(0o604), "mode 0604"},
		{"mode0610", chmod(0o610), "mode 0610"},
		{"symlink", func(t *testing.T, path string) {
			// The target is a perfectly good key file elsewhere.
			target := filepath.Join(t.TempDir(), "elsewhere.key")
			if err := os.Rename(path, target); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(target, path); err != nil {
				t.Fatal(err)
			}
		}, "symlink"},
		{"directory", func(t *testing.T, path string) {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(path, 0o700); err != nil {
				t.Fatal(err)
			}
		}, "not a regular file"},
		{"fifo", func(t *testing.T, path string) {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			if err := syscall.Mkfifo(path, 0o600); err != nil {
				t.Fatal(err)
			}
		}, "not a regular file"},
		{"owner", func(t *testing.T, path string) {
			if os.Geteuid() != 0 {
				t.Skip("chown to another user needs root")
			}
			if err := os.Lchown(path, 65534, 65534); err != nil {
				t.Fatal(err)
			}
		}, "owned by uid 65534"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			b := open(t, Config{Dir: dir})
			generate(t, b, "k", keystore.ES256)
			b.Close()
			path := filepath.Join(dir, "k.key")
			tt.spoil(t, path)

			var logs bytes.Buffer
			b = open(t, Config{Dir: dir, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			_, err := b.Public(t.Context(), "k")
			if !errors.Is(err, keystore.ErrInsecureStorage) {
				t.Fatalf("Public = %v; want ErrInsecureStorage", err)
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tt.problem) {
				t.Errorf("Public error %q does not name %s and %q", err, path, tt.problem)
			}
			d := keystoretest.Digest(keystore.ES256, []byte("m"))
			if _, err := b.Sign(t.Context(), "k", d, crypto.SHA256); !errors.Is(err, keystore.ErrInsecureStorage) {
				t.Errorf("Sign = %v; want ErrInsecureStorage", err)
			}
			// Still listed: the key is there, only unusable.
			if ids, err := b.List(t.Context()); err != nil || !slices.Equal(ids, []string{"k"}) {
				t.Errorf("List = %q, %v; want [k]", ids, err)
			}
			if !strings.Contains(logs.String(), "key file refused") || !strings.Contains(logs.String(), tt.problem) {
				t.Errorf("no log of the refused key file:\n%s", logs.String())
			}
		})
	}
}

func chmod(mode fs.FileMode) func(t *testing.T, path string) {
	return func(t *testing.T, path string) {
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
	}
}

// S1: New refuses a directory others can write to, a symlink and one owned by
// another user.
func TestInsecureDir(t *testing.T) {
	tests := []struct {
		name    string
		make    func(t *testing.T) string
		problem string
	}{
		{"mode0777", mkdir(0o777), "mode 0777"},
		{"mode0770", mkdir(0o770), "mode 0770"},
		{"mode0702", mkdir(0o702), "mode 0702"},
		{"mode1777", mkdir(0o777 | fs.ModeSticky), "mode 0777"},
		{"symlink", func(t *testing.T) string {
			real := mkdir(0o700)(t)
			link := filepath.Join(t.TempDir(), "link")
			if err := os.Symlink(real, link); err != nil {
				t.Fatal(err)
			}
			return link
		}, "symlink"},
		{"owner", func(t *testing.T) string {
			if os.Geteuid() != 0 {
				t.Skip("chown to another user needs root")
			}
			dir := mkdir(0o700)(t)
			if err := os.Chown(dir, 65534, 65534); err != nil {
				t.Fatal(err)
			}
			return dir
		}, "owned by uid 65534"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := tt.make(t)
			b, err := New(Config{Dir: dir})
			if !errors.Is(err, keystore.ErrInsecureStorage) {
				if b != nil {
					b.Close()
				}
				t.Fatalf("New(%s) = %v; want ErrInsecureStorage", dir, err)
			}
			if !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), tt.problem) {
				t.Errorf("New error %q does not name %s and %q", err, dir, tt.problem)
			}
		})
	}
}

func mkdir(mode fs.FileMode) func(t *testing.T) string {
	return func(t *testing.T) string {
		dir := filepath.Join(t.TempDir(), "keys")
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		return dir
	}
}

func TestBadConfig(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Error("New with no Dir succeeded")
	}
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{Dir: file}); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("New on a regular file = %v; want a not-a-directory error", err)
	}
}

// S2: a temporary file left by a crash does not break New, is not listed and
// is removed; the ID can then be generated.
func TestLeftoverTempFile(t *testing.T) {
	dir := t.TempDir()
	b := open(t, Config{Dir: dir})
	generate(t, b, "kept", keystore.EdDSA)
	b.Close()

	leftovers := []string{"crashed.key.tmp-1234", "kept.key.tmp-99", "half.key.tmp-5"}
	for i, name := range leftovers {
		// A complete key, a second name of an existing key, a partial write.
		data := []byte("-----BEGIN PRIVATE KEY-----\nMC4CAQ")
		if i == 0 {
			data = pemKey(t, mustEd25519(t))
		}
		if i == 1 {
			if err := os.Link(filepath.Join(dir, "kept.key"), filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	var logs bytes.Buffer
	// A name that is not quite ours is listed by neither and left alone.
	if err := os.WriteFile(filepath.Join(dir, "other.key.tmp-xxxx"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	b = open(t, Config{Dir: dir, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	ids, err := b.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ids, []string{"kept"}) {
		t.Errorf("List = %q, want [kept]", ids)
	}
	if got, want := dirNames(t, dir), []string{"kept.key", "other.key.tmp-xxxx"}; !slices.Equal(got, want) {
		t.Errorf("after New the directory holds %q, want %q", got, want)
	}
	if !strings.Contains(logs.String(), "removed leftover temporary key file") {
		t.Errorf("removal not logged:\n%s", logs.String())
	}
	pub := generate(t, b, "crashed", keystore.ES256)
	signVerify(t, b, "crashed", keystore.ES256, pub)
	if _, err := b.Public(t.Context(), "kept"); err != nil {
		t.Errorf("Public(kept): %v", err)
	}
}

// failAfter is a Rand that fails after n bytes.
type failAfter struct {
	mu sync.Mutex
	n  int
}

var errRand = errors.New("entropy source failed")

func (r *failAfter) Read(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n <= 0 {
		return 0, errRand
	}
	k := min(len(p), r.n)
	n, err := rand.Read(p[:k])
	r.n -= n
	if err == nil && k < len(p) {
		err = errRand
	}
	return n, err
}

// S2: a key generation that fails half-way leaves no file at all, and the ID
// stays free.
func TestFailingRandLeavesNoFile(t *testing.T) {
	specs := []keystore.KeySpec{
		{Algorithm: keystore.ES256},
		{Algorithm: keystore.ES384},
		{Algorithm: keystore.EdDSA},
		{Algorithm: keystore.RS256, RSABits: 2048},
	}
	for _, spec := range specs {
		t.Run(spec.String(), func(t *testing.T) {
			dir := t.TempDir()
			// 16 bytes: enough to start, not enough to finish.
			b := open(t, Config{Dir: dir, Rand: &failAfter{n: 16}})
			_, err := b.Generate(t.Context(), "k", spec)
			if !errors.Is(err, errRand) {
				t.Fatalf("Generate with a failing Rand = %v; want %v", err, errRand)
			}
			if got := dirNames(t, dir); len(got) != 0 {
				t.Errorf("failed Generate left %q", got)
			}
			if _, err := b.Public(t.Context(), "k"); !errors.Is(err, keystore.ErrNotFound) {
				t.Errorf("Public after a failed Generate = %v; want ErrNotFound", err)
			}
			b.Close()
			if spec.Algorithm.IsRSA() {
				return // spare an RSA keygen; the ID being free is shown by the others
			}
			b = open(t, Config{Dir: dir})
			pub, err := b.Generate(t.Context(), "k", spec)
			if err != nil {
				t.Fatalf("Generate after a failed one: %v", err)
			}
			signVerify(t, b, "k", spec.Algorithm, pub)
		})
	}
}

// S2: a crash or a full disk at any stage of the write leaves either no key
// file (and the ID free) or a complete one, never a partial <id>.key.
func TestInterruptedWrite(t *testing.T) {
	errCrash := errors.New("simulated crash")
	for _, stage := range []string{"written", "synced"} {
		t.Run(stage, func(t *testing.T) {
			dir := t.TempDir()
			b := open(t, Config{Dir: dir})
			b.failpoint = func(s string) error {
				if s == stage {
					return errCrash
				}
				return nil
			}
			if _, err := b.Generate(t.Context(), "k", keystore.KeySpec{Algorithm: keystore.ES256}); !errors.Is(err, errCrash) {
				t.Fatalf("Generate = %v; want %v", err, errCrash)
			}
			if got := dirNames(t, dir); len(got) != 0 {
				t.Errorf("interrupted Generate left %q", got)
			}
			b.failpoint = nil
			pub := generate(t, b, "k", keystore.ES256)
			signVerify(t, b, "k", keystore.ES256, pub)
		})
	}
	t.Run("linked", func(t *testing.T) {
		dir := t.TempDir()
		b := open(t, Config{Dir: dir})
		b.failpoint = func(s string) error {
			if s == "linked" {
				return errCrash
			}
			return nil
		}
		if _, err := b.Generate(t.Context(), "k", keystore.KeySpec{Algorithm: keystore.EdDSA}); !errors.Is(err, errCrash) {
			t.Fatalf("Generate = %v; want %v", err, errCrash)
		}
		b.Close()
		// After the "crash" the key is complete; a retried Generate must
		// not replace it, and it works.
		b = open(t, Config{Dir: dir})
		if got := dirNames(t, dir); !slices.Equal(got, []string{"k.key"}) {
			t.Errorf("directory holds %q, want [k.key]", got)
		}
		if _, err := b.Generate(t.Context(), "k", keystore.KeySpec{Algorithm: keystore.EdDSA}); !errors.Is(err, keystore.ErrAlreadyExists) {
			t.Errorf("retried Generate = %v; want ErrAlreadyExists", err)
		}
		pub, err := b.Public(t.Context(), "k")
		if err != nil {
			t.Fatal(err)
		}
		signVerify(t, b, "k", keystore.EdDSA, pub)
	})
}

// An existing file is never overwritten, whether it was there before Generate
// started or appeared while the key was being written.
func TestNeverOverwrite(t *testing.T) {
	t.Run("before", func(t *testing.T) {
		dir := t.TempDir()
		path := filepath.Join(dir, "k.key")
		orig := pemKey(t, mustEd25519(t))
		if err := os.WriteFile(path, orig, 0o600); err != nil {
			t.Fatal(err)
		}
		b := open(t, Config{Dir: dir})
		if _, err := b.Generate(t.Context(), "k", keystore.KeySpec{Algorithm: keystore.ES256}); !errors.Is(err, keystore.ErrAlreadyExists) {
			t.Errorf("Generate over an existing file = %v; want ErrAlreadyExists", err)
		}
		checkContent(t, path, orig)
	})
	t.Run("during", func(t *testing.T) {
		dir := t.TempDir()
		path := filepath.Join(dir, "k.key")
		orig := pemKey(t, mustEd25519(t))
		b := open(t, Config{Dir: dir})
		b.failpoint = func(stage string) error {
			if stage == "synced" {
				// Another writer wins the race for the name.
				return os.WriteFile(path, orig, 0o600)
			}
			return nil
		}
		if _, err := b.Generate(t.Context(), "k", keystore.KeySpec{Algorithm: keystore.ES256}); !errors.Is(err, keystore.ErrAlreadyExists) {
			t.Errorf("Generate racing a writer = %v; want ErrAlreadyExists", err)
		}
		checkContent(t, path, orig)
		if got := dirNames(t, dir); !slices.Equal(got, []string{"k.key"}) {
			t.Errorf("directory holds %q, want [k.key]", got)
		}
		// The key that is there is the one served.
		pub, err := b.Public(t.Context(), "k")
		if err != nil {
			t.Fatal(err)
		}
		block, _ := pem.Decode(orig)
		k, _ := x509.ParsePKCS8PrivateKey(block.Bytes)
		if !k.(ed25519.PrivateKey).Public().(ed25519.PublicKey).Equal(pub) {
			t.Error("Public returns a key other than the one on disk")
		}
	})
}

func checkContent(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s was overwritten", path)
	}
}

func mustEd25519(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func pemKey(t *testing.T, key any) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// Destroyed IDs are never reused: the tombstone outlives the process.
func TestTombstone(t *testing.T) {
	dir := t.TempDir()
	b := open(t, Config{Dir: dir})
	generate(t, b, "gone", keystore.ES256)
	if err := b.Destroy(t.Context(), "gone"); err != nil {
		t.Fatal(err)
	}
	_, err := b.Generate(t.Context(), "gone", keystore.KeySpec{Algorithm: keystore.ES256})
	if !errors.Is(err, keystore.ErrAlreadyExists) || !strings.Contains(err.Error(), "destroyed") {
		t.Errorf("Generate of a destroyed ID = %v; want ErrAlreadyExists saying it was destroyed", err)
	}
	b.Close()

	b = open(t, Config{Dir: dir})
	if _, err := b.Generate(t.Context(), "gone", keystore.KeySpec{Algorithm: keystore.ES256}); !errors.Is(err, keystore.ErrAlreadyExists) {
		t.Errorf("Generate of a destroyed ID after reopen = %v; want ErrAlreadyExists", err)
	}
	if err := b.Destroy(t.Context(), "gone"); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Destroy of a destroyed ID after reopen = %v; want ErrNotFound", err)
	}
	if ids, _ := b.List(t.Context()); len(ids) != 0 {
		t.Errorf("List = %q, want []", ids)
	}
}

// A load racing with Destroy must not bring the key back.
func TestDestroyWhileLoading(t *testing.T) {
	dir := t.TempDir()
	b := open(t, Config{Dir: dir})
	for range 20 {
		generate(t, b, "race", keystore.EdDSA)
		b.Close()
		b = open(t, Config{Dir: dir}) // nothing loaded
		var wg sync.WaitGroup
		wg.Go(func() { b.Public(t.Context(), "race") })
		if err := b.Destroy(t.Context(), "race"); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		if _, err := b.Public(t.Context(), "race"); !errors.Is(err, keystore.ErrNotFound) {
			t.Fatalf("Public after Destroy = %v; want ErrNotFound", err)
		}
		// Let the ID be generated again for the next round.
		if err := os.Remove(filepath.Join(dir, "race.destroyed")); err != nil {
			t.Fatal(err)
		}
	}
}

func TestSignOptions(t *testing.T) {
	b := open(t, Config{Dir: t.TempDir()})
	ctx := t.Context()
	generate(t, b, "ec", keystore.ES256)
	generate(t, b, "ec384", keystore.ES384)
	generate(t, b, "ed", keystore.EdDSA)
	rsaPub := generate(t, b, "rsa", keystore.PS256)
	d256 := keystoretest.Digest(keystore.ES256, []byte("m"))
	d384 := keystoretest.Digest(keystore.ES384, []byte("m"))

	refused := []struct {
		id     string
		digest []byte
		opts   crypto.SignerOpts
	}{
		{"ec", d384, crypto.SHA384},
		{"ec", d256, &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}},
		{"ec384", d256, crypto.SHA256},
		{"ed", []byte("m"), crypto.SHA256},
		{"ed", []byte("m"), &ed25519.Options{Context: "ctx"}},
		{"rsa", d384, crypto.SHA384},
		{"rsa", d256, &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthAuto}},
		{"rsa", d256, &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 222}},
		{"rsa", d256, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}},
		{"rsa", d256, nil},
	}
	for _, tt := range refused {
		if sig, err := b.Sign(ctx, tt.id, tt.digest, tt.opts); !errors.Is(err, keystore.ErrUnsupportedAlgorithm) {
			t.Errorf("Sign(%s, %T %v) = %x, %v; want ErrUnsupportedAlgorithm", tt.id, tt.opts, tt.opts, sig, err)
		}
	}
	if _, err := b.Sign(ctx, "ec", d256[:20], crypto.SHA256); err == nil {
		t.Error("Sign with a short digest succeeded")
	}

	// PS256 with an explicit 32-byte salt is the same as EqualsHash.
	sig, err := b.Sign(ctx, "rsa", d256, &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 32})
	if err != nil {
		t.Fatal(err)
	}
	if err := keystoretest.VerifyDER(keystore.PS256, rsaPub, d256, sig); err != nil {
		t.Error(err)
	}
	// The same RSA key signs RS256: the file does not record the algorithm.
	sig, err = b.Sign(ctx, "rsa", d256, crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := keystoretest.VerifyDER(keystore.RS256, rsaPub, d256, sig); err != nil {
		t.Error(err)
	}
}

func TestUnreadableKeyFile(t *testing.T) {
	x25519, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p521, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		data []byte
		want error
	}{
		{"empty", nil, keystore.ErrKeyLost},
		{"garbage", []byte("not a key"), keystore.ErrKeyLost},
		{"wrong PEM type", pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: []byte{1}}), keystore.ErrKeyLost},
		{"truncated DER", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{0x30, 0x10}}), keystore.ErrKeyLost},
		{"too large", bytes.Repeat([]byte{'A'}, maxKeyFile+1), keystore.ErrKeyLost},
		{"X25519", pemKey(t, x25519), keystore.ErrUnsupportedAlgorithm},
		{"P-521", pemKey(t, p521), keystore.ErrUnsupportedAlgorithm},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "k.key"), tt.data, 0o600); err != nil {
				t.Fatal(err)
			}
			b := open(t, Config{Dir: dir})
			if _, err := b.Public(t.Context(), "k"); !errors.Is(err, tt.want) {
				t.Errorf("Public = %v; want %v", err, tt.want)
			}
		})
	}
}

// Public returns copies: changing one does not change the key.
func TestPublicIsCopy(t *testing.T) {
	b := open(t, Config{Dir: t.TempDir()})
	pub := generate(t, b, "ed", keystore.EdDSA).(ed25519.PublicKey)
	want := slices.Clone(pub)
	clear(pub)
	got, err := b.Public(t.Context(), "ed")
	if err != nil {
		t.Fatal(err)
	}
	if !want.Equal(got) {
		t.Fatal("changing the returned public key changed the stored key")
	}
	signVerify(t, b, "ed", keystore.EdDSA, want)
}

// Generate whose context is cancelled while the key is being generated
// writes nothing.
func TestGenerateCancelledDuringKeygen(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(t.Context())
	b := open(t, Config{Dir: dir, Rand: readerFunc(func(p []byte) (int, error) {
		cancel()
		return rand.Read(p)
	})})
	_, err := b.Generate(ctx, "k", keystore.KeySpec{Algorithm: keystore.ES256})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Generate = %v; want context.Canceled", err)
	}
	if got := dirNames(t, dir); len(got) != 0 {
		t.Errorf("cancelled Generate left %q", got)
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

var _ io.Reader = readerFunc(nil)

// IDs that look like temporary or tombstone names are keys like any other:
// New's cleanup must not take their files for leftovers.
func TestTrickyIDs(t *testing.T) {
	dir := t.TempDir()
	b := open(t, Config{Dir: dir})
	ids := []string{"a.key.tmp-1", "a.key.tmp-1.key", "b.destroyed", "c.key", "d"}
	pubs := map[string]crypto.PublicKey{}
	for _, id := range ids {
		pubs[id] = generate(t, b, id, keystore.EdDSA)
	}
	if err := b.Destroy(t.Context(), "d"); err != nil {
		t.Fatal(err)
	}
	if err := b.Destroy(t.Context(), "a.key.tmp-1"); err != nil {
		t.Fatal(err)
	}
	b.Close()
	before := dirNames(t, dir)

	b = open(t, Config{Dir: dir})
	if got := dirNames(t, dir); !slices.Equal(got, before) {
		t.Errorf("New changed the directory from %q to %q", before, got)
	}
	live := []string{"a.key.tmp-1.key", "b.destroyed", "c.key"}
	if got, _ := b.List(t.Context()); !slices.Equal(got, live) {
		t.Errorf("List = %q, want %q", got, live)
	}
	for _, id := range live {
		signVerify(t, b, id, keystore.EdDSA, pubs[id])
	}
	for _, id := range []string{"d", "a.key.tmp-1"} {
		if _, err := b.Generate(t.Context(), id, keystore.KeySpec{Algorithm: keystore.EdDSA}); !errors.Is(err, keystore.ErrAlreadyExists) {
			t.Errorf("Generate(%q) after Destroy = %v; want ErrAlreadyExists", id, err)
		}
	}
}

// A crash in Destroy after the tombstone and before the key file's removal:
// at the next start the key is destroyed for good. It signs nothing, is not
// listed, its file is removed, and its ID is not reused.
func TestTombstonedKeyFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	b := open(t, Config{Dir: dir})
	generate(t, b, "keep", keystore.ES256)
	generate(t, b, "gone", keystore.ES256)
	b.Close()
	if err := os.WriteFile(filepath.Join(dir, "gone"+tombSuffix), nil, 0o600); err != nil {
		t.Fatal(err)
	}

	b = open(t, Config{Dir: dir})
	ctx := t.Context()
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	if sig, err := b.Sign(ctx, "gone", d, crypto.SHA256); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Sign by a key with a tombstone = %x, %v; want ErrNotFound", sig, err)
	}
	if ids, err := b.List(ctx); err != nil || !slices.Equal(ids, []string{"keep"}) {
		t.Errorf("List = %q, %v; want [keep]", ids, err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "gone"+keySuffix)); err == nil {
		t.Error("the key file of a tombstoned key is still there after New")
	}
	if _, err := b.Generate(ctx, "gone", keystore.KeySpec{Algorithm: keystore.ES256}); !errors.Is(err, keystore.ErrAlreadyExists) {
		t.Errorf("Generate under a tombstoned ID = %v; want ErrAlreadyExists", err)
	}
	if err := b.Destroy(ctx, "gone"); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Destroy again = %v; want ErrNotFound", err)
	}
	if got := dirNames(t, dir); !slices.Equal(got, []string{"gone.destroyed", "keep.key"}) {
		t.Errorf("directory holds %q, want [gone.destroyed keep.key]", got)
	}
	if _, err := b.Sign(ctx, "keep", d, crypto.SHA256); err != nil {
		t.Errorf("Sign by the other key: %v", err)
	}
}

// LoseKey removes the key file of id behind the backend's back.
func (p probed) LoseKey(t *testing.T, id string) {
	t.Helper()
	if err := os.Remove(filepath.Join(p.dir, id+".key")); err != nil {
		t.Fatal(err)
	}
}

// S2 on a real full disk: a small tmpfs (root only) is filled, Generate
// fails with ErrUnavailable, leaves no partial or temporary file, and the key
// already there still loads and signs after a restart.
func TestDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=64k,mode=0700"); err != nil {
		t.Skipf("cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	keys := filepath.Join(dir, "keys")
	b := open(t, Config{Dir: keys})
	old := generate(t, b, "old", keystore.ES256)

	// Fill the file system, 1 KiB at a time, bounded by its size.
	f, err := os.Create(filepath.Join(dir, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 1024)
	full := false
	for range 128 {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("filling the tmpfs: %v", err)
			}
			full = true
			break
		}
	}
	if err := f.Close(); err != nil && !errors.Is(err, syscall.ENOSPC) {
		t.Fatal(err)
	}
	if !full {
		t.Fatal("the 64 KiB tmpfs did not fill up with 128 KiB")
	}

	for _, spec := range []keystore.KeySpec{{Algorithm: keystore.RS256, RSABits: 3072}, {Algorithm: keystore.ES256}} {
		pub, err := b.Generate(t.Context(), "new", spec)
		if !errors.Is(err, keystore.ErrUnavailable) {
			t.Errorf("Generate(%v) on a full disk = %T, %v; want ErrUnavailable", spec, pub, err)
		}
		if got := dirNames(t, keys); !slices.Equal(got, []string{"old.key"}) {
			t.Errorf("after Generate(%v) on a full disk the key directory holds %q, want [old.key]", spec, got)
		}
	}
	b.Close()
	b = open(t, Config{Dir: keys})
	signVerify(t, b, "old", keystore.ES256, old)
	if ids, err := b.List(t.Context()); err != nil || !slices.Equal(ids, []string{"old"}) {
		t.Errorf("List after the full disk = %q, %v; want [old]", ids, err)
	}

	// With room again, the ID is free and works.
	if err := os.Remove(filepath.Join(dir, "filler")); err != nil {
		t.Fatal(err)
	}
	pub := generate(t, b, "new", keystore.ES256)
	signVerify(t, b, "new", keystore.ES256, pub)
}

// One process at a time may use a key directory: a second keyd (with a
// state directory of its own but backend.soft.dir shared) would remove
// the first one's files in progress as a crash's leftovers.
func TestOneBackendPerDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	b := open(t, Config{Dir: dir})
	if _, err := New(Config{Dir: dir}); !errors.Is(err, keyfile.ErrInUse) {
		t.Fatalf("second New on %s = %v; want keyfile.ErrInUse", dir, err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Errorf("second Close = %v; want nil", err)
	}
	b2, err := New(Config{Dir: dir})
	if err != nil {
		t.Fatalf("New after Close: %v", err)
	}
	b2.Close()
}

// Something other than a file where Destroy writes its tombstone (put there
// by someone else: keyd writes only files) fails the Destroy with
// ErrInsecureStorage, which the server answers FAILED_PRECONDITION with
// the path, not with an error wrapping no sentinel (INTERNAL); the key is
// left as it was.
func TestDestroyTombstoneNotAFile(t *testing.T) {
	for name, put := range map[string]func(path string) error{
		"directory": func(path string) error { return os.Mkdir(path, 0o700) },
		"fifo":      func(path string) error { return syscall.Mkfifo(path, 0o600) },
		"symlink":   func(path string) error { return os.Symlink("/dev/null", path) },
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			b := open(t, Config{Dir: dir})
			pub := generate(t, b, "k", keystore.ES256)
			if err := put(filepath.Join(dir, "k"+tombSuffix)); err != nil {
				t.Fatal(err)
			}
			if err := b.Destroy(t.Context(), "k"); !errors.Is(err, keystore.ErrInsecureStorage) {
				t.Errorf("Destroy with a %s at its tombstone = %v; want ErrInsecureStorage", name, err)
			}
			signVerify(t, b, "k", keystore.ES256, pub)
		})
	}
}
