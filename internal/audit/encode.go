package audit

import (
	"strconv"
	"time"

	"github.com/keyd-dev/keyd/internal/jsonstr"
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

// appendString appends s as encoding/json encodes it by default (HTML
// characters escaped).
func appendString(b []byte, s string) []byte { return jsonstr.Append(b, s, true) }
