package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// Bounds of one SignStream.
const (
	// streamInFlight bounds the requests of one stream being served or
	// whose results are not sent yet; past it the stream stops reading
	// until a result is sent (back-pressure, also on a caller that stops
	// reading its results).
	streamInFlight = 64
	// streamBatch bounds the requests of one message, and the results the
	// daemon puts in one message.
	streamBatch = 64
	// streamTimeout bounds one request when the caller gives no timeout.
	streamTimeout = 30 * time.Second
	// streamIdle is how long an idle worker of a stream waits for the next
	// request before it exits.
	streamIdle = 10 * time.Second
)

// SignStream implements keyd.v1.KeyService: each request is served by Sign,
// concurrently up to streamInFlight, and answered by id.
//
// The cost that matters here is per signature: requests are served by the
// stream's workers (long-lived goroutines, so their stacks are grown once,
// not once per request), and results are sent by whichever worker finds no
// send in progress, together with every result that is ready by then — one
// message for many results when many are in flight, and no hand-off to a
// sending goroutine when there is one.
func (s *Server) SignStream(stream grpc.BidiStreamingServer[keydv1.SignStreamRequest, keydv1.SignStreamResponse]) error {
	ctx := stream.Context()
	st := &streamState{
		srv:  s,
		ctx:  ctx,
		sem:  make(chan struct{}, streamInFlight),
		jobs: make(chan *keydv1.SignStreamItem),
		done: make(chan struct{}),
	}
	st.out = outbox{send: stream.Send, sem: st.sem, served: &s.streamItems}
	if c, err := s.caller(ctx); err == nil {
		// Without credentials every request is refused anyway; the
		// stream's own bound holds.
		st.out.caller = s.callerSlots.of(callerKey(c))
	}
	defer st.wg.Wait()
	defer close(st.done)
	if s.stop == nil {
		return st.receive(stream)
	}
	// The requests are read on a goroutine of their own, so that the stop
	// can end a stream whose client is not sending.
	received := make(chan error, 1)
	go func() { received <- st.receive(stream) }()
	select {
	case err := <-received:
		return err
	case <-s.stop:
		return st.end()
	}
}

// receive reads the stream's requests and hands them to workers until the
// client ends the stream (nil), the stream fails, or the stream is ending
// (see end).
func (st *streamState) receive(stream grpc.BidiStreamingServer[keydv1.SignStreamRequest, keydv1.SignStreamResponse]) error {
	ctx, s := st.ctx, st.srv
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		switch n := len(msg.Requests); {
		case n == 0:
			return status.Error(codes.InvalidArgument, "sign stream: a message must carry at least one request")
		case n > streamBatch:
			return status.Errorf(codes.InvalidArgument, "sign stream: a message carries %d requests; at most %d are allowed", n, streamBatch)
		}
		for _, it := range msg.Requests {
			select {
			case st.sem <- struct{}{}:
			case <-ctx.Done():
				return nil
			}
			if st.out.caller != nil {
				select {
				case st.out.caller <- struct{}{}:
				case <-ctx.Done():
					<-st.sem
					return nil
				}
			}
			st.mu.Lock()
			if st.ending {
				// Not served: the stream's end (UNAVAILABLE) answers it.
				st.mu.Unlock()
				if st.out.caller != nil {
					<-st.out.caller
				}
				<-st.sem
				return nil
			}
			s.streamItems.Add(1)
			st.dispatch(it)
			st.mu.Unlock()
		}
	}
}

// end makes the stream take no more requests and returns the stream's
// final status. The requests it took are answered before that status:
// SignStream's deferred wait lets every worker finish its request and send
// its result first.
func (st *streamState) end() error {
	st.mu.Lock()
	st.ending = true
	st.mu.Unlock()
	return status.Error(codes.Unavailable, "keyd is stopping; reconnect and retry (a restarted keyd answers)")
}

// callerInFlight bounds the SignStream requests one caller (a local uid,
// or a mutual-TLS identity) has being served at once, over all its streams
// and connections; further requests wait to be read, as a stream's
// request past streamInFlight does. Without it one caller's connections
// (limits.max_connections_per_uid) × streams (64 each) × streamInFlight
// could have keyd hold about a million requests, with a goroutine each.
const callerInFlight = 256

// callerSlots holds the slots of callerInFlight per caller. Callers are
// never forgotten: there are as many as uids and identities allowed to
// connect.
type callerSlots struct {
	mu sync.Mutex
	m  map[string]chan struct{}
}

func (c *callerSlots) of(key string) chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]chan struct{}{}
	}
	ch := c.m[key]
	if ch == nil {
		ch = make(chan struct{}, callerInFlight)
		c.m[key] = ch
	}
	return ch
}

// StreamItemsInFlight returns the number of SignStream requests being
// served: taken from a stream and their results not yet sent (or
// dropped).
func (s *Server) StreamItemsInFlight() int64 { return s.streamItems.Load() }

// streamState is one SignStream being served.
type streamState struct {
	srv  *Server
	ctx  context.Context
	sem  chan struct{}               // a slot per request being served
	jobs chan *keydv1.SignStreamItem // to an idle worker
	done chan struct{}               // closed when the stream ends
	wg   sync.WaitGroup
	out  outbox

	mu     sync.Mutex // orders taking a request against ending
	ending bool       // the daemon is stopping: no request is taken
}

// dispatch hands it to an idle worker, or starts one. The number of workers
// stays within streamInFlight plus those about to go idle.
func (st *streamState) dispatch(it *keydv1.SignStreamItem) {
	select {
	case st.jobs <- it:
	default:
		st.wg.Add(1)
		go st.worker(it)
	}
}

// worker serves it and then whatever dispatch hands it, until the stream
// ends or it has been idle for streamIdle.
func (st *streamState) worker(it *keydv1.SignStreamItem) {
	defer st.wg.Done()
	idle := time.NewTimer(streamIdle)
	defer idle.Stop()
	for {
		res := st.srv.serveStreamItem(st.ctx, it)
		st.out.push(res) // frees its slot once the result is sent or dropped
		idle.Reset(streamIdle)
		select {
		case it = <-st.jobs:
		case <-st.done:
			return
		case <-idle.C:
			return
		}
	}
}

// outbox sends a stream's results: the pusher that finds no send in
// progress sends, in one message, every result pending by then, and again
// while more arrived during its send.
type outbox struct {
	send func(*keydv1.SignStreamResponse) error
	// sem has a slot per request being served or result not yet sent.
	sem chan struct{}
	// served, if set, counts the same, for every stream of a Server.
	served *atomic.Int64
	// caller, if set, has the same slots in the caller's own bound, over
	// all its streams (see callerInFlight).
	caller chan struct{}

	mu      sync.Mutex
	pending []*keydv1.SignStreamResult
	spare   []*keydv1.SignStreamResult
	sending bool
	broken  bool
}

func (o *outbox) push(r *keydv1.SignStreamResult) {
	o.mu.Lock()
	if o.broken {
		o.mu.Unlock()
		o.free(1)
		return
	}
	o.pending = append(o.pending, r)
	if o.sending {
		o.mu.Unlock()
		return
	}
	o.sending = true
	if len(o.sem) > len(o.pending) {
		// Other requests of the stream are being served: let those
		// about to finish add their results to this message.
		o.mu.Unlock()
		runtime.Gosched()
		o.mu.Lock()
	}
	for len(o.pending) > 0 && !o.broken {
		batch := o.pending
		if len(batch) > streamBatch {
			batch = batch[:streamBatch]
			o.pending = append(o.spare[:0], o.pending[streamBatch:]...)
		} else {
			o.pending = o.spare[:0]
		}
		o.mu.Unlock()
		err := o.send(&keydv1.SignStreamResponse{Results: batch})
		o.free(len(batch))
		clear(batch)
		o.mu.Lock()
		o.spare = batch[:0]
		if err != nil {
			// The stream is gone (its context ended): the results still
			// pending have no one to go to.
			o.broken = true
			o.free(len(o.pending))
			o.pending = nil
		}
	}
	o.sending = false
	o.mu.Unlock()
}

func (o *outbox) free(n int) {
	for range n {
		<-o.sem
	}
	if o.caller != nil {
		for range n {
			<-o.caller
		}
	}
	if o.served != nil {
		o.served.Add(-int64(n))
	}
}

func (s *Server) serveStreamItem(ctx context.Context, req *keydv1.SignStreamItem) (out *keydv1.SignStreamResult) {
	out = &keydv1.SignStreamResult{Id: req.Id}
	defer func() {
		if r := recover(); r != nil {
			s.log.LogAttrs(ctx, slog.LevelError, "panic in sign stream", slog.Any("panic", r), slog.String("stack", string(debug.Stack())))
			out.Response, out.Code, out.Message = nil, int32(codes.Internal), "internal error; the daemon log has the details"
		}
	}()
	timeout := streamTimeout
	if t := time.Duration(req.TimeoutMs) * time.Millisecond; t > 0 && t < timeout {
		timeout = t
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	resp, err := s.Sign(ctx, req.Request)
	if err != nil {
		st := status.Convert(err)
		out.Code, out.Message = int32(st.Code()), st.Message()
		// One line per refused request, as the daemon writes for a
		// refused unary Sign (successes are in the audit log).
		LogRPC(ctx, s.log, keydv1.KeyService_SignStream_FullMethodName, start, err)
		return out
	}
	out.Response = resp
	return out
}
