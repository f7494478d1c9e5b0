package soft

import (
	"crypto"
	"crypto/rsa"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/keystore"
)

// A key that is loaded and signing under an ID must not be silently replaced
// by a different key under the same ID when its file disappears (deleted,
// restored from a backup without it, ...): Generate must refuse the ID, and
// Destroy must stop the key from signing rather than report ErrNotFound while
// it keeps signing.
func TestLostFileOfLoadedKey(t *testing.T) {
	dir := t.TempDir()
	b := open(t, Config{Dir: dir})
	generate(t, b, "k", keystore.EdDSA)
	if err := os.Remove(filepath.Join(dir, "k.key")); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Generate(t.Context(), "k", keystore.KeySpec{Algorithm: keystore.EdDSA}); !errors.Is(err, keystore.ErrAlreadyExists) {
		t.Errorf("Generate of an ID whose key is loaded and signing = %v; want ErrAlreadyExists (key ID reused)", err)
	}
}

func TestDestroyLoadedKeyWithoutFile(t *testing.T) {
	dir := t.TempDir()
	b := open(t, Config{Dir: dir})
	generate(t, b, "k", keystore.EdDSA)
	if err := os.Remove(filepath.Join(dir, "k.key")); err != nil {
		t.Fatal(err)
	}
	err := b.Destroy(t.Context(), "k")
	if _, serr := b.Sign(t.Context(), "k", []byte("m"), crypto.Hash(0)); serr == nil {
		t.Errorf("Destroy = %v, yet Sign with the key still succeeds", err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "k.destroyed")); err != nil {
		t.Errorf("no tombstone after Destroy of a loaded key: %v", err)
	}
}

// A FIFO at the tombstone's name must not hang Destroy (holding wmu, which
// blocks every later Generate and Destroy).
func TestDestroyFifoTombstone(t *testing.T) {
	dir := t.TempDir()
	b := open(t, Config{Dir: dir})
	generate(t, b, "k", keystore.EdDSA)
	tomb := filepath.Join(dir, "k.destroyed")
	if err := syscall.Mkfifo(tomb, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- b.Destroy(t.Context(), "k") }()
	select {
	case err := <-done:
		if err == nil {
			t.Errorf("Destroy with a FIFO as tombstone succeeded")
		}
	case <-time.After(2 * time.Second):
		t.Errorf("Destroy hangs on a FIFO at the tombstone's name")
		// Unblock it: open the read end.
		f, err := os.OpenFile(tomb, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err == nil {
			defer f.Close()
		}
		<-done
	}
}

// Sign with a typed nil option must fail, not panic the daemon.
func TestSignTypedNilOpts(t *testing.T) {
	b := open(t, Config{Dir: t.TempDir()})
	generate(t, b, "ed", keystore.EdDSA)
	generate(t, b, "ec", keystore.ES256)
	for _, id := range []string{"ed", "ec"} {
		for _, opts := range []crypto.SignerOpts{(*rsa.PSSOptions)(nil)} {
			func() {
				defer func() {
					if r := recover(); r != nil {
						t.Errorf("Sign(%s, %T nil) panicked: %v", id, opts, r)
					}
				}()
				if _, err := b.Sign(t.Context(), id, make([]byte, 32), opts); !errors.Is(err, keystore.ErrUnsupportedAlgorithm) {
					t.Errorf("Sign(%s, %T nil) = %v; want ErrUnsupportedAlgorithm", id, opts, err)
				}
			}()
		}
	}
}
