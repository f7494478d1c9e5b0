// Package e2e runs keyd's OAuth client against a real authorization server:
// oidc-provider (Node, pinned in package-lock.json) with DPoP, required
// nonces and private_key_jwt, and the real `keyd serve` binary signing.
// See README.md.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/client"
)

// requireE2E reports whether missing Node must fail the run
// (KEYD_REQUIRE_E2E=1, set by make test) rather than skip it.
func requireE2E() bool { return os.Getenv("KEYD_REQUIRE_E2E") == "1" }

var (
	buildOnce sync.Once
	buildDir  string
	buildBin  string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// keydBinary returns $KEYD_BIN, or builds cmd/keyd once per test run.
func keydBinary(t *testing.T) string {
	t.Helper()
	if b := os.Getenv("KEYD_BIN"); b != "" {
		return b
	}
	buildOnce.Do(func() {
		goTool, err := exec.LookPath("go")
		if err != nil {
			buildErr = fmt.Errorf("go not on PATH (set KEYD_BIN to a built keyd): %w", err)
			return
		}
		if buildDir, buildErr = os.MkdirTemp("", "keyd-e2e-bin"); buildErr != nil {
			return
		}
		buildBin = filepath.Join(buildDir, "keyd")
		args := []string{"build", "-o", buildBin}
		if raceEnabled {
			args = append(args, "-race")
		}
		cmd := exec.Command(goTool, append(args, "./cmd/keyd")...)
		cmd.Dir = ".."
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/keyd: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildBin
}

// needNode finds node and makes sure e2e/node_modules is installed from
// the lockfile (make deps does that; this is for a bare go test).
func needNode(t *testing.T) string {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		if requireE2E() {
			t.Fatalf("node not found and KEYD_REQUIRE_E2E=1: install Node.js >= 20.19 (and npm), then make deps: %v", err)
		}
		t.Skip("node not installed: the end-to-end tests need Node.js >= 20.19 (KEYD_REQUIRE_E2E=1 makes this a failure)")
	}
	if _, err := os.Stat("node_modules/oidc-provider/package.json"); err != nil {
		npm, err := exec.LookPath("npm")
		if err != nil {
			t.Fatalf("e2e/node_modules is missing and npm is not on PATH (run make deps): %v", err)
		}
		cmd := exec.Command(npm, "ci", "--no-audit", "--no-fund")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("npm ci in e2e: %v\n%s", err, out)
		}
	}
	return node
}

// nodeServer is server.js running.
type nodeServer struct {
	url   string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines *bufio.Scanner
	done  chan struct{}

	mu  sync.Mutex
	log []string // stderr lines
}

func startNode(t *testing.T, node string) *nodeServer {
	t.Helper()
	cmd := exec.Command(node, "server.js")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &nodeServer{cmd: cmd, stdin: stdin, lines: bufio.NewScanner(stdout), done: make(chan struct{})}
	logDone := make(chan struct{})
	go func() {
		defer close(logDone)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			s.mu.Lock()
			s.log = append(s.log, sc.Text())
			s.mu.Unlock()
		}
	}()
	go func() { <-logDone; cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		// Closing stdin stops the server; SIGKILL if it does not go.
		stdin.Close()
		select {
		case <-s.done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-s.done
		}
		if t.Failed() {
			t.Logf("authorization server log:\n%s", strings.Join(s.logLines(0), "\n"))
		}
	})
	var hello struct{ URL string }
	s.readLine(t, &hello)
	if !strings.HasPrefix(hello.URL, "http://127.0.0.1:") {
		t.Fatalf("server.js said %+v", hello)
	}
	s.url = hello.URL
	return s
}

// readLine reads the server's next stdout line as JSON into v (10s at most).
func (s *nodeServer) readLine(t *testing.T, v any) {
	t.Helper()
	got := make(chan bool, 1)
	go func() { got <- s.lines.Scan() }()
	select {
	case ok := <-got:
		if !ok {
			t.Fatalf("server.js exited: %v\n%s", s.lines.Err(), strings.Join(s.logLines(0), "\n"))
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("server.js said nothing for 10s\n%s", strings.Join(s.logLines(0), "\n"))
	}
	if err := json.Unmarshal(s.lines.Bytes(), v); err != nil {
		t.Fatalf("server.js: %q: %v", s.lines.Text(), err)
	}
}

// configure registers the clients and waits until the provider serves.
func (s *nodeServer) configure(t *testing.T, setup any) {
	t.Helper()
	b, err := json.Marshal(setup)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.stdin.Write(append(b, '\n')); err != nil {
		t.Fatal(err)
	}
	var ready struct{ Ready bool }
	s.readLine(t, &ready)
	if !ready.Ready {
		t.Fatal("server.js is not ready")
	}
}

func (s *nodeServer) logLines(from int) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.log[min(from, len(s.log)):]...)
}

func (s *nodeServer) mark() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.log)
}

// serverError is one rejection the server logged.
type serverError struct {
	Event       string `json:"event"`
	Error       string `json:"error"`
	Description string `json:"error_description"`
	Detail      string `json:"error_detail"`
}

// expectRejection waits (up to 3s) for a rejection logged after mark with
// the given event and error whose description or detail contains reason.
func (s *nodeServer) expectRejection(t *testing.T, mark int, event, errCode, reason string) serverError {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		var seen []string
		for _, line := range s.logLines(mark) {
			var e serverError
			if json.Unmarshal([]byte(line), &e) != nil {
				continue
			}
			seen = append(seen, line)
			if e.Event == event && e.Error == errCode && (strings.Contains(e.Description, reason) || strings.Contains(e.Detail, reason)) {
				return e
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server logged no %s %s %q; it logged:\n%s", event, errCode, reason, strings.Join(seen, "\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// keydProc is `keyd serve` running.
type keydProc struct {
	socket, config string
	stderr         *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func startKeyd(t *testing.T, bin, dir, configYAML string) *keydProc {
	t.Helper()
	k := &keydProc{socket: filepath.Join(dir, "keyd.sock"), config: filepath.Join(dir, "keyd.yaml"), stderr: &syncBuffer{}}
	if err := os.WriteFile(k.config, []byte(configYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", "--config", k.config)
	cmd.Env = keydEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	cmd.Stdout, cmd.Stderr = k.stderr, k.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("keyd serve exited: %v\n%s", err, k.stderr.String())
			}
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Errorf("keyd serve did not stop on SIGTERM\n%s", k.stderr.String())
		}
		if t.Failed() {
			t.Logf("keyd log:\n%s", k.stderr.String())
		}
	})
	// Wait until it answers.
	deadline := time.Now().Add(20 * time.Second)
	lastErr := fmt.Errorf("no socket at %s", k.socket)
	for {
		if _, err := os.Stat(k.socket); err == nil {
			if lastErr = ping(k.socket); lastErr == nil {
				return k
			}
		}
		select {
		case err := <-done:
			t.Fatalf("keyd serve exited: %v\n%s", err, k.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("keyd serve did not answer within 20s: %v\n%s", lastErr, k.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ping asks the daemon at socket for its key list.
func ping(socket string) error {
	kc, err := client.Dial(socket)
	if err != nil {
		return err
	}
	defer kc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err = kc.ListKeys(ctx)
	return err
}

// keydEnv is the environment of keyd processes: no KEYD_ variables of the
// caller, and, for a -race build, no second-long sleep at exit and a
// failing exit status for any race found.
func keydEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "KEYD_") && !strings.HasPrefix(kv, "GORACE=") {
			env = append(env, kv)
		}
	}
	return append(env, "GORACE=atexit_sleep_ms=10 exitcode=66")
}

// runKeyd runs the keyd binary (a client command) and returns its output
// and exit status.
func runKeyd(t *testing.T, bin string, args ...string) (stdout, stderr string, status int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = keydEnv()
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("keyd %q timed out", args)
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return o.String(), e.String(), ee.ExitCode()
	} else if err != nil {
		t.Fatalf("keyd %q: %v", args, err)
	}
	return o.String(), e.String(), 0
}

// exchange is one request and its response, as a recorder saw them.
type exchange struct {
	method, url  string
	sent, done   time.Time
	authz        string         // the Authorization header
	dpop         map[string]any // the proof's claims (unverified)
	dpopJKT      string         // the thumbprint of the proof's jwk
	assertion    map[string]any // the client assertion's claims
	assertionKid string         // the client assertion's kid header
	status       int
	nonce        string // DPoP-Nonce of the response
	challenge    string // WWW-Authenticate of the response
}

// recorder is an http.RoundTripper that records what goes through it.
type recorder struct {
	base http.RoundTripper
	mu   sync.Mutex
	seen []exchange
}

func (r *recorder) RoundTrip(req *http.Request) (*http.Response, error) {
	proof := req.Header.Get("DPoP")
	x := exchange{method: req.Method, url: req.URL.String(), sent: time.Now(), authz: req.Header.Get("Authorization"),
		dpop: jwtClaims(proof), dpopJKT: proofJKT(proof)}
	if req.GetBody != nil && req.Header.Get("Content-Type") == "application/x-www-form-urlencoded" {
		if b, err := req.GetBody(); err == nil {
			raw, _ := io.ReadAll(b)
			form, _ := parseQuery(string(raw))
			x.assertion = jwtClaims(form.Get("client_assertion"))
			x.assertionKid, _ = jwtHeader(form.Get("client_assertion"))["kid"].(string)
		}
	}
	resp, err := r.base.RoundTrip(req)
	x.done = time.Now()
	if err == nil {
		x.status, x.nonce, x.challenge = resp.StatusCode, resp.Header.Get("DPoP-Nonce"), resp.Header.Get("WWW-Authenticate")
	}
	r.mu.Lock()
	r.seen = append(r.seen, x)
	r.mu.Unlock()
	return resp, err
}

func (r *recorder) since(n int) []exchange {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]exchange(nil), r.seen[min(n, len(r.seen)):]...)
}

func (r *recorder) mark() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.seen)
}
