package config

import (
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
