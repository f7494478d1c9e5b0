package client

import (
	"net/http"
	"reflect"
	"testing"
)

func TestDPoPChallenge(t *testing.T) {
	for _, tc := range []struct {
		header []string
		want   map[string]string // nil: no DPoP challenge
	}{
		{[]string{`DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof"`},
			map[string]string{"error": "use_dpop_nonce", "error_description": "Resource server requires nonce in DPoP proof"}},
		{[]string{`Bearer realm="x", error="invalid_token", DPoP algs="ES256 PS256", error=use_dpop_nonce`},
			map[string]string{"algs": "ES256 PS256", "error": "use_dpop_nonce"}},
		{[]string{`Bearer abc==`, `dpop Error="invalid_dpop_proof",error_description="a \"quoted\" \\ word"`},
			map[string]string{"error": "invalid_dpop_proof", "error_description": `a "quoted" \ word`}},
		{[]string{`DPoP`}, map[string]string{}},
		{[]string{`Basic realm="x"`}, nil},
		{[]string{`DPoP error="unterminated`}, map[string]string{"error": "unterminated"}},
		{[]string{`,,, ="x", @@@ DPoP error=x`}, map[string]string{"error": "x"}},
		{nil, nil},
	} {
		h := http.Header{}
		for _, v := range tc.header {
			h.Add("WWW-Authenticate", v)
		}
		got, ok := dpopChallenge(h)
		if ok != (tc.want != nil) || (ok && !reflect.DeepEqual(got, tc.want)) {
			t.Errorf("%q: got %v, %v; want %v", tc.header, got, ok, tc.want)
		}
	}
}
