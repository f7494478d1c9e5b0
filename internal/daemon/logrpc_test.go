package daemon

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/internal/authz"
)

// The daemon's line per RPC names its caller. A caller over mutual TLS has
// no uid or pid (both are zero), and a call without credentials has no
// caller at all: neither may be logged as "uid=0", which reads as root's.
func TestRPCLogNamesCallerNotUID0(t *testing.T) {
	var buf bytes.Buffer
	d := &Daemon{log: slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	denied := status.Error(codes.PermissionDenied, "denied")
	mtls := authz.Caller{Transport: authz.TransportMTLS, Identities: []string{"spiffe://example.org/billing/api"}}
	d.logRPC(peer.NewContext(context.Background(), &peer.Peer{AuthInfo: authz.MTLSAuthInfo{Caller: mtls}}), "/keyd.v1.KeyService/Sign", time.Now(), denied)
	d.logRPC(context.Background(), "/keyd.v1.KeyService/Sign", time.Now(), status.Error(codes.Unauthenticated, "no credentials"))
	unix := authz.Caller{Transport: authz.TransportUnix, UID: 1001, GID: 1001, PID: 42}
	d.logRPC(peer.NewContext(context.Background(), &peer.Peer{AuthInfo: authz.AuthInfo{Caller: unix}}), "/keyd.v1.KeyService/Sign", time.Now(), denied)

	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("log lines:\n%s", buf.String())
	}
	for i, l := range lines[:2] {
		if strings.Contains(l, "uid=0") || strings.Contains(l, "pid=0") {
			t.Errorf("line %d logs uid 0 for a caller without one: %s", i, l)
		}
	}
	if !strings.Contains(lines[0], "identity=spiffe://example.org/billing/api") {
		t.Errorf("the mTLS caller's line lacks its identity: %s", lines[0])
	}
	if !strings.Contains(lines[2], "uid=1001") || !strings.Contains(lines[2], "pid=42") {
		t.Errorf("the Unix caller's line lacks its uid and pid: %s", lines[2])
	}
}
