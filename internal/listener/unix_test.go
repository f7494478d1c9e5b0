package listener

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

func shortDir(t *testing.T) string {
	d, err := os.MkdirTemp("", "kl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func TestModeIsSetBeforeListening(t *testing.T) {
	p := filepath.Join(shortDir(t), "sub", "k.sock")
	l, err := Unix(p, 0o600, -1)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", fi.Mode())
	}
	di, _ := os.Stat(filepath.Dir(p))
	if di.Mode().Perm() != 0o750 {
		t.Errorf("parent mode %v", di.Mode().Perm())
	}
	c, err := net.Dial("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

func TestRefusesLiveSocketAndOtherFiles(t *testing.T) {
	d := shortDir(t)
	p := filepath.Join(d, "k.sock")
	l, err := Unix(p, 0o660, -1)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := Unix(p, 0o660, -1); !errors.Is(err, ErrInUse) {
		t.Errorf("second listener on a live socket: %v", err)
	}
	l.Close()

	f := filepath.Join(d, "file")
	os.WriteFile(f, nil, 0o600)
	if _, err := Unix(f, 0o660, -1); !errors.Is(err, ErrInUse) {
		t.Errorf("regular file: %v", err)
	}
	if _, err := os.Stat(f); err != nil {
		t.Error("the regular file was removed")
	}
}

func TestRemovesStaleSocket(t *testing.T) {
	p := filepath.Join(shortDir(t), "k.sock")
	l, err := Unix(p, 0o660, -1)
	if err != nil {
		t.Fatal(err)
	}
	// Simulate a crash: the socket file stays, nobody listens.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := os.Lstat(p); err != nil {
		t.Fatal("socket file gone")
	}
	l, err = Unix(p, 0o660, -1)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l.Close()
}

func TestRejectsAbstractAndRelative(t *testing.T) {
	for _, p := range []string{"@keyd", "relative.sock", "/tmp/a\x00b"} {
		if _, err := Unix(p, 0o660, -1); err == nil {
			t.Errorf("%q accepted", p)
		}
	}
}

func TestGroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown to another group needs root")
	}
	p := filepath.Join(shortDir(t), "k.sock")
	l, err := Unix(p, 0o660, 65534)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fi, _ := os.Lstat(p)
	if st := fi.Sys().(interface{}); st == nil {
		t.Fatal("no stat")
	}
	if gid := statGID(t, p); gid != 65534 {
		t.Errorf("gid %d", gid)
	}
}

func TestLimit(t *testing.T) {
	p := filepath.Join(shortDir(t), "k.sock")
	inner, err := Unix(p, 0o600, -1)
	if err != nil {
		t.Fatal(err)
	}
	l := Limit(inner, 2)
	defer l.Close()
	accepted := make(chan net.Conn, 3)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	for range 3 {
		c, err := net.Dial("unix", p)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	a := <-accepted
	<-accepted
	select {
	case <-accepted:
		t.Fatal("a third connection accepted over the limit of 2")
	case <-time.After(100 * time.Millisecond):
	}
	if _, ok := a.(interface {
		SyscallConn() (syscall.RawConn, error)
	}); !ok {
		t.Error("limited connections lost SyscallConn")
	}
	a.Close()
	select {
	case <-accepted:
	case <-time.After(2 * time.Second):
		t.Fatal("closing a connection did not free a slot")
	}
}
