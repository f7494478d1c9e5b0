package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/authz"
	"github.com/keyd-dev/keyd/internal/config"
	"github.com/keyd-dev/keyd/internal/daemon"
	"github.com/keyd-dev/keyd/keystore"
)

type cli struct {
	stdout, stderr io.Writer
}

// errUsage marks errors that the usage text should follow.
var errUsage = errors.New("usage")

const usage = `keyd — hardware-backed signing keys for DPoP and private_key_jwt

Daemon:
  keyd serve [--config FILE]        run the daemon (the embedded default: soft keystore, key set "dpop")
  keyd check-config --config FILE   validate a configuration and report every problem

Client (find the daemon with --socket PATH or $KEYD_SOCKET):
  keyd health [--wait DURATION]                     is the daemon serving?
  keyd jwks [--keyset NAME]...                      print the public JWK Set
  keyd keys list [--json] [--keyset NAME]...        list key versions and their states
  keyd keys rotate NAME [--now]                     replace the active key (admin); key sets whose
                                                    verifiers cache JWKS pre-publish it unless --now
  keyd keys revoke KID [--keyset NAME]              unpublish and disable a key at once (admin)
  keyd proof --keyset NAME --htm METHOD --htu URL [--access-token T] [--nonce V] [--kid KID]
                                                    print a DPoP proof (RFC 9449)
  keyd assertion --keyset NAME                      print a private_key_jwt client assertion (RFC 7523)

OAuth (private_key_jwt + DPoP, endpoints from the issuer's metadata):
  keyd token --issuer URL --client-id ID --dpop-keyset NAME --assertion-keyset NAME [--scope S]... [--resource R]...
                                                    get a DPoP-bound token (client credentials); print the response as JSON
  keyd request [-X METHOD] [-d DATA] [-H 'K: V']... <token flags> URL
                                                    get a token, call URL with it and a DPoP proof, print the body
`

func (c *cli) run(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(c.stderr, usage)
		return 2
	}
	var err error
	switch cmd, rest := args[0], args[1:]; cmd {
	case "serve":
		err = c.serve(rest)
	case "check-config":
		err = c.checkConfig(rest)
	case "health":
		err = c.health(rest)
	case "jwks":
		err = c.jwks(rest)
	case "keys":
		err = c.keys(rest)
	case "proof":
		err = c.proof(rest)
	case "assertion":
		err = c.assertion(rest)
	case "token":
		err = c.token(rest)
	case "request":
		err = c.request(rest)
	case "help", "-h", "--help":
		fmt.Fprint(c.stdout, usage)
		return 0
	default:
		err = fmt.Errorf("%w: unknown command %q", errUsage, cmd)
	}
	if err == nil {
		return 0
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintf(c.stderr, "keyd: %s\n", oneLine(err))
	switch {
	case errors.Is(err, errUsage):
		fmt.Fprint(c.stderr, "run 'keyd help' for usage\n")
		return 2
	case errors.Is(err, keystore.ErrLocked):
		return exitLocked
	case errors.Is(err, errConfig):
		return exitConfig
	}
	return 1
}

// Exit statuses of keyd serve that a supervisor must not restart into
// (systemd: RestartPreventExitStatus): every start against a locked
// backend costs a PIN attempt, and a bad configuration stays bad.
const (
	exitLocked = 77 // EX_NOPERM: the backend refused its PIN or authorization
	exitConfig = 78 // EX_CONFIG: the configuration is invalid
)

// errConfig marks a configuration that cannot be loaded; configError
// carries it without changing the message.
var errConfig = errors.New("invalid configuration")

type configError struct{ error }

func (e configError) Is(target error) bool { return target == errConfig }
func (e configError) Unwrap() error        { return e.error }

func oneLine(err error) string {
	var ke *client.Error
	if errors.As(err, &ke) {
		msg := strings.Join(strings.Fields(ke.Message), " ")
		if ke.Code == codes.Unavailable && strings.Contains(msg, "connect:") {
			msg = "cannot connect to keyd (" + msg + "): is 'keyd serve' running, and may this user open its socket?"
		}
		return msg
	}
	return strings.Join(strings.Fields(strings.TrimPrefix(err.Error(), errUsage.Error()+": ")), " ")
}

func (c *cli) flags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet("keyd "+name, flag.ContinueOnError)
	// Errors are reported in one line by run; the flag list only on -h.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {
		fmt.Fprintf(c.stderr, "Usage of %s:\n", fs.Name())
		fs.SetOutput(c.stderr)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	return fs
}

// parse parses flags anywhere on the command line (keyd keys revoke KID
// --keyset x) and returns exactly positional positional arguments. An
// argument that starts with '-' but names no flag of fs is positional, so a
// kid such as "-Abc…" (base64url) needs no "--"; "--" still ends the flags.
func parse(fs *flag.FlagSet, args []string, positional int) ([]string, error) {
	var flags, pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i+1:]...)
			break
		}
		if !strings.HasPrefix(a, "-") || a == "-" {
			pos = append(pos, a)
			continue
		}
		name, _, inline := strings.Cut(strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-"), "=")
		f := fs.Lookup(name)
		if f == nil && name != "h" && name != "help" {
			pos = append(pos, a)
			continue
		}
		flags = append(flags, a)
		if f != nil && !inline && !isBool(f) && i+1 < len(args) {
			flags = append(flags, args[i+1])
			i++
		}
	}
	// The flag package calls Usage on every error, not only on -h: an
	// error is one line (run prints it), the flag list is for -h alone.
	usage := fs.Usage
	fs.Usage = func() {}
	err := fs.Parse(flags)
	fs.Usage = usage
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage()
			return nil, err
		}
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	if len(pos) != positional {
		for _, a := range pos {
			if strings.HasPrefix(a, "-") && len(pos) > positional {
				return nil, fmt.Errorf("%w: flag provided but not defined: %s", errUsage, a)
			}
		}
		if positional == 0 {
			return nil, fmt.Errorf("%w: %s takes no arguments, got %q", errUsage, fs.Name(), strings.Join(pos, " "))
		}
		return nil, fmt.Errorf("%w: %s takes %d argument(s), got %d", errUsage, fs.Name(), positional, len(pos))
	}
	return pos, nil
}

func isBool(f *flag.Flag) bool {
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// --- daemon ---

func (c *cli) serve(args []string) error {
	fs := c.flags("serve")
	path := fs.String("config", "", "configuration file (default: the embedded default)")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return configError{err}
	}
	// A name this host does not know stays unknown: exit as for any other
	// invalid configuration, before the state directory is touched, so
	// that a supervisor does not restart into it.
	for _, err := range hostProblems(cfg) {
		var uu user.UnknownUserError
		var ug user.UnknownGroupError
		if errors.As(err, &uu) || errors.As(err, &ug) {
			return configError{err}
		}
	}
	level := new(slog.LevelVar)
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	log := slog.New(slog.NewTextHandler(c.stderr, &slog.HandlerOptions{Level: level}))
	gogc := tuneGC(os.Getenv)
	log.Debug("garbage collector", "GOGC", gogc)
	if err := keepOutOfCores(); err != nil {
		log.Warn("cannot turn core dumps off: a crash may write keyd's memory (PIN, keys) to a core file", "err", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	sd := &systemdNotifier{log: log}
	go func() {
		<-ctx.Done()
		sd.stopping()
	}()
	d, err := daemon.New(ctx, cfg, daemon.Options{
		Logger:    log,
		Failpoint: failpoint(),
		Status:    sd.status,
		Ready: func(socket string) {
			sd.ready()
			if *path == "" {
				fmt.Fprintf(c.stdout, "keyd is serving on %s (embedded default: soft keystore, key set \"dpop\", ES256)\n", socket)
				fmt.Fprintf(c.stdout, "get a DPoP proof from another shell:\n  keyd proof --socket %s --keyset dpop --htm GET --htu https://api.example.com/resource\n", socket)
			}
		},
	})
	if err != nil {
		return err
	}
	return d.Serve(ctx)
}

func loadConfig(path string) (*config.Config, error) {
	if path == "" {
		return config.Default()
	}
	return config.Load(path)
}

func (c *cli) checkConfig(args []string) error {
	fs := c.flags("check-config")
	path := fs.String("config", "", "configuration file")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *path == "" {
		return fmt.Errorf("%w: --config FILE is required", errUsage)
	}
	cfg, err := config.Load(*path)
	if err != nil {
		fmt.Fprintln(c.stderr, err)
		return errors.New("the configuration has problems (listed above)")
	}
	if problems := hostProblems(cfg); len(problems) > 0 {
		fmt.Fprintln(c.stderr, errors.Join(problems...))
		return errors.New("the configuration has problems (listed above)")
	}
	fmt.Fprintf(c.stdout, "%s: OK (%d key sets, socket %s)\n", *path, len(cfg.KeySets), cfg.Socket)
	return nil
}

// hostProblems checks what the configuration names on this host: the names
// in allow lists and socket_group must resolve.
func hostProblems(cfg *config.Config) []error {
	var problems []error
	if cfg.SocketGroup != "" {
		if _, err := user.LookupGroup(cfg.SocketGroup); err != nil {
			problems = append(problems, fmt.Errorf("socket_group: %w", err))
		}
	}
	for _, ks := range cfg.KeySets {
		if _, err := authz.NewList(authz.Spec(ks.Allow), nil); err != nil {
			problems = append(problems, fmt.Errorf("keysets (%s).allow: %w", ks.Name, err))
		}
	}
	if cfg.Admins != nil {
		if _, err := authz.NewList(authz.Spec(*cfg.Admins), nil); err != nil {
			problems = append(problems, fmt.Errorf("admins: %w", err))
		}
	}
	return problems
}

// --- client commands ---

type clientFlags struct {
	socket  *string
	timeout *time.Duration
}

func addClientFlags(fs *flag.FlagSet) clientFlags {
	return clientFlags{
		socket:  fs.String("socket", "", "daemon socket (default $KEYD_SOCKET, else "+config.DefaultSocket()+")"),
		timeout: fs.Duration("timeout", 10*time.Second, "give up after this long (0: no limit)"),
	}
}

func (f clientFlags) path() string {
	p := config.DefaultSocket()
	if *f.socket != "" {
		p = *f.socket
	} else if s := os.Getenv("KEYD_SOCKET"); s != "" {
		p = s
	}
	// client.Dial takes only an absolute path for a socket: a relative
	// one would be a gRPC target, a host name.
	if abs, err := filepath.Abs(p); err == nil {
		return abs
	}
	return p
}

// dial connects and returns a context bounded by --timeout.
func (f clientFlags) dial() (*client.Client, context.Context, context.CancelFunc, error) {
	path := f.path()
	if _, err := os.Stat(path); err != nil {
		return nil, nil, nil, fmt.Errorf("no keyd socket at %s: is 'keyd serve' running? (choose the socket with --socket or KEYD_SOCKET)", path)
	}
	cl, err := client.Dial(path)
	if err != nil {
		return nil, nil, nil, err
	}
	var (
		ctx    context.Context
		cancel context.CancelFunc
	)
	if *f.timeout > 0 {
		ctx, cancel = context.WithTimeout(context.Background(), *f.timeout)
	} else {
		ctx, cancel = context.WithCancel(context.Background())
	}
	return cl, ctx, func() { cancel(); cl.Close() }, nil
}

func (c *cli) health(args []string) error {
	fs := c.flags("health")
	cf := addClientFlags(fs)
	wait := fs.Duration("wait", 0, "keep asking until the daemon serves, for at most this long")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	deadline := time.Now().Add(*wait)
	for {
		err := c.healthOnce(cf)
		if err == nil {
			fmt.Fprintln(c.stdout, "SERVING")
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (c *cli) healthOnce(cf clientFlags) error {
	cl, ctx, done, err := cf.dial()
	if err != nil {
		return err
	}
	defer done()
	resp, err := healthpb.NewHealthClient(cl.Conn()).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return fmt.Errorf("keyd at %s does not answer: %w", cf.path(), err)
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("keyd at %s is %s", cf.path(), resp.Status)
	}
	return nil
}

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func (c *cli) jwks(args []string) error {
	fs := c.flags("jwks")
	cf := addClientFlags(fs)
	var sets stringList
	fs.Var(&sets, "keyset", "key set to include (repeatable; default: all you may use)")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	cl, ctx, done, err := cf.dial()
	if err != nil {
		return err
	}
	defer done()
	set, err := cl.JWKSet(ctx, sets...)
	if err != nil {
		return err
	}
	var v any
	if err := json.Unmarshal(set.JSON, &v); err != nil {
		return err
	}
	if err := printJSON(c.stdout, v); err != nil {
		return err
	}
	for _, kid := range set.StaleKids {
		fmt.Fprintf(c.stderr, "keyd: warning: key %s is stale: the backend lost it and it no longer signs; it stays published, so that what it signed still verifies, until a new key replaces it (keyd keys rotate NAME --now) or you revoke it (a lost draining key: until it would have retired)\n", kid)
	}
	return nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (c *cli) keys(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: keys needs a subcommand: list, rotate or revoke", errUsage)
	}
	switch args[0] {
	case "list":
		return c.keysList(args[1:])
	case "rotate":
		return c.keysRotate(args[1:])
	case "revoke":
		return c.keysRevoke(args[1:])
	}
	return fmt.Errorf("%w: unknown keys subcommand %q (want list, rotate or revoke)", errUsage, args[0])
}

type keyJSON struct {
	KeySet       string          `json:"keyset"`
	Kid          string          `json:"kid"`
	State        string          `json:"state"`
	Alg          string          `json:"alg"`
	Purpose      string          `json:"purpose"`
	Backend      string          `json:"backend"`
	CreatedAt    time.Time       `json:"created_at"`
	ActivatedAt  *time.Time      `json:"activated_at,omitempty"`
	ActivateAt   *time.Time      `json:"activate_at,omitempty"`
	DeactivateAt *time.Time      `json:"deactivate_at,omitempty"`
	RetireAt     *time.Time      `json:"retire_at,omitempty"`
	DestroyAt    *time.Time      `json:"destroy_at,omitempty"`
	JWK          json.RawMessage `json:"jwk,omitempty"`
}

func optTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	u := t.UTC()
	return &u
}

func toJSON(k client.Key) keyJSON {
	return keyJSON{
		KeySet: k.KeySet, Kid: k.Kid, State: k.State, Alg: k.Alg, Purpose: k.Purpose, Backend: k.Backend,
		CreatedAt: k.CreatedAt.UTC(), ActivatedAt: optTime(k.ActivatedAt), ActivateAt: optTime(k.ActivateAt),
		DeactivateAt: optTime(k.DeactivateAt), RetireAt: optTime(k.RetireAt), DestroyAt: optTime(k.DestroyAt),
		JWK: k.JWK,
	}
}

// nextChange says what happens next to a key version, and when.
func nextChange(k client.Key) string {
	var what string
	var at time.Time
	switch k.State {
	case "next":
		what, at = "activates", k.ActivateAt
	case "active":
		what, at = "rotates", k.DeactivateAt
	case "draining":
		what, at = "retires", k.RetireAt
	case "retired", "revoked":
		what, at = "destroyed", k.DestroyAt
	case "lost":
		// A draining key that the backend lost stays published (stale)
		// until it would have retired.
		what, at = "unpublished", k.RetireAt
	}
	if at.IsZero() {
		return "-"
	}
	return what + " " + stamp(at)
}

func (c *cli) keysList(args []string) error {
	fs := c.flags("keys list")
	cf := addClientFlags(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	var sets stringList
	fs.Var(&sets, "keyset", "key set to list (repeatable; default: all you may use)")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	cl, ctx, done, err := cf.dial()
	if err != nil {
		return err
	}
	defer done()
	keys, err := cl.ListKeys(ctx, sets...)
	if err != nil {
		return err
	}
	if *asJSON {
		out := make([]keyJSON, 0, len(keys))
		for _, k := range keys {
			out = append(out, toJSON(k))
		}
		return printJSON(c.stdout, out)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEYSET\tKID\tSTATE\tALG\tCREATED\tACTIVATED\tNEXT CHANGE")
	for _, k := range keys {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.KeySet, k.Kid, k.State, k.Alg, stamp(k.CreatedAt), stamp(k.ActivatedAt), nextChange(k))
	}
	return tw.Flush()
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func (c *cli) keysRotate(args []string) error {
	fs := c.flags("keys rotate")
	cf := addClientFlags(fs)
	now := fs.Bool("now", false, "activate the new key at once, without pre-publishing it")
	pos, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	cl, ctx, done, err := cf.dial()
	if err != nil {
		return err
	}
	defer done()
	r, err := cl.Rotate(ctx, pos[0], *now)
	if err != nil {
		return err
	}
	switch {
	case r.Next.Kid != "":
		fmt.Fprintf(c.stdout, "%s: next key %s published; it activates at %s (active key %s until then)\n", pos[0], r.Next.Kid, stamp(r.Next.ActivateAt), r.Active.Kid)
	case r.Previous.Kid != "":
		fmt.Fprintf(c.stdout, "%s: active key %s; %s is %s\n", pos[0], r.Active.Kid, r.Previous.Kid, r.Previous.State)
	default:
		fmt.Fprintf(c.stdout, "%s: active key %s\n", pos[0], r.Active.Kid)
	}
	return nil
}

func (c *cli) keysRevoke(args []string) error {
	fs := c.flags("keys revoke")
	cf := addClientFlags(fs)
	keyset := fs.String("keyset", "", "the key set the kid must belong to")
	pos, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	cl, ctx, done, err := cf.dial()
	if err != nil {
		return err
	}
	defer done()
	k, err := cl.Revoke(ctx, pos[0], *keyset)
	if err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "%s: %s is %s\n", k.KeySet, k.Kid, k.State)
	return nil
}

// maxAccessToken bounds an access token read by --access-token @FILE.
const maxAccessToken = 64 << 10

// accessToken returns --access-token's token: v itself, or read from the
// file @FILE or from stdin (@-), without the line's end. A token in the
// arguments is visible to every user of the host (ps, /proc/PID/cmdline);
// in a file or on stdin it is not. A token never starts with '@' (RFC 6750
// b64token), so the forms cannot be confused.
func accessToken(v string) (string, error) {
	name, ok := strings.CutPrefix(v, "@")
	if !ok {
		return v, nil
	}
	b, src, err := readArg("--access-token", name, maxAccessToken)
	if err != nil {
		return "", err
	}
	tok := strings.TrimRight(string(b), "\r\n")
	switch {
	case tok == "":
		return "", fmt.Errorf("%w: --access-token: %s is empty (leave the flag out for a proof without ath)", errUsage, src)
	case strings.ContainsAny(tok, " \t\r\n"):
		return "", fmt.Errorf("%w: --access-token: %s holds more than one line or word; an access token has no spaces", errUsage, src)
	}
	return tok, nil
}

// readArg reads the value of a flag given as @FILE or @- (name is what
// follows the @): the file, or stdin for "-", at most max bytes. One byte
// more than max tells a longer value from one of exactly max: a longer one
// is refused, never cut, and a device or FIFO that never ends is read no
// further. It also returns the source's name for messages.
func readArg(flag, name string, max int) (b []byte, src string, err error) {
	var r io.Reader = os.Stdin
	src = "stdin"
	if name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return nil, name, fmt.Errorf("%s: %w", flag, err)
		}
		defer f.Close()
		r, src = f, name
	}
	b, err = io.ReadAll(io.LimitReader(r, int64(max)+1))
	if err != nil {
		return nil, src, fmt.Errorf("%s: read %s: %w", flag, src, err)
	}
	if len(b) > max {
		return nil, src, fmt.Errorf("%w: %s: %s holds more than %s", errUsage, flag, src, byteSize(max))
	}
	return b, src, nil
}

// byteSize writes n, a whole number of KiB or MiB, for people.
func byteSize(n int) string {
	if n >= 1<<20 && n%(1<<20) == 0 {
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d KiB", n>>10)
}

func (c *cli) proof(args []string) error {
	fs := c.flags("proof")
	cf := addClientFlags(fs)
	keyset := fs.String("keyset", "", "dpop key set (required)")
	htm := fs.String("htm", "", "HTTP method of the request (required)")
	htu := fs.String("htu", "", "URL of the request; the proof carries it without query and fragment (required)")
	token := fs.String("access-token", "", "access token to bind with ath (empty: none); @FILE reads it from FILE, @- from stdin, which other users cannot see as they can see arguments")
	nonce := fs.String("nonce", "", "server-provided DPoP nonce (empty: none)")
	kid := fs.String("kid", "", "prove with this (draining) key version instead of the active key")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	var missing []string
	for name, v := range map[string]string{"--keyset": *keyset, "--htm": *htm, "--htu": *htu} {
		if v == "" {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		return fmt.Errorf("%w: proof needs --keyset, --htm and --htu (missing %s)", errUsage, strings.Join(missing, ", "))
	}
	tok, err := accessToken(*token)
	if err != nil {
		return err
	}
	cl, ctx, done, err := cf.dial()
	if err != nil {
		return err
	}
	defer done()
	p, err := cl.DPoP(*keyset).Proof(ctx, *htm, *htu,
		client.WithAccessToken(tok), client.WithNonce(*nonce), client.WithKid(*kid))
	if err != nil {
		return err
	}
	fmt.Fprintln(c.stdout, p.JWT)
	return nil
}

func (c *cli) assertion(args []string) error {
	fs := c.flags("assertion")
	cf := addClientFlags(fs)
	keyset := fs.String("keyset", "", "client_assertion key set (required)")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *keyset == "" {
		return fmt.Errorf("%w: assertion needs --keyset", errUsage)
	}
	cl, ctx, done, err := cf.dial()
	if err != nil {
		return err
	}
	defer done()
	jwt, err := cl.ClientAssertion(ctx, *keyset)
	if err != nil {
		return err
	}
	fmt.Fprintln(c.stdout, jwt)
	return nil
}
