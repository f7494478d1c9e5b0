package server_test

import (
	"context"
	"crypto"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
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

// firstBlocks holds the first signature after armed is set until
// released; the others pass.
type firstBlocks struct {
	keystore.Backend
	armed   atomic.Bool
	once    sync.Once
	entered chan struct{}
	release chan struct{}
}

func (b *firstBlocks) Sign(ctx context.Context, id string, d []byte, o crypto.SignerOpts) ([]byte, error) {
	first := false
	if b.armed.Load() {
		b.once.Do(func() { first = true })
	}
	if first {
		close(b.entered)
		<-b.release
	}
	return b.Backend.Sign(ctx, id, d, o)
}

// A request arriving while another one of the stream is still inside the
// backend is received and answered all the same, not queued behind it (as
// it would be if the receiving goroutine served lone requests itself).
func TestLoneRequestDoesNotBlockTheStream(t *testing.T) {
	fb := &firstBlocks{entered: make(chan struct{}), release: make(chan struct{})}
	e := newEnv(t, defaultSets[:1], envOpts{wrap: func(b keystore.Backend) keystore.Backend { fb.Backend = b; return fb }})
	dp := e.cl.DPoP("dpop")
	if _, err := dp.Proof(ctx(t), "GET", "https://a.example/warm"); err != nil {
		t.Fatal(err)
	}
	fb.armed.Store(true)
	errc := make(chan error, 1)
	go func() {
		_, err := dp.Proof(ctx(t), "GET", "https://a.example/slow")
		errc <- err
	}()
	<-fb.entered
	for i := range 3 {
		c, cancel := context.WithTimeout(ctx(t), 5*time.Second)
		_, err := dp.Proof(c, "GET", "https://a.example/next")
		cancel()
		if err != nil {
			t.Fatalf("request %d while another one is inside the backend: %v", i, err)
		}
	}
	close(fb.release)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// When the daemon stops (Config.Stop closed), a SignStream takes no more
// requests and ends, UNAVAILABLE, once those it took are answered: a
// request in flight gets its result before the end, and a client that
// keeps its stream open does not hold the graceful stop. (The daemon used
// to force the stop once no request was in flight, which could cut off a
// result handed to gRPC but not yet written.)
func TestStreamEndsAtStopAfterItsResults(t *testing.T) {
	stop := make(chan struct{})
	fb := &firstBlocks{entered: make(chan struct{}), release: make(chan struct{})}
	e := newEnv(t, defaultSets[:1], envOpts{stop: stop, wrap: func(b keystore.Backend) keystore.Backend { fb.Backend = b; return fb }})
	st := rawStream(t, e)
	fb.armed.Store(true)
	if err := st.Send(&keydv1.SignStreamRequest{Requests: []*keydv1.SignStreamItem{dpopItem(1)}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-fb.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the request did not reach the backend within 10 s")
	}
	close(stop)
	stopped := make(chan struct{})
	go func() {
		e.grpc.GracefulStop()
		close(stopped)
	}()
	time.Sleep(50 * time.Millisecond) // the stop is under way, the request held
	close(fb.release)

	resp, err := st.Recv()
	if err != nil {
		t.Fatalf("the request in flight when the stop began got no result: %v", err)
	}
	if len(resp.Results) != 1 || resp.Results[0].Id != 1 || resp.Results[0].Code != int32(codes.OK) || resp.Results[0].Response == nil {
		t.Fatalf("the request in flight when the stop began: %+v", resp.Results)
	}
	if _, err := st.Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("after its results, the stream ended with %v; want UNAVAILABLE", err)
	}
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("the graceful stop did not finish within 10 s with a SignStream open")
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

// rawStream opens a SignStream without the client package.
// rawKeys dials e's socket with a plain gRPC connection, closed at
// cleanup, and returns a KeyService client and a context of 10 s.
func rawKeys(t *testing.T, e *env) (keydv1.KeyServiceClient, context.Context) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return keydv1.NewKeyServiceClient(conn), c
}

func rawStream(t *testing.T, e *env) keydv1.KeyService_SignStreamClient {
	t.Helper()
	keys, c := rawKeys(t, e)
	st, err := keys.SignStream(c)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func dpopItem(id uint64) *keydv1.SignStreamItem {
	return &keydv1.SignStreamItem{Id: id, Request: &keydv1.SignRequest{
		Keyset: "dpop", Claims: []byte(`{"htm":"GET","htu":"https://a.example/"}`),
	}}
}

// A stream request without a request body is refused, not a crash, and
// only that request is refused; the refusal is audited, as a unary Sign's
// would be.
func TestStreamEmptyRequest(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	st := rawStream(t, e)
	if err := st.Send(&keydv1.SignStreamRequest{Requests: []*keydv1.SignStreamItem{{Id: 7}, dpopItem(8)}}); err != nil {
		t.Fatal(err)
	}
	got := map[uint64]*keydv1.SignStreamResult{}
	for len(got) < 2 {
		resp, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range resp.Results {
			got[r.Id] = r
		}
	}
	if r := got[7]; codes.Code(r.Code) != codes.InvalidArgument {
		t.Errorf("request without body: %+v", r)
	}
	if r := got[8]; r.Code != 0 || r.Response == nil {
		t.Errorf("valid request in the same message: %+v", r)
	} else {
		verify(t, e, "dpop", r.Response.Jwt)
	}
	st.CloseSend()
	outcomes := map[string]int{}
	for _, r := range e.audit.records() {
		outcomes[r.Outcome]++
	}
	if outcomes["ok"] != 1 || outcomes[codes.InvalidArgument.String()] != 1 {
		t.Errorf("audit outcomes %v; want one ok and one %s", outcomes, codes.InvalidArgument)
	}
}

// Many requests in one message are each served, audited and answered; the
// answers come back in fewer messages than requests when they are ready
// together.
func TestStreamBatch(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	st := rawStream(t, e)
	const n = 64
	var items []*keydv1.SignStreamItem
	for i := range n {
		items = append(items, dpopItem(uint64(1000+i)))
	}
	items[5].Request.Keyset = "forbidden"
	if err := st.Send(&keydv1.SignStreamRequest{Requests: items}); err != nil {
		t.Fatal(err)
	}
	got := map[uint64]*keydv1.SignStreamResult{}
	msgs := 0
	for len(got) < n {
		resp, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		msgs++
		if len(resp.Results) == 0 || len(resp.Results) > n {
			t.Fatalf("a message with %d results", len(resp.Results))
		}
		for _, r := range resp.Results {
			if _, dup := got[r.Id]; dup {
				t.Fatalf("result %d twice", r.Id)
			}
			got[r.Id] = r
		}
	}
	for i := range n {
		r := got[uint64(1000+i)]
		switch {
		case r == nil:
			t.Fatalf("no result for %d", 1000+i)
		case i == 5:
			if codes.Code(r.Code) != codes.PermissionDenied {
				t.Errorf("forbidden key set in a batch: %+v", r)
			}
		case r.Code != 0 || r.Response == nil:
			t.Errorf("request %d: %+v", i, r)
		default:
			verify(t, e, "dpop", r.Response.Jwt)
		}
	}
	if n := len(e.audit.records()); n != 64 {
		t.Errorf("%d audit records, want 64", n)
	}
	t.Logf("%d results in %d messages", n, msgs)
	st.CloseSend()
}

// A message with no request, or with more than the daemon takes, ends the
// stream with InvalidArgument.
func TestStreamBadMessages(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{})
	for _, tc := range []struct {
		name string
		n    int
	}{{"empty", 0}, {"65 requests", 65}} {
		t.Run(tc.name, func(t *testing.T) {
			st := rawStream(t, e)
			msg := &keydv1.SignStreamRequest{}
			for i := range tc.n {
				msg.Requests = append(msg.Requests, dpopItem(uint64(i)))
			}
			if err := st.Send(msg); err != nil {
				t.Fatal(err)
			}
			_, err := st.Recv()
			if status.Code(err) != codes.InvalidArgument {
				t.Errorf("err = %v, want InvalidArgument", err)
			}
		})
	}
	if n := len(e.audit.records()); n != 0 {
		t.Errorf("%d audit records, want none", n)
	}
}

// counter counts what the daemon receives: unary Sign calls, SignStream
// messages and the requests in them.
type counter struct {
	mu                    sync.Mutex
	unary, msgs, requests int
	maxPerMsg             int
}

func (c *counter) opts() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if info.FullMethod == keydv1.KeyService_Sign_FullMethodName {
				c.mu.Lock()
				c.unary++
				c.mu.Unlock()
			}
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			return h(srv, &countingStream{ServerStream: ss, c: c})
		}),
	}
}

func (c *counter) get() (unary, msgs, requests, maxPerMsg int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.unary, c.msgs, c.requests, c.maxPerMsg
}

type countingStream struct {
	grpc.ServerStream
	c *counter
}

func (s *countingStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if req, ok := m.(*keydv1.SignStreamRequest); ok && err == nil {
		s.c.mu.Lock()
		s.c.msgs++
		s.c.requests += len(req.Requests)
		s.c.maxPerMsg = max(s.c.maxPerMsg, len(req.Requests))
		s.c.mu.Unlock()
	}
	return err
}

// The client sends requests that are in flight together in shared
// messages, never more than the daemon takes in one, and a request too
// large to share a message as a unary call that fails alone.
func TestClientBatches(t *testing.T) {
	var c counter
	e := newEnv(t, defaultSets, envOpts{grpcOpts: c.opts()})
	const callers, each = 64, 25
	pad := strings.Repeat("x", 2000) // 64 of these exceed one message's 64 KiB
	var wg sync.WaitGroup
	errs := make(chan error, callers*each)
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				_, err := e.cl.Sign(ctx(t), client.SignRequest{KeySet: "idt", Claims: map[string]any{
					"iss": "https://op.example.com", "sub": "s", "aud": "a", "pad": pad, "exp": time.Now().Add(10 * time.Minute).Unix(),
				}})
				if err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	unary, msgs, requests, maxPerMsg := c.get()
	t.Logf("%d requests in %d messages (at most %d in one), %d unary", requests, msgs, maxPerMsg, unary)
	if requests != callers*each || unary != 0 {
		t.Errorf("%d requests over the stream and %d unary, want %d and 0", requests, unary, callers*each)
	}
	// Measured here: ~185 messages for 1600 requests (≈ 1400 before the
	// sender yielded to the callers about to queue).
	if msgs > requests/2 {
		t.Errorf("%d messages for %d requests from %d concurrent callers: hardly batched", msgs, requests, callers)
	}
	if maxPerMsg > 30 {
		t.Errorf("a message with %d requests of 2 KiB each: more than 64 KiB", maxPerMsg)
	}

	// Too large to share a message (40 KiB, under the daemon's 64 KiB per
	// message but over its 16 KiB for claims): unary, refused alone.
	big := strings.Repeat("y", 40<<10)
	_, err := e.cl.Sign(ctx(t), client.SignRequest{KeySet: "idt", Claims: map[string]any{"iss": "https://op.example.com", "pad": big}})
	if !errors.Is(err, client.ErrInvalidArgument) {
		t.Errorf("40 KiB claims: %v, want InvalidArgument", err)
	}
	if u, _, _, _ := c.get(); u != 1 {
		t.Errorf("%d unary calls, want the large request's 1", u)
	}
	if _, err := e.cl.DPoP("dpop").Proof(ctx(t), "GET", "https://a.example/"); err != nil {
		t.Errorf("stream after the large request: %v", err)
	}
}

// stalledSend: the client has stopped reading; a send blocks until the stream ends.
type stalledSend struct{ grpc.ServerStream }

func (s stalledSend) SendMsg(any) error {
	<-s.Context().Done()
	return s.Context().Err()
}

// A caller that keeps sending but reads nothing is held back by streamInFlight (64).
func TestStreamBackPressureWhenCallerStopsReading(t *testing.T) {
	e := newEnv(t, defaultSets, envOpts{grpcOpts: []grpc.ServerOption{
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			return h(srv, stalledSend{ss})
		}),
	}})
	st := rawStream(t, e)
	const msgs = 20 // 1280 requests
	go func() {
		for m := range msgs {
			var items []*keydv1.SignStreamItem
			for i := range 64 {
				items = append(items, dpopItem(uint64(m*64+i)))
			}
			if st.Send(&keydv1.SignStreamRequest{Requests: items}) != nil {
				return
			}
		}
	}()
	last, stable := -1, 0
	for i := 0; i < 100 && stable < 5; i++ { // at most 5 s
		time.Sleep(50 * time.Millisecond)
		if n := len(e.audit.records()); n == last {
			stable++
		} else {
			last, stable = n, 0
		}
	}
	served := len(e.audit.records())
	t.Logf("%d of %d requests served while the caller reads nothing", served, msgs*64)
	if served > 2*64 {
		t.Errorf("%d requests served (results buffered) for a caller that reads nothing; the in-flight bound is 64", served)
	}
}

// panicsOnce panics in the signature after armed is set, once; the others
// pass.
type panicsOnce struct {
	keystore.Backend
	armed atomic.Bool
	once  sync.Once
}

func (b *panicsOnce) Sign(ctx context.Context, id string, d []byte, o crypto.SignerOpts) ([]byte, error) {
	if b.armed.Load() {
		b.once.Do(func() { panic("backend bug") })
	}
	return b.Backend.Sign(ctx, id, d, o)
}

// A panic while one request of a stream is being signed (a backend's bug)
// ends only that request, answered Internal, and the attempt is audited
// like any other: an audit record exists for every sign attempt.
func TestStreamPanicAudited(t *testing.T) {
	pb := &panicsOnce{}
	e := newEnv(t, defaultSets[:1], envOpts{wrap: func(b keystore.Backend) keystore.Backend { pb.Backend = b; return pb }})
	pb.armed.Store(true)
	st := rawStream(t, e)
	const n = 8
	var items []*keydv1.SignStreamItem
	for i := range n {
		items = append(items, dpopItem(uint64(i)))
	}
	if err := st.Send(&keydv1.SignStreamRequest{Requests: items}); err != nil {
		t.Fatal(err)
	}
	codesGot := map[codes.Code]int{}
	for got := 0; got < n; {
		resp, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range resp.Results {
			got++
			codesGot[codes.Code(r.Code)]++
		}
	}
	st.CloseSend()
	if codesGot[codes.OK] != n-1 || codesGot[codes.Internal] != 1 {
		t.Errorf("result codes %v; want %d OK and one Internal", codesGot, n-1)
	}
	outcomes := map[string]int{}
	for _, r := range e.audit.records() {
		outcomes[r.Outcome]++
	}
	if outcomes["ok"] != n-1 || outcomes[codes.Internal.String()] != 1 {
		t.Errorf("audit outcomes %v; want %d ok and one %s", outcomes, n-1, codes.Internal)
	}
}

// gated holds every signature until open is closed.
type gated struct {
	keystore.Backend
	open chan struct{}
}

func (b *gated) Sign(ctx context.Context, id string, d []byte, o crypto.SignerOpts) ([]byte, error) {
	select {
	case <-b.open:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return b.Backend.Sign(ctx, id, d, o)
}

// One caller's streams together have at most 256 requests being served
// (each with a goroutine and its request held); the rest wait to be read,
// and are served once the first ones are answered.
func TestCallerStreamRequestsBounded(t *testing.T) {
	gb := &gated{open: make(chan struct{})}
	e := newEnv(t, defaultSets[:1], envOpts{wrap: func(b keystore.Backend) keystore.Backend { gb.Backend = b; return gb }})
	const streams = 8 // 8 × 64 = 512 requests, over the bound
	var sts []keydv1.KeyService_SignStreamClient
	for s := range streams {
		st := rawStream(t, e)
		var items []*keydv1.SignStreamItem
		for i := range 64 {
			items = append(items, dpopItem(uint64(s*64+i)))
		}
		if err := st.Send(&keydv1.SignStreamRequest{Requests: items}); err != nil {
			t.Fatal(err)
		}
		sts = append(sts, st)
	}
	for i := 0; e.srv.StreamItemsInFlight() < 256; i++ {
		if i == 500 {
			t.Fatalf("%d requests in flight after 5 s, want 256", e.srv.StreamItemsInFlight())
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // the others would be taken by now
	if n := e.srv.StreamItemsInFlight(); n != 256 {
		t.Errorf("%d requests of one caller being served at once, want 256", n)
	}
	close(gb.open)
	for s, st := range sts {
		got := 0
		for got < 64 {
			resp, err := st.Recv()
			if err != nil {
				t.Fatalf("stream %d: %v after %d results", s, err, got)
			}
			for _, r := range resp.Results {
				if r.Response == nil {
					t.Errorf("stream %d request %d: code %d: %s", s, r.Id, r.Code, r.Message)
				}
			}
			got += len(resp.Results)
		}
	}
}
