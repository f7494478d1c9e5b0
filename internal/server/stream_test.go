package server_test

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/authz"
	"github.com/keyd-dev/keyd/internal/listener"
	"github.com/keyd-dev/keyd/keystore"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// The same answers over unary Sign and over SignStream.
func TestUnaryAndStreamAgree(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	unary, err := client.Dial(e.socket, client.WithUnarySign())
	if err != nil {
		t.Fatal(err)
	}
	defer unary.Close()
	for _, cl := range []*client.Client{e.cl, unary} {
		p, err := cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/")
		if err != nil {
			t.Fatal(err)
		}
		verify(t, e, "dpop", p.JWT)
		if _, err := cl.DPoP("forbidden").Proof(ctx(t), "GET", "https://a.example/"); !errors.Is(err, client.ErrPermissionDenied) {
			t.Errorf("forbidden: %v", err)
		}
		if _, err := cl.DPoP("dpop").Proof(ctx(t), "GET", "/relative"); !errors.Is(err, client.ErrInvalidArgument) {
			t.Errorf("relative htu: %v", err)
		}
		if _, err := cl.Sign(ctx(t), client.SignRequest{KeySet: "dpop", Claims: map[string]any{"htm": "GET", "htu": "https://a.example/?q"}}); !errors.Is(err, client.ErrInvalidArgument) {
			t.Errorf("htu with query: %v", err)
		}
	}
	// Every decision the daemon made is audited, over both paths (the
	// relative htu never leaves the client).
	if n := len(e.audit.records()); n != 6 {
		t.Errorf("%d audit records, want 6", n)
	}
}

// Many callers share one stream; a refused request does not end it.
func TestStreamConcurrentAndMixed(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	var wg sync.WaitGroup
	errs := make(chan error, 64*20)
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 20 {
				keyset := "dpop"
				if (i+j)%5 == 0 {
					keyset = "forbidden"
				}
				p, err := e.cl.DPoP(keyset).Proof(ctx(t), "GET", "https://a.example/")
				switch {
				case keyset == "forbidden" && !errors.Is(err, client.ErrPermissionDenied):
					errs <- err
				case keyset == "dpop" && (err != nil || p.JWT == ""):
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := len(e.audit.records()); n != 64*20 {
		t.Errorf("%d audit records, want %d", n, 64*20)
	}
}

// A caller's deadline ends its wait; the stream stays usable.
func TestStreamCallerDeadline(t *testing.T) {
	sb := &slowBackend{entered: make(chan struct{}, 1), release: make(chan struct{})}
	e := newEnv(t, defaultSets[:1], envOpts{wrap: func(b keystore.Backend) keystore.Backend { sb.Backend = b; return sb }})
	c, cancel := context.WithTimeout(ctx(t), 200*time.Millisecond)
	defer cancel()
	if _, err := e.cl.DPoP("dpop").Proof(c, "GET", "https://a.example/"); !errors.Is(err, client.ErrDeadlineExceeded) {
		t.Errorf("err = %v, want DeadlineExceeded", err)
	}
	<-sb.entered
	close(sb.release)
	go func() {
		for range sb.entered {
		}
	}()
	if _, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/"); err != nil {
		t.Errorf("stream unusable after a caller gave up: %v", err)
	}
}

// The stream is reopened after the daemon restarts.
func TestStreamReconnects(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	if _, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/"); err != nil {
		t.Fatal(err)
	}
	e.grpc.Stop()
	if _, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/"); !errors.Is(err, client.ErrUnavailable) {
		t.Errorf("daemon gone: %v, want Unavailable", err)
	}
	e.serve(t)
	var err error
	for range 100 {
		if _, err = e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/"); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("after restart: %v", err)
	}
}

// A daemon without SignStream is served by unary Sign.
func TestStreamFallsBackToUnary(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	dir := shortDir(t)
	lis, err := listener.Unix(filepath.Join(dir, "old.sock"), 0o600, -1)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(authz.PeerCredentials()))
	keydv1.RegisterKeyServiceServer(g, unaryOnly{e.srv})
	go g.Serve(lis)
	defer g.Stop()
	cl, err := client.Dial(filepath.Join(dir, "old.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	for range 3 {
		if _, err := cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/"); err != nil {
			t.Fatalf("against a daemon without SignStream: %v", err)
		}
	}
}

// unaryOnly hides SignStream, like an older daemon.
type unaryOnly struct{ keydv1.KeyServiceServer }

func (unaryOnly) SignStream(grpc.BidiStreamingServer[keydv1.SignStreamRequest, keydv1.SignStreamResponse]) error {
	return errUnimplemented
}

var errUnimplemented = status.Error(codes.Unimplemented, "method SignStream not implemented")

// A stream request without a request body is refused, not a crash.
func TestStreamEmptyRequest(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := keydv1.NewKeyServiceClient(conn).SignStream(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&keydv1.SignStreamRequest{Id: 7}); err != nil {
		t.Fatal(err)
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if resp.Id != 7 || codes.Code(resp.Code) != codes.InvalidArgument {
		t.Errorf("response %+v", resp)
	}
	st.CloseSend()
}
