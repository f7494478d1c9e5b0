package listener

import (
	"os"
	"path/filepath"
	"testing"
)

// A socket in a directory every user may write to can be unlinked and
// replaced by anyone: clients would then talk to an impostor.
func TestRefusesParentWritableByOthers(t *testing.T) {
	d := filepath.Join(shortDir(t), "pub")
	if err := os.Mkdir(d, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(d, 0o777); err != nil {
		t.Fatal(err)
	}
	if l, err := Unix(filepath.Join(d, "k.sock"), 0o600, -1); err == nil {
		l.Close()
		t.Fatal("socket created in a directory writable by every user")
	}
	// A sticky directory (like /tmp) keeps others from removing our socket.
	if err := os.Chmod(d, 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	l, err := Unix(filepath.Join(d, "k.sock"), 0o600, -1)
	if err != nil {
		t.Fatalf("sticky directory: %v", err)
	}
	l.Close()
}

// A directory (or a symlink to one) owned by another user, e.g. one that
// user created in /tmp ahead of us, is theirs: they can replace our socket.
func TestRefusesParentOwnedByAnotherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown to another user needs root")
	}
	base := shortDir(t)
	d := filepath.Join(base, "theirs")
	if err := os.Mkdir(d, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(d, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if l, err := Unix(filepath.Join(d, "k.sock"), 0o600, -1); err == nil {
		l.Close()
		t.Error("socket created in a directory owned by another user")
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(d, link); err != nil {
		t.Fatal(err)
	}
	if l, err := Unix(filepath.Join(link, "k.sock"), 0o600, -1); err == nil {
		l.Close()
		t.Error("socket created through a symlink to a directory owned by another user")
	}
	// Our own directory behind a symlink another user owns: they can re-point it.
	ours := filepath.Join(base, "ours")
	if err := os.Mkdir(ours, 0o750); err != nil {
		t.Fatal(err)
	}
	link2 := filepath.Join(base, "link2")
	if err := os.Symlink(ours, link2); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link2, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if l, err := Unix(filepath.Join(link2, "k.sock"), 0o600, -1); err == nil {
		l.Close()
		t.Error("socket created through a symlink owned by another user")
	}
}
