// Package secretfile checks that a file holding a secret keyd reads (the
// PKCS#11 PIN file, the mutual-TLS private key) is private to keyd.
package secretfile

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// ErrExposed is wrapped by Check's errors: the file may be read or changed
// by others than keyd.
var ErrExposed = errors.New("not private to keyd")

// Check refuses, with an error wrapping ErrExposed and naming the file as
// what (e.g. "pin file") and path, a file that is not a regular file, on
// which others have any permission, whose group may write or execute it, or
// whose group may read it while that group is not this process's effective
// group: mode 0640 root:keyd is fine for a daemon running with group keyd,
// 0644 never is. fi describes the file as opened (os.File.Stat, so that a
// symbolic link is judged by its target, as Kubernetes mounts secrets).
func Check(what, path string, fi os.FileInfo) error {
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s %s: %w: not a regular file", what, path, ErrExposed)
	}
	perm := fi.Mode().Perm()
	if perm&0o037 != 0 {
		return fmt.Errorf("%s %s: %w: mode %04o lets others (or the group) at it; chmod 0600", what, path, ErrExposed, perm)
	}
	if perm&0o040 != 0 {
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok || int(st.Gid) != os.Getegid() {
			return fmt.Errorf("%s %s: %w: mode %04o lets its group read it and that group is not keyd's; chmod 0600", what, path, ErrExposed, perm)
		}
	}
	return nil
}
