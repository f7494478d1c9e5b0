// Package client is the Go client of keyd: it dials the daemon, asks it for
// signatures and public keys, and builds what OAuth clients need from them —
// DPoP proofs (RFC 9449), private_key_jwt client assertions (RFC 7523) and a
// go-jose OpaqueSigner for other JWTs — without ever holding a private key.
//
// Errors returned by the daemon match this package's sentinels with
// errors.Is, e.g. errors.Is(err, client.ErrPermissionDenied).
package client

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"iter"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/timestamppb"

	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// Client talks to one keyd daemon. It is safe for concurrent use.
type Client struct {
	conn   *grpc.ClientConn
	keys   keydv1.KeyServiceClient
	admin  keydv1.KeyAdminServiceClient
	stream *streamSigner // nil: unary Sign only
	// closed is closed by Close: the client's goroutines (a KeyWatcher
	// waiting to reconnect) end at once.
	closed    chan struct{}
	closeOnce sync.Once
}

type options struct {
	dial  []grpc.DialOption
	unary bool
	tls   *tls.Config
}

// WithTLS connects over TCP with mutual TLS (the daemon's tcp listener):
// cfg carries the client certificate and the CA that signed the daemon's.
// The target is then host:port.
func WithTLS(cfg *tls.Config) Option {
	return func(o *options) { o.tls = cfg }
}

// WithUnarySign makes every signature its own unary Sign call instead of a
// message on the client's shared SignStream (the default, which costs less
// per signature). The answers are the same either way.
func WithUnarySign() Option {
	return func(o *options) { o.unary = true }
}

// Option configures Dial.
type Option func(*options)

// WithDialOptions adds gRPC dial options (interceptors, for example).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dial = append(o.dial, opts...) }
}

// Dial returns a client of the daemon at target: a Unix socket path
// ("/run/keyd/keyd.sock") or a gRPC target ("unix:///run/keyd/keyd.sock").
// The connection is made lazily, on the first call.
func Dial(target string, opts ...Option) (*Client, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if strings.HasPrefix(target, "/") {
		target = "unix://" + target
	}
	if target == "" {
		return nil, fmt.Errorf("%w: no daemon address", ErrInvalidArgument)
	}
	// Over the Unix socket, the socket itself is the security boundary: the
	// daemon identifies the caller by its peer credentials. Over TCP, mutual
	// TLS is.
	creds := insecure.NewCredentials()
	if o.tls != nil {
		creds = credentials.NewTLS(o.tls)
	}
	closed := make(chan struct{})
	dial := append([]grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		// A call on a closed client is ErrUnavailable, as a stream Sign's
		// is, not gRPC's Canceled, which matches no sentinel.
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoke grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if isClosed(closed) {
				return errClientClosed
			}
			return invoke(ctx, method, req, reply, cc, opts...)
		}),
		grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, stream grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			if isClosed(closed) {
				return nil, errClientClosed
			}
			return stream(ctx, desc, cc, method, opts...)
		}),
		// A fixed window (gRPC's default size) instead of BDP probing,
		// whose pings and window updates add frames and wake-ups to each
		// exchange; keyd's answers are small.
		grpc.WithInitialWindowSize(64 << 10),
		grpc.WithInitialConnWindowSize(64 << 10),
	}, o.dial...)
	conn, err := grpc.NewClient(target, dial...)
	if err != nil {
		return nil, fmt.Errorf("dial keyd at %s: %w", target, err)
	}
	c := &Client{conn: conn, keys: keydv1.NewKeyServiceClient(conn), admin: keydv1.NewKeyAdminServiceClient(conn), closed: closed}
	if !o.unary {
		c.stream = newStreamSigner(c.keys)
	}
	return c, nil
}

// Close closes the connection.
func (c *Client) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	if c.stream != nil {
		c.stream.close()
	}
	return c.conn.Close()
}

// errClientClosed is the error of a call on a closed Client.
var errClientClosed = &Error{Code: codes.Unavailable, Message: "the client is closed"}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// Conn returns the underlying connection (for the health service, say).
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// SignRequest asks for a JWT signed by a key of KeySet.
type SignRequest struct {
	KeySet string
	// Kid names a draining key version to keep proving with; empty means
	// the active key.
	Kid string
	// Claims of the JWT. The daemon fills jti and iat when absent, and for
	// client assertions iss, sub, aud and exp.
	Claims map[string]any
	// Purpose, when set, is the purpose the caller builds for (dpop,
	// client_assertion, jwt); the daemon refuses a key set of another
	// purpose with a message that says so.
	Purpose string
	// Header holds extra JOSE header parameters the key set's policy allows
	// (typ for the jwt purpose); nil for none.
	Header map[string]any
}

// Signed is a JWT the daemon signed.
type Signed struct {
	JWT string
	Kid string
	Alg string
}

// Sign asks the daemon to sign a JWT.
func (c *Client) Sign(ctx context.Context, req SignRequest) (Signed, error) {
	pr := &keydv1.SignRequest{Keyset: req.KeySet, Kid: req.Kid, Purpose: req.Purpose}
	var err error
	if req.Claims != nil {
		if pr.Claims, err = json.Marshal(req.Claims); err != nil {
			return Signed{}, fmt.Errorf("%w: claims: %v", ErrInvalidArgument, err)
		}
	}
	if req.Header != nil {
		if pr.Header, err = json.Marshal(req.Header); err != nil {
			return Signed{}, fmt.Errorf("%w: header: %v", ErrInvalidArgument, err)
		}
	}
	return c.sign(ctx, pr)
}

// SignInput asks the daemon to sign a complete JWS signing input
// (BASE64URL(header) "." BASE64URL(claims)) built elsewhere. The daemon
// checks it against the key set's policy and fills nothing in.
func (c *Client) SignInput(ctx context.Context, keyset, kid string, signingInput []byte) (Signed, error) {
	return c.sign(ctx, &keydv1.SignRequest{Keyset: keyset, Kid: kid, SigningInput: signingInput})
}

func (c *Client) sign(ctx context.Context, req *keydv1.SignRequest) (Signed, error) {
	if c.stream != nil {
		resp, err := c.stream.sign(ctx, req)
		if err == nil {
			return Signed{JWT: resp.Jwt, Kid: resp.Kid, Alg: resp.Alg}, nil
		}
		if !errors.Is(err, errFallback) {
			return Signed{}, err
		}
	}
	resp, err := c.keys.Sign(ctx, req)
	if err != nil {
		return Signed{}, fromStatus(err)
	}
	return Signed{JWT: resp.Jwt, Kid: resp.Kid, Alg: resp.Alg}, nil
}

// JWKS returns the JWK Set ({"keys":[...]}) of the named key sets, or of
// every key set the caller may use when none are named.
func (c *Client) JWKS(ctx context.Context, keysets ...string) ([]byte, error) {
	set, err := c.JWKSet(ctx, keysets...)
	return set.JSON, err
}

// JWKSet is a JWK Set the daemon publishes.
type JWKSet struct {
	// JSON is the RFC 7517 JWK Set, {"keys":[...]}.
	JSON []byte
	// StaleKids are the kids of the keys in JSON that the backend lost
	// (state lost): they no longer sign, and stay published until an
	// operator rotates or revokes their key set.
	StaleKids []string
}

// JWKSet is JWKS with the kids of the stale keys in the set.
func (c *Client) JWKSet(ctx context.Context, keysets ...string) (JWKSet, error) {
	resp, err := c.keys.GetJWKS(ctx, &keydv1.GetJWKSRequest{Keysets: keysets})
	if err != nil {
		return JWKSet{}, fromStatus(err)
	}
	return JWKSet{JSON: resp.Jwks, StaleKids: resp.StaleKids}, nil
}

// Key is one key version.
type Key struct {
	KeySet      string
	Kid         string
	Alg         string
	Purpose     string
	State       string // next, active, draining, retired, destroyed, revoked, lost
	CreatedAt   time.Time
	ActivatedAt time.Time // zero if never active
	ActivateAt  time.Time // next: when it activates
	// DeactivateAt is when an active key is due to be replaced (zero: no
	// scheduled rotation).
	DeactivateAt time.Time
	RetireAt     time.Time // draining: when it is unpublished
	DestroyAt    time.Time // retired or revoked: when it is destroyed
	// JWK is the public key while the key is in the JWK Set: published,
	// or lost and still published stale. It is empty otherwise.
	JWK     json.RawMessage
	Backend string
}

func keyFromProto(k *keydv1.KeyVersion) Key {
	if k == nil {
		return Key{}
	}
	out := Key{
		KeySet:  k.Keyset,
		Kid:     k.Kid,
		Alg:     k.Alg,
		Purpose: k.Purpose,
		State:   stateName(k.State),
		JWK:     k.Jwk,
		Backend: k.Backend,
	}
	if k.CreatedAt != nil {
		out.CreatedAt = k.CreatedAt.AsTime()
	}
	if k.ActivatedAt != nil {
		out.ActivatedAt = k.ActivatedAt.AsTime()
	}
	for _, t := range []struct {
		src *timestamppb.Timestamp
		dst *time.Time
	}{
		{k.RetireAt, &out.RetireAt}, {k.ActivateAt, &out.ActivateAt},
		{k.DeactivateAt, &out.DeactivateAt}, {k.DestroyAt, &out.DestroyAt},
	} {
		if t.src != nil {
			*t.dst = t.src.AsTime()
		}
	}
	return out
}

func stateName(s keydv1.KeyState) string {
	n := keydv1.KeyState_name[int32(s)]
	if n == "" {
		return "unknown"
	}
	return strings.ToLower(strings.TrimPrefix(n, "KEY_STATE_"))
}

// ListKeys returns the key versions of the named key sets (every key set the
// caller may use when none are named).
func (c *Client) ListKeys(ctx context.Context, keysets ...string) ([]Key, error) {
	resp, err := c.keys.ListKeys(ctx, &keydv1.ListKeysRequest{Keysets: keysets})
	if err != nil {
		return nil, fromStatus(err)
	}
	out := make([]Key, 0, len(resp.Keys))
	for _, k := range resp.Keys {
		out = append(out, keyFromProto(k))
	}
	return out, nil
}

// ActiveKey returns the active key version of keyset.
func (c *Client) ActiveKey(ctx context.Context, keyset string) (Key, error) {
	keys, err := c.ListKeys(ctx, keyset)
	if err != nil {
		return Key{}, err
	}
	for _, k := range keys {
		if k.State == "active" {
			return k, nil
		}
	}
	return Key{}, fmt.Errorf("key set %q: %w: no active key", keyset, ErrFailedPrecondition)
}

// KeyEvent is a lifecycle event from Watch.
type KeyEvent struct {
	// Type is "snapshot" (a version as it was when the watch started),
	// "synced" (the snapshot is complete) or "changed".
	Type string
	Key  Key
	// Previous is the state before a change ("" for a new version).
	Previous string
}

// Watch streams the lifecycle events of the named key sets until ctx ends
// or the stream fails; the iteration yields the error last. Breaking out
// of the iteration ends the stream.
func (c *Client) Watch(ctx context.Context, keysets ...string) iter.Seq2[KeyEvent, error] {
	return func(yield func(KeyEvent, error) bool) {
		// The stream lives as long as the iteration: a caller that stops
		// early must not leave it open (it would hold one of the
		// connection's concurrent streams until ctx ends).
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stream, err := c.keys.WatchKeys(ctx, &keydv1.WatchKeysRequest{Keysets: keysets})
		if err != nil {
			yield(KeyEvent{}, fromStatus(err))
			return
		}
		for {
			ev, err := stream.Recv()
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				if errors.Is(err, io.EOF) {
					// The daemon ended the stream, as it does when it
					// stops: it is gone, as far as the watch goes.
					err = &Error{Code: codes.Unavailable, Message: "watch keys: the daemon ended the stream"}
				}
				yield(KeyEvent{}, fromStatus(err))
				return
			}
			ke := KeyEvent{
				Type: strings.ToLower(strings.TrimPrefix(ev.Type.String(), "TYPE_")),
				Key:  keyFromProto(ev.Key),
			}
			if ev.PreviousState != keydv1.KeyState_KEY_STATE_UNSPECIFIED {
				ke.Previous = stateName(ev.PreviousState)
			}
			if !yield(ke, nil) {
				return
			}
		}
	}
}

// Rotation is the outcome of Rotate.
type Rotation struct {
	// Active is the active key after the rotation.
	Active Key
	// Previous is the key that stopped being active (zero if none).
	Previous Key
	// Next is the key published to activate later, when the key set
	// pre-publishes and the rotation was not immediate (then Active is
	// unchanged).
	Next Key
}

// Rotate replaces the active key of keyset (admin only). Key sets whose
// verifiers cache JWKS publish the new key first and activate it after the
// schedule's prepublish time, unless now is true.
func (c *Client) Rotate(ctx context.Context, keyset string, now bool) (Rotation, error) {
	resp, err := c.admin.Rotate(ctx, &keydv1.RotateRequest{Keyset: keyset, Now: now})
	if err != nil {
		return Rotation{}, adminStatus(err)
	}
	return Rotation{Active: keyFromProto(resp.Active), Previous: keyFromProto(resp.Previous), Next: keyFromProto(resp.Next)}, nil
}

// Revoke unpublishes and disables the key version kid at once (admin only).
// keyset, when not empty, must be the version's key set.
func (c *Client) Revoke(ctx context.Context, kid, keyset string) (Key, error) {
	resp, err := c.admin.Revoke(ctx, &keydv1.RevokeRequest{Kid: kid, Keyset: keyset})
	if err != nil {
		return Key{}, adminStatus(err)
	}
	return keyFromProto(resp.Key), nil
}

// adminStatus is fromStatus for the admin calls: a socket that does not
// serve them (keyd's main socket when admin_socket is configured, or the
// mutual-TLS listener) says only "unknown service"; the error says where
// they go.
func adminStatus(err error) error {
	err = fromStatus(err)
	var e *Error
	if errors.As(err, &e) && e.Code == codes.Unimplemented {
		return &Error{Code: e.Code, Message: e.Message + ": this socket takes no admin calls; with admin_socket configured, rotate and revoke go to that socket (--socket)"}
	}
	return err
}
