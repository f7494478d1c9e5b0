package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/authz"
	"github.com/keyd-dev/keyd/internal/config"
	"github.com/keyd-dev/keyd/internal/daemon"
	"github.com/keyd-dev/keyd/internal/listener"
	"github.com/keyd-dev/keyd/internal/policy"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/soft"
)

// maxSocketPath is the longest Unix socket path keyd accepts.
const maxSocketPath = 107

// workDir is the temporary directory of one bench run.
type workDir struct {
	dir        string
	keydSocket string
	echoSocket string
	stateDir   string
	auditLog   string
	configPath string
	keydLog    string
	echoLog    string
	echoKeys   string
}

func newWorkDir() (*workDir, error) {
	dir, err := os.MkdirTemp("", "kb")
	if err != nil {
		return nil, err
	}
	// $TMPDIR may be long; socket paths may not.
	if len(filepath.Join(dir, "keyd.sock")) >= maxSocketPath {
		os.RemoveAll(dir)
		if dir, err = os.MkdirTemp("/tmp", "kb"); err != nil {
			return nil, err
		}
		if len(filepath.Join(dir, "keyd.sock")) >= maxSocketPath {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("temporary directory %s is too long for a Unix socket path", dir)
		}
	}
	return &workDir{
		dir:        dir,
		keydSocket: filepath.Join(dir, "keyd.sock"),
		echoSocket: filepath.Join(dir, "echo.sock"),
		stateDir:   filepath.Join(dir, "state"),
		auditLog:   filepath.Join(dir, "audit.jsonl"),
		configPath: filepath.Join(dir, "keyd.yaml"),
		keydLog:    filepath.Join(dir, "keyd.log"),
		echoLog:    filepath.Join(dir, "echo.log"),
		echoKeys:   filepath.Join(dir, "echo-keys"),
	}, nil
}

func (w *workDir) remove() { os.RemoveAll(w.dir) }

// keydConfig is the YAML configuration keyd runs with: the soft backend and
// one dpop key set per algorithm, allowed to this process's uid.
func keydConfig(w *workDir, algs []keystore.Algorithm, uid int) []byte {
	return keydConfigFor(w, "  soft: {}\n", algs, uid)
}

// keydEnv is added to keyd's environment (-keyd-env), for experiments such
// as GOMAXPROCS=4.
var keydEnv []string

// child is a process this program started; stop ends it by its PID.
type child struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when the process has been waited for
	err  error         // Wait's result, valid once done is closed
}

func startChild(name, logPath string, path string, args ...string) (*child, error) {
	lf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	defer lf.Close()
	cmd := exec.Command(path, args...)
	cmd.Stdout = lf
	cmd.Stderr = lf
	cmd.Env = os.Environ()
	if name == "keyd" {
		cmd.Env = append(cmd.Env, keydEnv...)
	}
	// If this program dies without cleaning up (SIGKILL), the child follows.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the child's PID, waits up to 5 s for it to exit,
// then kills it. It returns once the process is gone.
func (c *child) stop() {
	if c.exited() {
		return
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
		return
	case <-time.After(5 * time.Second):
	}
	_ = c.cmd.Process.Kill()
	<-c.done
}

// logTail returns the last lines the child wrote.
func (c *child) logTail() string {
	b, err := os.ReadFile(c.log)
	if err != nil || len(b) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return "\n  " + c.name + " log:\n    " + strings.Join(lines, "\n    ")
}

// ensureKeyd builds the keyd binary when it is missing.
func ensureKeyd(ctx context.Context, o options) error {
	if fi, err := os.Stat(o.keyd); err == nil {
		if fi.IsDir() {
			return fmt.Errorf("keyd binary %s is a directory", o.keyd)
		}
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	progress("building %s…", o.keyd)
	cmd := exec.CommandContext(ctx, "go", "build", "-o", o.keyd, "./cmd/keyd")
	cmd.Dir = o.root
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("build keyd: %w", err)
	}
	return nil
}

// waitServing polls the health service at socket until it answers SERVING,
// the child exits, or the timeout passes.
func waitServing(ctx context.Context, c *child, socket string, timeout time.Duration) error {
	return waitFor(ctx, c, socket, timeout, func() error {
		if _, err := os.Stat(socket); err != nil {
			return err
		}
		return healthOnce(ctx, socket)
	})
}

// waitSocket waits until c accepts connections on the Unix socket.
func waitSocket(ctx context.Context, c *child, socket string, timeout time.Duration) error {
	return waitFor(ctx, c, socket, timeout, func() error {
		conn, err := net.Dial("unix", socket)
		if err == nil {
			conn.Close()
		}
		return err
	})
}

// waitFor calls probe every 20 ms until it succeeds, the child exits, or
// the timeout passes.
func waitFor(ctx context.Context, c *child, socket string, timeout time.Duration, probe func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		if c.exited() {
			return fmt.Errorf("%s exited before serving (%v)%s", c.name, c.err, c.logTail())
		}
		err := probe()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s does not serve on %s after %v: %v%s", c.name, socket, timeout, err, c.logTail())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func healthOnce(ctx context.Context, socket string) error {
	cl, err := client.Dial(socket)
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(cl.Conn()).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return err
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("status %v", resp.Status)
	}
	return nil
}

// serveEcho is the echo server child, started as
//
//	bench -echo-server SOCKET KEYDIR ALG[,ALG...]
//
// It serves, on a Unix socket made like keyd's and with keyd's server
// options that shape the transport (daemon.ServerOptions: peer-credential
// handshake, message and stream limits, fixed flow-control windows,
// keepalive) but none of its interceptors:
//
//   - the standard gRPC health service, whose unary Check is the bare
//     transport ("echo");
//   - keydbench.ProofEcho/Proof, a diagnostic: the handler makes the same
//     in-process DPoP proof as the in-process mode, with its own soft keys
//     in KEYDIR, and returns it ("echo+proof"). It is keyd's Sign minus
//     everything keyd does besides the proof: authorization, the lifecycle
//     lease, the audit record, the interceptor.
//
// It serves until SIGTERM/SIGINT.
func serveEcho(args []string) error {
	if len(args) != 3 {
		return fmt.Errorf("usage: bench -echo-server SOCKET KEYDIR ALGS")
	}
	socket, keyDir := args[0], args[1]
	algs, err := parseAlgs(args[2])
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	pe, err := newProofEcho(ctx, keyDir, algs)
	if err != nil {
		return err
	}
	defer pe.be.Close()
	return serveGRPC(ctx, socket, func(g *grpc.Server) {
		h := health.NewServer()
		h.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
		healthpb.RegisterHealthServer(g, h)
		g.RegisterService(&proofEchoDesc, pe)
	})
}

// serveGRPC serves, until ctx ends, a gRPC server with keyd's transport
// options (daemon.ServerOptions) and the services register adds, on a Unix
// socket made like keyd's.
func serveGRPC(ctx context.Context, socket string, register func(*grpc.Server)) error {
	lis, err := listener.Unix(socket, 0o600, -1)
	if err != nil {
		return err
	}
	g := grpc.NewServer(daemon.ServerOptions(authz.PeerCredentials())...)
	register(g)
	errc := make(chan error, 1)
	go func() { errc <- g.Serve(lis) }()
	select {
	case <-ctx.Done():
		g.Stop()
		<-errc
		return nil
	case err := <-errc:
		return err
	}
}

// proofEchoMethod is the full name of the diagnostic method.
const proofEchoMethod = "/keydbench.ProofEcho/Proof"

var proofEchoDesc = grpc.ServiceDesc{
	ServiceName: "keydbench.ProofEcho",
	HandlerType: (*any)(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Proof", Handler: proofEchoHandler}},
}

type proofEcho struct {
	be      *soft.Backend
	signers map[keystore.Algorithm]*inproc
}

// newProofEcho generates one soft key per algorithm in dir.
func newProofEcho(ctx context.Context, dir string, algs []keystore.Algorithm) (*proofEcho, error) {
	be, err := soft.New(soft.Config{Dir: dir})
	if err != nil {
		return nil, err
	}
	pe := &proofEcho{be: be, signers: map[keystore.Algorithm]*inproc{}}
	for _, alg := range algs {
		id := "echo-" + strings.ToLower(string(alg))
		pub, err := be.Generate(ctx, id, keystore.KeySpec{Algorithm: alg})
		if err != nil {
			be.Close()
			return nil, err
		}
		in, err := newInprocKey(be, policy.Policy{Purpose: policy.DPoP}, alg, id, pub)
		if err != nil {
			be.Close()
			return nil, err
		}
		pe.signers[alg] = in
	}
	return pe, nil
}

func proofEchoHandler(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	req := new(wrapperspb.StringValue)
	if err := dec(req); err != nil {
		return nil, err
	}
	in := srv.(*proofEcho).signers[keystore.Algorithm(req.Value)]
	if in == nil {
		return nil, status.Errorf(codes.InvalidArgument, "no key for %q", req.Value)
	}
	jwt, err := in.proof(ctx, proofMethod, proofURL)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return wrapperspb.String(jwt), nil
}

// procStatus reads VmRSS and VmHWM (KiB) from /proc/<pid>/status.
func procStatus(pid int) (rss, hwm int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		for _, k := range []struct {
			name string
			dst  *int64
		}{{"VmRSS:", &rss}, {"VmHWM:", &hwm}} {
			if rest, ok := strings.CutPrefix(line, k.name); ok {
				f := strings.Fields(rest)
				if len(f) >= 1 {
					*k.dst, _ = strconv.ParseInt(f[0], 10, 64)
				}
			}
		}
	}
	if rss == 0 {
		return 0, 0, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
	}
	return rss, hwm, sc.Err()
}

// parseConfig checks the configuration the way keyd will.
func parseConfig(b []byte, name string) (*config.Config, error) {
	return config.Parse(b, name)
}
