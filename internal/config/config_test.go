package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const good = `
socket: /run/keyd/keyd.sock
socket_mode: "0660"
state_dir: /var/lib/keyd
audit_log: /var/log/keyd/audit.jsonl
admins: {uids: [0]}
backend:
  soft: {}
keysets:
  - name: billing-dpop
    purpose: dpop
    alg: ES256
    allow: {uids: [1001], groups: [billing]}
  - name: billing-client
    purpose: client_assertion
    alg: ES256
    client_id: 0oa1example
    audience: https://issuer.example.com
    max_lifetime: 5m
    allow: {uids: [1001]}
`

// The example of the issue must keep working.
func TestIssueExample(t *testing.T) {
	c, err := Parse([]byte(good), "keyd.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.KeySets) != 2 || c.KeySets[1].ClientID != "0oa1example" || time.Duration(c.KeySets[1].MaxLifetime) != 5*time.Minute {
		t.Errorf("%+v", c)
	}
	p, err := c.KeySets[1].Policy()
	if err != nil || p.Audience != "https://issuer.example.com" {
		t.Errorf("policy %+v %v", p, err)
	}
	if m, _ := c.Mode(); m != 0o660 {
		t.Errorf("mode %o", m)
	}
}

// A socket mode nobody but root could connect with is refused.
func TestSocketModeUsable(t *testing.T) {
	for mode, ok := range map[string]bool{"0660": true, "0600": true, "0620": true, "0": false, "0440": false, "0550": false} {
		_, err := (&Config{SocketMode: mode}).Mode()
		if (err == nil) != ok {
			t.Errorf("socket_mode %q: %v, want accepted %v", mode, err, ok)
		}
		if err != nil && !ok && !strings.Contains(err.Error(), "connecting needs") {
			t.Errorf("socket_mode %q: %v, want it to say why", mode, err)
		}
	}
}

func TestEveryProblemAtOnce(t *testing.T) {
	bad := `
socket: relative.sock
socket_mode: "0666"
state_dir: /var/lib/keyd
backend: {soft: {}}
keysets:
  - name: a
    purpose: client_assertion
    alg: ES256
    client_id: x
    allow: {uids: [1]}
  - name: a
    purpose: dpop
    alg: HS256
    allow: {uids: [1]}
  - name: Bad Name
    purpose: signing
    alg: ES256
`
	_, err := Parse([]byte(bad), "bad.yaml")
	if err == nil {
		t.Fatal("accepted")
	}
	for _, want := range []string{
		"socket: \"relative.sock\" must be an absolute path",
		"socket_mode",
		"needs an Audience",
		"is already declared",
		"HS256",
		"keysets[2]",
		"signing",
		"allow: list the uids",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q:\n%v", want, err)
		}
	}
}

func TestUnknownFieldIsAnError(t *testing.T) {
	_, err := Parse([]byte(strings.Replace(good, "socket_mode:", "socket_mod:", 1)), "k.yaml")
	if err == nil || !strings.Contains(err.Error(), "socket_mod") {
		t.Fatalf("err = %v", err)
	}
	_, err = Parse([]byte(strings.Replace(good, "soft: {}", "hsm: {}", 1)), "k.yaml")
	if err == nil || !strings.Contains(err.Error(), "hsm") {
		t.Fatalf("err = %v", err)
	}
}

func TestRejects(t *testing.T) {
	cases := map[string]struct{ from, to, want string }{
		"abstract socket":   {"/run/keyd/keyd.sock", "\"@keyd\"", "abstract"},
		"bad duration":      {"max_lifetime: 5m", "max_lifetime: five", "not a duration"},
		"audience array":    {"audience: https://issuer.example.com", "audience: [https://issuer.example.com]", "line 18: cannot unmarshal !!seq into string"},
		"client_id on dpop": {"    allow: {uids: [1001], groups: [billing]}", "    client_id: x\n    allow: {uids: [1001], groups: [billing]}", "client_id: only for purpose client_assertion"},
		"rsa bits on ec":    {"    allow: {uids: [1001], groups: [billing]}", "    rsa_bits: 3072\n    allow: {uids: [1001], groups: [billing]}", "rsa_bits"},
		"uid past 32 bits":  {"    allow: {uids: [1001], groups: [billing]}", "    allow: {uids: [4294967296]}", "uids: 4294967296 is not a uid"},
		"gid past 32 bits":  {"    allow: {uids: [1001], groups: [billing]}", "    allow: {gids: [4294967295]}", "gids: 4294967295 is not a gid"},
		"no backend":        {"  soft: {}", "", "backend"},
		"empty":             {good, "", "empty"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := Parse([]byte(strings.Replace(good, tc.from, tc.to, 1)), "k.yaml")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want mention of %q", err, tc.want)
			}
		})
	}
}

func TestDefault(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	t.Setenv("XDG_STATE_HOME", "/home/u/.local/state")
	c, err := Default()
	if err != nil {
		t.Fatal(err)
	}
	if c.Socket != "/run/user/1000/keyd/keyd.sock" || c.StateDir != "/home/u/.local/state/keyd" || c.SocketMode != "0600" {
		t.Errorf("%+v", c)
	}
	if len(c.KeySets) != 1 || c.KeySets[0].Name != "dpop" || c.KeySets[0].Alg != "ES256" || c.Backend.Soft == nil {
		t.Errorf("%+v", c.KeySets)
	}
	if DefaultSocket() != c.Socket {
		t.Error("client default socket differs from the daemon's")
	}
}

func TestUnknownFieldReportedWithOtherProblems(t *testing.T) {
	bad := strings.Replace(good, "socket_mode: \"0660\"", "socket_mod: \"0660\"\nsocket_mode: \"0666\"", 1)
	_, err := Parse([]byte(bad), "k.yaml")
	if err == nil || !strings.Contains(err.Error(), "socket_mod not found") || !strings.Contains(err.Error(), "every user") {
		t.Fatalf("err = %v", err)
	}
}

func TestScheduleDefaultsAndRules(t *testing.T) {
	c, err := Parse([]byte(good), "k.yaml")
	if err != nil {
		t.Fatal(err)
	}
	d := c.KeySets[0].Schedule() // dpop
	if d.Period != 0 || d.Prepublish != 0 || d.Drain != time.Hour || d.Retain != 24*time.Hour {
		t.Errorf("dpop defaults %+v", d)
	}
	a := c.KeySets[1].Schedule() // client_assertion, max_lifetime 5m
	if a.Prepublish != 5*time.Minute || a.Drain != 5*time.Minute+60*time.Second+5*time.Minute {
		t.Errorf("assertion defaults %+v", a)
	}
	rks, err := c.KeySets[1].RotationKeySet()
	if err != nil || !rks.Prepublish || rks.Schedule != a {
		t.Errorf("rotation key set %+v %v", rks, err)
	}

	with := func(keyset int, extra string) error {
		lines := strings.Split(good, "\n")
		var out []string
		n := -1
		for _, l := range lines {
			if strings.HasPrefix(l, "  - name:") {
				n++
			}
			out = append(out, l)
			if n == keyset && strings.HasPrefix(l, "  - name:") {
				out = append(out, "    "+extra)
			}
		}
		_, err := Parse([]byte(strings.Join(out, "\n")), "k.yaml")
		return err
	}
	cases := []struct {
		keyset int
		extra  string
		want   string // "" = accepted
	}{
		{0, "rotation: {period: 24h}", ""},
		{0, "rotation: {period: 24h, drain: 30m}", "must cover token_lifetime (1h0m0s)"},
		{0, "token_lifetime: 10m\n    rotation: {period: 1h, drain: 10m}", ""},
		{1, "rotation: {period: 24h}", ""},
		{1, "rotation: {period: 24h, prepublish: 1m}", "must cover jwks_cache (5m0s)"},
		{1, "jwks_cache: 30s\n    rotation: {period: 10m, prepublish: 30s, drain: 6m}", ""},
		{1, "rotation: {period: 24h, drain: 2m}", "must cover max_lifetime + iat_skew (6m0s)"},
		{1, "rotation: {period: 4m}", "must be shorter than rotation.period"},
		{1, "rotation: {prepublish: 10m}", "rotation.period: required"},
		{1, "token_lifetime: 1h", "token_lifetime: only for purpose dpop"},
		// retain 0 would never destroy an unpublished key (no DestroyAt).
		{0, "rotation: {period: 24h, retain: 0s}", "rotation.retain: must be positive"},
		{1, "rotation: {period: 24h, retain: 1s}", ""},
		// A period much shorter than the drain piles keys up: one new key
		// per period, each published for drain.
		{0, "rotation: {period: 1ms}", "3600001 keys would be published at once"},
		{0, "rotation: {period: 1m}", "61 keys would be published at once, at most 32"},
		{0, "rotation: {period: 5m}", ""}, // 13 keys: five-minute keys for one-hour tokens
		{0, "token_lifetime: 10m\n    rotation: {period: 2m, drain: 10m}", ""},
		{1, "jwks_cache: 1s\n    iat_skew: 2s\n    rotation: {period: 3m, prepublish: 2s, drain: 8m, retain: 1s}", ""},
	}
	for _, tc := range cases {
		err := with(tc.keyset, tc.extra)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%q: %v", tc.extra, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%q: err = %v, want %q", tc.extra, err, tc.want)
		}
	}
}

// FuzzParse: any file is either a valid configuration or an error, never a
// panic; a valid one passes Validate again.
func FuzzParse(f *testing.F) {
	f.Add([]byte(good))
	f.Add([]byte(strings.Replace(good, "soft: {}", "tpm: {address: \"tcp://127.0.0.1:2321\"}", 1)))
	f.Add([]byte(strings.Replace(good, "soft: {}", "pkcs11: {module: /x.so, uri: \"pkcs11:token=a\", pin_env: P}", 1)))
	f.Add([]byte("keysets: [{name: a, rotation: {period: 1h, drain: -1s}}]"))
	f.Add([]byte("tcp: {listen: ':1'}\nhttp: {listen: x}\nlimits: {sign_rate: -1}"))
	f.Add([]byte("{"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Parse(b, "fuzz.yaml")
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("parsed but invalid: %v", err)
		}
		for _, ks := range c.KeySets {
			if _, err := ks.RotationKeySet(); err != nil {
				t.Fatalf("valid key set without a lifecycle: %v", err)
			}
		}
	})
}

// backend.pkcs11.session_copies: on unless set to false.
func TestPKCS11SessionCopies(t *testing.T) {
	t.Setenv("KEYD_TEST_PIN", "1234")
	for _, tc := range []struct {
		line string
		off  bool
	}{{"", false}, {"session_copies: true", false}, {"session_copies: false", true}} {
		y := strings.Replace(good, "soft: {}", "pkcs11: {module: /x.so, uri: \"pkcs11:token=a\", pin_env: KEYD_TEST_PIN"+
			map[bool]string{true: ", " + tc.line, false: ""}[tc.line != ""]+"}", 1)
		c, err := Parse([]byte(y), "keyd.yaml")
		if err != nil {
			t.Fatalf("%q: %v", tc.line, err)
		}
		p, err := c.PKCS11Config()
		if err != nil {
			t.Fatalf("%q: %v", tc.line, err)
		}
		if p.NoSessionCopies != tc.off {
			t.Errorf("%q: NoSessionCopies = %v; want %v", tc.line, p.NoSessionCopies, tc.off)
		}
	}
}

// A listen address whose port no listener can bind is a configuration
// error that check-config reports, not a surprise at start.
func TestListenPort(t *testing.T) {
	base := "socket: /run/keyd/keyd.sock\nstate_dir: /var/lib/keyd\nbackend: {soft: {}}\n" +
		"keysets: [{name: d, purpose: dpop, alg: ES256, allow: {uids: [0]}}]\n"
	for _, tc := range []struct{ extra, want string }{
		{`http: {listen: "127.0.0.1:99999"}`, `http.listen: "127.0.0.1:99999": want host:port`},
		{`http: {listen: "127.0.0.1:-1"}`, `http.listen: "127.0.0.1:-1": want host:port`},
		{`http: {listen: "127.0.0.1:nosuchservice"}`, `http.listen: "127.0.0.1:nosuchservice": want host:port`},
		{"tcp: {listen: \"0.0.0.0:70000\", cert_file: /c, key_file: /k, client_ca_file: /ca}", `tcp.listen: "0.0.0.0:70000": want host:port`},
	} {
		_, err := Parse([]byte(base+tc.extra), "keyd.yaml")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v; want one saying %s", tc.extra, err, tc.want)
		}
	}
	for _, ok := range []string{`http: {listen: "127.0.0.1:8089"}`, `http: {listen: ":0"}`, `http: {listen: "[::1]:65535"}`} {
		if _, err := Parse([]byte(base+ok), "keyd.yaml"); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}

// pin_env names a variable; a PIN written there by mistake is refused
// without being quoted, since configuration errors are printed and logged.
func TestPINEnvIsAName(t *testing.T) {
	const cfg = "socket: /run/keyd/keyd.sock\nstate_dir: /var/lib/keyd\n" +
		"backend: {pkcs11: {module: /usr/lib/softhsm/libsofthsm2.so, uri: \"pkcs11:token=keyd\", pin_env: %s}}\n" +
		"keysets: [{name: d, purpose: dpop, alg: ES256, allow: {uids: [0]}}]\n"
	for _, pin := range []string{`"20240611"`, `"9 9 9 9"`, `"s3cr=t"`} {
		_, err := Parse([]byte(strings.Replace(cfg, "%s", pin, 1)), "keyd.yaml")
		if err == nil || !strings.Contains(err.Error(), "backend.pkcs11.pin_env:") || strings.Contains(err.Error(), strings.Trim(pin, `"`)) {
			t.Errorf("pin_env: %s: err = %v; want an error naming backend.pkcs11.pin_env that does not quote the value", pin, err)
		}
	}
	if _, err := Parse([]byte(strings.Replace(cfg, "%s", "KEYD_PKCS11_PIN", 1)), "keyd.yaml"); err != nil {
		t.Errorf("pin_env: KEYD_PKCS11_PIN: %v", err)
	}
}

// A bad duration is reported with the file's other problems, and a day
// written as "1d" (which Go durations lack) gets a hint.
func TestBadDurationWithOtherProblems(t *testing.T) {
	bad := "socket: /run/keyd/keyd.sock\nsocket_mode: \"0666\"\nstate_dir: /var/lib/keyd\nbackend: {soft: {}}\n" +
		"keysets: [{name: d, purpose: dpop, alg: ES256, allow: {uids: [0]}, rotation: {period: 1d}}]\n"
	_, err := Parse([]byte(bad), "keyd.yaml")
	if err == nil {
		t.Fatal("accepted")
	}
	for _, want := range []string{`line 5, column 87: "1d" is not a duration`, "24h", `socket_mode: "0666" gives access`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %s", err, want)
		}
	}
}

func TestPKCS11OpenTimeout(t *testing.T) {
	const cfg = "socket: /run/keyd/keyd.sock\nstate_dir: /var/lib/keyd\n" +
		"backend: {pkcs11: {module: /usr/lib/softhsm/libsofthsm2.so, uri: \"pkcs11:token=keyd\", pin_env: KEYD_PIN%s}}\n" +
		"keysets: [{name: d, purpose: dpop, alg: ES256, allow: {uids: [0]}}]\n"
	for extra, want := range map[string]time.Duration{"": DefaultPKCS11OpenTimeout, ", open_timeout: 5s": 5 * time.Second} {
		c, err := Parse([]byte(strings.Replace(cfg, "%s", extra, 1)), "keyd.yaml")
		if err != nil {
			t.Fatalf("%q: %v", extra, err)
		}
		if got := c.PKCS11OpenTimeout(); got != want {
			t.Errorf("%q: open timeout %v, want %v", extra, got, want)
		}
	}
	if _, err := Parse([]byte(strings.Replace(cfg, "%s", ", open_timeout: -1s", 1)), "keyd.yaml"); err == nil || !strings.Contains(err.Error(), "backend.pkcs11.open_timeout: must not be negative") {
		t.Errorf("negative open_timeout: %v", err)
	}
}

// A second YAML document is refused, not silently ignored with its
// settings; an empty one after a trailing "---" is harmless.
func TestSecondDocumentIsAnError(t *testing.T) {
	_, err := Parse([]byte(good+"---\nbackend: {pkcs11: {module: /usr/lib/x.so}}\n"), "keyd.yaml")
	if err == nil || !strings.Contains(err.Error(), "a second YAML document") {
		t.Errorf("a second document: %v, want it refused", err)
	}
	if _, err := Parse([]byte(good+"---\n"), "keyd.yaml"); err != nil {
		t.Errorf("an empty second document: %v", err)
	}
}

// TPM 2.0 has no Ed25519: check-config must refuse what serve would.
func TestEdDSAOnTPMIsAnError(t *testing.T) {
	in := "socket: /run/keyd/keyd.sock\nstate_dir: /var/lib/keyd\nbackend: {tpm: {address: \"tcp://127.0.0.1:2321\"}}\n" +
		"keysets:\n  - {name: j, purpose: jwt, issuers: [\"https://op.example\"], alg: EdDSA, allow: {uids: [1]}}\n"
	_, err := Parse([]byte(in), "keyd.yaml")
	if err == nil || !strings.Contains(err.Error(), "keysets[0] (j).alg: EdDSA: the tpm backend cannot make EdDSA keys") {
		t.Errorf("EdDSA on tpm: %v, want it refused", err)
	}
	if _, err := Parse([]byte(strings.Replace(in, "{tpm: {address: \"tcp://127.0.0.1:2321\"}}", "{soft: {}}", 1)), "keyd.yaml"); err != nil {
		t.Errorf("EdDSA on soft: %v", err)
	}
}

// check-config refuses the PKCS#11 settings that the backend refuses at
// start: a URI that names no token, and a session pool past its limit.
func TestPKCS11SettingsServeRefuses(t *testing.T) {
	const base = "socket: /run/keyd/keyd.sock\nstate_dir: /var/lib/keyd\nkeysets: [{name: d, purpose: dpop, alg: ES256, allow: {uids: [1]}}]\n" +
		"backend: {pkcs11: {module: /usr/lib/softhsm/libsofthsm2.so, pin_env: PIN, "
	for in, want := range map[string]string{
		`uri: "pkcs11:model=SoftHSM%20v2"}}`:            "backend.pkcs11.uri: \"pkcs11:model=SoftHSM%20v2\": name the token with token=, serial= or slot-id=",
		`uri: "pkcs11:token=keyd", max_sessions: 257}}`: "backend.pkcs11.max_sessions: 257: want 0 (automatic) to 256",
		`uri: "pkcs11:token=keyd", max_sessions: -1}}`:  "backend.pkcs11.max_sessions: -1: want 0 (automatic) to 256",
	} {
		if _, err := Parse([]byte(base+in+"\n"), "keyd.yaml"); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %s", in, err, want)
		}
	}
	for _, in := range []string{`uri: "pkcs11:slot-id=0", max_sessions: 256}}`, `uri: "pkcs11:serial=abc"}}`} {
		if _, err := Parse([]byte(base+in+"\n"), "keyd.yaml"); err != nil {
			t.Errorf("%s: %v", in, err)
		}
	}
}

// A malformed mTLS identity is an error of the file: Parse (so check-config,
// and serve with exit status 78) refuses it, as the daemon would at start.
func TestBadIdentityIsAnError(t *testing.T) {
	in := "socket: /run/keyd/keyd.sock\nstate_dir: /var/lib/keyd\nbackend: {soft: {}}\n" +
		"tcp: {listen: \"127.0.0.1:7443\", cert_file: /c.pem, key_file: /k.pem, client_ca_file: /ca.pem}\n" +
		"keysets:\n  - {name: d, purpose: dpop, alg: ES256, allow: {identities: [\"spiffe://example.org/*/billing\"]}}\n"
	_, err := Parse([]byte(in), "keyd.yaml")
	if err == nil || !strings.Contains(err.Error(), `keysets[0] (d): allow: identities: identity "spiffe://example.org/*/billing": the only wildcard is a trailing /*`) {
		t.Errorf("bad identity: %v, want it refused", err)
	}
	if _, err := Parse([]byte(strings.Replace(in, "*/billing", "billing/*", 1)), "keyd.yaml"); err != nil {
		t.Errorf("good identity: %v", err)
	}
}

// A file that is not a configuration (a device that never ends, a log)
// is refused after 1 MiB instead of read until memory runs out.
func TestLoadRefusesHugeFiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "huge.yaml")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(1<<20 + 1); err != nil { // sparse
		t.Fatal(err)
	}
	f.Close()
	if _, err := Load(path); err == nil || !strings.Contains(err.Error(), "longer than 1024 KiB") {
		t.Errorf("Load of a 1 MiB + 1 byte file = %v; want it refused as too long", err)
	}
}

// http.listen and tcp.listen on one port would fail serve's second bind:
// check-config says so.
func TestHTTPAndTCPListenApart(t *testing.T) {
	base := "socket: /run/keyd/keyd.sock\nstate_dir: /var/lib/keyd\nbackend: {soft: {}}\n" +
		"keysets: [{name: d, purpose: dpop, alg: ES256, allow: {uids: [0]}}]\n" +
		"tcp: {listen: %q, cert_file: /c, key_file: /k, client_ca_file: /ca}\nhttp: {listen: %q}\n"
	for _, tc := range []struct {
		tcp, http string
		clash     bool
	}{
		{"127.0.0.1:7443", "127.0.0.1:7443", true},
		{"0.0.0.0:7443", "127.0.0.1:7443", true},
		{":7443", "[::1]:7443", true},
		{"127.0.0.1:7443", "127.0.0.1:8089", false},
		{"127.0.0.1:7443", "127.0.0.2:7443", false},
		{"127.0.0.1:0", "127.0.0.1:0", false},
	} {
		_, err := Parse(fmt.Appendf(nil, base, tc.tcp, tc.http), "keyd.yaml")
		got := err != nil && strings.Contains(err.Error(), "the same port as tcp.listen")
		if got != tc.clash {
			t.Errorf("tcp %s, http %s: err = %v; want a clash: %v", tc.tcp, tc.http, err, tc.clash)
		}
	}
}

// A key set only mutual-TLS callers may use needs the mutual-TLS
// listener: without tcp nobody could sign with it.
func TestIdentitiesOnlyNeedTCP(t *testing.T) {
	const base = "socket: /run/keyd/keyd.sock\nstate_dir: /var/lib/keyd\nbackend: {soft: {}}\n"
	const set = "keysets: [{name: d, purpose: dpop, alg: ES256, allow: %s}]\n"
	_, err := Parse([]byte(base+fmt.Sprintf(set, "{identities: [\"spiffe://example.org/billing\"]}")), "k.yaml")
	if err == nil || !strings.Contains(err.Error(), "nobody could use this key set") {
		t.Errorf("identities only, no tcp: %v, want refused", err)
	}
	if _, err := Parse([]byte(base+fmt.Sprintf(set, "{identities: [\"spiffe://example.org/billing\"], uids: [1001]}")), "k.yaml"); err != nil {
		t.Errorf("identities and a uid, no tcp: %v", err)
	}
}
