// Package soft is the software key store: private keys in files in a local
// directory.
//
// It is for development and for trying keyd, NOT for production. The keys are
// ordinary files, protected only by file permissions: anyone who can read them
// (root, a backup, a disk image, a process running as keyd's user) has the
// keys, and Destroy only unlinks a file, so the key may survive on the disk.
// Use the pkcs11 or tpm backend for keys that matter.
//
// # Layout
//
// One file per key, <Dir>/<id>.key, holding a PKCS #8 private key in a PEM
// "PRIVATE KEY" block (the key type is in the PKCS #8 structure; the file does
// not record the JWS algorithm). Files are mode 0600 and the directory 0700.
// A key is written to a temporary file <id>.key.tmp-* (created with O_EXCL),
// synced, hard-linked to its final name (which fails if the name exists, so
// an existing key is never replaced) and the directory synced: a crash leaves
// either no <id>.key or a complete one. New removes temporary files left by a
// crash.
//
// Destroy first writes an empty tombstone <id>.destroyed, then removes
// <id>.key. Generate refuses an ID that has a tombstone with
// keystore.ErrAlreadyExists, so an ID is never reused for a different key. A
// crash between the two steps leaves the key file beside its tombstone; New
// removes it, and the key never signs again.
//
// # Storage checks
//
// New refuses a directory that is a symlink, is writable by group or others,
// or is owned by another user than the process's effective uid. Loading a key
// (the first Public or Sign of it in a process) refuses a file that is a
// symlink, not a regular file, has any group or other permission bit, or is
// owned by another user. Both fail with an error wrapping
// keystore.ErrInsecureStorage that names the path and the problem. New also
// checks every key file and logs the ones that would be refused, but still
// opens, so the other keys stay usable.
//
// One process at a time may use a directory: New takes an exclusive lock on
// the file "lock" in it, held until Close, and fails with an error wrapping
// keyfile.ErrInUse while another process (or another open Backend) holds it.
//
// # Context
//
// Every method returns ctx.Err() if ctx is done when it starts. Generate also
// returns as soon as ctx is done while the key is being generated (RSA-3072
// takes a while), writing nothing; once it starts writing the file it
// finishes. Sign does not stop once started: signing takes milliseconds.
package soft

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/keyd-dev/keyd/internal/keyfile"
	"github.com/keyd-dev/keyd/keystore"
)

// Config configures a soft Backend.
type Config struct {
	// Dir is the key directory. It is created, mode 0700, if missing.
	Dir string

	// Logger receives warnings about the storage; nil discards them.
	Logger *slog.Logger

	// Rand is the source of randomness for key generation and signing, for
	// tests; nil means crypto/rand. Since Go 1.26 the standard library ignores
	// it for ECDSA and RSA unless GODEBUG=cryptocustomrand=1 is set; Ed25519
	// key generation always reads its seed from it.
	Rand io.Reader
}

// Backend is the soft keystore.Backend. It is safe for concurrent use.
type Backend struct {
	dir  string
	log  *slog.Logger
	rand io.Reader
	lock *os.File // the directory's lock (lockFile), held until Close

	// wmu serializes changes to the directory (the file part of Generate,
	// Destroy), so a Generate and a Destroy of one ID cannot interleave.
	wmu sync.Mutex

	mu     sync.RWMutex
	closed bool
	keys   map[string]crypto.Signer // loaded keys
	// gone holds IDs destroyed by this process, so a load racing with
	// Destroy cannot put the key back in the cache.
	gone map[string]struct{}

	// failpoint, if set (by tests), is called at each stage of writing a key
	// file; an error aborts the write there as a crash or a full disk would.
	failpoint func(stage string) error
}

var _ keystore.Backend = (*Backend)(nil)

// algorithms is what the soft backend generates: everything keyd knows.
var algorithms = keystore.Algorithms()

// New opens the key directory cfg.Dir, creating it if needed. It fails with an
// error wrapping keystore.ErrInsecureStorage if the directory is a symlink,
// writable by group or others, or owned by another user.
func New(cfg Config) (*Backend, error) {
	if cfg.Dir == "" {
		return nil, errors.New("soft: Config.Dir is empty")
	}
	dir := filepath.Clean(cfg.Dir)
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := cfg.Rand
	if r == nil {
		r = rand.Reader
	}
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("soft: create key directory: %w", err)
		}
	}
	if err := keyfile.CheckDir(dir, "key directory"); err != nil {
		return nil, fmt.Errorf("soft: %w", err)
	}
	// Ours alone from here: scan may remove what a crash left.
	lock, err := keyfile.LockDir(dir, lockFile)
	if err != nil {
		return nil, fmt.Errorf("soft: key directory: %w", err)
	}
	b := &Backend{
		dir:  dir,
		log:  log.With("backend", "soft", "dir", dir),
		rand: r,
		lock: lock,
		keys: map[string]crypto.Signer{},
		gone: map[string]struct{}{},
	}
	n, err := b.scan()
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("soft: %w", err)
	}
	b.log.Warn("soft key store opened: keys are files protected only by permissions; not for production", "keys", n)
	return b, nil
}

// scan removes temporary files left by a crash, finishes destroys that a
// crash interrupted (see keyfile.Tombstoned) and checks each key file,
// logging those that loading would refuse. It returns the number of keys.
func (b *Backend) scan() (int, error) {
	entries, err := os.ReadDir(b.dir)
	if err != nil {
		return 0, fmt.Errorf("read key directory: %w", err)
	}
	n := 0
	removed := false
	for _, e := range entries {
		name := e.Name()
		if id, ok := tempID(name); ok {
			path := filepath.Join(b.dir, name)
			if err := os.Remove(path); err != nil {
				b.log.Error("cannot remove leftover temporary key file", "id", id, "path", path, "err", err)
				continue
			}
			b.log.Warn("removed leftover temporary key file from an interrupted generate", "id", id, "path", path)
			continue
		}
		id, ok := keyID(name)
		if !ok {
			continue
		}
		if keyfile.Tombstoned(b.log, id, filepath.Join(b.dir, name), b.tombstonePath(id)) {
			b.gone[id] = struct{}{}
			removed = true
			continue
		}
		n++
		if _, err := checkFile(filepath.Join(b.dir, name)); err != nil {
			b.log.Error("key file refused; Public and Sign of this key will fail", "id", id, "err", err)
		}
	}
	if removed {
		if err := keyfile.SyncDir(b.dir); err != nil {
			return 0, err
		}
	}
	return n, nil
}

// Name returns "soft".
func (b *Backend) Name() string { return "soft" }

// Algorithms returns every algorithm keyd knows: ES256, ES384, RS256, PS256
// (2048 and 3072 bits) and EdDSA.
func (b *Backend) Algorithms() []keystore.Algorithm { return slices.Clone(algorithms) }

// Generate creates a key under id. It fails with ErrAlreadyExists if id has a
// key file or a tombstone, ErrInvalidID, ErrUnsupportedAlgorithm, ErrClosed,
// or the context's error.
func (b *Backend) Generate(ctx context.Context, id string, spec keystore.KeySpec) (crypto.PublicKey, error) {
	if err := b.beginID(ctx, id); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	if err := spec.Validate(); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	// Fail early, before the slow part; the link below is what guarantees it.
	if err := keyfile.CheckFree(b.keyPath(id), b.tombstonePath(id)); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	key, err := b.generate(ctx, spec)
	if err != nil {
		return nil, fmt.Errorf("generate %s %v: %w", id, spec, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}

	b.wmu.Lock()
	err = keyfile.CheckFree(b.keyPath(id), b.tombstonePath(id))
	if err == nil && b.loaded(id) {
		// The file is gone but the key is loaded and signing: a new key
		// under its ID would be a reused ID.
		err = fmt.Errorf("%w (loaded, though its file is missing)", keystore.ErrAlreadyExists)
	}
	if err == nil {
		err = b.writeKey(id, key)
	}
	if err == nil {
		// Recorded before wmu goes: a Destroy of id that comes between
		// would otherwise be undone here, the key gone from the disk
		// and live in memory.
		b.mu.Lock()
		if !b.closed {
			delete(b.gone, id)
			b.keys[id] = key
		}
		b.mu.Unlock()
	}
	b.wmu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	b.log.Info("key generated", "id", id, "spec", spec.String())
	pub, err := keystore.ClonePublic(key.Public())
	if err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	return pub, nil
}

// generate makes a key for spec, returning early if ctx is done.
func (b *Backend) generate(ctx context.Context, spec keystore.KeySpec) (crypto.Signer, error) {
	type result struct {
		key crypto.Signer
		err error
	}
	done := make(chan result, 1)
	go func() {
		var r result
		switch spec.Algorithm {
		case keystore.ES256:
			r.key, r.err = ecdsa.GenerateKey(elliptic.P256(), b.rand)
		case keystore.ES384:
			r.key, r.err = ecdsa.GenerateKey(elliptic.P384(), b.rand)
		case keystore.RS256, keystore.PS256:
			r.key, r.err = rsa.GenerateKey(b.rand, spec.Bits())
		case keystore.EdDSA:
			_, r.key, r.err = ed25519.GenerateKey(b.rand)
		default:
			r.err = keystore.ErrUnsupportedAlgorithm
		}
		done <- r
	}()
	select {
	case r := <-done:
		if r.err != nil {
			return nil, r.err
		}
		return r.key, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Public returns the public key of id.
func (b *Backend) Public(ctx context.Context, id string) (crypto.PublicKey, error) {
	if err := b.beginID(ctx, id); err != nil {
		return nil, fmt.Errorf("public %s: %w", id, err)
	}
	key, err := b.key(id)
	if err != nil {
		return nil, fmt.Errorf("public %s: %w", id, err)
	}
	pub, err := keystore.ClonePublic(key.Public())
	if err != nil {
		return nil, fmt.Errorf("public %s: %w", id, err)
	}
	return pub, nil
}

// Sign signs digest with key id. ECDSA keys take the hash of their curve
// (SHA-256 for P-256, SHA-384 for P-384) and return ASN.1 DER; RSA keys take
// crypto.SHA256 (PKCS #1 v1.5) or *rsa.PSSOptions with Hash crypto.SHA256 and
// SaltLength rsa.PSSSaltLengthEqualsHash or 32; Ed25519 keys take the message
// and crypto.Hash(0). Anything else fails with ErrUnsupportedAlgorithm.
func (b *Backend) Sign(ctx context.Context, id string, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := b.beginID(ctx, id); err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	key, err := b.key(id)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	sig, err := b.sign(key, digest, opts)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	return sig, nil
}

func (b *Backend) sign(key crypto.Signer, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := keystore.CheckOpts(opts); err != nil {
		return nil, err
	}
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		want := crypto.SHA256
		if k.Curve == elliptic.P384() {
			want = crypto.SHA384
		}
		if _, pss := opts.(*rsa.PSSOptions); pss || opts.HashFunc() != want {
			return nil, fmt.Errorf("%s key signs %v digests, not %T %v: %w", k.Curve.Params().Name, want, opts, opts.HashFunc(), keystore.ErrUnsupportedAlgorithm)
		}
		if len(digest) != want.Size() {
			return nil, fmt.Errorf("digest is %d bytes, want %d for %v", len(digest), want.Size(), want)
		}
		return ecdsa.SignASN1(b.rand, k, digest)
	case *rsa.PrivateKey:
		if o, ok := opts.(*rsa.PSSOptions); ok {
			if o.Hash != crypto.SHA256 || (o.SaltLength != rsa.PSSSaltLengthEqualsHash && o.SaltLength != crypto.SHA256.Size()) {
				return nil, fmt.Errorf("RSA-PSS with hash %v and salt length %d: %w (PS256 wants SHA-256 and a 32-byte salt)", o.Hash, o.SaltLength, keystore.ErrUnsupportedAlgorithm)
			}
			return rsa.SignPSS(b.rand, k, crypto.SHA256, digest, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		}
		if opts.HashFunc() != crypto.SHA256 {
			return nil, fmt.Errorf("RSA PKCS #1 v1.5 with hash %v: %w (RS256 wants SHA-256)", opts.HashFunc(), keystore.ErrUnsupportedAlgorithm)
		}
		return rsa.SignPKCS1v15(nil, k, crypto.SHA256, digest)
	case ed25519.PrivateKey:
		if o, ok := opts.(*ed25519.Options); ok && o.Context != "" {
			return nil, fmt.Errorf("Ed25519 with a context: %w", keystore.ErrUnsupportedAlgorithm)
		}
		if opts.HashFunc() != 0 {
			return nil, fmt.Errorf("Ed25519 signs the message, not a %v digest: %w", opts.HashFunc(), keystore.ErrUnsupportedAlgorithm)
		}
		return ed25519.Sign(k, digest), nil
	}
	return nil, fmt.Errorf("key type %T: %w", key, keystore.ErrUnsupportedAlgorithm)
}

// List returns the IDs of the key files in the directory, sorted.
func (b *Backend) List(ctx context.Context) ([]string, error) {
	if err := b.begin(ctx); err != nil {
		return nil, fmt.Errorf("list: %w", err)
	}
	ids, err := keyfile.List(b.dir, keySuffix)
	if err != nil {
		return nil, fmt.Errorf("list: %w", err)
	}
	return ids, nil
}

// Destroy writes the tombstone of id, then removes its key file. It fails with
// ErrNotFound if there is no key file.
func (b *Backend) Destroy(ctx context.Context, id string) error {
	if err := b.beginID(ctx, id); err != nil {
		return fmt.Errorf("destroy %s: %w", id, err)
	}
	b.wmu.Lock()
	defer b.wmu.Unlock()
	path := b.keyPath(id)
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) && !b.loaded(id) {
		return fmt.Errorf("destroy %s: %w", id, keystore.ErrNotFound)
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("destroy %s: %w: %v", id, keystore.ErrUnavailable, err)
	}
	tomb := b.tombstonePath(id)
	err := keyfile.WriteTombstone(b.dir, filepath.Base(tomb))
	if err != nil {
		return fmt.Errorf("destroy %s: write tombstone: %w", id, err)
	}

	b.mu.Lock()
	delete(b.keys, id)
	b.gone[id] = struct{}{}
	b.mu.Unlock()

	if err := keyfile.Remove(b.dir, filepath.Base(path)); err != nil {
		return fmt.Errorf("destroy %s: %w", id, err)
	}
	b.log.Info("key destroyed", "id", id)
	return nil
}

// Close makes every later call fail with ErrClosed and drops the loaded keys
// (Go cannot reliably wipe them from memory). Closing twice returns nil.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	b.closed = true
	b.keys = nil
	return b.lock.Close()
}

// loaded reports whether key id is loaded.
func (b *Backend) loaded(id string) bool {
	b.mu.RLock()
	defer b.mu.RUnlock()
	_, ok := b.keys[id]
	return ok
}

// begin checks that b is open and ctx is live.
func (b *Backend) begin(ctx context.Context) error {
	b.mu.RLock()
	closed := b.closed
	b.mu.RUnlock()
	if closed {
		return keystore.ErrClosed
	}
	return ctx.Err()
}

// beginID is begin, and checks that id is valid.
func (b *Backend) beginID(ctx context.Context, id string) error {
	if err := b.begin(ctx); err != nil {
		return err
	}
	return keystore.ValidID(id)
}

// key returns the loaded key id, loading it from its file the first time.
func (b *Backend) key(id string) (crypto.Signer, error) {
	b.mu.RLock()
	key, ok := b.keys[id]
	closed := b.closed
	b.mu.RUnlock()
	if closed {
		return nil, keystore.ErrClosed
	}
	if ok {
		return key, nil
	}
	key, err := loadKey(b.keyPath(id))
	if err != nil {
		if errors.Is(err, keystore.ErrInsecureStorage) {
			b.log.Error("key file refused", "id", id, "err", err)
		}
		return nil, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	switch _, gone := b.gone[id]; {
	case b.closed:
		return nil, keystore.ErrClosed
	case gone:
		return nil, keystore.ErrNotFound
	}
	if k, ok := b.keys[id]; ok {
		return k, nil // loaded concurrently; keep one
	}
	b.keys[id] = key
	return key, nil
}

func (b *Backend) keyPath(id string) string       { return filepath.Join(b.dir, id+keySuffix) }
func (b *Backend) tombstonePath(id string) string { return filepath.Join(b.dir, id+tombSuffix) }

const (
	keySuffix  = ".key"
	tombSuffix = ".destroyed"
	tempInfix  = keySuffix + keyfile.TempInfix
	lockFile   = "lock"
)

// keyID returns the ID of a key file name "<id>.key".
func keyID(name string) (string, bool) {
	return keyfile.ID(name, keySuffix)
}

// tempID returns the ID of a temporary key file name "<id>.key.tmp-<digits>"
// (os.CreateTemp's random part is decimal). Requiring the digits keeps a key
// or tombstone whose ID contains ".key.tmp-" from looking temporary.
func tempID(name string) (string, bool) {
	i := strings.LastIndex(name, tempInfix)
	if i < 0 {
		return "", false
	}
	id, rnd := name[:i], name[i+len(tempInfix):]
	if rnd == "" || strings.Trim(rnd, "0123456789") != "" {
		return "", false
	}
	return id, keystore.ValidID(id) == nil
}

// loadedIDs returns the IDs of the loaded keys, for tests.
func (b *Backend) loadedIDs() []string {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return slices.Sorted(maps.Keys(b.keys))
}
