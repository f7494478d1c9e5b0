package rotation

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/keyd-dev/keyd/internal/keyfile"
	"github.com/keyd-dev/keyd/keystore"
)

// Store persists the versions of every key set in one small JSON file,
// replaced atomically on every change: written to a temporary file, fsynced,
// renamed over the old one, and the directory fsynced. The state is tens of
// records and changes a few times a day, so rewriting it whole is cheap and
// leaves no journal to replay; a crash at any point leaves either the old or
// the new file, never a mix. (An embedded database such as bbolt would bring
// a dependency and a file format for no gain at this size.)
//
// The store also holds an exclusive flock on the state directory for the
// life of the process, so a second keyd on the same directory refuses to
// start instead of corrupting it.
type Store struct {
	dir  string
	path string
	lock *os.File
	// syncDir syncs the directory after a rename; nil: the real one
	// (tests make it fail).
	syncDir func(dir string) error
}

const (
	stateFile = "keys.json"
	// tempPrefix starts the names of Save's temporary files.
	tempPrefix = ".keys.json.tmp-"
)

type stateDoc struct {
	Format   int       `json:"format"`
	Versions []Version `json:"versions"`
}

// OpenStore opens (creating 0700 when missing) the state directory dir and
// takes its lock. It fails with ErrLocked when another process holds it,
// and with keystore.ErrInsecureStorage when dir is a symlink, writable by
// group or others, or owned by another user (keyfile.CheckDir). It removes
// the temporary files of a save that a crash interrupted.
func OpenStore(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if err := keyfile.CheckDir(dir, "state directory"); err != nil {
		return nil, err
	}
	lf, err := keyfile.LockDir(dir, "keyd.lock")
	if errors.Is(err, keyfile.ErrInUse) {
		return nil, fmt.Errorf("%s: %w", dir, ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("state lock: %w", err)
	}
	// Ours alone now: a temporary file is what a crash in Save left.
	if entries, err := os.ReadDir(dir); err == nil {
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), tempPrefix) {
				os.Remove(filepath.Join(dir, e.Name()))
			}
		}
	}
	return &Store{dir: dir, path: filepath.Join(dir, stateFile), lock: lf}, nil
}

// maxStateFile bounds what Load reads. A version record takes about 300
// bytes, and records of destroyed keys are dropped after a while, so the
// state of even hundreds of key sets stays far below it.
const maxStateFile = 64 << 20

// stateFileRule is what Load accepts as the state file: what Save
// writes, not writable by group or others, and owned by keyd's user.
var stateFileRule = keyfile.Rule{Mask: 0o022}

// Load returns the stored versions (none when the file does not exist yet).
// It fails with ErrCorruptState when the file cannot be read as keyd wrote
// it, and with keystore.ErrInsecureStorage when it is not a file that Save
// wrote (see stateFileRule); it never follows a symlink or blocks on a
// FIFO.
func (s *Store) Load() ([]Version, error) {
	b, err := keyfile.Read(s.path, "key metadata", stateFileRule, maxStateFile)
	switch {
	case errors.Is(err, keystore.ErrNotFound):
		return nil, nil
	case errors.Is(err, keystore.ErrKeyLost):
		// Larger than Save ever writes: not keyd's state file.
		return nil, fmt.Errorf("%s: %w: larger than %d MiB", s.path, ErrCorruptState, maxStateFile>>20)
	case err != nil:
		return nil, fmt.Errorf("read key metadata: %w", err)
	}
	var doc stateDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("%s: %w: %v", s.path, ErrCorruptState, err)
	}
	if doc.Format != 1 {
		return nil, fmt.Errorf("%s: %w: format %d, this keyd reads format 1", s.path, ErrCorruptState, doc.Format)
	}
	return doc.Versions, nil
}

// Save replaces the stored versions with vs, atomically and durably.
func (s *Store) Save(vs []Version) error {
	b, err := json.MarshalIndent(stateDoc{Format: 1, Versions: vs}, "", "  ")
	if err != nil {
		return fmt.Errorf("encode key metadata: %w", err)
	}
	tmp, err := os.CreateTemp(s.dir, tempPrefix+"*")
	if err != nil {
		return fmt.Errorf("write key metadata: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := tmp.Chmod(0o600); err != nil {
		return fmt.Errorf("write key metadata: %w", err)
	}
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("write key metadata: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("write key metadata: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write key metadata: %w", err)
	}
	if err := os.Rename(tmp.Name(), s.path); err != nil {
		return fmt.Errorf("write key metadata: %w", err)
	}
	ok = true
	// From here the new state is the file's: a Load reads it. Only its
	// durability across a power loss is in question, and a power loss
	// would bring back the previous state, which is consistent too.
	sync := s.syncDir
	if sync == nil {
		sync = keyfile.SyncDir
	}
	if err := sync(s.dir); err != nil {
		return fmt.Errorf("%w: %w", ErrNotDurable, err)
	}
	return nil
}

// ErrNotDurable is wrapped by a Save whose new state is written (later
// Loads read it) but whose directory could not be synced. The caller must
// treat the state as saved: undoing what it records (destroying a key it
// names) would leave the file naming what is gone.
var ErrNotDurable = errors.New("key metadata written but not synced to disk")

// Dir is the state directory.
func (s *Store) Dir() string { return s.dir }

// Close releases the lock.
func (s *Store) Close() error { return s.lock.Close() }
