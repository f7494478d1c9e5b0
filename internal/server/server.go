// Package server is keyd's gRPC adapter: it authenticates the caller,
// authorizes the key set, applies the key set's policy, signs through the
// lifecycle manager, audits the decision and maps errors to gRPC codes once.
package server

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keyd-dev/keyd/internal/audit"
	"github.com/keyd-dev/keyd/internal/authz"
	"github.com/keyd-dev/keyd/internal/jws"
	"github.com/keyd-dev/keyd/internal/metrics"
	"github.com/keyd-dev/keyd/internal/policy"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
	"github.com/keyd-dev/keyd/rotation"
)

// Auditor records sign decisions. An error means the record was not
// written, and the signature must not be released.
type Auditor interface {
	Record(audit.Record) error
}

// KeySet is a key set's access rules and policy.
type KeySet struct {
	Allow  *authz.List
	Policy policy.Policy
}

// Config wires a Server.
type Config struct {
	Manager *rotation.Manager
	KeySets map[string]KeySet
	Admins  *authz.List
	Audit   Auditor
	Logger  *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Rand fills jti; nil means crypto/rand.
	Rand io.Reader
	// BackendFailed, when set, is called (without blocking) each time the
	// backend fails a signature, so health can be rechecked at once.
	BackendFailed func(error)
	// Metrics records decisions; nil records nothing.
	Metrics *metrics.Metrics
	// SignRate limits each caller's Sign requests per second (0: no limit),
	// with bursts of SignBurst (default: one second's worth).
	SignRate  float64
	SignBurst int
	// Stop, when set, is closed when the daemon begins to stop: each
	// SignStream then takes no more requests and ends, UNAVAILABLE, once
	// those it took are answered. Clients keep their stream open between
	// signatures, so it would otherwise hold a graceful stop for good.
	Stop <-chan struct{}
}

// Server implements keyd.v1.KeyService and keyd.v1.KeyAdminService.
type Server struct {
	keydv1.UnimplementedKeyServiceServer
	keydv1.UnimplementedKeyAdminServiceServer

	mgr     *rotation.Manager
	sets    map[string]KeySet
	admins  *authz.List
	audit   Auditor
	log     *slog.Logger
	now     func() time.Time
	rand    io.Reader
	keys    keyCache
	failed  func(error)
	metrics *metrics.Metrics
	limit   *limiter

	streamItems atomic.Int64 // see StreamItemsInFlight
	callerSlots callerSlots
	stop        <-chan struct{} // Config.Stop
}

// New returns a Server.
func New(cfg Config) (*Server, error) {
	if cfg.Manager == nil || cfg.Audit == nil {
		return nil, errors.New("server: Manager and Audit are required")
	}
	s := &Server{mgr: cfg.Manager, sets: cfg.KeySets, admins: cfg.Admins, audit: cfg.Audit, log: cfg.Logger, now: cfg.Now, rand: cfg.Rand, failed: cfg.BackendFailed,
		metrics: cfg.Metrics, limit: newLimiter(cfg.SignRate, cfg.SignBurst), stop: cfg.Stop}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.rand == nil {
		s.rand = rand.Reader
	}
	for name := range s.sets {
		if _, ok := cfg.Manager.KeySet(name); !ok {
			return nil, fmt.Errorf("server: key set %q has no lifecycle", name)
		}
	}
	return s, nil
}

// Register registers both services on g.
func (s *Server) Register(g *grpc.Server) {
	s.RegisterKeys(g)
	s.RegisterAdmin(g)
}

// RegisterKeys registers KeyService only (for a socket without admin calls).
func (s *Server) RegisterKeys(g *grpc.Server) { keydv1.RegisterKeyServiceServer(g, s) }

// RegisterAdmin registers KeyAdminService only (for the admin socket).
func (s *Server) RegisterAdmin(g *grpc.Server) { keydv1.RegisterKeyAdminServiceServer(g, s) }

// Field caps: far above any legitimate request, far below anything abusive.
const (
	maxNameLen         = 64
	maxKidLen          = 128
	maxJSONLen         = 16 << 10
	maxSigningInputLen = 48 << 10
)

func (s *Server) caller(ctx context.Context) (authz.Caller, error) {
	c, err := authz.FromContext(ctx)
	if err != nil {
		return authz.Caller{}, fmt.Errorf("%w: connect over keyd's Unix socket or its mutual-TLS listener (%v)", errUnauthenticated, err)
	}
	return c, nil
}

// authorize returns the key set if c may use it. An unknown key set and a
// forbidden one get the same answer, so callers cannot enumerate key sets.
func (s *Server) authorize(c authz.Caller, name string) (KeySet, error) {
	ks, ok := s.sets[name]
	if !ok || !ks.Allow.Permits(c) {
		return KeySet{}, fmt.Errorf("key set %q: %w for %s (the key set does not exist or this caller is not on its allow list)", name, errDenied, c.Who())
	}
	return ks, nil
}

// Sign implements keyd.v1.KeyService.
func (s *Server) Sign(ctx context.Context, req *keydv1.SignRequest) (*keydv1.SignResponse, error) {
	c, err := s.caller(ctx)
	if err != nil {
		return nil, s.toStatus(ctx, "sign", err)
	}
	start := time.Now()
	rec := audit.Record{Event: "sign", UID: c.UID, GID: c.GID, PID: c.PID, KeySet: auditName(req.GetKeyset())}
	if c.Transport == authz.TransportMTLS && len(c.Identities) > 0 {
		rec.Identity = c.Identities[0]
	}
	var resp *keydv1.SignResponse
	if s.limit.allow(callerKey(c), start) {
		resp, err = s.signRecovered(ctx, c, req, &rec)
	} else {
		s.metrics.Limited("sign_rate")
		err = fmt.Errorf("%w: sign rate limit for %s exceeded (%v per second, bursts of %d); slow down and retry", errLimited, c, s.limit.rate, s.limit.burst)
	}
	rec.Time = s.now().UTC()
	defer func() { s.metrics.Sign(s.metricKeySet(rec.KeySet), rec.Purpose, rec.Outcome, time.Since(start)) }()
	if err != nil {
		if errors.Is(err, errDenied) {
			s.metrics.Denied("Sign")
		}
		st := s.toStatus(ctx, "sign", err)
		rec.Outcome = codeOf(err).String()
		rec.Reason = status.Convert(st).Message()
		if aerr := s.audit.Record(rec); aerr != nil {
			s.log.LogAttrs(ctx, slog.LevelError, "audit write failed", slog.String("err", aerr.Error()))
		}
		return nil, st
	}
	rec.Outcome = "ok"
	if err := s.audit.Record(rec); err != nil {
		s.log.LogAttrs(ctx, slog.LevelError, "audit write failed; refusing the signature", slog.String("err", err.Error()))
		return nil, status.Error(codes.Unavailable, "sign: the audit log cannot be written, so no signature is released; fix the audit log and retry")
	}
	return resp, nil
}

// auditName is a name the caller chose as its audit record keeps it: whole
// up to maxNameLen bytes (a longer one is refused), else its start and its
// length, so that a refused request cannot write 64 KiB to the audit log.
func auditName(name string) string {
	if len(name) <= maxNameLen {
		return name
	}
	cut := maxNameLen
	for cut > 0 && !utf8.RuneStart(name[cut]) {
		cut--
	}
	return fmt.Sprintf("%s…(%d bytes)", name[:cut], len(name))
}

// unknownKeySet labels the metrics of Sign requests for a key set that is
// not configured: the name is the caller's to choose, and one series per
// made-up name would grow the metrics without bound.
const unknownKeySet = "(unknown)"

// metricKeySet is the keyset label of a Sign request's metrics.
func (s *Server) metricKeySet(name string) string {
	if _, ok := s.sets[name]; ok {
		return name
	}
	return unknownKeySet
}

// errPanic is a panic recovered while signing.
var errPanic = errors.New("panic while signing")

// signRecovered is sign with a panic (a backend's or a policy's bug) turned
// into errPanic, answered Internal: the attempt is still audited and
// measured like any other, which a recovery further up (the interceptor's,
// a SignStream's) cannot do.
func (s *Server) signRecovered(ctx context.Context, c authz.Caller, req *keydv1.SignRequest, rec *audit.Record) (resp *keydv1.SignResponse, err error) {
	defer func() {
		if r := recover(); r != nil {
			s.log.LogAttrs(ctx, slog.LevelError, "panic while signing", slog.Any("panic", r), slog.String("stack", string(debug.Stack())))
			resp, err = nil, errPanic
		}
	}()
	return s.sign(ctx, c, req, rec)
}

func (s *Server) sign(ctx context.Context, c authz.Caller, req *keydv1.SignRequest, rec *audit.Record) (*keydv1.SignResponse, error) {
	if err := checkSignRequest(req); err != nil {
		return nil, err
	}
	ks, err := s.authorize(c, req.Keyset)
	if err != nil {
		return nil, err
	}
	if id := ks.Allow.AllowedIdentity(c); id != "" {
		rec.Identity = id
	}
	rec.Purpose = string(ks.Policy.Purpose)
	if req.Purpose != "" && req.Purpose != rec.Purpose {
		return nil, invalid("key set %q has purpose %s; it cannot sign a %s token", req.Keyset, rec.Purpose, req.Purpose)
	}
	lease, err := s.mgr.Acquire(req.Keyset, req.Kid)
	if err != nil {
		return nil, err
	}
	defer lease.Release()
	v := lease.Version
	rec.Kid = v.Kid
	if v.Purpose != rec.Purpose {
		// A key made for one purpose never signs for another (A6), even
		// after the configuration changed the key set's purpose.
		return nil, fmt.Errorf("kid %s of key set %q was made for purpose %q, not %s: %w; rotate the key set for a key of purpose %s",
			v.Kid, req.Keyset, v.Purpose, rec.Purpose, rotation.ErrNotSignable, rec.Purpose)
	}
	pk, err := s.keys.get(v, ks.Policy)
	if err != nil {
		return nil, err
	}

	now := s.now()
	var input []byte
	var sum policy.Summary
	if len(req.SigningInput) > 0 {
		h, cl, err := jws.SplitSigningInput(req.SigningInput)
		if err != nil {
			return nil, invalid("signing_input: %v", err)
		}
		if sum, err = pk.policy.CheckPrebuilt(now, h, cl); err != nil {
			return nil, err
		}
		input = req.SigningInput
	} else {
		tok, err := pk.policy.Prepare(now, req.Header, req.Claims, s.rand)
		if err != nil {
			return nil, err
		}
		sum = tok.Summary
		input = jws.SigningInput(tok.Header, tok.Claims)
	}
	fillAudit(rec, sum)
	if v.State == rotation.Draining && !v.RetireAt.IsZero() && sum.Exp != 0 && time.Unix(sum.Exp, 0).After(v.RetireAt) {
		// R2: the key leaves the JWK Set at RetireAt; a token it signs
		// must not outlive it, or verifiers refuse it before its exp.
		return nil, fmt.Errorf("kid %s is draining and leaves the JWK Set at %s, before this token's exp %s: %w; sign with the active key (no kid) or with an earlier exp",
			v.Kid, v.RetireAt.UTC().Format(time.RFC3339), time.Unix(sum.Exp, 0).UTC().Format(time.RFC3339), rotation.ErrNotSignable)
	}

	digest, err := jws.Digest(v.Alg, input)
	if err != nil {
		return nil, err
	}
	der, err := lease.Sign(ctx, digest, v.Alg.SignerOpts())
	if err != nil {
		if s.failed != nil && ctx.Err() == nil {
			s.failed(err)
		}
		return nil, fmt.Errorf("sign with kid %s: %w", v.Kid, err)
	}
	if !lease.Valid() {
		return nil, fmt.Errorf("kid %s was revoked while signing: %w", v.Kid, rotation.ErrNotSignable)
	}
	sig, err := pk.sig.Encode(der)
	if err != nil {
		return nil, err
	}
	return &keydv1.SignResponse{Jwt: jws.Compact(input, sig), Kid: v.Kid, Alg: string(v.Alg)}, nil
}

// LogRPC writes one "rpc" line to log for a call to method that began at
// start and ended with err: at debug level when it succeeded (the audit
// log already has every signature), at info level otherwise; the caller is
// named by authz.CallerLogAttrs.
func LogRPC(ctx context.Context, log *slog.Logger, method string, start time.Time, err error) {
	level := slog.LevelDebug
	if err != nil {
		level = slog.LevelInfo
	}
	if !log.Enabled(ctx, level) {
		return
	}
	attrs := append([]slog.Attr{slog.String("method", method)}, authz.CallerLogAttrs(ctx)...)
	log.LogAttrs(ctx, level, "rpc", append(attrs,
		slog.String("code", status.Code(err).String()),
		slog.Duration("took", time.Since(start)))...)
}

func fillAudit(rec *audit.Record, sum policy.Summary) {
	rec.Htm, rec.Htu, rec.Ath = sum.Htm, sum.Htu, sum.Ath
	rec.Iss, rec.Sub, rec.Aud = sum.Iss, sum.Sub, sum.Aud
	rec.Jti, rec.Exp = sum.Jti, sum.Exp
}

func checkSignRequest(req *keydv1.SignRequest) error {
	switch {
	case req == nil:
		return invalid("request is required") // a SignStream item without one
	case req.Keyset == "":
		return invalid("keyset is required")
	case len(req.Keyset) > maxNameLen:
		return invalid("keyset is longer than %d bytes", maxNameLen)
	case len(req.Kid) > maxKidLen:
		return invalid("kid is longer than %d bytes", maxKidLen)
	case len(req.Claims) > maxJSONLen:
		return invalid("claims are larger than %d bytes", maxJSONLen)
	case len(req.Header) > maxJSONLen:
		return invalid("header is larger than %d bytes", maxJSONLen)
	case len(req.SigningInput) > maxSigningInputLen:
		return invalid("signing_input is larger than %d bytes", maxSigningInputLen)
	case len(req.Purpose) > maxNameLen:
		return invalid("purpose is longer than %d bytes", maxNameLen)
	case len(req.SigningInput) > 0 && (len(req.Claims) > 0 || len(req.Header) > 0):
		return invalid("send either signing_input or claims and header, not both")
	}
	return nil
}

// GetJWKS implements keyd.v1.KeyService.
func (s *Server) GetJWKS(ctx context.Context, req *keydv1.GetJWKSRequest) (*keydv1.GetJWKSResponse, error) {
	names, err := s.visible(ctx, req.Keysets)
	if err != nil {
		return nil, s.toStatus(ctx, "jwks", err)
	}
	vs := s.mgr.Versions(names...)
	b, err := JWKS(vs)
	if err != nil {
		return nil, s.toStatus(ctx, "jwks", err)
	}
	return &keydv1.GetJWKSResponse{Jwks: b, StaleKids: rotation.StaleKids(vs)}, nil
}

// JWKS encodes the versions among vs that rotation.Published keeps as an
// RFC 7517 JWK Set.
func JWKS(vs []rotation.Version) ([]byte, error) {
	keys := []json.RawMessage{}
	for _, v := range rotation.Published(vs) {
		if len(v.JWK) > 0 {
			keys = append(keys, v.JWK)
		}
	}
	return json.Marshal(struct {
		Keys []json.RawMessage `json:"keys"`
	}{keys})
}

// ListKeys implements keyd.v1.KeyService.
func (s *Server) ListKeys(ctx context.Context, req *keydv1.ListKeysRequest) (*keydv1.ListKeysResponse, error) {
	names, err := s.visible(ctx, req.Keysets)
	if err != nil {
		return nil, s.toStatus(ctx, "list keys", err)
	}
	resp := &keydv1.ListKeysResponse{}
	vs := s.mgr.Versions(names...)
	stale := rotation.StaleKids(vs)
	for _, v := range vs {
		resp.Keys = append(resp.Keys, toProto(v, stale))
	}
	return resp, nil
}

// WatchKeys implements keyd.v1.KeyService.
func (s *Server) WatchKeys(req *keydv1.WatchKeysRequest, stream grpc.ServerStreamingServer[keydv1.WatchKeysResponse]) error {
	ctx := stream.Context()
	names, err := s.visible(ctx, req.Keysets)
	if err != nil {
		return s.toStatus(ctx, "watch keys", err)
	}
	if len(names) == 0 {
		// Nothing to watch: the (empty) view is complete now.
		if err := stream.Send(&keydv1.WatchKeysResponse{Type: keydv1.WatchKeysResponse_TYPE_SYNCED}); err != nil {
			return err
		}
		<-ctx.Done()
		return nil
	}
	snap, events, cancel := s.mgr.Watch(names...)
	defer cancel()
	stale := rotation.StaleKids(snap)
	for _, v := range snap {
		if err := stream.Send(&keydv1.WatchKeysResponse{Type: keydv1.WatchKeysResponse_TYPE_SNAPSHOT, Key: toProto(v, stale)}); err != nil {
			return err
		}
	}
	if err := stream.Send(&keydv1.WatchKeysResponse{Type: keydv1.WatchKeysResponse_TYPE_SYNCED}); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-events:
			if !ok {
				return status.Error(codes.Unavailable, "watch keys: this watcher fell behind; watch again for a fresh snapshot")
			}
			prev := stateToProto(ev.Previous)
			if ev.Previous == rotation.Pending {
				prev = keydv1.KeyState_KEY_STATE_UNSPECIFIED
			}
			var stale []string
			if ev.Version.State == rotation.Lost {
				stale = rotation.StaleKids(s.mgr.Versions(ev.Version.KeySet))
			}
			if err := stream.Send(&keydv1.WatchKeysResponse{Type: keydv1.WatchKeysResponse_TYPE_CHANGED, Key: toProto(ev.Version, stale), PreviousState: prev}); err != nil {
				return err
			}
		}
	}
}

// visible returns the requested key sets if the caller may use every one of
// them, or, when none are requested, every key set the caller may use.
func (s *Server) visible(ctx context.Context, requested []string) ([]string, error) {
	c, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	if len(requested) > 0 {
		if len(requested) > 256 {
			return nil, invalid("more than 256 key sets requested")
		}
		for _, n := range requested {
			if _, err := s.authorize(c, n); err != nil {
				return nil, err
			}
		}
		return requested, nil
	}
	var out []string
	for _, ks := range s.mgr.KeySets() {
		if set, ok := s.sets[ks.Name]; ok && set.Allow.Permits(c) {
			out = append(out, ks.Name)
		}
	}
	return out, nil
}

func (s *Server) admin(ctx context.Context) (authz.Caller, error) {
	c, err := s.caller(ctx)
	if err != nil {
		return c, err
	}
	if !s.admins.Permits(c) {
		s.metrics.Denied("admin")
		return c, fmt.Errorf("%w: %s is not on the admin allow list", errDenied, c.Who())
	}
	return c, nil
}

// Rotate implements keyd.v1.KeyAdminService.
func (s *Server) Rotate(ctx context.Context, req *keydv1.RotateRequest) (*keydv1.RotateResponse, error) {
	c, err := s.admin(ctx)
	var res rotation.RotateResult
	if err == nil {
		if _, ok := s.sets[req.Keyset]; !ok {
			err = fmt.Errorf("key set %q: %w", req.Keyset, rotation.ErrUnknownKeySet)
		} else {
			res, err = s.mgr.Rotate(ctx, req.Keyset, req.Now)
		}
	}
	if err != nil {
		st := s.toStatus(ctx, "rotate", err)
		s.auditAdmin(c, err, st, audit.Record{Event: "rotate", KeySet: auditName(req.Keyset)})
		return nil, st
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, "rotated by admin", slog.String("keyset", req.Keyset), slog.String("caller", c.String()),
		slog.String("kid", res.Active.Kid), slog.String("next_kid", res.Next.Kid))
	kid := res.Active.Kid
	if res.Next.Kid != "" {
		kid = res.Next.Kid
	}
	s.auditAdmin(c, nil, nil, audit.Record{Event: "rotate", KeySet: req.Keyset, Kid: kid})
	resp := &keydv1.RotateResponse{Active: ToProto(res.Active)}
	if res.Previous.Kid != "" {
		resp.Previous = ToProto(res.Previous)
	}
	if res.Next.Kid != "" {
		resp.Next = ToProto(res.Next)
	}
	return resp, nil
}

// Revoke implements keyd.v1.KeyAdminService.
func (s *Server) Revoke(ctx context.Context, req *keydv1.RevokeRequest) (*keydv1.RevokeResponse, error) {
	c, err := s.admin(ctx)
	if err == nil && (req.Kid == "" || len(req.Kid) > maxKidLen) {
		err = invalid("kid is required (at most %d bytes)", maxKidLen)
	}
	var v rotation.Version
	if err == nil {
		v, err = s.mgr.Revoke(ctx, req.Kid, req.Keyset)
		if err == nil || v.Kid != "" {
			s.log.LogAttrs(ctx, slog.LevelWarn, "revoked by admin", slog.String("kid", req.Kid), slog.String("caller", c.String()))
		}
	}
	rec := audit.Record{Event: "revoke", KeySet: auditName(req.Keyset), Kid: auditName(req.Kid)}
	if v.Kid != "" {
		rec.KeySet = v.KeySet
	}
	if err != nil {
		st := s.toStatus(ctx, "revoke", err)
		s.auditAdmin(c, err, st, rec)
		return nil, st
	}
	s.auditAdmin(c, nil, nil, rec)
	return &keydv1.RevokeResponse{Key: ToProto(v)}, nil
}

// auditAdmin completes rec, the record of an admin call by c that failed
// with err (answered st) or succeeded, and writes it. A call without
// caller credentials has no one to record. The change, if any, is made
// already: a record that cannot be written is logged, not returned (an
// admin told the call failed would make it again).
func (s *Server) auditAdmin(c authz.Caller, err error, st error, rec audit.Record) {
	if errors.Is(err, errUnauthenticated) {
		return
	}
	rec.Time = s.now().UTC()
	rec.UID, rec.GID, rec.PID = c.UID, c.GID, c.PID
	if c.Transport == authz.TransportMTLS && len(c.Identities) > 0 {
		rec.Identity = c.Identities[0]
	}
	rec.Outcome = "ok"
	if err != nil {
		rec.Outcome = codeOf(err).String()
		rec.Reason = status.Convert(st).Message()
	}
	if aerr := s.audit.Record(rec); aerr != nil {
		s.log.Error("cannot write the audit record of an admin call", "event", rec.Event, "keyset", rec.KeySet, "kid", rec.Kid, "outcome", rec.Outcome, "err", aerr)
	}
}

// ToProto converts a version for the wire.
func ToProto(v rotation.Version) *keydv1.KeyVersion {
	kv := &keydv1.KeyVersion{
		Keyset:    v.KeySet,
		Kid:       v.Kid,
		Alg:       string(v.Alg),
		Purpose:   v.Purpose,
		State:     stateToProto(v.State),
		CreatedAt: ts(v.CreatedAt),
		Backend:   v.Backend,
	}
	if !v.ActivatedAt.IsZero() {
		kv.ActivatedAt = ts(v.ActivatedAt)
	}
	for _, t := range []struct {
		at  time.Time
		dst **timestamppb.Timestamp
	}{
		{v.RetireAt, &kv.RetireAt}, {v.ActivateAt, &kv.ActivateAt},
		{v.DeactivateAt, &kv.DeactivateAt}, {v.DestroyAt, &kv.DestroyAt},
	} {
		if !t.at.IsZero() {
			*t.dst = ts(t.at)
		}
	}
	if v.State.Published() {
		kv.Jwk = v.JWK
	}
	return kv
}

// toProto is ToProto for a version among versions whose stale kids are
// stale: a stale key is still in the JWK Set, so it keeps its JWK.
func toProto(v rotation.Version, stale []string) *keydv1.KeyVersion {
	kv := ToProto(v)
	if v.State == rotation.Lost && slices.Contains(stale, v.Kid) {
		kv.Jwk = v.JWK
	}
	return kv
}

func ts(t time.Time) *timestamppb.Timestamp { return timestamppb.New(t) }

func stateToProto(s rotation.State) keydv1.KeyState {
	switch s {
	case rotation.Next:
		return keydv1.KeyState_KEY_STATE_NEXT
	case rotation.Active:
		return keydv1.KeyState_KEY_STATE_ACTIVE
	case rotation.Draining:
		return keydv1.KeyState_KEY_STATE_DRAINING
	case rotation.Retired:
		return keydv1.KeyState_KEY_STATE_RETIRED
	case rotation.Destroyed:
		return keydv1.KeyState_KEY_STATE_DESTROYED
	case rotation.Revoked:
		return keydv1.KeyState_KEY_STATE_REVOKED
	case rotation.Lost:
		return keydv1.KeyState_KEY_STATE_LOST
	}
	return keydv1.KeyState_KEY_STATE_UNSPECIFIED
}

// callerKey names a caller for per-caller limits: its uid (a pid would let a
// service escape its limit by reconnecting from a new process).
func callerKey(c authz.Caller) string { return c.Principal() }

// keyCache keeps, per kid, the key set's policy bound to the public key (with
// the DPoP header precomputed) and the key's signature encoder, both
// validated once. A kid is a thumbprint of one key of one key set, so an
// entry never goes stale.
type keyCache struct{ m sync.Map }

type publicKey struct {
	policy *policy.Bound
	sig    jws.SignatureEncoder // the key checked once for its algorithm
}

func (c *keyCache) get(v rotation.Version, p policy.Policy) (publicKey, error) {
	if pk, ok := c.m.Load(v.Kid); ok {
		return pk.(publicKey), nil
	}
	var k jws.JWK
	if err := json.Unmarshal(v.JWK, &k); err != nil {
		return publicKey{}, fmt.Errorf("recorded JWK of kid %s: %w", v.Kid, err)
	}
	pub, err := k.PublicKey()
	if err != nil {
		return publicKey{}, fmt.Errorf("recorded JWK of kid %s: %w", v.Kid, err)
	}
	k.Kid, k.Alg, k.Use = "", "", ""
	bare, err := json.Marshal(k)
	if err != nil {
		return publicKey{}, err
	}
	bound, err := p.Bind(policy.Key{Alg: string(v.Alg), Kid: v.Kid, JWK: bare})
	if err != nil {
		return publicKey{}, err
	}
	enc, err := jws.NewSignatureEncoder(v.Alg, pub)
	if err != nil {
		return publicKey{}, fmt.Errorf("recorded JWK of kid %s: %w", v.Kid, err)
	}
	pk := publicKey{policy: bound, sig: enc}
	c.m.Store(v.Kid, pk)
	return pk, nil
}
