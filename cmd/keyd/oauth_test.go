package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/internal/config"
	"github.com/keyd-dev/keyd/internal/daemon"
)

// TestOAuthUsage: the OAuth commands' usage errors exit 2 and name what is
// missing; nothing reaches a daemon.
func TestOAuthUsage(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("KEYD_SOCKET", "")
	t.Setenv("XDG_RUNTIME_DIR", dir)
	const hint = "run 'keyd help' for usage\n"
	all := []string{"--issuer", "http://127.0.0.1:1", "--client-id", "c", "--dpop-keyset", "d", "--assertion-keyset", "a"}
	for _, tc := range []struct {
		name   string
		args   []string
		status int
		stderr string
	}{
		{"token without flags", []string{"token"}, 2,
			`\Akeyd: token needs --issuer \(or --token-url\), --client-id, --dpop-keyset and --assertion-keyset \(missing --assertion-keyset, --client-id, --dpop-keyset, --issuer\)\n` + hint + `\z`},
		{"token with a token URL only", []string{"token", "--token-url", "http://127.0.0.1:1/t", "--client-id", "c", "--dpop-keyset", "d"}, 2,
			`\(missing --assertion-keyset\)\n`},
		{"request without URL", append([]string{"request"}, all...), 2, `\Akeyd: keyd request takes 1 argument\(s\), got 0\n` + hint + `\z`},
		{"request with a relative URL", append([]string{"request", "/api"}, all...), 2, `\Akeyd: request needs an absolute http\(s\) URL, not "/api"\n` + hint + `\z`},
		{"request with a bad header", append([]string{"request", "-H", "nocolon", "http://x/"}, all...), 2, `(?m)^keyd: invalid value "nocolon" for flag -H: want 'Name: value', got "nocolon"\n` + hint + `\z`},
		{"token without --issuer", append([]string{"token", "--socket", filepath.Join(dir, "none.sock")}, all[2:]...), 2, `missing --issuer`},
		{"no daemon", append([]string{"token", "--socket", filepath.Join(dir, "none.sock")}, all...), 1, `\Akeyd: no keyd socket at .*none\.sock: is 'keyd serve' running\?`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr strings.Builder
			if status := run(tc.args, &stdout, &stderr); status != tc.status {
				t.Errorf("exit status %d, want %d\nstderr: %s", status, tc.status, stderr.String())
			}
			if !regexp.MustCompile(tc.stderr).MatchString(stderr.String()) {
				t.Errorf("stderr:\n%s\ndoes not match %s", stderr.String(), tc.stderr)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout: %s", stdout.String())
			}
		})
	}
}

// fakeServer is a small authorization server and resource in one that
// demands DPoP nonces (n1 at the token endpoint, r1 at the resource).
type fakeServer struct {
	srv       *httptest.Server
	mu        sync.Mutex
	tokenType string
	forms     []url.Values
}

func newFakeServer(t *testing.T) *fakeServer {
	f := &fakeServer{tokenType: "DPoP"}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeServer) serve(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	proof := claimsOf(r.Header.Get("DPoP"))
	w.Header().Set("Content-Type", "application/json")
	switch {
	case r.URL.Path == "/.well-known/oauth-authorization-server":
		json.NewEncoder(w).Encode(map[string]string{"issuer": f.srv.URL, "token_endpoint": f.srv.URL + "/token"})
	case r.URL.Path == "/token":
		r.ParseForm()
		f.forms = append(f.forms, r.PostForm)
		if proof["nonce"] != "n1" || proof["htm"] != "POST" {
			w.Header().Set("DPoP-Nonce", "n1")
			w.WriteHeader(400)
			fmt.Fprint(w, `{"error":"use_dpop_nonce"}`)
			return
		}
		if claimsOf(r.PostForm.Get("client_assertion"))["iss"] != "c1" {
			w.WriteHeader(401)
			fmt.Fprint(w, `{"error":"invalid_client","error_description":"who are you?"}`)
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"access_token": "tok", "token_type": f.tokenType, "expires_in": 60, "scope": r.PostForm.Get("scope")})
	case r.URL.Path == "/moved":
		http.Redirect(w, r, "http://127.0.0.2:9/elsewhere", http.StatusTemporaryRedirect)
	case strings.HasPrefix(r.URL.Path, "/api"):
		if proof["nonce"] != "r1" {
			w.Header().Set("WWW-Authenticate", `DPoP error="use_dpop_nonce"`)
			w.Header().Set("DPoP-Nonce", "r1")
			w.WriteHeader(401)
			return
		}
		if r.Header.Get("Authorization") != "DPoP tok" || proof["htm"] != r.Method || proof["ath"] == nil {
			w.WriteHeader(401)
			return
		}
		if r.URL.Path != "/api" {
			w.WriteHeader(404)
			fmt.Fprint(w, `{"error":"not_found"}`)
			return
		}
		body, _ := io.ReadAll(r.Body)
		json.NewEncoder(w).Encode(map[string]string{"method": r.Method, "body": string(body), "ct": r.Header.Get("Content-Type"), "x": r.Header.Get("X-Test")})
	default:
		w.WriteHeader(404)
	}
}

func claimsOf(jwt string) map[string]any {
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return map[string]any{}
	}
	b, _ := base64.RawURLEncoding.DecodeString(parts[1])
	m := map[string]any{}
	json.Unmarshal(b, &m)
	return m
}

// startDaemon runs keyd in this process with key sets dpop and assert
// (client_id c1, audience aud) and returns its socket.
func startDaemon(t *testing.T, aud string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "k.sock")
	cfg, err := config.Parse([]byte(fmt.Sprintf(`socket: %s
state_dir: %s
backend: {soft: {}}
keysets:
  - {name: dpop, purpose: dpop, alg: ES256, allow: {uids: [%[3]d]}}
  - {name: assert, purpose: client_assertion, alg: ES256, client_id: c1, audience: %[4]q, allow: {uids: [%[3]d]}}
`, socket, filepath.Join(dir, "state"), os.Geteuid(), aud)), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := daemon.New(ctx, cfg, daemon.Options{})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return socket
}

func TestTokenAndRequest(t *testing.T) {
	f := newFakeServer(t)
	socket := startDaemon(t, f.srv.URL)
	flags := []string{"--socket", socket, "--issuer", f.srv.URL, "--client-id", "c1", "--dpop-keyset", "dpop", "--assertion-keyset", "assert"}
	keyd := func(args ...string) (string, string, int) {
		var stdout, stderr strings.Builder
		status := run(args, &stdout, &stderr)
		return stdout.String(), stderr.String(), status
	}

	out, errOut, status := keyd(append([]string{"token", "--scope", "a b", "--scope", "c", "--resource", "https://rs.example/"}, flags...)...)
	var tok map[string]any
	if status != 0 || json.Unmarshal([]byte(out), &tok) != nil {
		t.Fatalf("token: exit %d, stdout %q, stderr %q", status, out, errOut)
	}
	if tok["access_token"] != "tok" || tok["token_type"] != "DPoP" || tok["expires_in"] != 60.0 || tok["scope"] != "a b c" || tok["keyd_dpop_kid"] == "" {
		t.Errorf("token printed %v", tok)
	}
	if !strings.HasPrefix(out, "{\n  \"access_token\"") {
		t.Errorf("token output is not indented JSON: %q", out)
	}
	if last := f.forms[len(f.forms)-1]; last.Get("resource") != "https://rs.example/" || last.Get("client_id") != "c1" || last.Get("grant_type") != "client_credentials" {
		t.Errorf("token request form %v", last)
	}

	out, errOut, status = keyd(append([]string{"request", f.srv.URL + "/api"}, flags...)...)
	if status != 0 || out != `{"body":"","ct":"","method":"GET","x":""}`+"\n" || errOut != "" {
		t.Errorf("request: exit %d, stdout %q, stderr %q", status, out, errOut)
	}
	out, errOut, status = keyd(append([]string{"request", "-d", "a=1", "-H", "X-Test: v", f.srv.URL + "/api"}, flags...)...)
	if status != 0 || out != `{"body":"a=1","ct":"application/x-www-form-urlencoded","method":"POST","x":"v"}`+"\n" {
		t.Errorf("request -d: exit %d, stdout %q, stderr %q", status, out, errOut)
	}
	data := filepath.Join(t.TempDir(), "body.json")
	os.WriteFile(data, []byte(`{"k":1}`), 0o600)
	out, errOut, status = keyd(append([]string{"request", "-X", "patch", "-d", "@" + data, "-H", "Content-Type: application/json", f.srv.URL + "/api"}, flags...)...)
	if status != 0 || out != `{"body":"{\"k\":1}","ct":"application/json","method":"PATCH","x":""}`+"\n" {
		t.Errorf("request -d @file: exit %d, stdout %q, stderr %q", status, out, errOut)
	}
	out, errOut, status = keyd(append([]string{"request", f.srv.URL + "/api/missing"}, flags...)...)
	if status != 1 || out != `{"error":"not_found"}` || errOut != "keyd: GET "+f.srv.URL+"/api/missing: HTTP 404 Not Found\n" {
		t.Errorf("request for a 404: exit %d, stdout %q, stderr %q", status, out, errOut)
	}

	// The server's error, in one line.
	out, errOut, status = keyd("token", "--socket", socket, "--token-url", f.srv.URL+"/token", "--client-id", "c2", "--dpop-keyset", "dpop", "--assertion-keyset", "assert")
	if status != 1 || out != "" || errOut != "keyd: invalid argument: client_id \"c2\" does not match key set assert, whose assertions are for client_id \"c1\"\n" {
		t.Errorf("mismatched client id: exit %d, stdout %q, stderr %q", status, out, errOut)
	}

	// A Bearer token is an error, or a warning with --allow-bearer.
	f.mu.Lock()
	f.tokenType = "Bearer"
	f.mu.Unlock()
	_, errOut, status = keyd(append([]string{"token"}, flags...)...)
	if status != 1 || !strings.Contains(errOut, `keyd: access token is not DPoP-bound: `+f.srv.URL+`/token answered token_type "Bearer"`) {
		t.Errorf("bearer: exit %d, stderr %q", status, errOut)
	}
	out, errOut, status = keyd(append([]string{"token", "--allow-bearer"}, flags...)...)
	if status != 0 || !strings.Contains(out, `"token_type": "Bearer"`) || strings.Contains(out, "keyd_dpop_kid") ||
		!strings.HasPrefix(errOut, "keyd: warning: the authorization server issued a token that is not DPoP-bound") {
		t.Errorf("--allow-bearer: exit %d, stdout %q, stderr %q", status, out, errOut)
	}
}

// An authorization server that answers an HTML page (a proxy's 502) rather
// than an OAuth error is reported in one short line naming the endpoint and
// the status, with the start of the page quoted: not the whole page, raw,
// terminal escape sequences included.
func TestTokenEndpointErrorPage(t *testing.T) {
	f := newFakeServer(t)
	socket := startDaemon(t, f.srv.URL)
	page := "<html>\x1b]0;owned\x07\x1b[2J" + strings.Repeat("Bad Gateway ", 20000) + "</html>"
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusBadGateway)
		fmt.Fprint(w, page)
	}))
	defer as.Close()
	flags := []string{"--socket", socket, "--token-url", as.URL + "/token", "--client-id", "c1", "--dpop-keyset", "dpop", "--assertion-keyset", "assert"}
	for _, args := range [][]string{{"token"}, {"request", f.srv.URL + "/api"}} {
		var stdout, stderr strings.Builder
		status := run(append(args, flags...), &stdout, &stderr)
		errOut := stderr.String()
		if status != 1 || stdout.Len() != 0 || strings.Count(errOut, "\n") != 1 || len(errOut) > 1024 ||
			strings.ContainsAny(errOut, "\x1b\x07") || !strings.Contains(errOut, as.URL+"/token") || !strings.Contains(errOut, "502 Bad Gateway") {
			t.Errorf("%s: exit %d, stdout %q, stderr (%d bytes) %.300q", args[0], status, stdout.String(), len(errOut), errOut)
		}
	}
}

// -H adds a header as given: one named twice is sent twice, as curl does.
func TestRequestRepeatedHeader(t *testing.T) {
	f := newFakeServer(t)
	socket := startDaemon(t, f.srv.URL)
	rs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"accept": r.Header.Values("Accept"), "ct": r.Header.Values("Content-Type")})
	}))
	defer rs.Close()
	var stdout, stderr strings.Builder
	status := run([]string{"request", "-H", "Accept: text/plain", "-H", "Accept: application/json", "-d", "{}", "-H", "Content-Type: application/json",
		"--socket", socket, "--issuer", f.srv.URL, "--client-id", "c1", "--dpop-keyset", "dpop", "--assertion-keyset", "assert", rs.URL + "/api"}, &stdout, &stderr)
	want := `{"accept":["text/plain","application/json"],"ct":["application/json"]}` + "\n"
	if status != 0 || stdout.String() != want {
		t.Errorf("exit %d, stdout %q, stderr %q; want stdout %q", status, stdout.String(), stderr.String(), want)
	}
}

// keyd request writes Authorization and DPoP itself: a -H that sets either
// is a usage error, not a header silently replaced; nothing is sent.
func TestRequestAuthorizationHeaderRefused(t *testing.T) {
	f := newFakeServer(t)
	socket := startDaemon(t, f.srv.URL)
	hits := 0
	rs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hits++ }))
	for _, h := range []string{"Authorization: Basic dTpw", "dpop: eyJ.x.y"} {
		var stdout, stderr strings.Builder
		status := run([]string{"request", "-H", h, "--socket", socket, "--issuer", f.srv.URL, "--client-id", "c1",
			"--dpop-keyset", "dpop", "--assertion-keyset", "assert", rs.URL + "/api"}, &stdout, &stderr)
		name, _, _ := strings.Cut(h, ":")
		if status != 2 || stdout.Len() != 0 || !strings.Contains(stderr.String(), name) {
			t.Errorf("-H %q: exit %d, stdout %q, stderr %q", h, status, stdout.String(), stderr.String())
		}
	}
	rs.Close() // waits for its handlers: hits is theirs no more
	f.mu.Lock()
	defer f.mu.Unlock()
	if hits != 0 || len(f.forms) != 0 {
		t.Errorf("%d requests to the resource, %d to the token endpoint", hits, len(f.forms))
	}
}

// A password in the request URL is not printed in the error line of a
// failed request (net/http's own errors redact it too).
func TestRequestErrorRedactsPassword(t *testing.T) {
	f := newFakeServer(t)
	socket := startDaemon(t, f.srv.URL)
	target := strings.Replace(f.srv.URL, "http://", "http://user:s3cret@", 1) + "/api/missing"
	var stdout, stderr strings.Builder
	status := run([]string{"request", "--socket", socket, "--issuer", f.srv.URL, "--client-id", "c1",
		"--dpop-keyset", "dpop", "--assertion-keyset", "assert", target}, &stdout, &stderr)
	if status != 1 || strings.Contains(stderr.String(), "s3cret") || !strings.Contains(stderr.String(), "HTTP 404") {
		t.Errorf("exit %d, stderr %q", status, stderr.String())
	}
	// Usage errors about the URL do not quote the password either.
	for _, bad := range []string{"ftp://user:s3cret@host/x", "http://user:s3cret@host/%zz"} {
		stderr.Reset()
		status := run([]string{"request", "--socket", socket, "--issuer", f.srv.URL, "--client-id", "c1",
			"--dpop-keyset", "dpop", "--assertion-keyset", "assert", bad}, &stdout, &stderr)
		if status != 2 || strings.Contains(stderr.String(), "s3cret") {
			t.Errorf("%s: exit %d, stderr %q", bad, status, stderr.String())
		}
	}
}

// --timeout 0 means no limit (as curl's --max-time 0), not a deadline
// already past.
func TestTimeoutZeroIsNoLimit(t *testing.T) {
	f := newFakeServer(t)
	socket := startDaemon(t, f.srv.URL)
	for _, args := range [][]string{
		{"jwks", "--socket", socket, "--timeout", "0"},
		{"token", "--socket", socket, "--timeout", "0", "--issuer", f.srv.URL, "--client-id", "c1", "--dpop-keyset", "dpop", "--assertion-keyset", "assert"},
	} {
		var stdout, stderr strings.Builder
		if status := run(args, &stdout, &stderr); status != 0 {
			t.Errorf("keyd %s --timeout 0: exit %d, stderr %q", args[0], status, stderr.String())
		}
	}
}

// The authorization server gets the command's --timeout, not only the
// client's default 30 s.
func TestTimeoutAppliesToAuthorizationServer(t *testing.T) {
	for timeout, want := range map[string]time.Duration{"45s": 45 * time.Second, "5s": 5 * time.Second, "0": 0} {
		fs := flag.NewFlagSet("token", flag.ContinueOnError)
		of := addOAuthFlags(fs, "token")
		if err := fs.Parse([]string{"--timeout", timeout}); err != nil {
			t.Fatal(err)
		}
		if got := of.config().ASTimeout; got != want {
			t.Errorf("--timeout %s: ASTimeout %v, want %v (0: the client's default)", timeout, got, want)
		}
	}
}

// A redirect to another origin is not followed (the token and the proof
// stay with the first server), and keyd request says so: otherwise a
// request that reached no resource looks like one that did.
func TestRequestCrossOriginRedirectWarned(t *testing.T) {
	f := newFakeServer(t)
	socket := startDaemon(t, f.srv.URL)
	var stdout, stderr strings.Builder
	status := run([]string{"request", "--socket", socket, "--issuer", f.srv.URL, "--client-id", "c1",
		"--dpop-keyset", "dpop", "--assertion-keyset", "assert", f.srv.URL + "/moved"}, &stdout, &stderr)
	if status != 0 || !strings.Contains(stderr.String(), "keyd: warning: not following the redirect (HTTP 307") ||
		!strings.Contains(stderr.String(), "http://127.0.0.2:9/elsewhere") {
		t.Errorf("exit %d, stderr %q", status, stderr.String())
	}
}
