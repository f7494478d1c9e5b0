package policy

import (
	"strings"
	"testing"
)

func TestNormalizeHTU(t *testing.T) {
	for _, tc := range []struct {
		in, want string
	}{
		{"HTTPS://Server.Example.COM:443/token?x=1#f", "https://server.example.com/token"},
		{"http://a.example:8080", "http://a.example:8080/"},
		{"http://a.example:80/x", "http://a.example/x"},
		{"https://a.example:80/x", "https://a.example:80/x"},
		{"http://a.example:443/x", "http://a.example:443/x"},
		{"https://a.example:0443/x", "https://a.example/x"},
		{"https://a.example:08080/x", "https://a.example:8080/x"},
		{"https://a.example:/x", "https://a.example/x"},
		{"https://user:pass@a.example/x", "https://a.example/x"},
		{"https://user@a.example@b.example/x", "https://b.example/x"},
		{"https://a.example?q", "https://a.example/"},
		{"https://a.example#f", "https://a.example/"},
		{"https://a.example/x?y#z", "https://a.example/x"},
		{"https://a.example/x#y?z", "https://a.example/x"},
		{"https://a.example/Path/Keeps/Case", "https://a.example/Path/Keeps/Case"},
		{"https://a.example/a%2Fb/%7e", "https://a.example/a%2Fb/%7e"},
		{"https://a.example/é", "https://a.example/%C3%A9"},
		{"https://a.example/./a/../b", "https://a.example/./a/../b"},
		{"https://a.example//x", "https://a.example//x"},
		{"http://[::1]:8080/x", "http://[::1]:8080/x"},
		{"http://[FE80::1]/x", "http://[fe80::1]/x"},
		{"https://[::1]:443", "https://[::1]/"},
		{"https://127.0.0.1:8443/token", "https://127.0.0.1:8443/token"},
		{"https://a.example/x?%zz", "https://a.example/x"},
		{"https://%zz@a.example/x", "https://a.example/x"},
	} {
		got, err := NormalizeHTU(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("NormalizeHTU(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
			continue
		}
		if again, err := NormalizeHTU(got); err != nil || again != got {
			t.Errorf("NormalizeHTU(%q) = %q, %v; not a fixed point", got, again, err)
		}
		if reason := checkHTU(got); reason != "" {
			t.Errorf("policy refuses NormalizeHTU(%q) = %q: %s", tc.in, got, reason)
		}
	}
	// A caller's own htu claim is held to the same: no backslash.
	for _, raw := range []string{`https://a.example/x\y`, `https://a.example\x/`} {
		if reason := checkHTU(raw); !strings.Contains(reason, "backslash") {
			t.Errorf("checkHTU(%q) = %q, want a backslash refused", raw, reason)
		}
	}
	for _, tc := range []struct {
		in, want string // want: a substring of the error
	}{
		{"ftp://x", "absolute http or https"},
		{"/relative", "absolute http or https"},
		{"relative/path", "absolute http or https"},
		{"//a.example/x", "absolute http or https"},
		{"https:a.example/x", "absolute http or https"},
		{"mailto:a@b.example", "absolute http or https"},
		{"", "absolute http or https"},
		{"https://", "must have a host"},
		{"https:///x", "must have a host"},
		{"https://user@/x", "must have a host"},
		{"https://:443/x", "must have a host"},
		{"https://a.example:99999/", "invalid port"},
		{"https://a.example:0/", "invalid port"},
		{"https://a.example:8o/", "invalid port"},
		{"https://a.example:1:2/", "invalid port"},
		{"https://bücher.example/", "ASCII host"},
		{"https://a%2eexample/", "percent-encoded host"},
		{"https://a!b/", "not allowed in a host name"},
		{"https://[::1/", "closing ]"},
		{"https://[1.2.3.4]/", "invalid IPv6"},
		{"https://[fe80::1%25en0]/", "percent-encoded host or an IPv6 zone"},
		{"https://[::1]x/", "not a port"},
		{"https://a.example/%zz", "path is not valid"},
		// A browser's URL parser (Node's) reads a backslash as a path
		// separator, curl and Python as part of the userinfo: the two
		// would disagree on the host the proof is for.
		{`https://good.example\@evil.example/x`, "backslash"},
		{`https://a.example\x/`, "backslash"},
		{`https://a.example/x\y`, "backslash"},
		{"https://a.example/a b", "a space at byte 19"},
		{"https://a.example/\tb", "control character 0x09"},
		{"https://a.example/\x7f", "control character 0x7f"},
		{" https://a.example/", "a space at byte 0"},
		{"https://a.example/" + strings.Repeat("a", 2048), "at most 2048"},
		{"https://a.example/" + strings.Repeat("é", 1000), "once normalized"},
	} {
		got, err := NormalizeHTU(tc.in)
		if err == nil {
			t.Errorf("NormalizeHTU(%q) = %q, want an error", tc.in, got)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NormalizeHTU(%q): %v, want %q", tc.in, err, tc.want)
		}
	}
}
