// Package daemon assembles a running keyd from its configuration: the
// backend, the lifecycle manager, the audit log, the gRPC server and its
// socket. Backends are listed explicitly here; there is no registration
// magic.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/internal/audit"
	"github.com/keyd-dev/keyd/internal/authz"
	"github.com/keyd-dev/keyd/internal/config"
	"github.com/keyd-dev/keyd/internal/httpapi"
	"github.com/keyd-dev/keyd/internal/listener"
	"github.com/keyd-dev/keyd/internal/metrics"
	"github.com/keyd-dev/keyd/internal/server"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/pkcs11"
	"github.com/keyd-dev/keyd/keystore/soft"
	"github.com/keyd-dev/keyd/keystore/tpm"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
	"github.com/keyd-dev/keyd/rotation"
)

// Options are the parts of a daemon that are not in the config file.
type Options struct {
	Logger *slog.Logger
	// Failpoint is handed to the lifecycle manager (crash tests).
	Failpoint func(string)
	// Ready, when set, is called once the socket accepts connections.
	Ready func(socket string)
	// Status, when set, is given one line for people whenever the
	// daemon's state changes: serving (and whether the backend is
	// healthy), the backend failing or recovering, stopping. keyd serve
	// hands it to systemd (STATUS=), where systemctl status shows it.
	// The line has no control characters.
	Status func(line string)
}

// Daemon is an assembled keyd.
type Daemon struct {
	cfg       *config.Config
	log       *slog.Logger
	backend   keystore.Backend
	store     *rotation.Store
	mgr       *rotation.Manager
	audit     *audit.Log
	syslog    *audit.Syslog // the audit log's second sink, if configured
	grpc      *grpc.Server
	tcpGRPC   *grpc.Server // the mutual-TLS listener's, if configured
	adminGRPC *grpc.Server // the admin socket's, if configured
	adminLis  net.Listener
	tcpLis    net.Listener
	health    *health.Server
	kick      chan struct{} // a backend failure: recheck health now
	healthy   atomic.Bool
	metrics   *metrics.Metrics
	lis       net.Listener
	httpLis   net.Listener
	http      *http.Server
	ready     func(string)
	status    func(string)
	// statusMu guards what the status line is made of, and orders the
	// lines: the last one told is the daemon's state.
	statusMu  sync.Mutex
	announced bool  // Serve has called ready
	healthErr error // the backend's failure, nil while it is healthy
	stopNote  string
	// stopping is cancelled when Serve begins to stop: it ends the
	// server-streaming watchers (health Watch, WatchKeys), which would
	// otherwise hold a graceful stop until its forced-stop timeout.
	stopping    context.Context
	stopWatches context.CancelFunc
	// calls counts the RPC handlers running. gRPC's Stop does not wait
	// for them: Serve does, before it closes what they use. (Not a
	// WaitGroup: a handler may still start while Serve waits.)
	calls atomic.Int64
	srv   *server.Server
}

// New builds a daemon: it locks the state directory, opens the backend,
// reconciles keys, opens the audit log and listens on the socket.
func New(ctx context.Context, cfg *config.Config, opts Options) (_ *Daemon, err error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Daemon{cfg: cfg, log: log, ready: opts.Ready, status: opts.Status, kick: make(chan struct{}, 1)}
	d.stopping, d.stopWatches = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			d.close()
		}
	}()

	if d.store, err = rotation.OpenStore(cfg.StateDir); err != nil {
		return nil, err
	}
	if d.backend, err = openBackend(ctx, cfg, log); err != nil {
		return nil, err
	}
	var sets []rotation.KeySet
	policies := map[string]server.KeySet{}
	groups := &authz.GroupCache{}
	for _, ks := range cfg.KeySets {
		spec, err := ks.KeySpec()
		if err != nil {
			return nil, fmt.Errorf("key set %q: %w", ks.Name, err)
		}
		if !supports(d.backend, spec.Algorithm) {
			return nil, fmt.Errorf("key set %q: %w: the %s backend cannot make %s keys", ks.Name, keystore.ErrUnsupportedAlgorithm, d.backend.Name(), spec.Algorithm)
		}
		p, err := ks.Policy()
		if err != nil {
			return nil, fmt.Errorf("key set %q: %w", ks.Name, err)
		}
		allow, err := authz.NewList(authz.Spec(ks.Allow), groups)
		if err != nil {
			return nil, fmt.Errorf("key set %q: allow: %w", ks.Name, err)
		}
		rks, err := ks.RotationKeySet()
		if err != nil {
			return nil, fmt.Errorf("key set %q: %w", ks.Name, err)
		}
		sets = append(sets, rks)
		policies[ks.Name] = server.KeySet{Allow: allow, Policy: p}
	}
	adminSpec := authz.Spec{UIDs: []int{0, os.Geteuid()}}
	if cfg.Admins != nil {
		adminSpec = authz.Spec(*cfg.Admins)
	}
	admins, err := authz.NewList(adminSpec, groups)
	if err != nil {
		return nil, fmt.Errorf("admins: %w", err)
	}

	if d.mgr, err = rotation.New(ctx, rotation.Config{
		Backend: d.backend, Store: d.store, KeySets: sets, Logger: log, Failpoint: opts.Failpoint,
	}); err != nil {
		return nil, err
	}
	if d.audit, err = audit.Open(cfg.AuditLog); err != nil {
		return nil, err
	}
	var sink server.Auditor = d.audit
	if a := cfg.AuditSyslog; a != nil {
		addr, tag := a.Address, a.Tag
		if addr == "" {
			addr = "/dev/log"
		}
		if tag == "" {
			tag = "keyd-audit"
		}
		if d.syslog, err = audit.OpenSyslog(addr, tag); err != nil {
			return nil, err
		}
		sink = audit.Either(log, d.audit, d.syslog)
	}
	d.metrics = metrics.New(d.backend.Name(), d.mgr)
	d.srv, err = server.New(server.Config{
		Manager: d.mgr, KeySets: policies, Admins: admins, Audit: sink, Logger: log,
		Metrics: d.metrics, SignRate: cfg.Limits.SignRate, SignBurst: cfg.Limits.SignBurst,
		Stop: d.stopping.Done(),
		BackendFailed: func(error) {
			select {
			case d.kick <- struct{}{}:
			default:
			}
		},
	})
	if err != nil {
		return nil, err
	}
	d.metrics.StreamInFlight(d.srv.StreamItemsInFlight)

	d.health = health.NewServer()
	d.setHealth(healthpb.HealthCheckResponse_SERVING)
	perUID := cfg.Limits.MaxConnectionsPerUID
	if cfg.AdminSocket == "" {
		d.grpc = d.newGRPCServer(authz.PeerCredentialsPerUID(perUID), d.srv.Register)
	} else {
		d.grpc = d.newGRPCServer(authz.PeerCredentialsPerUID(perUID), d.srv.RegisterKeys)
		d.adminGRPC = d.newGRPCServer(authz.PeerCredentialsPerUID(perUID), d.srv.RegisterAdmin)
	}
	if t := cfg.TCP; t != nil {
		creds, err := authz.MTLSCredentials(authz.TLSConfig{CertFile: t.CertFile, KeyFile: t.KeyFile, ClientCAFile: t.ClientCAFile, Logger: log})
		if err != nil {
			return nil, fmt.Errorf("tcp: %w", err)
		}
		d.tcpGRPC = d.newGRPCServer(creds, d.srv.RegisterKeys)
		l, err := net.Listen("tcp", t.Listen)
		if err != nil {
			return nil, fmt.Errorf("tcp.listen: %w", err)
		}
		d.tcpLis = listener.Limit(l, cfg.Limits.MaxConnections)
	}

	mode, err := cfg.Mode()
	if err != nil {
		return nil, err
	}
	gid := -1
	if cfg.SocketGroup != "" {
		g, err := user.LookupGroup(cfg.SocketGroup)
		if err != nil {
			return nil, fmt.Errorf("socket_group: %w", err)
		}
		if gid, err = strconv.Atoi(g.Gid); err != nil {
			return nil, fmt.Errorf("socket_group %q: %w", cfg.SocketGroup, err)
		}
	}
	d.healthy.Store(true)
	if cfg.HTTP != nil {
		maxAge := map[string]time.Duration{}
		for _, ks := range cfg.KeySets {
			maxAge[ks.Name] = ks.JWKSMaxAge()
		}
		var metricsHandler http.Handler
		if cfg.HTTP.ServesMetrics() {
			metricsHandler = d.metrics.Handler()
		}
		h := httpapi.Handler(httpapi.Config{Keys: d.mgr, MaxAge: maxAge, Encode: server.JWKS, Healthy: d.healthy.Load, Metrics: metricsHandler, Logger: log})
		if d.httpLis, err = net.Listen("tcp", cfg.HTTP.Listen); err != nil {
			return nil, fmt.Errorf("http.listen: %w", err)
		}
		// Whoever reaches it may hold connections open: bounded, they
		// cannot use up the descriptors the socket and the audit log need.
		d.httpLis = listener.Limit(d.httpLis, cfg.Limits.MaxConnections)
		d.http = httpapi.Server(cfg.HTTP.Listen, h)
	}
	if d.lis, err = listener.Unix(cfg.Socket, mode, gid); err != nil {
		return nil, err
	}
	d.lis = listener.Limit(d.lis, cfg.Limits.MaxConnections)
	if cfg.AdminSocket != "" {
		l, err := listener.Unix(cfg.AdminSocket, 0o600, -1)
		if err != nil {
			return nil, fmt.Errorf("admin_socket: %w", err)
		}
		d.adminLis = listener.Limit(l, 64)
	}
	return d, nil
}

// newGRPCServer makes a gRPC server with keyd's limits and services over
// creds: the Unix socket and the mutual-TLS listener get one each.
func (d *Daemon) newGRPCServer(creds credentials.TransportCredentials, register func(*grpc.Server)) *grpc.Server {
	g := grpc.NewServer(append(ServerOptions(creds),
		grpc.ChainUnaryInterceptor(d.unaryInterceptor),
		grpc.ChainStreamInterceptor(d.streamInterceptor),
	)...)
	register(g)
	healthpb.RegisterHealthServer(g, d.health)
	reflection.Register(g)
	return g
}

// ServerOptions are the options of keyd's gRPC servers that shape the
// transport and its limits, without keyd's interceptors and services: the
// benchmark's echo and relay servers use them to measure the same
// transport.
func ServerOptions(creds credentials.TransportCredentials) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.Creds(creds),
		grpc.MaxRecvMsgSize(64 << 10),
		grpc.MaxConcurrentStreams(64),
		// A fixed flow-control window of gRPC's default size instead of
		// BDP probing: the probe's pings and window updates add frames and
		// wake-ups to the exchanges of a lone caller (≈ 10–25 µs of p50
		// measured), keyd's messages are small, and a window that cannot
		// grow also bounds what a peer can make keyd buffer.
		grpc.InitialWindowSize(64 << 10),
		grpc.InitialConnWindowSize(64 << 10),
		grpc.ConnectionTimeout(5 * time.Second),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 30 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: 15 * time.Minute}),
	}
}

func supports(b keystore.Backend, a keystore.Algorithm) bool {
	for _, x := range b.Algorithms() {
		if x == a {
			return true
		}
	}
	return false
}

// openBackend is the explicit list of backends.
func openBackend(ctx context.Context, cfg *config.Config, log *slog.Logger) (keystore.Backend, error) {
	switch {
	case cfg.Backend.Soft != nil:
		log.Warn("using the soft keystore: keys are files protected only by permissions; use pkcs11 or tpm in production", "dir", cfg.SoftDir())
		return soft.New(soft.Config{Dir: cfg.SoftDir(), Logger: log})
	case cfg.Backend.PKCS11 != nil:
		pc, err := cfg.PKCS11Config()
		if err != nil {
			return nil, err
		}
		pc.Logger = log
		// A module that does not answer must not hang the start for
		// good: New and the probe below give up at open_timeout.
		octx, cancel := context.WithTimeoutCause(ctx, cfg.PKCS11OpenTimeout(),
			fmt.Errorf("backend.pkcs11.open_timeout (%v) passed", cfg.PKCS11OpenTimeout()))
		defer cancel()
		b, err := pkcs11.New(octx, pc)
		if err != nil {
			return nil, err
		}
		// A wrong PIN leaves the backend locked after its one C_Login:
		// say so now, rather than at the first signature.
		if err := b.Health(octx); errors.Is(err, keystore.ErrLocked) {
			b.Close()
			return nil, fmt.Errorf("pkcs11 token: %w", err)
		}
		return b, nil
	case cfg.Backend.TPM != nil:
		tc := cfg.TPMConfig()
		tc.Logger = log
		return tpm.New(ctx, tc)
	}
	return nil, errors.New("no backend configured")
}

// Manager returns the lifecycle manager (for tests and the HTTP listener).
func (d *Daemon) Manager() *rotation.Manager { return d.mgr }

// Serve serves until ctx is done, then stops gracefully (in-flight calls
// finish, for at most gracefulWait; each SignStream ends once the requests
// it took are answered; the handlers of calls cut off then are waited for,
// at most backgroundWait) and releases everything.
func (d *Daemon) Serve(ctx context.Context) error {
	// The health watch and the key lifecycle use the backend and the
	// store: they stop, and are waited for, before those are closed.
	bctx, stopBackground := context.WithCancel(ctx)
	defer stopBackground()
	var background sync.WaitGroup
	if hc, ok := d.backend.(healthChecker); ok {
		// The first check completes before anything is served (the
		// socket accepts already, but no call is answered), so health
		// never reports SERVING for a backend that is down.
		serving := d.checkHealth(bctx, hc, true)
		background.Go(func() { d.watchHealth(bctx, hc, serving) })
	}
	errc := make(chan error, 1)
	go func() { errc <- d.grpc.Serve(d.lis) }()
	if d.adminGRPC != nil {
		go func() {
			if err := d.adminGRPC.Serve(d.adminLis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				d.log.Error("admin socket failed", "err", err)
			}
		}()
	}
	if d.tcpGRPC != nil {
		go func() {
			if err := d.tcpGRPC.Serve(d.tcpLis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				d.log.Error("mutual-TLS listener failed", "err", err)
			}
		}()
		d.log.Info("mutual-TLS listener serving", "addr", d.tcpLis.Addr().String())
	}
	background.Go(func() { d.mgr.Run(bctx, tickInterval(d.mgr.KeySets())) })
	if d.http != nil {
		go func() {
			if err := d.http.Serve(d.httpLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				d.log.Error("http listener failed", "err", err)
			}
		}()
		d.log.Info("http listener serving /jwks/{keyset}.json and /healthz", "addr", d.httpLis.Addr().String())
	}
	d.log.Info("keyd serving", "socket", d.cfg.Socket, "backend", d.backend.Name(), "keysets", len(d.cfg.KeySets))
	if d.ready != nil {
		d.ready(d.cfg.Socket)
	}
	d.updateStatus(func() { d.announced = true })
	var err error
	select {
	case <-ctx.Done():
		d.updateStatus(func() { d.stopNote = "finishing the calls in flight" })
		d.health.Shutdown()
		d.stopWatches()
		if d.http != nil {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			d.http.Shutdown(sctx)
			cancel()
		}
		// Every server stops taking new calls at once; a call still
		// running on one must not keep the others answering new ones.
		stopped := make(chan struct{})
		go func() {
			var wg sync.WaitGroup
			d.eachServer(func(g *grpc.Server) { wg.Go(g.GracefulStop) })
			wg.Wait()
			close(stopped)
		}()
		d.awaitStop(stopped)
		err = <-errc
		if errors.Is(err, grpc.ErrServerStopped) {
			err = nil
		}
	case err = <-errc:
		// The main socket failed: nothing is served any more. Stop the
		// other listeners' servers too (at once: they must not go on
		// using the backend that is closed below), and say so to health.
		d.log.Error("the socket failed; stopping", "err", err)
		d.updateStatus(func() { d.stopNote = fmt.Sprintf("the socket failed: %v", err) })
		d.health.Shutdown()
		d.stopWatches()
		if d.http != nil {
			d.http.Close()
		}
		d.eachServer((*grpc.Server).Stop)
	}
	// Calls cut off by a forced stop may still be running: they use the
	// backend, the store and the audit log as the background work does.
	background.Go(d.waitCalls)
	stopBackground()
	d.waitBackground(&background)
	d.close()
	d.log.Info("keyd stopped")
	return err
}

// eachServer applies stop to the mutual-TLS and admin servers, if
// configured, and then to the main socket's.
func (d *Daemon) eachServer(stop func(*grpc.Server)) {
	for _, g := range []*grpc.Server{d.tcpGRPC, d.adminGRPC, d.grpc} {
		if g != nil {
			stop(g)
		}
	}
}

// backgroundWait bounds how long Serve waits for the health watch and the
// key lifecycle to stop before it closes the backend: a scheduled change
// stuck in a device that ignores cancellation must not keep keyd from
// stopping.
const backgroundWait = 15 * time.Second

// gracefulWait bounds the graceful stop: calls still running then are cut
// off.
const gracefulWait = 10 * time.Second

// awaitStop waits for the graceful stop (stopped closed), at most
// gracefulWait; then it stops the servers, cutting off what still runs.
// The SignStreams that clients keep open between signatures do not hold
// it: each ends once the requests it took are answered (server.Config.Stop).
func (d *Daemon) awaitStop(stopped <-chan struct{}) {
	select {
	case <-stopped:
	case <-time.After(gracefulWait):
		d.eachServer((*grpc.Server).Stop)
	}
}

// waitCalls waits until no handler runs, at most backgroundWait.
func (d *Daemon) waitCalls() {
	for range backgroundWait / (10 * time.Millisecond) {
		if d.calls.Load() == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// auditCloseWait bounds how long stopping waits for the audit log's
// pending write.
const auditCloseWait = 5 * time.Second

// waitBackground waits for wg, at most backgroundWait.
func (d *Daemon) waitBackground(wg *sync.WaitGroup) {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(backgroundWait):
		d.log.Error("the key lifecycle, the health watch or a call did not stop in time; closing the backend under it", "waited", backgroundWait)
	}
}

// tickInterval is how often the lifecycle manager looks at the schedules
// besides their own deadlines: a tenth of the shortest schedule duration,
// between 100 ms and 30 s, so a failed step is retried soon.
func tickInterval(sets []rotation.KeySet) time.Duration {
	iv := 30 * time.Second
	for _, ks := range sets {
		for _, d := range []time.Duration{ks.Schedule.Period, ks.Schedule.Prepublish, ks.Schedule.Drain, ks.Schedule.Retain} {
			if d > 0 && d/10 < iv {
				iv = d / 10
			}
		}
	}
	return max(iv, 100*time.Millisecond)
}

// healthChecker is a backend that can tell cheaply whether it works.
type healthChecker interface {
	Health(ctx context.Context) error
}

// setHealth reports st for the daemon (""), for KeyService and for the
// backend ("keyd.backend.<name>", e.g. keyd.backend.pkcs11). Polling it
// reads a cached status: it never touches the backend.
func (d *Daemon) setHealth(st healthpb.HealthCheckResponse_ServingStatus) {
	d.health.SetServingStatus("", st)
	d.health.SetServingStatus(keydv1.KeyService_ServiceDesc.ServiceName, st)
	d.health.SetServingStatus("keyd.backend."+d.backend.Name(), st)
}

// healthInterval is how often the backend's health is polled; a failed
// signature triggers a check at once.
const healthInterval = 5 * time.Second

// watchHealth mirrors the backend's health into the gRPC health service:
// NOT_SERVING while the backend fails (a frozen TPM, a wiped token, a
// locked PIN), SERVING again once it recovers. Transitions are logged.
func (d *Daemon) watchHealth(ctx context.Context, hc healthChecker, serving bool) {
	t := time.NewTicker(healthInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-d.kick:
		}
		serving = d.checkHealth(ctx, hc, serving)
		if ctx.Err() != nil {
			return
		}
	}
}

// checkHealth asks the backend once and reports a change from serving;
// it returns the new state.
func (d *Daemon) checkHealth(ctx context.Context, hc healthChecker, serving bool) bool {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	err := hc.Health(cctx)
	cancel()
	if ctx.Err() != nil {
		return serving
	}
	if ok := err == nil; ok != serving {
		serving = ok
		d.healthy.Store(ok)
		d.metrics.BackendUp(ok)
		st := healthpb.HealthCheckResponse_SERVING
		if ok {
			d.log.Info("backend healthy again", "backend", d.backend.Name())
		} else {
			st = healthpb.HealthCheckResponse_NOT_SERVING
			d.log.Error("backend unhealthy; health reports NOT_SERVING", "backend", d.backend.Name(), "err", err)
		}
		d.setHealth(st)
		d.updateStatus(func() { d.healthErr = err })
	}
	return serving
}

// updateStatus applies change to the status's parts and, once Serve has
// announced the daemon, tells Options.Status the line they make.
func (d *Daemon) updateStatus(change func()) {
	d.statusMu.Lock()
	defer d.statusMu.Unlock()
	change()
	if d.status == nil || !d.announced {
		return
	}
	var line string
	switch {
	case d.stopNote != "":
		line = "stopping: " + d.stopNote
	case d.healthErr != nil:
		line = fmt.Sprintf("serving on %s; backend %s unavailable (health NOT_SERVING): %v", d.cfg.Socket, d.backend.Name(), d.healthErr)
	default:
		line = fmt.Sprintf("serving on %s; backend %s healthy; %d key set(s)", d.cfg.Socket, d.backend.Name(), len(d.cfg.KeySets))
	}
	d.status(oneLine(line))
}

// oneLine replaces control characters (a newline would start another
// assignment in a systemd notification) and bounds the length.
func oneLine(s string) string {
	const limit = 400
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	if len(s) > limit {
		s = strings.ToValidUTF8(s[:limit], "") + "…"
	}
	return s
}

func (d *Daemon) close() {
	if d.lis != nil {
		d.lis.Close()
	}
	if d.httpLis != nil {
		d.httpLis.Close()
	}
	if d.tcpLis != nil {
		d.tcpLis.Close()
	}
	if d.adminLis != nil {
		d.adminLis.Close()
	}
	if d.audit != nil {
		// Close waits for the write in progress: an audit sink that
		// stopped taking writes (a stalled FIFO reader, a hung mount)
		// must not keep keyd from stopping.
		closed := make(chan struct{})
		go func() {
			d.audit.Close()
			close(closed)
		}()
		select {
		case <-closed:
		case <-time.After(auditCloseWait):
			d.log.Error("the audit log did not finish its pending write in time; stopping without it", "waited", auditCloseWait)
		}
	}
	if d.syslog != nil {
		d.syslog.Close()
	}
	if d.backend != nil {
		d.backend.Close()
	}
	if d.store != nil {
		d.store.Close()
	}
	if d.stopWatches != nil {
		d.stopWatches()
	}
}

// defaultTimeout bounds calls whose client set no deadline.
const defaultTimeout = 30 * time.Second

func (d *Daemon) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	d.calls.Add(1)
	defer d.calls.Add(-1)
	start := time.Now()
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultTimeout)
		defer cancel()
	}
	defer func() {
		if r := recover(); r != nil {
			d.log.LogAttrs(ctx, slog.LevelError, "panic in handler", slog.String("method", info.FullMethod), slog.Any("panic", r), slog.String("stack", string(debug.Stack())))
			err = status.Error(codes.Internal, "internal error; the daemon log has the details")
		}
		d.logRPC(ctx, info.FullMethod, start, err)
	}()
	return handler(ctx, req)
}

func (d *Daemon) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	d.calls.Add(1)
	defer d.calls.Add(-1)
	start := time.Now()
	defer func() {
		if r := recover(); r != nil {
			d.log.LogAttrs(ss.Context(), slog.LevelError, "panic in handler", slog.String("method", info.FullMethod), slog.Any("panic", r), slog.String("stack", string(debug.Stack())))
			err = status.Error(codes.Internal, "internal error; the daemon log has the details")
		}
		d.logRPC(ss.Context(), info.FullMethod, start, err)
	}()
	if info.IsServerStream && !info.IsClientStream && d.stopping != nil {
		// A watcher ends when the daemon stops.
		ctx, cancel := context.WithCancel(ss.Context())
		defer cancel()
		defer context.AfterFunc(d.stopping, cancel)()
		ss = ctxStream{ServerStream: ss, ctx: ctx}
	}
	return handler(srv, ss)
}

// ctxStream is a server stream with another context.
type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s ctxStream) Context() context.Context { return s.ctx }

// logRPC writes the RPC's log line (see server.LogRPC).
func (d *Daemon) logRPC(ctx context.Context, method string, start time.Time, err error) {
	server.LogRPC(ctx, d.log, method, start, err)
}
