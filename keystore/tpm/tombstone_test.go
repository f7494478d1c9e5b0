package tpm

import (
	"crypto"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/keyd-dev/keyd/internal/swtpmtest"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// TestTombstonedKeyFile (P11 for the TPM): keyd crashed in Destroy after
// writing the tombstone and before removing the key file. At the next start
// the key is destroyed for good: it signs nothing, is not listed, its file
// is removed, and its ID is not reused.
func TestTombstonedKeyFile(t *testing.T) {
	s := swtpmtest.Start(t)
	dir := filepath.Join(t.TempDir(), "state")
	b := newTestBackend(t, s, Config{StateDir: dir})
	ctx := t.Context()
	keystoretest.MustGenerate(t, b, "keep")
	keystoretest.MustGenerate(t, b, "gone")
	b.Close()
	// The crash: the tombstone is written, the key file is still there.
	writeFile(t, filepath.Join(dir, "gone"+tombSuffix), nil, 0o600)

	b = newTestBackend(t, s, Config{StateDir: dir})
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	if sig, err := b.Sign(ctx, "gone", d, crypto.SHA256); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Sign by a key with a tombstone = %x, %v; want ErrNotFound", sig, err)
	}
	if _, err := b.Public(ctx, "gone"); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("Public of a key with a tombstone = %v; want ErrNotFound", err)
	}
	if ids, err := b.List(ctx); err != nil || !slices.Equal(ids, []string{"keep"}) {
		t.Errorf("List = %q, %v; want [keep]", ids, err)
	}
	if _, err := os.Lstat(b.keyPath("gone")); err == nil {
		t.Errorf("the key file of a tombstoned key is still there after New")
	}
	if _, err := b.Generate(ctx, "gone", keystore.KeySpec{Algorithm: keystore.ES256}); !errors.Is(err, keystore.ErrAlreadyExists) {
		t.Errorf("Generate under a tombstoned ID = %v; want ErrAlreadyExists", err)
	}
	if _, err := b.Sign(ctx, "keep", d, crypto.SHA256); err != nil {
		t.Errorf("Sign by the other key: %v", err)
	}
}
