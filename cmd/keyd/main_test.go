package main

import (
	"bytes"
	"context"
	"crypto"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/rogpeppe/go-internal/testscript"
)

// TestMain lets the test binary play keyd: testscript copies it onto $PATH
// as "keyd" and dispatches on the program name.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"keyd": func() {
			dieWithParent()
			os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
		},
	})
}

// dieWithParent has the kernel send SIGTERM (which stops a daemon cleanly)
// when the process that started this one exits, so that no daemon outlives
// a test binary that was killed before its scripts could stop them.
func dieWithParent() {
	parent := os.Getppid()
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, syscall.PR_SET_PDEATHSIG, uintptr(syscall.SIGTERM), 0); errno != 0 {
		return
	}
	if p := os.Getppid(); p != parent || p == 1 { // the parent died before the prctl
		os.Exit(1)
	}
}

// TestScripts runs the CLI scripts in testdata/script. Each script starts
// its own daemon in the background and stops it with SIGINT before it ends;
// testscript interrupts any daemon a failing script leaves behind.
//
// Every script gets:
//
//	$SOCKDIR   a short directory for sockets (Unix socket paths are limited to
//	           107 bytes and $WORK can be longer), removed at the end
//	$HOME, $XDG_RUNTIME_DIR, $XDG_STATE_HOME   directories inside $WORK
//	           ($KEYD_SOCKET is unset)
//	$NOGROUP   the name of group 65534 (nogroup on Debian, nobody elsewhere)
//
// and these commands besides testscript's own (see their functions):
//
//	expandenv SRC DST                      copy SRC to DST expanding $VARS
//	verifyjwt JWT-FILE JWKS-FILE CHECK...  verify a JWT against a JWK Set
//	jsonget FILE PATH [VAR]                print (and set VAR to) a JSON value
//	jwtpart JWT-FILE header|claims [PATH [VAR]]  the same, in a JWT's header or claims
//	asuser UID GID keyd ARGS...            run keyd as another user
//
// and the conditions [root] (running as root) and [nogroup] (group 65534
// exists).
func TestScripts(t *testing.T) {
	shared := &sharedBinary{}
	t.Cleanup(shared.remove)
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		RequireExplicitExec: true,
		RequireUniqueNames:  true,
		Setup:               setupScript,
		Condition: func(cond string) (bool, error) {
			switch cond {
			case "root":
				return os.Geteuid() == 0, nil
			case "nogroup":
				_, err := user.LookupGroupId("65534")
				return err == nil, nil
			}
			return false, fmt.Errorf("unknown condition %q", cond)
		},
		Cmds: map[string]func(*testscript.TestScript, bool, []string){
			"expandenv": cmdExpandEnv,
			"verifyjwt": cmdVerifyJWT,
			"jsonget":   cmdJSONGet,
			"jwtpart":   cmdJWTPart,
			"asuser":    shared.cmdAsUser,
		},
	})
}

func setupScript(env *testscript.Env) error {
	sockdir, err := os.MkdirTemp("", "kd")
	if err != nil {
		return err
	}
	env.Defer(func() { os.RemoveAll(sockdir) })
	env.Setenv("SOCKDIR", sockdir)

	// Nothing of the caller's environment may point a script at a real daemon.
	vars := env.Vars[:0]
	for _, kv := range env.Vars {
		if !strings.HasPrefix(kv, "KEYD_") {
			vars = append(vars, kv)
		}
	}
	env.Vars = vars

	// Under -race, every keyd process would otherwise sleep a second on
	// exit, waiting for late race reports; scripts run dozens of them.
	env.Setenv("GORACE", strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=10"))

	if g, err := user.LookupGroupId("65534"); err == nil {
		env.Setenv("NOGROUP", g.Name)
	}
	// Scripts that run on every backend write `backend: $BACKEND`.
	env.Setenv("BACKEND", "{soft: {}}")
	env.Setenv("BACKEND_NAME", "soft")

	for name, dir := range map[string]string{
		"HOME":            "home",
		"XDG_RUNTIME_DIR": "xdg-run",
		"XDG_STATE_HOME":  "xdg-state",
	} {
		dir = filepath.Join(env.WorkDir, dir)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		env.Setenv(name, dir)
	}
	return nil
}

// cmdExpandEnv implements "expandenv SRC DST": it writes SRC to DST with
// $NAME and ${NAME} replaced by the script's environment, so that configs in
// the archive can name $WORK and $SOCKDIR.
func cmdExpandEnv(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: expandenv SRC DST")
	}
	out := os.Expand(ts.ReadFile(args[0]), ts.Getenv)
	ts.Check(os.WriteFile(ts.MkAbs(args[1]), []byte(out), 0o644))
}

// jwtAlgs are the algorithms keyd signs with.
var jwtAlgs = []jose.SignatureAlgorithm{jose.ES256, jose.ES384, jose.RS256, jose.PS256, jose.EdDSA}

// cmdVerifyJWT implements
//
//	verifyjwt JWT-FILE JWKS-FILE [CHECK...]
//
// It parses the compact JWT in JWT-FILE with go-jose (alg one of ES256,
// ES384, RS256, PS256, EdDSA) and finds its key in the JWK Set in JWKS-FILE:
// by the header kid, or, when the header embeds a jwk (DPoP), by the jwk's
// RFC 7638 SHA-256 thumbprint, which must be a kid of the set. It verifies
// the signature with go-jose, checks that an ECDSA signature is raw r||s of
// the curve's size (64 bytes for ES256) and that the key's kid is its
// thumbprint, then runs each CHECK:
//
//	h.PATH=VALUE   the header member at PATH (dotted, as in jsonget) equals
//	c.PATH=VALUE   VALUE; the claim likewise. A string compares as is, any
//	               other value as its JSON encoding (c.iat=1700000000,
//	               c.aud=["a","b"]); so c.aud=X also says aud is one string.
//	?h.PATH        the member is present (?c.jti)
//	!h.PATH        the member is absent (!h.jwk.d, !h.kid)
//	c.PATH~now     a number within 60 seconds of now (c.iat~now)
//	lifetime<=N    0 < exp - iat <= N seconds
//	jkt=VALUE      the kid (thumbprint) of the key that verified equals VALUE
//
// With "!", verifyjwt must fail, and prints why on stderr.
func cmdVerifyJWT(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) < 2 {
		ts.Fatalf("usage: verifyjwt JWT-FILE JWKS-FILE [CHECK...]")
	}
	err := verifyJWT(strings.TrimSpace(ts.ReadFile(args[0])), []byte(ts.ReadFile(args[1])), args[2:], time.Now())
	switch {
	case err != nil && !neg:
		ts.Fatalf("verifyjwt %s: %v", args[0], err)
	case err == nil && neg:
		ts.Fatalf("verifyjwt %s: verified and passed every check, want a failure", args[0])
	case err != nil:
		fmt.Fprintf(ts.Stderr(), "%v\n", err)
	}
}

func verifyJWT(compact string, jwksJSON []byte, checks []string, now time.Time) error {
	parts := strings.Split(compact, ".")
	if len(parts) != 3 {
		return fmt.Errorf("not a compact JWS: %d parts", len(parts))
	}
	header, err := decodeSegment(parts[0])
	if err != nil {
		return fmt.Errorf("header: %w", err)
	}
	claims, err := decodeSegment(parts[1])
	if err != nil {
		return fmt.Errorf("claims: %w", err)
	}
	jwt, err := jose.ParseSignedCompact(compact, jwtAlgs)
	if err != nil {
		return fmt.Errorf("go-jose: %w", err)
	}
	if len(jwt.Signatures) != 1 {
		return fmt.Errorf("%d signatures, want 1", len(jwt.Signatures))
	}
	h := jwt.Signatures[0].Protected
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(jwksJSON, &set); err != nil {
		return fmt.Errorf("JWK Set: %w", err)
	}

	// Find the key that must have signed.
	var key jose.JSONWebKey
	switch {
	case h.JSONWebKey != nil && h.KeyID != "":
		return errors.New("header has both jwk and kid")
	case h.JSONWebKey != nil:
		if !h.JSONWebKey.IsPublic() {
			return errors.New("header jwk is not a public key")
		}
		kid, err := thumbprint(*h.JSONWebKey)
		if err != nil {
			return fmt.Errorf("header jwk: %w", err)
		}
		keys := set.Key(kid)
		if len(keys) != 1 {
			return fmt.Errorf("header jwk (thumbprint %s) is not in the JWK Set (%d matches)", kid, len(keys))
		}
		key = *h.JSONWebKey
		key.KeyID, key.Algorithm = kid, keys[0].Algorithm
	case h.KeyID != "":
		keys := set.Key(h.KeyID)
		if len(keys) != 1 {
			return fmt.Errorf("header kid %s is not in the JWK Set (%d matches)", h.KeyID, len(keys))
		}
		key = keys[0]
	default:
		return errors.New("header has neither kid nor jwk")
	}
	if !key.IsPublic() {
		return fmt.Errorf("key %s in the JWK Set is not a public key", key.KeyID)
	}
	if tp, err := thumbprint(key); err != nil || tp != key.KeyID {
		return fmt.Errorf("kid %s is not the key's RFC 7638 thumbprint (%s, %v)", key.KeyID, tp, err)
	}
	if key.Algorithm != "" && key.Algorithm != h.Algorithm {
		return fmt.Errorf("header alg %s, but key %s is for %s", h.Algorithm, key.KeyID, key.Algorithm)
	}

	payload, err := jwt.Verify(key.Key)
	if err != nil {
		return fmt.Errorf("signature does not verify with key %s: %w", key.KeyID, err)
	}
	if raw, _ := base64.RawURLEncoding.DecodeString(parts[1]); !bytes.Equal(payload, raw) {
		return errors.New("verified payload differs from the claims segment")
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return fmt.Errorf("signature segment: %w", err)
	}
	if want := map[string]int{"ES256": 64, "ES384": 96}[h.Algorithm]; want != 0 && len(sig) != want {
		return fmt.Errorf("%s signature is %d bytes, want %d (raw r||s)", h.Algorithm, len(sig), want)
	}

	for _, c := range checks {
		if err := checkJWT(c, header, claims, key.KeyID, now); err != nil {
			return fmt.Errorf("check %s: %w", c, err)
		}
	}
	return nil
}

func thumbprint(k jose.JSONWebKey) (string, error) {
	tp, err := k.Thumbprint(crypto.SHA256)
	if err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(tp), nil
}

func decodeSegment(s string) (map[string]any, error) {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := decodeJSON(b, &m); err != nil {
		return nil, err
	}
	return m, nil
}

// decodeJSON decodes exactly one JSON value, keeping numbers exact.
func decodeJSON(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data after the JSON value")
	}
	return nil
}

func checkJWT(check string, header, claims map[string]any, kid string, now time.Time) error {
	member := func(ref string) (any, bool, error) {
		part, path, _ := strings.Cut(ref, ".")
		switch part {
		case "h":
			return lookup(header, path)
		case "c":
			return lookup(claims, path)
		}
		return nil, false, fmt.Errorf("%q: want h.PATH or c.PATH", ref)
	}
	number := func(ref string) (int64, error) {
		v, ok, err := member(ref)
		if err != nil || !ok {
			return 0, fmt.Errorf("%s: missing (%v)", ref, err)
		}
		n, ok := v.(json.Number)
		if !ok {
			return 0, fmt.Errorf("%s: %s is not a number", ref, show(v))
		}
		return n.Int64()
	}
	switch {
	case strings.HasPrefix(check, "?") || strings.HasPrefix(check, "!"):
		v, ok, err := member(check[1:])
		if err != nil {
			return err
		}
		if want := check[0] == '?'; ok != want {
			if ok {
				return fmt.Errorf("present: %s", show(v))
			}
			return errors.New("absent")
		}
	case strings.HasSuffix(check, "~now"):
		n, err := number(strings.TrimSuffix(check, "~now"))
		if err != nil {
			return err
		}
		if d := now.Unix() - n; math.Abs(float64(d)) > 60 {
			return fmt.Errorf("%d is %ds away from now (%d)", n, d, now.Unix())
		}
	case strings.HasPrefix(check, "lifetime<="):
		limit, err := strconv.ParseInt(strings.TrimPrefix(check, "lifetime<="), 10, 64)
		if err != nil {
			return err
		}
		exp, err := number("c.exp")
		if err != nil {
			return err
		}
		iat, err := number("c.iat")
		if err != nil {
			return err
		}
		if d := exp - iat; d <= 0 || d > limit {
			return fmt.Errorf("exp - iat = %d", d)
		}
	case strings.HasPrefix(check, "jkt="):
		if want := strings.TrimPrefix(check, "jkt="); kid != want {
			return fmt.Errorf("signed by %s", kid)
		}
	default:
		ref, want, ok := strings.Cut(check, "=")
		if !ok {
			return errors.New("unknown check: see cmdVerifyJWT")
		}
		v, ok, err := member(ref)
		if err != nil {
			return err
		}
		if !ok {
			return errors.New("absent")
		}
		if got := show(v); got != want {
			return fmt.Errorf("got %s", got)
		}
	}
	return nil
}

// lookup finds path in v. path is a dot-separated list of steps, each one of
//
//	NAME     an object member
//	N        an array element (0-based)
//	#        the length of an array or object (the last step only)
//	[K=V]    the first array element that is an object whose member K shows as V
//
// An empty path is v itself.
func lookup(v any, path string) (any, bool, error) {
	if path == "" {
		return v, true, nil
	}
	for step := range strings.SplitSeq(path, ".") {
		switch x := v.(type) {
		case map[string]any:
			if step == "#" {
				v = json.Number(strconv.Itoa(len(x)))
				continue
			}
			var ok bool
			if v, ok = x[step]; !ok {
				return nil, false, nil
			}
		case []any:
			switch {
			case step == "#":
				v = json.Number(strconv.Itoa(len(x)))
			case strings.HasPrefix(step, "[") && strings.HasSuffix(step, "]"):
				k, want, ok := strings.Cut(step[1:len(step)-1], "=")
				if !ok {
					return nil, false, fmt.Errorf("step %q: want [KEY=VALUE]", step)
				}
				v = nil
				for _, e := range x {
					if m, ok := e.(map[string]any); ok && m[k] != nil && show(m[k]) == want {
						v = e
						break
					}
				}
				if v == nil {
					return nil, false, nil
				}
			default:
				i, err := strconv.Atoi(step)
				if err != nil {
					return nil, false, fmt.Errorf("step %q into an array: want an index, # or [KEY=VALUE]", step)
				}
				if i < 0 || i >= len(x) {
					return nil, false, nil
				}
				v = x[i]
			}
		default:
			return nil, false, nil
		}
	}
	return v, true, nil
}

// show is a JSON value as the checks compare it: a string as is, anything
// else as compact JSON.
func show(v any) string {
	if s, ok := v.(string); ok {
		return s
	}
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return string(b)
}

// cmdJSONGet implements "jsonget FILE PATH [VAR]": it prints the value at
// PATH (see lookup) of the JSON document in FILE, a string as is and
// anything else as JSON, and sets the environment variable VAR to it when
// given. With "!", the path must not exist.
func cmdJSONGet(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) < 2 || len(args) > 3 {
		ts.Fatalf("usage: jsonget FILE PATH [VAR]")
	}
	var doc any
	if err := decodeJSON([]byte(ts.ReadFile(args[0])), &doc); err != nil {
		ts.Fatalf("%s: %v", args[0], err)
	}
	getJSON(ts, neg, doc, args[1], args[2:])
}

// cmdJWTPart implements "jwtpart JWT-FILE header|claims [PATH [VAR]]": like
// jsonget, on the decoded header or claims of a compact JWT (which it does
// not verify). Without PATH it prints the whole part.
func cmdJWTPart(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) < 2 || len(args) > 4 {
		ts.Fatalf("usage: jwtpart JWT-FILE header|claims [PATH [VAR]]")
	}
	parts := strings.Split(strings.TrimSpace(ts.ReadFile(args[0])), ".")
	if len(parts) != 3 {
		ts.Fatalf("%s: not a compact JWS (%d parts)", args[0], len(parts))
	}
	i, ok := map[string]int{"header": 0, "claims": 1}[args[1]]
	if !ok {
		ts.Fatalf("jwtpart: want header or claims, not %q", args[1])
	}
	m, err := decodeSegment(parts[i])
	if err != nil {
		ts.Fatalf("%s %s: %v", args[0], args[1], err)
	}
	path := ""
	if len(args) > 2 {
		path = args[2]
	}
	var rest []string
	if len(args) > 3 {
		rest = args[3:]
	}
	getJSON(ts, neg, m, path, rest)
}

func getJSON(ts *testscript.TestScript, neg bool, doc any, path string, setVar []string) {
	v, ok, err := lookup(doc, path)
	ts.Check(err)
	switch {
	case ok && neg:
		ts.Fatalf("%s: present (%s), want absent", path, show(v))
	case !ok && !neg:
		ts.Fatalf("%s: absent", path)
	case !ok:
		return
	}
	fmt.Fprintln(ts.Stdout(), show(v))
	if len(setVar) == 1 {
		ts.Setenv(setVar[0], show(v))
	}
}

// sharedBinary is a copy of the test binary that any user may execute:
// testscript's copy on $PATH and go test's binary live in directories
// only root can enter.
type sharedBinary struct {
	once sync.Once
	dir  string
	path string
	err  error
}

func (s *sharedBinary) get() (string, error) {
	s.once.Do(func() {
		self, err := os.Executable()
		if err != nil {
			s.err = err
			return
		}
		if s.dir, s.err = os.MkdirTemp("", "kdbin"); s.err != nil {
			return
		}
		if s.err = os.Chmod(s.dir, 0o755); s.err != nil {
			return
		}
		s.path = filepath.Join(s.dir, "keyd")
		s.err = copyFile(self, s.path, 0o755)
	})
	return s.path, s.err
}

func (s *sharedBinary) remove() {
	if s.dir != "" {
		os.RemoveAll(s.dir)
	}
}

func copyFile(from, to string, mode os.FileMode) error {
	r, err := os.Open(from)
	if err != nil {
		return err
	}
	defer r.Close()
	w, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(w, r); err != nil {
		w.Close()
		return err
	}
	return w.Close()
}

// cmdAsUser implements "asuser UID GID keyd ARGS...": it runs keyd as the
// user UID with group GID and no supplementary groups (so it needs root),
// in the directory /, with only PATH, TMPDIR, KEYD_SOCKET and GORACE of the
// script's environment. Its stdout and stderr become the script's. With
// "!", keyd must exit with a non-zero status; failing to start it at all
// fails the script either way.
func (s *sharedBinary) cmdAsUser(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) < 3 || args[2] != "keyd" {
		ts.Fatalf("usage: asuser UID GID[,SUPPLEMENTARY...] keyd ARGS...")
	}
	uid, err := strconv.ParseUint(args[0], 10, 32)
	ts.Check(err)
	gids := strings.Split(args[1], ",")
	gid, err := strconv.ParseUint(gids[0], 10, 32)
	ts.Check(err)
	groups := []uint32{}
	for _, g := range gids[1:] {
		n, err := strconv.ParseUint(g, 10, 32)
		ts.Check(err)
		groups = append(groups, uint32(n))
	}
	bin, err := s.get()
	ts.Check(err)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var stdout, stderr strings.Builder
	// The copy was just written, and a process forked meanwhile by another
	// script holds the written descriptor until it execs (golang/go#22315):
	// exec then fails with ETXTBSY for a moment. Try again, a few times.
	for try := 0; ; try++ {
		cmd := exec.CommandContext(ctx, bin, args[3:]...)
		cmd.Args[0] = "keyd" // testscript.Main dispatches on the program name
		cmd.Dir = "/"
		cmd.Env = []string{"PATH=" + ts.Getenv("PATH"), "TMPDIR=/tmp"}
		for _, name := range []string{"KEYD_SOCKET", "GORACE"} {
			if v := ts.Getenv(name); v != "" {
				cmd.Env = append(cmd.Env, name+"="+v)
			}
		}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: groups}}
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err = cmd.Start(); errors.Is(err, syscall.ETXTBSY) && try < 50 {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if err == nil {
			err = cmd.Wait()
		}
		break
	}
	io.WriteString(ts.Stdout(), stdout.String())
	io.WriteString(ts.Stderr(), stderr.String())
	var exit *exec.ExitError
	switch {
	case ctx.Err() != nil:
		ts.Fatalf("asuser: timed out")
	case err != nil && !errors.As(err, &exit):
		ts.Fatalf("asuser: %v", err)
	case err != nil && !neg:
		ts.Fatalf("unexpected command failure: %v", err)
	case err == nil && neg:
		ts.Fatalf("unexpected command success")
	}
}

// binaryAndDir returns a copy of the test binary that any user may run
// (see sharedBinary) and a new temporary directory with a short path (for
// sockets); both are removed when t ends.
func binaryAndDir(t *testing.T, prefix string) (bin, dir string) {
	t.Helper()
	shared := &sharedBinary{}
	t.Cleanup(shared.remove)
	bin, err := shared.get()
	if err != nil {
		t.Fatal(err)
	}
	if dir, err = os.MkdirTemp("", prefix); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return bin, dir
}

// softConfig writes, in dir, the configuration of a daemon on the soft
// keystore with one dpop key set "d" for this test's uid, and returns its
// path and socket.
func softConfig(t *testing.T, dir string) (conf, sock string) {
	t.Helper()
	conf, sock = filepath.Join(dir, "keyd.yaml"), filepath.Join(dir, "k.sock")
	if err := os.WriteFile(conf, fmt.Appendf(nil, `socket: %[1]s
state_dir: %[2]s/state
backend: {soft: {}}
keysets: [{name: d, purpose: dpop, alg: ES256, allow: {uids: [%[3]d]}}]
`, sock, dir, os.Geteuid()), 0o600); err != nil {
		t.Fatal(err)
	}
	return conf, sock
}
