package authz

import (
	"errors"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// A Unix socket with no peer (never connected) answers SO_PEERCRED without
// an error, with the kernel's "no credentials": uid and gid (uid_t)-1 and
// pid 0. That is no caller: the handshake must refuse it with
// ErrNoCredentials (A2: never a made-up uid), not admit uid 4294967295.
func TestReadPeerCredRefusesSocketWithoutPeer(t *testing.T) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "unconnected")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	caller, err := ReadPeerCred(c)
	if !errors.Is(err, ErrNoCredentials) {
		t.Fatalf("ReadPeerCred of a socket without a peer = %v, %v; want ErrNoCredentials", caller, err)
	}
	if _, _, err := PeerCredentials().ServerHandshake(c); !errors.Is(err, ErrNoCredentials) {
		t.Fatalf("ServerHandshake of a socket without a peer: %v, want ErrNoCredentials", err)
	}
}
