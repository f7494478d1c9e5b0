package daemon

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// setuidChild, in the child process, connects as root, drops to uid
// 65534, then signs once over the connection it made as root and once
// over a new one. It prints the two status codes.
func setuidChild(socket string) {
	sign := func(c net.Conn) codes.Code {
		conn, err := grpc.NewClient("passthrough:///keyd",
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) { return c, nil }))
		if err != nil {
			return codes.Unknown
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err = keydv1.NewKeyServiceClient(conn).Sign(ctx, &keydv1.SignRequest{
			Keyset: "d", Claims: []byte(`{"htm":"GET","htu":"https://a.example/"}`)})
		return status.Code(err)
	}
	asRoot, err := net.Dial("unix", socket)
	if err != nil {
		os.Exit(3)
	}
	if err := syscall.Setgid(65534); err != nil {
		os.Exit(4)
	}
	if err := syscall.Setuid(65534); err != nil {
		os.Exit(5)
	}
	first := sign(asRoot)
	asNobody, err := net.Dial("unix", socket)
	if err != nil {
		os.Exit(6)
	}
	os.Stdout.WriteString(first.String() + " " + sign(asNobody).String() + "\n")
	os.Exit(0)
}

// A3: authorization uses the credentials the kernel captured when the
// connection was made, never the process's credentials read later: a
// process that connected as root and then dropped to uid 65534 keeps
// using its connection as root (the descriptor is the capability, as for
// any file), and is audited as root; a connection it makes after dropping
// is uid 65534's, refused. A daemon that re-read the pid's credentials
// would disagree on both, and could be fooled by a reused pid.
func TestCredentialsCapturedAtConnect(t *testing.T) {
	if sock := os.Getenv("KEYD_TEST_SETUID_SOCKET"); sock != "" {
		setuidChild(sock)
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to change uid")
	}
	cfg := daemonConfig(t, "")
	_, stop := serve(t, cfg)
	dir := filepath.Dir(cfg.Socket)
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(cfg.Socket, 0o666); err != nil {
		t.Fatal(err)
	}
	child := exec.Command(os.Args[0], "-test.run=^TestCredentialsCapturedAtConnect$")
	child.Env = append(os.Environ(), "KEYD_TEST_SETUID_SOCKET="+cfg.Socket)
	out, err := child.Output()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if got := strings.TrimSpace(string(out)); got != "OK PermissionDenied" {
		t.Errorf("connected as root, then uid 65534: %q, want the root connection to sign (OK) and the new one refused (PermissionDenied)", got)
	}
	stop()
	b, err := os.ReadFile(cfg.AuditLog)
	if err != nil {
		t.Fatal(err)
	}
	var uids []uint32
	for line := range strings.Lines(string(b)) {
		var r struct {
			UID     uint32 `json:"uid"`
			Outcome string `json:"outcome"`
		}
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		uids = append(uids, r.UID)
	}
	if len(uids) != 2 || uids[0] != 0 || uids[1] != 65534 {
		t.Errorf("audited uids %v, want [0 65534]\n%s", uids, b)
	}
}
