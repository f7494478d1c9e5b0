// Package keyfile writes the files of keystores that keep keys (or key
// blobs) in a directory: atomically, durably, and never over an existing
// file, so a key ID is never silently reused.
package keyfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
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
// never through a symlink) and makes it durable.
func WriteTombstone(dir, name string) error {
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = SyncDir(dir)
	}
	return err
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
