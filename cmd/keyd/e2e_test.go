package main

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestExitStatus checks what testscript cannot: the exact exit status. 0 is
// success (and help), 1 a failure, 2 a usage error, which adds a hint to run
// 'keyd help'. Every failure prints exactly one line starting "keyd: " (and
// the hint), and nothing on stdout. None of these cases reaches a daemon, so
// run is called in-process.
func TestExitStatus(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("KEYD_SOCKET", "")
	t.Setenv("XDG_RUNTIME_DIR", dir)
	noSocket := filepath.Join(dir, "none.sock")
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("socket: relative.sock\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	noGroup := filepath.Join(dir, "nogroup.yaml")
	if err := os.WriteFile(noGroup, []byte("socket: /run/keyd/keyd.sock\nsocket_group: keyd-no-such-group\nstate_dir: /var/lib/keyd\n"+
		"backend: {soft: {}}\nkeysets: [{name: d, purpose: dpop, alg: ES256, allow: {uids: [0]}}]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The same, with a state directory serve may use (and must not touch).
	state := filepath.Join(dir, "state")
	noGroupServe := filepath.Join(dir, "nogroup-serve.yaml")
	noUserServe := filepath.Join(dir, "nouser-serve.yaml")
	for file, body := range map[string]string{
		noGroupServe: "socket_group: keyd-no-such-group\nkeysets: [{name: d, purpose: dpop, alg: ES256, allow: {uids: [0]}}]\n",
		noUserServe:  "keysets: [{name: d, purpose: dpop, alg: ES256, allow: {users: [keyd-no-such-user]}}]\n",
	} {
		if err := os.WriteFile(file, []byte("socket: "+filepath.Join(dir, "s.sock")+"\nstate_dir: "+state+"\nbackend: {soft: {}}\n"+body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	const hint = "run 'keyd help' for usage\n"

	for _, tc := range []struct {
		name   string
		args   []string
		status int
		// stderr is a regexp the whole of stderr must match; "" means empty.
		stderr string
		// stdout is a regexp stdout must contain; "" means stdout is empty.
		stdout string
	}{
		{"no arguments", nil, 2, `(?s)\Akeyd — .*  keyd proof --keyset NAME .*\z`, ""},
		{"help", []string{"help"}, 0, "", `(?m)^  keyd serve \[--config FILE\]`},
		{"--help", []string{"--help"}, 0, "", `(?m)^Daemon:$`},
		{"unknown command", []string{"frobnicate"}, 2, `\Akeyd: unknown command "frobnicate"\n` + hint + `\z`, ""},
		{"keys without subcommand", []string{"keys"}, 2, `\Akeyd: keys needs a subcommand: list, rotate or revoke\n` + hint + `\z`, ""},
		{"unknown keys subcommand", []string{"keys", "destroy"}, 2, `\Akeyd: unknown keys subcommand "destroy" \(want list, rotate or revoke\)\n` + hint + `\z`, ""},
		{"rotate without key set", []string{"keys", "rotate"}, 2, `\Akeyd: keyd keys rotate takes 1 argument\(s\), got 0\n` + hint + `\z`, ""},
		{"proof without flags", []string{"proof", "--keyset", "d"}, 2, `\Akeyd: proof needs --keyset, --htm and --htu \(missing --htm, --htu\)\n` + hint + `\z`, ""},
		{"assertion without key set", []string{"assertion"}, 2, `\Akeyd: assertion needs --keyset\n` + hint + `\z`, ""},
		{"check-config without config", []string{"check-config"}, 2, `\Akeyd: --config FILE is required\n` + hint + `\z`, ""},
		{"serve with a missing configuration", []string{"serve", "--config", "/nonexistent/keyd.yaml"}, 78, `\Akeyd: read config: open /nonexistent/keyd.yaml: no such file or directory\n\z`, ""},
		{"unknown flag", []string{"proof", "--bogus"}, 2, `\Akeyd: flag provided but not defined: --bogus\n` + hint + `\z`, ""},
		// A bad flag value is one line too: the flag list is for -h only.
		{"bad flag value", []string{"health", "--wait", "soon"}, 2, `\Akeyd: invalid value "soon" for flag -wait: parse error\n` + hint + `\z`, ""},
		{"flag without its value", []string{"proof", "--keyset", "d", "--htm"}, 2, `\Akeyd: flag needs an argument: -htm\n` + hint + `\z`, ""},
		{"flag help", []string{"proof", "-h"}, 0, `(?s)\AUsage of keyd proof:\n.*-htu string`, ""},
		{"no daemon", []string{"jwks", "--socket", noSocket}, 1, `\Akeyd: no keyd socket at ` + regexp.QuoteMeta(noSocket) + `: is 'keyd serve' running\? \(choose the socket with --socket or KEYD_SOCKET\)\n\z`, ""},
		{"no daemon, default socket", []string{"keys", "list"}, 1, `\Akeyd: no keyd socket at ` + regexp.QuoteMeta(filepath.Join(dir, "keyd", "keyd.sock")) + `: is 'keyd serve' running\?`, ""},
		{"no daemon, health", []string{"health", "--socket", noSocket}, 1, `\Akeyd: no keyd socket at .*\n\z`, ""},
		{"bad config", []string{"check-config", "--config", bad}, 1, `(?s)\A.*: invalid configuration:\n.*socket: "relative.sock" must be an absolute path\n.*keyd: the configuration has problems \(listed above\)\n\z`, ""},
		// check-config finds what serve would refuse at start.
		{"check-config with an unknown socket_group", []string{"check-config", "--config", noGroup}, 1, `\Asocket_group: group: unknown group keyd-no-such-group\nkeyd: the configuration has problems \(listed above\)\n\z`, ""},
		// ... and serve refuses them as an invalid configuration, so that
		// systemd does not restart into it (RestartPreventExitStatus=78).
		{"serve with an unknown socket_group", []string{"serve", "--config", noGroupServe}, 78, `\Akeyd: socket_group: group: unknown group keyd-no-such-group\n\z`, ""},
		{"serve with an unknown user", []string{"serve", "--config", noUserServe}, 78, `\Akeyd: keysets \(d\)\.allow: user "keyd-no-such-user": user: unknown user keyd-no-such-user\n\z`, ""},
		{"serve with bad config", []string{"serve", "--config", bad}, 78, `\Akeyd: .*invalid configuration: .*socket: "relative.sock" must be an absolute path.*\n\z`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr strings.Builder
			status := run(tc.args, &stdout, &stderr)
			if status != tc.status {
				t.Errorf("keyd %q: exit status %d, want %d\nstderr:\n%s", tc.args, status, tc.status, stderr.String())
			}
			if tc.stderr == "" {
				if stderr.Len() != 0 {
					t.Errorf("stderr:\n%s\nwant nothing", stderr.String())
				}
			} else if !regexp.MustCompile(tc.stderr).MatchString(stderr.String()) {
				t.Errorf("stderr:\n%s\ndoes not match %s", stderr.String(), tc.stderr)
			}
			if tc.stdout == "" {
				if stdout.Len() != 0 {
					t.Errorf("stdout:\n%s\nwant nothing", stdout.String())
				}
			} else if !regexp.MustCompile(tc.stdout).MatchString(stdout.String()) {
				t.Errorf("stdout:\n%s\ndoes not match %s", stdout.String(), tc.stdout)
			}
		})
	}
}

// TestVerifyJWT checks the script checker itself on tokens it must refuse:
// a test helper that accepts anything would make every script pass.
func TestVerifyJWT(t *testing.T) {
	const (
		// An ES256 DPoP proof from keyd and the JWK Set of its key.
		proof = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwiY3J2IjoiUC0yNTYiLCJ4IjoiUFhBdHhTRlVNNVVLckZLX2tVX3VqQkZUOFB2MXhKdG1fUmdTbDcwSjNnYyIsInkiOiJ4enpnLWpxSFNKekFCZ0FrLVNrS1h6TXhjWnZTRWxQY09fVndFZUM0NUY0In19.eyJhdGgiOiJHblowNjA3bmpmZmhyRU9hazhQNmpqeVVWNFRVM3NuOWpqQVJjNHN2SFdJIiwiaHRtIjoiR0VUIiwiaHR1IjoiaHR0cHM6Ly9hcGkuZXhhbXBsZS5jb20vciIsImlhdCI6MTc5NTM1MTYyOSwianRpIjoiY01KTnRDYlQ0ems0SUxxNndqRGV2USIsIm5vbmNlIjoibjEifQ.ec169cAmbs1hbkxbdHFN_BucpbSIZLbB4ijhX_zI4yZhgwt4e-SLJVi7goPwX9H2eN1Dhw503TOYaLoI24Ak3Q"
		kid   = "wVdWxbw0gSpuEm47_UA0KqPN6TdAla6ZRzhnj3fwssk"
		jwks  = `{"keys":[{"alg":"ES256","crv":"P-256","kid":"` + kid + `","kty":"EC","use":"sig","x":"PXAtxSFUM5UKrFK_kU_ujBFT8Pv1xJtm_RgSl70J3gc","y":"xzzg-jqHSJzABgAk-SkKXzMxcZvSElPcO_VwEeC45F4"}]}`
		// Another P-256 key.
		otherJWKS = `{"keys":[{"alg":"ES256","crv":"P-256","kid":"IwUCD1O_7hryW2PuX7erwovrYEuAnd1UfhkaAgeSPGs","kty":"EC","use":"sig","x":"ThFF2LYyGcLKEjQPfKLqWr-Gcrv_ZzuKC8eprYRAgqk","y":"pecatWp79OT_TP0kc1Nt_hwER3PZxCaCFPxY94A79oE"}]}`
	)
	iat := int64(1795351629)
	at := func(sec int64) int64 { return iat + sec }
	parts := strings.Split(proof, ".")
	flipped := []byte(parts[2])
	flipped[10] ^= 'A' ^ 'B'

	for _, tc := range []struct {
		name    string
		jwt     string
		jwks    string
		checks  []string
		now     int64
		wantErr string // "" means success
	}{
		{"good", proof, jwks, []string{"h.typ=dpop+jwt", "!h.kid", "!h.jwk.d", "?h.jwk.x", "c.htm=GET", "c.htu=https://api.example.com/r", "c.nonce=n1", "c.ath=GnZ0607njffhrEOak8P6jjyUV4TU3sn9jjARc4svHWI", "?c.jti", "c.iat~now", "c.iat=1795351629", "jkt=" + kid}, at(30), ""},
		{"key not published", proof, otherJWKS, nil, at(0), "is not in the JWK Set"},
		{"bad signature", parts[0] + "." + parts[1] + "." + string(flipped), jwks, nil, at(0), "signature does not verify"},
		{"claims swapped", parts[0] + "." + base64URL(`{"htm":"POST"}`) + "." + parts[2], jwks, nil, at(0), "signature does not verify"},
		{"long signature", parts[0] + "." + parts[1] + "." + parts[2] + "AAAA", jwks, nil, at(0), "signature does not verify"},
		{"wrong value", proof, jwks, []string{"c.htm=POST"}, at(0), "got GET"},
		{"absent member", proof, jwks, []string{"c.exp=1"}, at(0), "absent"},
		{"present member", proof, jwks, []string{"!c.nonce"}, at(0), "present: n1"},
		{"iat too old", proof, jwks, []string{"c.iat~now"}, at(61), "away from now"},
		{"iat in the future", proof, jwks, []string{"c.iat~now"}, at(-61), "away from now"},
		{"wrong jkt", proof, jwks, []string{"jkt=someoneelse"}, at(0), "signed by " + kid},
		{"no lifetime", proof, jwks, []string{"lifetime<=300"}, at(0), "c.exp: missing"},
		{"not a JWS", "a.b", jwks, nil, at(0), "not a compact JWS"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := verifyJWT(tc.jwt, []byte(tc.jwks), tc.checks, unix(tc.now))
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("verifyJWT: %v", err)
			case tc.wantErr != "" && err == nil:
				t.Fatalf("verifyJWT succeeded, want an error containing %q", tc.wantErr)
			case tc.wantErr != "" && !strings.Contains(err.Error(), tc.wantErr):
				t.Fatalf("verifyJWT: %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
}

func base64URL(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

func unix(sec int64) time.Time { return time.Unix(sec, 0) }
