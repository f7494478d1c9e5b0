package client_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/client"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// unaryKeys is a daemon without SignStream (an older keyd): it signs over
// unary Sign only, here by naming the key set.
type unaryKeys struct {
	keydv1.UnimplementedKeyServiceServer
}

func (unaryKeys) Sign(_ context.Context, req *keydv1.SignRequest) (*keydv1.SignResponse, error) {
	return &keydv1.SignResponse{Jwt: req.Keyset}, nil
}

// A client of a daemon without SignStream falls back to unary Sign, also
// for the callers that arrive while the stream is found to be missing:
// none of them may get the stream's Unimplemented.
func TestSignFallsBackWithoutSignStream(t *testing.T) {
	sock := serveKeys(t, unaryKeys{})
	for i := range 100 {
		kc, err := client.Dial(sock)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for range 64 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				if _, err := kc.Sign(ctx, client.SignRequest{KeySet: "jwt"}); err != nil {
					errs <- err
				}
			}()
		}
		wg.Wait()
		kc.Close()
		close(errs)
		for err := range errs {
			t.Fatalf("client %d: Sign: %v", i, err)
		}
	}
}
