package client

import (
	"encoding/json"
	"testing"
)

// TestDPoPClaimsAsEncodingJSON: the claims Proof sends are the bytes
// json.Marshal writes for the same map (key order, HTML and control
// character escapes, invalid UTF-8), with ath and nonce left out when empty.
func TestDPoPClaimsAsEncodingJSON(t *testing.T) {
	for _, c := range [][4]string{
		{"GET", "https://a.example/r", "", ""},
		{"POST", "https://a.example/token", "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo", ""},
		{"GET", "https://a.example/r", "", "eyJ7S_zG.nonce-1"},
		{"PUT", "https://a.example/x?y", "ath", "n"},
		{"GET", "https://a.example/<script>&\"\\", "a\u2028b", "\x00\x1f\x7f"},
		{"G\xffT", "https://a.example/é/\U0001F600", "\t\r\n", "<>&"},
	} {
		m := map[string]any{"htm": c[0], "htu": c[1]}
		if c[2] != "" {
			m["ath"] = c[2]
		}
		if c[3] != "" {
			m["nonce"] = c[3]
		}
		want, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if got := dpopClaims(c[0], c[1], c[2], c[3]); string(got) != string(want) {
			t.Errorf("dpopClaims%q = %s, want %s", c, got, want)
		}
	}
}
