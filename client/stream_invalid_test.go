package client_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/client"
)

// A request that cannot be encoded (a string that is not UTF-8, which
// protobuf refuses) fails its own Sign, as over unary Sign; it must not
// end the SignStream it shares with other callers, failing their requests
// with its error. Here the other request waits for a daemon that does not
// answer, until its deadline.
func TestUnencodableRequestFailsOnlyItsCaller(t *testing.T) {
	kc, err := client.Dial(serveKeys(t, stalledKeys{}))
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		defer cancel()
		_, err := kc.Sign(ctx, client.SignRequest{KeySet: "dpop", Purpose: "dpop"})
		done <- err
	}()
	time.Sleep(100 * time.Millisecond) // the first request is on its way
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := kc.Sign(ctx, client.SignRequest{KeySet: "dpop\xff", Purpose: "dpop"}); err == nil {
		t.Error("Sign with a key set name that is not UTF-8 succeeded")
	}
	select {
	case err := <-done:
		if !errors.Is(err, client.ErrDeadlineExceeded) {
			t.Errorf("the other caller's Sign: %v, want ErrDeadlineExceeded", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the other caller's Sign, with a 500ms deadline, still blocked after 5s")
	}
}
