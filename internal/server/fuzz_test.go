package server_test

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/internal/authz"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// FuzzSign feeds arbitrary requests to Sign as an allowed caller: it never
// panics, never answers Internal, and whatever it signs verifies.
func FuzzSign(f *testing.F) {
	now := time.Now().Unix()
	f.Add("dpop", "", []byte(`{"htm":"GET","htu":"https://a.example/"}`), []byte(nil), []byte(nil), "")
	f.Add("dpop", "", []byte(`{"htm":"GET","htu":"https://a.example/","iat":`+itoa(now)+`,"jti":"abc"}`), []byte(`{}`), []byte(nil), "dpop")
	f.Add("assert", "", []byte(nil), []byte(nil), []byte(nil), "client_assertion")
	f.Add("assert", "", []byte(`{"aud":["x"]}`), []byte(`{"typ":"JWT"}`), []byte(nil), "")
	f.Add("idt", "", []byte(`{"iss":"https://op.example.com","exp":`+itoa(now+60)+`}`), []byte(`{"typ":"at+jwt"}`), []byte(nil), "jwt")
	f.Add("idt", "", []byte(nil), []byte(nil), []byte("eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0"), "")
	f.Add("forbidden", "kid", []byte(`{`), []byte(`[]`), []byte("..."), "x")
	f.Add("", "", []byte(`{"a":1,"a":2}`), []byte(nil), []byte(nil), "")

	e := newEnv(f, defaultSets, envOpts{})
	f.Fuzz(func(t *testing.T, keyset, kid string, claims, header, input []byte, purpose string) {
		c := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: authz.AuthInfo{Caller: authz.Caller{UID: 0}}})
		resp, err := e.srv.Sign(c, &keydv1.SignRequest{Keyset: keyset, Kid: kid, Claims: claims, Header: header, SigningInput: input, Purpose: purpose})
		switch code := status.Code(err); code {
		case codes.OK:
			if parts := strings.Split(resp.Jwt, "."); len(parts) != 3 {
				t.Fatalf("not a compact JWS: %q", resp.Jwt)
			}
			verify(t, e, keyset, resp.Jwt)
		case codes.Internal, codes.Unknown, codes.DataLoss:
			t.Fatalf("Sign answered %v: %v", code, err)
		}
	})
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
