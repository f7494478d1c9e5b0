// Package keyfile writes the files of keystores that keep keys (or key
// blobs) in a directory: atomically, durably, and never over an existing
// file, so a key ID is never silently reused.
package keyfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/keyd-dev/keyd/keystore"
)

// TempInfix joins a file's name and the random part of its temporary file:
// "<name>.tmp-<digits>". Backends remove such leftovers of a crash at start.
const TempInfix = ".tmp-"

// WriteNew writes data to dir/name atomically and without replacing an
// existing file: a temporary file (O_EXCL, mode 0600) is written and
// synced, hard-linked to the final name (which fails with
// keystore.ErrAlreadyExists if the name exists), removed, and the directory
// synced. A crash leaves no file or a complete one, plus perhaps a
// temporary file. fail, when not nil, is called after each stage
// ("written", "synced", "linked") and an error from it is returned as it
// is: tests simulate crashes and races with it. Other failures wrap
// keystore.ErrUnavailable.
func WriteNew(dir, name string, data []byte, fail func(stage string) error) (err error) {
	if fail == nil {
		fail = func(string) error { return nil }
	}
	f, err := os.CreateTemp(dir, name+TempInfix+"*")
	if err != nil {
		return fmt.Errorf("%w: create %s: %v", keystore.ErrUnavailable, name, err)
	}
	tmp := f.Name()
	defer func() {
		if f != nil {
			f.Close()
		}
		// A temporary file that cannot be removed is a leftover the
		// backend removes at its next start; the write itself stands.
		os.Remove(tmp)
	}()
	if err := f.Chmod(0o600); err != nil {
		return fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("%w: write %s: %v", keystore.ErrUnavailable, tmp, err)
	}
	if err := fail("written"); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("%w: sync %s: %v", keystore.ErrUnavailable, tmp, err)
	}
	err = f.Close()
	f = nil
	if err != nil {
		return fmt.Errorf("%w: close %s: %v", keystore.ErrUnavailable, tmp, err)
	}
	if err := fail("synced"); err != nil {
		return err
	}
	final := filepath.Join(dir, name)
	if err := os.Link(tmp, final); errors.Is(err, fs.ErrExist) {
		return keystore.ErrAlreadyExists
	} else if err != nil {
		return fmt.Errorf("%w: link %s: %v", keystore.ErrUnavailable, final, err)
	}
	if err := fail("linked"); err != nil {
		return err
	}
	// Only now is the new name durable. If this fails the file may or may
	// not survive a crash; a retried write then sees ErrAlreadyExists or
	// writes afresh, and never overwrites.
	if err := SyncDir(dir); err != nil {
		return fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	return nil
}

// WriteTombstone creates the empty file dir/name (mode 0600, if missing,
// never through a symlink, never blocking on a FIFO) and makes it durable.
// An existing name that is not a regular file is refused with
// keystore.ErrInsecureStorage; a failure to write is keystore.ErrUnavailable.
func WriteTombstone(dir, name string) error {
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0o600)
	switch {
	case errors.Is(err, syscall.ELOOP), errors.Is(err, syscall.EISDIR), errors.Is(err, syscall.ENXIO):
		// A symlink, a directory, a FIFO without a reader: put there by
		// someone else, never by keyd.
		return fmt.Errorf("%s is not a regular file: %w", path, keystore.ErrInsecureStorage)
	case err != nil:
		return fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	if fi, serr := f.Stat(); serr != nil {
		f.Close()
		return fmt.Errorf("%w: %v", keystore.ErrUnavailable, serr)
	} else if !fi.Mode().IsRegular() {
		f.Close()
		return fmt.Errorf("%s is not a regular file (%v): %w", path, fi.Mode().Type(), keystore.ErrInsecureStorage)
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = SyncDir(dir)
	}
	if err != nil {
		return fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	return nil
}

// Remove removes dir/name, if it is there, and makes the removal durable.
// A failure is keystore.ErrUnavailable.
func Remove(dir, name string) error {
	if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	if err := SyncDir(dir); err != nil {
		return fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	return nil
}

// Tombstoned reports whether the key file at keyPath, of key id, has a
// tombstone at tombPath: its Destroy wrote the tombstone, and a crash may
// have cut it short before the key file was removed. If so, it finishes the
// job: it removes the key file, logging the outcome to log, and the
// caller's scan at start counts the key as destroyed (and syncs the
// directory).
func Tombstoned(log *slog.Logger, id, keyPath, tombPath string) bool {
	if _, err := os.Lstat(tombPath); err != nil {
		return false
	}
	if err := os.Remove(keyPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		log.Error("cannot remove the key file of a destroyed key; it stays unusable", "id", id, "err", err)
	} else {
		log.Warn("removed the key file of a key whose destroy was interrupted", "id", id)
	}
	return true
}

// SyncDir makes the directory entries of dir durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync directory: %w", err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", filepath.Clean(dir), err)
	}
	return nil
}

// CheckDir refuses a key directory that is a symlink, not a directory,
// writable by group or others, or owned by another user than this process's
// (ErrInsecureStorage). what names it in messages ("key directory").
func CheckDir(dir, what string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("%s %s is a symlink; configure the real path: %w", what, dir, keystore.ErrInsecureStorage)
	case !fi.IsDir():
		return fmt.Errorf("%s %s is not a directory (%v)", what, dir, fi.Mode().Type())
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("%s %s has mode %04o, writable by group or others; chmod 700 it: %w", what, dir, fi.Mode().Perm(), keystore.ErrInsecureStorage)
	}
	if uid, ok := Owner(fi); ok && uid != os.Geteuid() {
		return fmt.Errorf("%s %s is owned by uid %d, not by this process's uid %d: %w", what, dir, uid, os.Geteuid(), keystore.ErrInsecureStorage)
	}
	return nil
}

// Rule says which files CheckInfo accepts: no permission bit in Mask, owned
// by this process's user (or also by root, if RootOK).
type Rule struct {
	Mask   fs.FileMode
	RootOK bool
}

// KeyRule is the rule for key files: mode 0600 or stricter, ours.
var KeyRule = Rule{Mask: 0o077}

// CheckInfo refuses (ErrInsecureStorage) a file that is a symlink, not a
// regular file, or breaks rule. what names it in messages ("key file").
func CheckInfo(path, what string, fi fs.FileInfo, rule Rule) error {
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("%s %s is a symlink: %w", what, path, keystore.ErrInsecureStorage)
	case !fi.Mode().IsRegular():
		return fmt.Errorf("%s %s is not a regular file (%v): %w", what, path, fi.Mode().Type(), keystore.ErrInsecureStorage)
	case fi.Mode().Perm()&rule.Mask != 0:
		return fmt.Errorf("%s %s has mode %04o, open to group or others; chmod 600 it: %w", what, path, fi.Mode().Perm(), keystore.ErrInsecureStorage)
	}
	if uid, ok := Owner(fi); ok && uid != os.Geteuid() && !(rule.RootOK && uid == 0) {
		return fmt.Errorf("%s %s is owned by uid %d, not by this process's uid %d: %w", what, path, uid, os.Geteuid(), keystore.ErrInsecureStorage)
	}
	return nil
}

// Owner returns the uid that owns fi, when the platform says.
func Owner(fi fs.FileInfo) (int, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return int(st.Uid), true
}

// ID returns the key ID of a file name "<id><suffix>", if it is a valid one.
func ID(name, suffix string) (string, bool) {
	id, ok := strings.CutSuffix(name, suffix)
	return id, ok && keystore.ValidID(id) == nil
}

// List returns, sorted, the IDs of the files "<id><suffix>" in dir.
func List(dir, suffix string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	ids := []string{}
	for _, e := range entries {
		if id, ok := ID(e.Name(), suffix); ok {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids, nil
}

// Read reads the file at path, at most max bytes, after checking it with
// CheckInfo (what names it in messages), without following a symlink or
// blocking on a FIFO swapped in after the check, and only if the file
// opened is the one checked. A missing file is keystore.ErrNotFound; one
// larger than max is keystore.ErrKeyLost; an unsafe one
// keystore.ErrInsecureStorage.
func Read(path, what string, rule Rule, max int) ([]byte, error) {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, keystore.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	if err := CheckInfo(path, what, fi, rule); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, keystore.ErrNotFound
	case errors.Is(err, syscall.ELOOP):
		return nil, fmt.Errorf("%s %s is a symlink: %w", what, path, keystore.ErrInsecureStorage)
	case err != nil:
		return nil, fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	defer f.Close()
	ofi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	if err := CheckInfo(path, what, ofi, rule); err != nil {
		return nil, err
	}
	if !os.SameFile(fi, ofi) {
		return nil, fmt.Errorf("%s %s was replaced while being opened: %w", what, path, keystore.ErrInsecureStorage)
	}
	if ofi.Size() > int64(max) {
		return nil, fmt.Errorf("%s %s is larger than %d bytes: %w", what, path, max, keystore.ErrKeyLost)
	}
	data, err := io.ReadAll(io.LimitReader(f, int64(max)+1))
	if err != nil {
		clear(data)
		return nil, fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	if len(data) > max {
		clear(data)
		return nil, fmt.Errorf("%s %s is larger than %d bytes: %w", what, path, max, keystore.ErrKeyLost)
	}
	return data, nil
}

// CheckFree reports keystore.ErrAlreadyExists if the key file keyPath or
// its tombstone tombPath exists: key IDs are never reused.
func CheckFree(keyPath, tombPath string) error {
	if _, err := os.Lstat(keyPath); err == nil {
		return keystore.ErrAlreadyExists
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	if _, err := os.Lstat(tombPath); err == nil {
		return fmt.Errorf("%w (destroyed; key IDs are never reused)", keystore.ErrAlreadyExists)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	return nil
}

// ErrInUse means another process holds a directory's lock (or this process
// does, through another open of it).
var ErrInUse = errors.New("in use by another keyd")

// LockDir takes an exclusive flock on dir/name (created mode 0600, never
// through a symlink), held until the returned file is closed, so that two
// processes never share the directory. A lock held elsewhere fails at once
// with an error wrapping ErrInUse; a crashed holder's lock is gone with it.
func LockDir(dir, name string) (*os.File, error) {
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: %w", dir, ErrInUse)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}
