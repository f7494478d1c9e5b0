package policy

import (
	"encoding/json"
	"fmt"
	"testing"
)

// dpopRequests are the claims the Go client (client.DPoP.Proof) sends for a
// proof: a map marshaled with encoding/json, so in sorted key order, with
// htm and htu always, ath for a resource request and the origin's nonce once
// the server has sent one. The header is empty: keyd writes it.
func dpopRequests(b *testing.B) []struct {
	name   string
	claims []byte
} {
	b.Helper()
	const nonce = "eyJ7S_zG.eyJH0-Z.HX4w-7v"
	reqs := []struct {
		name   string
		claims map[string]any
	}{
		{"token", map[string]any{"htm": "POST", "htu": "https://server.example.com/token"}},
		{"token_nonce", map[string]any{"htm": "POST", "htu": "https://server.example.com/token", "nonce": nonce}},
		{"resource", map[string]any{"htm": "GET", "htu": "https://resource.example.org/protected", "ath": validATH, "nonce": nonce}},
	}
	out := make([]struct {
		name   string
		claims []byte
	}, len(reqs))
	for i, r := range reqs {
		c, err := json.Marshal(r.claims)
		if err != nil {
			b.Fatal(err)
		}
		out[i].name, out[i].claims = r.name, c
	}
	return out
}

// bindDPoP binds a dpop policy to the test key as internal/server does.
func bindDPoP(b *testing.B) *Bound {
	b.Helper()
	bound, err := Policy{Purpose: DPoP}.Bind(Key{Alg: "ES256", Kid: testKid, JWK: []byte(testJWK)})
	if err != nil {
		b.Fatal(err)
	}
	return bound
}

func BenchmarkPrepareDPoP(b *testing.B) {
	bound := bindDPoP(b)
	for _, r := range dpopRequests(b) {
		b.Run(r.name, func(b *testing.B) {
			rnd := &seqReader{}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := bound.Prepare(now, nil, r.claims, rnd); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkCheckPrebuilt(b *testing.B) {
	bound := bindDPoP(b)
	for _, r := range dpopRequests(b) {
		tok, err := bound.Prepare(now, nil, r.claims, &seqReader{})
		if err != nil {
			b.Fatal(err)
		}
		b.Run(r.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := bound.CheckPrebuilt(now, tok.Header, tok.Claims); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkParseLarge parses the largest claims set keyd accepts, made of
// as many members as fit: the worst case of the duplicate check.
func BenchmarkParseLarge(b *testing.B) {
	var claims []byte
	for i := 0; ; i++ {
		m := fmt.Appendf(nil, `,"m%d":%d`, i, i)
		if len(claims)+len(m)+1 > MaxJSONSize {
			break
		}
		claims = append(claims, m...)
	}
	claims[0] = '{'
	claims = append(claims, '}')
	b.ReportAllocs()
	for b.Loop() {
		if _, v := parseObject(claims, "claims"); v != nil {
			b.Fatal(v)
		}
	}
}
