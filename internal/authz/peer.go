// Package authz decides who is calling keyd and what they may use.
//
// Caller identity comes from the kernel, never from the request: for a Unix
// socket, the uid, gid and pid that SO_PEERCRED reports for the connection,
// captured once when the connection is accepted. Decisions use the uid and
// gid only; the pid is recorded for the audit log and is not trusted (it may
// be reused once the caller exits, and is 0 for a caller in a pid namespace
// keyd cannot see).
//
// The credentials belong to the connection, not to whoever holds it now: a
// process that passes its connected socket to another (SCM_RIGHTS, or a
// child inheriting it) lends it its uid for every later call. That is
// inherent to SO_PEERCRED; a caller must not hand its keyd connection to
// code it would not let sign as itself.
package authz

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/keyd-dev/keyd/internal/listener"
)

// ErrNoCredentials means the connection carries no usable peer credentials.
var ErrNoCredentials = errors.New("no peer credentials")

// Caller is an authenticated caller: a local process on the Unix socket
// (Transport "unix": UID, GID and PID are set) or a client of the mutual TLS
// listener (Transport "mtls": Identities is set, UID, GID and PID are zero and
// meaningless).
type Caller struct {
	UID, GID uint32
	// PID is the caller's process at connect time, for the audit log only.
	PID int32

	// Transport is TransportUnix or TransportMTLS. The zero value is
	// treated as TransportUnix (callers built by hand in tests); with
	// Identities set it matches no allow list.
	Transport string
	// Identities are the URI SANs (first) and DNS SANs of a verified
	// client certificate, for TransportMTLS. Shared by every RPC of the
	// connection: do not modify.
	Identities []string
}

// String formats the caller for logs: "uid=1001 gid=1001 pid=42" for a
// Unix caller, its identities ("spiffe://example.org/billing") for an mTLS
// caller.
func (c Caller) String() string {
	if c.Transport == TransportMTLS {
		return mtlsString(c.Identities)
	}
	return "uid=" + strconv.FormatUint(uint64(c.UID), 10) + " gid=" + strconv.FormatUint(uint64(c.GID), 10) + " pid=" + strconv.FormatInt(int64(c.PID), 10)
}

// AuthInfo carries the caller through gRPC's peer information.
type AuthInfo struct {
	credentials.CommonAuthInfo
	Caller Caller
}

// AuthType implements credentials.AuthInfo.
func (AuthInfo) AuthType() string { return "unix-peercred" }

// FromContext returns the caller of an RPC, or ErrNoCredentials: the Unix
// caller PeerCredentials found, or the mTLS caller MTLSCredentials found.
func FromContext(ctx context.Context) (Caller, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return Caller{}, ErrNoCredentials
	}
	return callerOf(p.AuthInfo)
}

// PeerCredentials returns gRPC transport credentials for a Unix socket
// server: the handshake reads SO_PEERCRED of each accepted connection and
// refuses connections that have none (they never default to uid 0).
func PeerCredentials() credentials.TransportCredentials { return peerCreds{} }

// PeerCredentialsPerUID is PeerCredentials that also refuses a connection
// from a uid that has perUID connections open already (0: no limit), so
// that one local user cannot take every connection the listener allows.
func PeerCredentialsPerUID(perUID int) credentials.TransportCredentials {
	if perUID <= 0 {
		return peerCreds{}
	}
	return peerCreds{open: &uidConns{max: perUID, n: map[uint32]int{}}}
}

type peerCreds struct {
	open *uidConns // nil: no limit per uid
}

// uidConns counts the open connections of each uid.
type uidConns struct {
	max int
	mu  sync.Mutex
	n   map[uint32]int
}

// take counts one more connection of uid, unless it has max already.
func (u *uidConns) take(uid uint32) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.n[uid] >= u.max {
		return fmt.Errorf("uid %d has %d connections open, the most one user may have (limits.max_connections_per_uid)", uid, u.max)
	}
	u.n[uid]++
	return nil
}

func (u *uidConns) release(uid uint32) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.n[uid]--; u.n[uid] <= 0 {
		delete(u.n, uid)
	}
}

func (peerCreds) ClientHandshake(_ context.Context, _ string, c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return c, AuthInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}}, nil
}

func (p peerCreds) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	caller, err := ReadPeerCred(c)
	if err != nil {
		return nil, nil, err
	}
	if p.open != nil {
		if err := p.open.take(caller.UID); err != nil {
			return nil, nil, err
		}
		c = listener.ReleaseOnClose(c, func() { p.open.release(caller.UID) })
	}
	return c, AuthInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity},
		Caller:         caller,
	}, nil
}

func (peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "unix-peercred"}
}
func (p peerCreds) Clone() credentials.TransportCredentials { return p }
func (peerCreds) OverrideServerName(string) error           { return nil }

// ReadPeerCred returns the SO_PEERCRED credentials of a Unix socket
// connection.
func ReadPeerCred(c net.Conn) (Caller, error) {
	uc, ok := c.(syscall.Conn)
	if !ok {
		return Caller{}, fmt.Errorf("%w: %T is not a Unix socket connection", ErrNoCredentials, c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Caller{}, fmt.Errorf("%w: %v", ErrNoCredentials, err)
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		// SO_PEERCRED answers on other socket families too, with
		// meaningless ids: insist on AF_UNIX first.
		domain, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN)
		if err != nil {
			credErr = err
			return
		}
		if domain != unix.AF_UNIX {
			credErr = fmt.Errorf("socket family %d is not AF_UNIX", domain)
			return
		}
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Caller{}, fmt.Errorf("%w: %v", ErrNoCredentials, err)
	}
	if credErr != nil {
		return Caller{}, fmt.Errorf("%w: SO_PEERCRED: %v", ErrNoCredentials, credErr)
	}
	// A socket without a peer answers without an error, but with the
	// kernel's "no credentials": uid and gid (uid_t)-1. That is nobody,
	// not a uid to match.
	if cred.Uid == math.MaxUint32 || cred.Gid == math.MaxUint32 {
		return Caller{}, fmt.Errorf("%w: SO_PEERCRED reports no credentials (uid %d, gid %d): the socket has no peer", ErrNoCredentials, cred.Uid, cred.Gid)
	}
	return Caller{UID: cred.Uid, GID: cred.Gid, PID: cred.Pid, Transport: TransportUnix}, nil
}

// CallerLogAttrs name the caller of ctx in a log line: "uid" and "pid" for
// a Unix caller, "identity" for an mTLS caller (whose uid and pid are zero),
// "caller" "unauthenticated" for a call without credentials. A caller
// without a uid is never logged as uid 0, which reads as root's.
func CallerLogAttrs(ctx context.Context) []slog.Attr {
	c, err := FromContext(ctx)
	switch {
	case err != nil:
		return []slog.Attr{slog.String("caller", "unauthenticated")}
	case c.Transport == TransportMTLS:
		return []slog.Attr{slog.String("identity", mtlsString(c.Identities))}
	}
	return []slog.Attr{slog.Uint64("uid", uint64(c.UID)), slog.Int64("pid", int64(c.PID))}
}

// Who names the caller in messages: "uid 1001" for a local caller, its
// first certificate identity for an mTLS caller.
func (c Caller) Who() string {
	if c.Transport == TransportMTLS && len(c.Identities) > 0 {
		return c.Identities[0]
	}
	return "uid " + strconv.FormatUint(uint64(c.UID), 10)
}
