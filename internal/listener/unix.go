// Package listener creates the Unix socket keyd serves on, with its
// permissions in place before any client can connect.
package listener

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrInUse means the socket path is taken: by a live server, or by something
// that is not a socket.
var ErrInUse = errors.New("socket path in use")

// Unix listens on path with the given mode and, when gid >= 0, group.
//
// The order closes the window other daemons leave open between bind and
// chmod: socket, bind, chmod and chown of the path, and only then listen, so
// a connection attempt before the permissions are set is refused by the
// kernel rather than accepted. A missing parent directory is created 0750.
// An existing
// path is removed only when it is a socket nobody listens on; anything else is
// ErrInUse. Abstract socket names ("@...") are refused: they have no
// permissions at all.
func Unix(path string, mode os.FileMode, gid int) (net.Listener, error) {
	if strings.HasPrefix(path, "@") || strings.ContainsRune(path, 0) {
		return nil, fmt.Errorf("socket %q: abstract sockets are not allowed", path)
	}
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("socket %q: not an absolute path", path)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}

	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close() // net.FileListener dups the descriptor
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return nil, fmt.Errorf("bind %s: %w", path, err)
	}
	cleanup := func(err error) (net.Listener, error) {
		os.Remove(path)
		return nil, err
	}
	if err := unix.Fchmodat(unix.AT_FDCWD, path, uint32(mode.Perm()), 0); err != nil {
		return cleanup(fmt.Errorf("chmod %s: %w", path, err))
	}
	if gid >= 0 {
		if err := unix.Lchown(path, -1, gid); err != nil {
			return cleanup(fmt.Errorf("chown %s to gid %d: %w", path, gid, err))
		}
	}
	if err := unix.Listen(fd, 1024); err != nil {
		return cleanup(fmt.Errorf("listen %s: %w", path, err))
	}
	l, err := net.FileListener(f)
	if err != nil {
		return cleanup(fmt.Errorf("listener %s: %w", path, err))
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(true)
	return ul, nil
}

// checkDir refuses a socket directory that someone else could use to
// replace the socket: one with a directory on its path (itself or any
// directory above it, as written and with symlinks resolved) owned by a
// user other than root and us, or one every user, or a group other than
// root's and our own, may write to (unless sticky, as /tmp is): the
// socket's group, of its callers, must not be able to replace it. Nor may
// a symlink on its path be another user's (they could re-point it, e.g. in
// /tmp). A user able to write to a directory above the socket's can rename
// the socket's directory away and put their own in its place.
func checkDir(dir string) error {
	if err := checkPath(dir); err != nil {
		return err
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	if real == filepath.Clean(dir) {
		return nil // no symlink on the path: checked already
	}
	return checkPath(real)
}

// checkPath checks dir and each directory above it, without following a
// symlink in the last element of each.
func checkPath(dir string) error {
	euid, egid := uint32(os.Geteuid()), uint32(os.Getegid())
	for p := filepath.Clean(dir); ; p = filepath.Dir(p) {
		fi, err := os.Lstat(p)
		if err != nil {
			return fmt.Errorf("socket directory: %w", err)
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			kind := "a directory"
			if fi.Mode()&os.ModeSymlink != 0 {
				kind = "a symlink"
			}
			if st.Uid != 0 && st.Uid != euid {
				return fmt.Errorf("socket directory %s: %s on its path, %s, is owned by uid %d; use directories of root or of uid %d", dir, kind, p, st.Uid, euid)
			}
			perm := fi.Mode().Perm()
			sticky := fi.Mode()&os.ModeSticky != 0
			switch {
			case fi.Mode()&os.ModeSymlink != 0, sticky:
			case perm&0o002 != 0:
				return fmt.Errorf("socket directory %s: every user may write to %s (mode %v), and so replace the socket", dir, p, perm)
			case perm&0o020 != 0 && st.Gid != 0 && st.Gid != egid:
				return fmt.Errorf("socket directory %s: group %d may write to %s (mode %v), and so replace the socket", dir, st.Gid, p, perm)
			}
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket %s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("socket %s: %w: it exists and is not a socket; remove it or choose another path", path, ErrInUse)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("socket %s: %w: another server is listening on it", path, ErrInUse)
	}
	if !errors.Is(err, unix.ECONNREFUSED) {
		return fmt.Errorf("socket %s: %w: cannot tell whether it is stale: %v", path, ErrInUse, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}
