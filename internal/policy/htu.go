package policy

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
)

// MaxHTULength is the longest htu, in bytes, keyd signs.
const MaxHTULength = 2048

// NormalizeHTU turns the URL of an HTTP request into the htu of a DPoP proof
// for it (RFC 9449 §4.2: the URI without query and fragment), in the form
// servers compare against (RFC 3986 §6.2.2 and §6.2.3):
//
//   - the scheme (http or https) and the host are lowercased;
//   - the default port (:80 for http, :443 for https) is removed, other ports
//     lose leading zeros;
//   - userinfo, query and fragment are dropped;
//   - an empty path becomes "/"; the path is otherwise kept as escaped, with
//     characters that must be escaped (non-ASCII ones, for example)
//     percent-encoded, and dot segments are left alone.
//
// It returns an error for a relative URL, another scheme, a missing or
// malformed host (a non-ASCII host must be given in its xn-- form), an invalid
// port, an input or result longer than MaxHTULength bytes, and any space or
// control character. The result is a fixed point: NormalizeHTU(out) == out,
// and the policy accepts it as a dpop htu.
func NormalizeHTU(raw string) (string, error) {
	if len(raw) > MaxHTULength {
		return "", fmt.Errorf("htu: URL is %d bytes; at most %d are allowed", len(raw), MaxHTULength)
	}
	if i, ok := findSpaceOrControl(raw); ok {
		return "", fmt.Errorf("htu: URL contains %s at byte %d", describeByte(raw[i]), i)
	}
	if i := strings.IndexByte(raw, '\\'); i >= 0 {
		// No URI has one (RFC 3986); URL parsers that take it anyway
		// disagree: a path separator to a browser's (so the host is
		// what comes before it), part of the userinfo to curl's.
		return "", fmt.Errorf("htu: URL contains a backslash at byte %d, which URL parsers read differently; percent-encode it as %%5C", i)
	}
	s, _, _ := strings.Cut(raw, "#")
	s, _, _ = strings.Cut(s, "?")
	scheme, authority, path, reason := splitHTU(s)
	if reason != "" {
		return "", errors.New("htu: URL " + reason)
	}
	if at := strings.LastIndexByte(authority, '@'); at >= 0 {
		authority = authority[at+1:]
	}
	hostport, reason := normHostPort(scheme, authority)
	if reason != "" {
		return "", errors.New("htu: URL " + reason)
	}
	u, err := url.Parse(scheme + "://" + hostport + path)
	if err != nil {
		return "", fmt.Errorf("htu: URL path is not valid: %s", urlErr(err))
	}
	p := u.EscapedPath()
	if p == "" {
		p = "/"
	}
	out := scheme + "://" + hostport + p
	if len(out) > MaxHTULength {
		return "", fmt.Errorf("htu: URL is %d bytes once normalized; at most %d are allowed", len(out), MaxHTULength)
	}
	return out, nil
}

// checkHTU returns why raw is not acceptable as the htu claim of a DPoP
// proof, or "" when it is. Unlike NormalizeHTU it drops nothing: the htu must
// already be free of userinfo, query and fragment.
func checkHTU(raw string) string {
	if len(raw) > MaxHTULength {
		return fmt.Sprintf("is %d bytes; at most %d are allowed", len(raw), MaxHTULength)
	}
	if i, ok := findSpaceOrControl(raw); ok {
		return fmt.Sprintf("must not contain whitespace or control characters (%s at byte %d)", describeByte(raw[i]), i)
	}
	for i := 0; i < len(raw); i++ {
		if raw[i] >= 0x80 {
			return fmt.Sprintf("must be ASCII (a non-ASCII byte at %d); percent-encode the path, use the xn-- form of the host", i)
		}
	}
	if i := strings.IndexByte(raw, '#'); i >= 0 {
		return `must not have a fragment (the "#" and what follows): the htu is the request URI without query and fragment`
	}
	if i := strings.IndexByte(raw, '?'); i >= 0 {
		return `must not have a query (the "?" and what follows): the htu is the request URI without query and fragment`
	}
	if i := strings.IndexByte(raw, '\\'); i >= 0 {
		return fmt.Sprintf("must not contain a backslash (byte %d), which URL parsers read differently; percent-encode it as %%5C", i)
	}
	scheme, authority, _, reason := splitHTU(raw)
	if reason != "" {
		return reason
	}
	if strings.ContainsRune(authority, '@') {
		return `must not have userinfo (the "user@" before the host)`
	}
	if _, reason := normHostPort(scheme, authority); reason != "" {
		return reason
	}
	if _, err := url.Parse(raw); err != nil {
		return "is not a valid URI: " + urlErr(err)
	}
	return ""
}

// splitHTU splits s (which has no query or fragment) into its lowercased
// scheme, its authority and its path.
func splitHTU(s string) (scheme, authority, path, reason string) {
	const want = "must be an absolute http or https URI (like https://server.example/token)"
	i := strings.IndexByte(s, ':')
	if i <= 0 {
		return "", "", "", want
	}
	scheme = strings.ToLower(s[:i])
	if scheme != "http" && scheme != "https" {
		return "", "", "", want
	}
	rest, ok := strings.CutPrefix(s[i+1:], "//")
	if !ok {
		return "", "", "", want
	}
	authority, path = rest, ""
	if j := strings.IndexByte(rest, '/'); j >= 0 {
		authority, path = rest[:j], rest[j:]
	}
	return scheme, authority, path, ""
}

// normHostPort checks authority (without userinfo) and returns it normalized:
// lowercase host, no default port, no leading zeros in the port.
func normHostPort(scheme, authority string) (string, string) {
	if authority == "" {
		return "", "must have a host"
	}
	for i := 0; i < len(authority); i++ {
		if c := authority[i]; c >= 0x80 {
			return "", "must have an ASCII host (use the xn-- form of an internationalized name)"
		}
	}
	if strings.ContainsRune(authority, '%') {
		return "", "must not have a percent-encoded host or an IPv6 zone"
	}
	var host, port string
	if strings.HasPrefix(authority, "[") {
		end := strings.IndexByte(authority, ']')
		if end < 0 {
			return "", "has an IPv6 host without its closing ]"
		}
		ip := authority[1:end]
		if !strings.Contains(ip, ":") || net.ParseIP(ip) == nil {
			return "", fmt.Sprintf("has an invalid IPv6 host %q", ip)
		}
		host = "[" + strings.ToLower(ip) + "]"
		rest := authority[end+1:]
		if rest != "" {
			p, ok := strings.CutPrefix(rest, ":")
			if !ok {
				return "", "has characters after its IPv6 host that are not a port"
			}
			port = p
		}
	} else {
		h, p, _ := strings.Cut(authority, ":")
		if h == "" {
			return "", "must have a host"
		}
		for i := 0; i < len(h); i++ {
			if !isHostChar(h[i]) {
				return "", fmt.Sprintf("has a host with a character not allowed in a host name: %q", h[i])
			}
		}
		host, port = strings.ToLower(h), p
	}
	if port == "" {
		return host, ""
	}
	n := 0
	for i := 0; i < len(port); i++ {
		c := port[i]
		if c < '0' || c > '9' || n > 65535 {
			return "", fmt.Sprintf("has an invalid port %q", port)
		}
		n = n*10 + int(c-'0')
	}
	if n == 0 || n > 65535 {
		return "", fmt.Sprintf("has an invalid port %q", port)
	}
	if (scheme == "http" && n == 80) || (scheme == "https" && n == 443) {
		return host, ""
	}
	return host + ":" + strconv.Itoa(n), ""
}

func isHostChar(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '-' || c == '.' || c == '_' || c == '~'
}

func findSpaceOrControl(s string) (int, bool) {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] == 0x7f {
			return i, true
		}
	}
	return 0, false
}

func describeByte(c byte) string {
	if c == ' ' {
		return "a space"
	}
	return fmt.Sprintf("a control character 0x%02x", c)
}

func urlErr(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err.Error()
	}
	return err.Error()
}
