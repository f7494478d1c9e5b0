package client_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/daemon"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// stalledKeys is a daemon whose backend has stalled (a slow or wedged HSM
// or TPM): like keyd's SignStream it takes up to 64 requests of a stream
// and then stops reading until one is answered, which none is.
type stalledKeys struct {
	keydv1.UnimplementedKeyServiceServer
}

func (stalledKeys) SignStream(stream grpc.BidiStreamingServer[keydv1.SignStreamRequest, keydv1.SignStreamResponse]) error {
	for taken := 0; taken < 64; {
		msg, err := stream.Recv()
		if err != nil {
			return nil
		}
		taken += len(msg.Requests)
	}
	<-stream.Context().Done()
	return nil
}

// Under the daemon's back-pressure each Sign must still end when its
// context does: its request may wait, but its caller must not.
func TestSignHonoursContextUnderBackPressure(t *testing.T) {
	dir, err := os.MkdirTemp("", "kd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "k.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(daemon.ServerOptions(insecure.NewCredentials())...)
	keydv1.RegisterKeyServiceServer(g, stalledKeys{})
	go g.Serve(ln)
	defer g.Stop()

	kc, err := client.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	big := strings.Repeat("x", 20<<10) // a large request, still under the stream's per-request bound
	for i := range 96 {
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 25*time.Millisecond)
			defer cancel()
			_, err := kc.Sign(ctx, client.SignRequest{KeySet: "jwt", Claims: map[string]any{"pad": big}})
			done <- err
		}()
		select {
		case err := <-done:
			if !errors.Is(err, client.ErrDeadlineExceeded) {
				t.Fatalf("Sign %d: %v, want ErrDeadlineExceeded", i, err)
			}
		case <-time.After(2 * time.Second):
			t.Errorf("Sign %d with a 25ms deadline still blocked after 2s", i)
			kc.Close() // ends the stream, and the blocked send with it
			<-done
			return
		}
	}
}
