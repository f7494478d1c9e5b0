package audit

import (
	"strconv"
	"time"
	"unicode/utf8"
)

// appendJSON appends r as one JSON object with the members of Record's json
// tags, in the same order and with the same omissions, without reflection:
// audit writes sit on every signature's path.
func appendJSON(b []byte, r *Record) []byte {
	b = append(b, `{"time":"`...)
	b = r.Time.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","event":`...)
	b = appendString(b, r.Event)
	b = append(b, `,"uid":`...)
	b = strconv.AppendUint(b, uint64(r.UID), 10)
	b = append(b, `,"gid":`...)
	b = strconv.AppendUint(b, uint64(r.GID), 10)
	b = append(b, `,"pid":`...)
	b = strconv.AppendInt(b, int64(r.PID), 10)
	b = optString(b, "identity", r.Identity)
	b = append(b, `,"keyset":`...)
	b = appendString(b, r.KeySet)
	b = optString(b, "kid", r.Kid)
	b = optString(b, "purpose", r.Purpose)
	b = optString(b, "htm", r.Htm)
	b = optString(b, "htu", r.Htu)
	b = optString(b, "ath", r.Ath)
	b = optString(b, "iss", r.Iss)
	b = optString(b, "sub", r.Sub)
	if len(r.Aud) > 0 {
		b = append(b, `,"aud":[`...)
		for i, a := range r.Aud {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendString(b, a)
		}
		b = append(b, ']')
	}
	b = optString(b, "jti", r.Jti)
	if r.Exp != 0 {
		b = append(b, `,"exp":`...)
		b = strconv.AppendInt(b, r.Exp, 10)
	}
	b = append(b, `,"outcome":`...)
	b = appendString(b, r.Outcome)
	b = optString(b, "reason", r.Reason)
	return append(b, '}')
}

func optString(b []byte, name, v string) []byte {
	if v == "" {
		return b
	}
	b = append(b, ',', '"')
	b = append(b, name...)
	b = append(b, '"', ':')
	return appendString(b, v)
}

const hex = "0123456789abcdef"

// appendString appends s as a JSON string the way encoding/json does:
// control characters, quotes, backslashes, <, > and & escaped, U+2028 and
// U+2029 escaped, invalid UTF-8 replaced by U+FFFD.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
