package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"

	"github.com/keyd-dev/keyd/client"
)

// oauthFlags are the flags of the OAuth commands (token, request).
type oauthFlags struct {
	issuer, tokenURL  *string
	clientID          *string
	dpopKeySet        *string
	assertionKeySet   *string
	scopes, resources stringList
	allowBearer       *bool
	clientFlags       clientFlags
	command           string
}

func addOAuthFlags(fs *flag.FlagSet, cmd string) *oauthFlags {
	f := &oauthFlags{
		issuer:          fs.String("issuer", "", "authorization server issuer; its metadata (RFC 8414 or OpenID discovery) names the token endpoint"),
		tokenURL:        fs.String("token-url", "", "token endpoint, instead of discovering it from --issuer"),
		clientID:        fs.String("client-id", "", "client_id: must be the --assertion-keyset's configured client_id (required)"),
		dpopKeySet:      fs.String("dpop-keyset", "", "dpop key set for the DPoP proofs (required)"),
		assertionKeySet: fs.String("assertion-keyset", "", "client_assertion key set for private_key_jwt (required)"),
		allowBearer:     fs.Bool("allow-bearer", false, "accept a token that is not DPoP-bound (token_type Bearer), with a warning"),
		clientFlags:     addClientFlags(fs),
		command:         cmd,
	}
	fs.Var(&f.scopes, "scope", "scope to request (repeatable, or space-separated)")
	fs.Var(&f.resources, "resource", "RFC 8707 resource indicator (repeatable)")
	return f
}

// check reports the missing required flags as a usage error.
func (f *oauthFlags) check() error {
	var missing []string
	if *f.issuer == "" && *f.tokenURL == "" {
		missing = append(missing, "--issuer")
	}
	for name, v := range map[string]string{"--client-id": *f.clientID, "--dpop-keyset": *f.dpopKeySet, "--assertion-keyset": *f.assertionKeySet} {
		if v == "" {
			missing = append(missing, name)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	slices.Sort(missing)
	return fmt.Errorf("%w: %s needs --issuer (or --token-url), --client-id, --dpop-keyset and --assertion-keyset (missing %s)",
		errUsage, f.command, strings.Join(missing, ", "))
}

func (f *oauthFlags) config() client.OAuthConfig {
	var scopes []string
	for _, s := range f.scopes {
		scopes = append(scopes, strings.Fields(s)...)
	}
	return client.OAuthConfig{
		Issuer:          *f.issuer,
		TokenURL:        *f.tokenURL,
		ClientID:        *f.clientID,
		DPoPKeySet:      *f.dpopKeySet,
		AssertionKeySet: *f.assertionKeySet,
		Scopes:          scopes,
		Resources:       f.resources,
		AllowBearer:     *f.allowBearer,
		// The authorization server gets the command's time, not only
		// the client's default 30 s (which stays with --timeout 0).
		ASTimeout: max(*f.clientFlags.timeout, 0),
	}
}

// open dials keyd and sets up the OAuth client the flags describe. done
// closes the connection and ends ctx, the command's timeout.
func (f *oauthFlags) open(c *cli) (o *client.OAuth, ctx context.Context, done func(), err error) {
	cl, ctx, done, err := f.clientFlags.dial()
	if err != nil {
		return nil, nil, nil, err
	}
	o, err = cl.OAuth(ctx, withLogger(f.config(), c))
	if err != nil {
		done()
		return nil, nil, nil, err
	}
	return o, ctx, done, nil
}

// token implements `keyd token`: client credentials with private_key_jwt
// and DPoP, printing the token endpoint's JSON response (plus
// keyd_dpop_kid, the kid of the key the token is bound to).
func (c *cli) token(args []string) error {
	fs := c.flags("token")
	of := addOAuthFlags(fs, "token")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if err := of.check(); err != nil {
		return err
	}
	o, ctx, done, err := of.open(c)
	if err != nil {
		return err
	}
	defer done()
	tok, err := o.ClientCredentialsToken(ctx)
	if err != nil {
		return err
	}
	return printJSON(c.stdout, client.TokenResponse(tok))
}

// headerList is the repeatable -H flag.
type headerList []string

func (h *headerList) String() string { return strings.Join(*h, "; ") }
func (h *headerList) Set(v string) error {
	name, _, ok := strings.Cut(v, ":")
	if !ok || strings.TrimSpace(name) == "" || strings.ContainsAny(strings.TrimSpace(name), " \t") {
		return fmt.Errorf("want 'Name: value', got %q", v)
	}
	*h = append(*h, v)
	return nil
}

// request implements `keyd request`: get a token as `keyd token` does, then
// call URL with it and a DPoP proof (answering a nonce challenge once),
// print the response body, and fail on an HTTP status of 400 or more.
func (c *cli) request(args []string) error {
	fs := c.flags("request")
	of := addOAuthFlags(fs, "request")
	method := fs.String("X", "", "HTTP method (default GET, or POST with -d)")
	data := fs.String("d", "", "request body; @FILE reads it from FILE, @- from stdin, either at most 64 MiB (default Content-Type: application/x-www-form-urlencoded)")
	var headers headerList
	fs.Var(&headers, "H", "request header 'Name: value' (repeatable; not Authorization or DPoP, which keyd sets)")
	pos, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	if err := of.check(); err != nil {
		return err
	}
	target := pos[0]
	u, err := url.Parse(target)
	if err != nil {
		// Not quoted: url.Error quotes the whole URL, password included.
		return fmt.Errorf("%w: request needs an absolute http(s) URL, and this one does not parse", errUsage)
	}
	if (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return fmt.Errorf("%w: request needs an absolute http(s) URL, not %q", errUsage, u.Redacted())
	}
	// shown is target as messages name it: without a password it holds.
	shown := u.Redacted()
	for _, h := range headers {
		name, _, _ := strings.Cut(h, ":")
		if name = strings.TrimSpace(name); strings.EqualFold(name, "Authorization") || strings.EqualFold(name, "DPoP") {
			return fmt.Errorf("%w: -H %s: keyd request sends the access token and a DPoP proof in Authorization and DPoP itself", errUsage, name)
		}
	}
	dataSet := false
	fs.Visit(func(f *flag.Flag) { dataSet = dataSet || f.Name == "d" })
	var body []byte
	if dataSet {
		if body, err = readData(*data); err != nil {
			return err
		}
	}
	m := strings.ToUpper(*method)
	if m == "" {
		m = http.MethodGet
		if dataSet {
			m = http.MethodPost
		}
	}

	o, ctx, done, err := of.open(c)
	if err != nil {
		return err
	}
	defer done()
	var reqBody io.Reader
	if dataSet {
		reqBody = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, m, target, reqBody)
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if dataSet {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	given := map[string]bool{}
	for _, h := range headers {
		name, value, _ := strings.Cut(h, ":")
		name, value = strings.TrimSpace(name), strings.TrimSpace(value)
		if strings.EqualFold(name, "Host") {
			// net/http sends req.Host and ignores a Host in req.Header.
			req.Host = value
			continue
		}
		// The first -H of a name replaces a default (Content-Type of
		// -d); the next ones add to it, as curl does.
		if key := http.CanonicalHeaderKey(name); given[key] {
			req.Header.Add(name, value)
		} else {
			given[key] = true
			req.Header.Set(name, value)
		}
	}
	resp, err := o.Client(o.ClientCredentials(ctx)).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(c.stdout, resp.Body); err != nil {
		return fmt.Errorf("%s %s: reading the response: %w", m, shown, err)
	}
	if loc := resp.Header.Get("Location"); loc != "" && resp.StatusCode >= 300 && resp.StatusCode < 400 {
		// Client follows redirects within the origin only.
		fmt.Fprintf(c.stderr, "keyd: warning: not following the redirect (HTTP %s) to %q: another origin gets neither the access token nor a proof; call that URL if you trust it\n", resp.Status, loc)
	}
	if resp.StatusCode >= 400 {
		detail := ""
		if ch := resp.Header.Get("WWW-Authenticate"); ch != "" {
			detail = " (WWW-Authenticate: " + ch + ")"
		}
		return fmt.Errorf("%s %s: HTTP %s%s", m, shown, resp.Status, detail)
	}
	return nil
}

// maxData bounds a request body read from a file or stdin (-d @FILE, -d @-).
const maxData = 64 << 20

func readData(d string) ([]byte, error) {
	name, ok := strings.CutPrefix(d, "@")
	if !ok {
		return []byte(d), nil
	}
	b, _, err := readArg("-d", name, maxData)
	return b, err
}

// withLogger sends the client's warnings (a token that is not DPoP-bound)
// to stderr as "keyd: warning: ..." lines.
func withLogger(cfg client.OAuthConfig, c *cli) client.OAuthConfig {
	cfg.Logger = slog.New(warnHandler{w: c.stderr})
	return cfg
}

// warnHandler prints warnings and errors as one "keyd: warning:" line each.
type warnHandler struct {
	w     io.Writer
	attrs []slog.Attr
}

func (h warnHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }

func (h warnHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	fmt.Fprintf(&b, "keyd: warning: %s", r.Message)
	add := func(a slog.Attr) bool { fmt.Fprintf(&b, " %s=%v", a.Key, a.Value); return true }
	for _, a := range h.attrs {
		add(a)
	}
	r.Attrs(add)
	b.WriteByte('\n')
	_, err := io.WriteString(h.w, b.String())
	return err
}

func (h warnHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return warnHandler{w: h.w, attrs: append(slices.Clip(h.attrs), attrs...)}
}

func (h warnHandler) WithGroup(string) slog.Handler { return h }
