package client_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/client"
)

// A token response whose expires_in is a JSON number with a fraction
// (servers that compute it as exp - now in floating point send such values,
// e.g. 1.5 or 3599.98) still gives the token its lifetime: it must not be
// taken for a token that never expires and be cached for ever.
func TestFractionalExpiresIn(t *testing.T) {
	var issued atomic.Int32
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := issued.Add(1)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"access_token":"at-%d","token_type":"DPoP","expires_in":%s}`, n, r.URL.Query().Get("exp"))
	}))
	t.Cleanup(as.Close)
	kc := startKeyd(t, as.URL)

	for _, exp := range []string{"1.5", "1.0", `"1.5"`} {
		t.Run(exp, func(t *testing.T) {
			t.Parallel()
			o, err := kc.OAuth(ctx(t), client.OAuthConfig{TokenURL: as.URL + "/token?exp=" + exp, AssertionKeySet: "assert", DPoPKeySet: "dpop"})
			if err != nil {
				t.Fatal(err)
			}
			ts := o.ClientCredentials(ctx(t))
			a, err := ts.Token()
			if err != nil {
				t.Fatal(err)
			}
			if a.Expiry.IsZero() {
				t.Errorf("expires_in %s: the token has no expiry (it is cached for ever)", exp)
			}
			time.Sleep(1600 * time.Millisecond)
			b, err := ts.Token()
			if err != nil {
				t.Fatal(err)
			}
			if b.AccessToken == a.AccessToken {
				t.Errorf("expires_in %s: the expired token %s is still handed out", exp, a.AccessToken)
			}
		})
	}
}
