package client_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/client"
)

// An authorization server that accepts and never answers fails a token
// request after ASTimeout, even with no deadline on the caller's context
// and no Timeout on the HTTP client, instead of holding it (and every
// caller of its TokenSource) for good.
func TestHungAuthorizationServerTimesOut(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(release)
	kc := startKeyd(t, srv.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	o, err := kc.OAuth(ctx, client.OAuthConfig{TokenURL: srv.URL + "/token", ClientID: "c1",
		AssertionKeySet: "assert", DPoPKeySet: "dpop", ASTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := o.ClientCredentialsToken(context.Background())
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !errors.Is(err, context.DeadlineExceeded) && !isTimeout(err) {
			t.Errorf("token request to a hung server = %v; want a timeout", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("token request to a hung server still waiting after 15 s")
	}
}

func isTimeout(err error) bool {
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}

// A request whose context ends while another request of the same
// TokenSource waits for a token gives up then, not when that token comes
// (up to ASTimeout later).
func TestRequestStopsWaitingForAnotherTokenFetch(t *testing.T) {
	release := make(chan struct{})
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer as.Close()
	defer close(release)
	kc := startKeyd(t, as.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	o, err := kc.OAuth(ctx, client.OAuthConfig{TokenURL: as.URL + "/token", ClientID: "c1",
		AssertionKeySet: "assert", DPoPKeySet: "dpop", ASTimeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	hc := o.Client(o.ClientCredentials(ctx))
	get := func(timeout time.Duration) error {
		rctx, rcancel := context.WithTimeout(context.Background(), timeout)
		defer rcancel()
		req, _ := http.NewRequestWithContext(rctx, "GET", "https://rs.invalid/r", nil)
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	first := make(chan error, 1)
	go func() { first <- get(20 * time.Second) }() // fetches, and hangs with the server
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	err = get(300 * time.Millisecond)
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("a request with a 300 ms deadline returned after %v, behind another's token fetch", took.Round(time.Millisecond))
	}
	if !errors.Is(err, client.ErrDeadlineExceeded) && !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("request behind another's token fetch: %v, want a deadline error", err)
	}
}
