package client_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
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
	kc, err := client.Dial(serveKeys(t, stalledKeys{}))
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	bigSignsEndWithTheirContext(t, kc, 96)
}

// bigSignsEndWithTheirContext makes n signatures of 20 KiB requests, one
// after the other, each with a 25 ms deadline, and checks each ends with
// ErrDeadlineExceeded within 2 s (if one does not, it closes kc).
func bigSignsEndWithTheirContext(t *testing.T, kc *client.Client, n int) {
	t.Helper()
	big := strings.Repeat("x", 20<<10) // a large request, still under the stream's per-request bound
	for i := range n {
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

// frozenKeys is a daemon that has stopped reading its SignStreams
// altogether, before taking the 64 requests it serves at once: a stopped
// (SIGSTOP) or wedged process, whose flow-control window fills.
type frozenKeys struct {
	keydv1.UnimplementedKeyServiceServer
}

func (frozenKeys) SignStream(stream grpc.BidiStreamingServer[keydv1.SignStreamRequest, keydv1.SignStreamResponse]) error {
	<-stream.Context().Done()
	return nil
}

// serveKeys serves srv as keyd's KeyService on a Unix socket in a
// temporary directory until the test ends, and returns the socket's path.
func serveKeys(t *testing.T, srv keydv1.KeyServiceServer) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "k.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(daemon.ServerOptions(insecure.NewCredentials())...)
	keydv1.RegisterKeyServiceServer(g, srv)
	go g.Serve(ln)
	t.Cleanup(g.Stop)
	return sock
}

// A daemon that stops reading before it has 64 requests of the stream
// must not hold a caller past its context either: the requests a caller
// sends on its own goroutine must fit in the stream's flow-control window,
// large requests too, or the send blocks until the daemon reads again.
func TestSignHonoursContextWhenDaemonStopsReading(t *testing.T) {
	kc, err := client.Dial(serveKeys(t, frozenKeys{}))
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	bigSignsEndWithTheirContext(t, kc, 16)
}

// While the daemon does not read (here, it has 64 requests it does not
// answer), the requests of callers that gave up must not pile up in the
// client: a caller's request may wait for the daemon, but once its caller
// stops waiting nothing should keep it.
func TestSignMemoryBoundedUnderBackPressure(t *testing.T) {
	kc, err := client.Dial(serveKeys(t, stalledKeys{}))
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	pad := strings.Repeat("x", 8<<10)
	sign := func(n int) {
		var wg sync.WaitGroup
		for range 32 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range n {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
					kc.Sign(ctx, client.SignRequest{KeySet: "jwt", Claims: map[string]any{"pad": pad}})
					cancel()
				}
			}()
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			kc.Close() // ends the stream, and a blocked send with it
			<-done
			t.Fatal("Signs with a 5ms deadline still blocked after 30s")
		}
	}
	heap := func() int64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return int64(m.HeapAlloc)
	}
	sign(10) // the daemon has its 64 requests and has stopped reading
	before := heap()
	sign(200) // 6400 requests of 8 KiB: 50 MiB if every one were kept
	if grew := heap() - before; grew > 16<<20 {
		t.Errorf("the heap grew by %d MiB over 6400 requests whose callers gave up", grew>>20)
	}
}
