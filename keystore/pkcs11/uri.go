package pkcs11

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// URI is the part of an RFC 7512 PKCS#11 URI keyd uses: which token to open.
// Empty fields match anything; at least one of Token, Serial and SlotID is
// required by New.
type URI struct {
	Token        string // token=, the token label (CK_TOKEN_INFO.label)
	Manufacturer string // manufacturer=, CK_TOKEN_INFO.manufacturerID
	Serial       string // serial=, CK_TOKEN_INFO.serialNumber
	Model        string // model=, CK_TOKEN_INFO.model
	SlotID       uint   // slot-id=, when HasSlotID
	HasSlotID    bool

	// Ignored lists the attributes that were accepted but play no part:
	// object=, id= and type= (keyd chooses its own objects) and vendor
	// attributes (x-…). New logs them.
	Ignored []string
}

// Limits of the CK_TOKEN_INFO fields a URI value is compared with: a longer
// value can never match.
const (
	maxLabel  = 32
	maxManuf  = 32
	maxSerial = 16
	maxModel  = 16
)

// ParseURI parses a PKCS#11 URI (RFC 7512) such as "pkcs11:token=keyd" or
// "pkcs11:serial=2a2794af3b184258;manufacturer=SoftHSM%20project".
//
// Path attributes token, manufacturer, serial, model and slot-id select the
// token; object, id, type and vendor attributes (x-…) are ignored. Values
// are percent-decoded; characters outside RFC 7512's set must be
// percent-encoded (a space is %20). Attributes may not repeat or be empty.
// The library-* and slot-description/slot-manufacturer attributes are
// refused, as are the query attributes pin-value and pin-source (the PIN
// comes from pin_file or an environment variable, never from the URI) and
// module-name and module-path (the module is configured on its own).
func ParseURI(s string) (URI, error) {
	var u URI
	// A PIN anywhere in the URI — in the query as RFC 7512 has it, in the
	// path by mistake, in any case (ABNF names are case-insensitive), even
	// percent-encoded — is refused before anything can quote the URI:
	// errors about the path quote all of it.
	if l := strings.ToLower(s); strings.Contains(l, "pin-value") || strings.Contains(l, "pin%2dvalue") {
		return u, errors.New("PKCS#11 URI: pin-value is refused: put the PIN in pin_file (or an environment variable), never in the URI")
	}
	const scheme = "pkcs11:"
	if len(s) < len(scheme) || !strings.EqualFold(s[:len(scheme)], scheme) {
		return u, fmt.Errorf("PKCS#11 URI %q: want one starting with %q, such as pkcs11:token=keyd", clip(noQuery(s)), scheme)
	}
	rest := s[len(scheme):]
	path, query, hasQuery := strings.Cut(rest, "?")
	// Errors show the URI without its query, which may hold a PIN.
	shown := s[:len(scheme)] + path
	if hasQuery {
		shown += "?…"
	}
	seen := map[string]bool{}
	if path != "" {
		for _, attr := range strings.Split(path, ";") {
			// A PIN put in the path by mistake is refused before
			// anything quotes the URI.
			if strings.HasPrefix(attr, "pin-value") || strings.HasPrefix(attr, "pin-source") {
				return URI{}, errors.New("PKCS#11 URI: a PIN is refused in the URI: put the PIN in pin_file (or an environment variable), never in the URI")
			}
			name, value, err := splitAttr(attr, false)
			if err != nil {
				return URI{}, fmt.Errorf("PKCS#11 URI %q: %w", clip(shown), err)
			}
			if seen[name] {
				return URI{}, fmt.Errorf("PKCS#11 URI %q: attribute %s appears twice", clip(shown), name)
			}
			seen[name] = true
			if err := u.setPath(name, value); err != nil {
				return URI{}, fmt.Errorf("PKCS#11 URI %q: %w", clip(shown), err)
			}
		}
	}
	if hasQuery && query != "" {
		for _, attr := range strings.Split(query, "&") {
			// Refuse a PIN before looking at its value, so no error
			// message can quote it.
			if strings.HasPrefix(attr, "pin-value") {
				return URI{}, errors.New("PKCS#11 URI: pin-value is refused: put the PIN in pin_file (or an environment variable), never in the URI")
			}
			name, _, err := splitAttr(attr, true)
			if err != nil {
				return URI{}, fmt.Errorf("PKCS#11 URI %q: %w", clip(shown), err)
			}
			if seen["?"+name] {
				return URI{}, fmt.Errorf("PKCS#11 URI %q: a query attribute appears twice", clip(shown))
			}
			seen["?"+name] = true
			switch {
			case name == "pin-source":
				return URI{}, errors.New("PKCS#11 URI: pin-source is refused: put the PIN in pin_file (or an environment variable)")
			case name == "module-name" || name == "module-path":
				return URI{}, fmt.Errorf("PKCS#11 URI: %s is refused: set the module path in the configuration's module field", name)
			case strings.HasPrefix(name, "x-"):
				u.Ignored = append(u.Ignored, "?"+name)
			default:
				return URI{}, fmt.Errorf("PKCS#11 URI %q: unknown query attribute (keyd accepts only vendor x-… ones)", clip(shown))
			}
		}
	}
	return u, nil
}

func (u *URI) setPath(name, value string) error {
	if value == "" {
		return fmt.Errorf("attribute %s is empty", name)
	}
	limit := func(max int) error {
		if len(value) > max {
			return fmt.Errorf("%s is %d bytes; a token's %s has at most %d, so it can never match", name, len(value), name, max)
		}
		return nil
	}
	switch name {
	case "token":
		u.Token = value
		return limit(maxLabel)
	case "manufacturer":
		u.Manufacturer = value
		return limit(maxManuf)
	case "serial":
		u.Serial = value
		return limit(maxSerial)
	case "model":
		u.Model = value
		return limit(maxModel)
	case "slot-id":
		if strings.Trim(value, "0123456789") != "" {
			return fmt.Errorf("slot-id %q: want a decimal number", value)
		}
		n, err := strconv.ParseUint(value, 10, 64)
		if err != nil || uint64(uint(n)) != n {
			return fmt.Errorf("slot-id %q: out of range", value)
		}
		u.SlotID, u.HasSlotID = uint(n), true
		return nil
	case "object", "id", "type":
		u.Ignored = append(u.Ignored, name)
		return nil
	case "library-manufacturer", "library-description", "library-version", "slot-description", "slot-manufacturer":
		return fmt.Errorf("attribute %s is not supported: select the token with token=, serial=, manufacturer=, model= or slot-id=", name)
	}
	if strings.HasPrefix(name, "x-") {
		u.Ignored = append(u.Ignored, name)
		return nil
	}
	return fmt.Errorf("unknown path attribute %s", name)
}

// splitAttr splits "name=value", checks the name and the characters of the
// value, and percent-decodes the value. Errors about a query attribute quote
// nothing of it: the query is where a PIN would be.
func splitAttr(attr string, query bool) (name, value string, err error) {
	name, raw, ok := strings.Cut(attr, "=")
	switch {
	case !ok && attr == "":
		return "", "", errors.New("empty attribute (a stray ; or &)")
	case !ok && query:
		return "", "", errors.New("a query attribute has no '='")
	case !ok:
		return "", "", fmt.Errorf("attribute %q has no '='", clip(attr))
	case name == "":
		return "", "", errors.New("attribute with no name")
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			if query {
				return "", "", errors.New("a query attribute name has an invalid character")
			}
			return "", "", fmt.Errorf("attribute name %q: invalid character %q", clip(name), c)
		}
	}
	value, err = pctDecode(raw, query)
	if err != nil {
		if query {
			return "", "", errors.New("a query attribute value has a character that must be percent-encoded, or bad percent-encoding")
		}
		return "", "", fmt.Errorf("attribute %s: %w", name, err)
	}
	return name, value, nil
}

// pctDecode decodes an RFC 7512 value. Path values may use unreserved
// characters, ":[]@!$'()*+,=" and "&"; query values the same with "/?|"
// instead of "&"; anything else must be percent-encoded.
func pctDecode(s string, query bool) (string, error) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '%':
			if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
				return "", fmt.Errorf("bad percent-encoding at byte %d", i)
			}
			b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
			i += 2
		case isUnreserved(c) || strings.IndexByte(":[]@!$'()*+,=", c) >= 0:
			b.WriteByte(c)
		case !query && c == '&', query && (c == '/' || c == '?' || c == '|'):
			b.WriteByte(c)
		default:
			return "", fmt.Errorf("character %q must be percent-encoded (%%%02X)", c, c)
		}
	}
	return b.String(), nil
}

func isUnreserved(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~'
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c >= 'a':
		return c - 'a' + 10
	case c >= 'A':
		return c - 'A' + 10
	}
	return c - '0'
}

// String returns the URI in canonical form: the selecting attributes in a
// fixed order, everything but unreserved characters percent-encoded. Ignored
// attributes are left out.
func (u URI) String() string {
	var parts []string
	add := func(name, v string) {
		if v != "" {
			parts = append(parts, name+"="+pctEncode(v))
		}
	}
	add("token", u.Token)
	add("manufacturer", u.Manufacturer)
	add("serial", u.Serial)
	add("model", u.Model)
	if u.HasSlotID {
		parts = append(parts, "slot-id="+strconv.FormatUint(uint64(u.SlotID), 10))
	}
	return "pkcs11:" + strings.Join(parts, ";")
}

func pctEncode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if isUnreserved(c) {
			b.WriteByte(c)
			continue
		}
		fmt.Fprintf(&b, "%%%02X", c)
	}
	return b.String()
}

// selects reports whether u names a token by something that identifies one:
// its label, serial number or slot.
func (u URI) selects() bool { return u.Token != "" || u.Serial != "" || u.HasSlotID }

// noQuery returns s without a query part, which may hold a PIN.
func noQuery(s string) string {
	if i := strings.IndexByte(s, '?'); i >= 0 {
		return s[:i] + "?…"
	}
	return s
}

// clip shortens s for an error message.
func clip(s string) string {
	if len(s) > 100 {
		return s[:100] + "…"
	}
	return s
}
