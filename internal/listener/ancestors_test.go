package listener

import (
	"os"
	"path/filepath"
	"testing"
)

// A parent directory a group may write to lets every member of that group
// unlink the socket and bind their own in its place: with the socket's
// group (the callers) owning it, any caller could impersonate keyd to the
// others.
func TestRefusesParentWritableByGroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown to another group needs root")
	}
	d := filepath.Join(shortDir(t), "grp")
	if err := os.Mkdir(d, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(d, 0, 65534); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(d, 0o770); err != nil {
		t.Fatal(err)
	}
	if l, err := Unix(filepath.Join(d, "k.sock"), 0o660, 65534); err == nil {
		l.Close()
		t.Fatal("socket created in a directory group 65534 may write to")
	}
	// Sticky, members may not remove or rename our socket.
	if err := os.Chmod(d, 0o770|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	l, err := Unix(filepath.Join(d, "k.sock"), 0o660, 65534)
	if err != nil {
		t.Fatalf("sticky directory: %v", err)
	}
	l.Close()
}

// An ancestor directory another user owns (or may write to) lets that user
// rename our directory away and put one of their own, with their socket,
// in its place: every directory up to the root must be safe, not only the
// socket's own.
func TestRefusesAncestorOwnedByAnotherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown to another user needs root")
	}
	base := shortDir(t)
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	theirs := filepath.Join(base, "theirs")
	if err := os.Mkdir(theirs, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(theirs, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	ours := filepath.Join(theirs, "ours")
	if err := os.Mkdir(ours, 0o750); err != nil {
		t.Fatal(err)
	}
	if l, err := Unix(filepath.Join(ours, "k.sock"), 0o600, -1); err == nil {
		l.Close()
		t.Error("socket created below a directory owned by another user")
	}
	// The same through MkdirAll: keyd creates the missing directories.
	if l, err := Unix(filepath.Join(theirs, "new", "k.sock"), 0o600, -1); err == nil {
		l.Close()
		t.Error("socket directory created below a directory owned by another user")
	}

	pub := filepath.Join(base, "pub")
	if err := os.Mkdir(pub, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(pub, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(pub, "ours"), 0o750); err != nil {
		t.Fatal(err)
	}
	if l, err := Unix(filepath.Join(pub, "ours", "k.sock"), 0o600, -1); err == nil {
		l.Close()
		t.Error("socket created below a directory every user may write to")
	}
}
