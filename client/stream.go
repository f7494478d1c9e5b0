package client

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// Bounds of the messages the client sends on the SignStream. The daemon
// takes at most 64 requests and 64 KiB per message.
const (
	streamBatch = 64
	// streamBatchBytes bounds the encoded requests of one message, with
	// room under the daemon's 64 KiB for the message's own framing.
	streamBatchBytes = 60 << 10
	// streamInFlight is how many requests of a stream the daemon serves
	// at once; past it, it stops reading the stream until it has answered
	// one, and a send may then block for as long as the daemon is busy.
	streamInFlight = 64
	// streamUnit is the size a request counts as against streamInFlight:
	// one unit up to it, one more for each further streamUnit bytes. The
	// daemon's flow-control window of a stream is 64 KiB, so the requests
	// of streamInFlight units fit in it, and a send that stays within
	// them does not block even when the daemon reads nothing more.
	streamUnit = 1 << 10
	// streamQueueCompact is the least length of the queue at which the
	// requests of callers that stopped waiting are dropped from it.
	streamQueueCompact = 4 * streamBatch
)

// streamSigner multiplexes the client's signatures over one SignStream,
// opened on first use and reopened after it breaks. A daemon without
// SignStream makes it fall back to unary Sign for good.
//
// Requests that are in flight together travel together: the caller that
// finds no send in progress sends its request and every request queued by
// then in one message, and again while more were queued during its send.
// A lone caller therefore sends at once, without a hand-off to another
// goroutine; with others in flight it first yields the processor once, so
// that callers just woken by their answers queue their next requests into
// the same message. Many callers share each message's cost.
type streamSigner struct {
	keys keydv1.KeyServiceClient

	mu       sync.Mutex
	cur      *signStream
	unary    bool // the daemon has no SignStream
	closed   bool
	nextID   uint64
	closeCtx context.Context
	closeFn  context.CancelFunc
	// opening is the stream being opened, if any. It is opened off the
	// lock and outside any caller's context, so that a caller whose
	// context ends while the connection is still being made gives up
	// (and Close does not wait for the connection either).
	opening *streamOpen
}

// streamOpen is one attempt to open the SignStream; done is closed once st
// or err is set.
type streamOpen struct {
	done chan struct{}
	st   *signStream
	err  error
}

type signStream struct {
	stream keydv1.KeyService_SignStreamClient
	cancel context.CancelFunc

	mu      sync.Mutex
	pending map[uint64]chan *keydv1.SignStreamResult
	err     error // set once the stream broke

	qmu     sync.Mutex
	queue   []*keydv1.SignStreamItem
	spare   []*keydv1.SignStreamItem
	sending bool
	// compactAt is the length of the queue at which it is next compacted
	// (at least streamQueueCompact).
	compactAt int

	// unanswered counts the units (streamUnit) of the requests sent whose
	// results have not come back, including those whose callers stopped
	// waiting: the daemon serves them all the same.
	unanswered atomic.Int64
	// big holds the units of the requests of more than one unit, from
	// their queueing until their result or until they are dropped from
	// the queue (guarded by mu).
	big map[uint64]int64
	// broken forgets the stream after a send failed.
	broken func()
}

func newStreamSigner(keys keydv1.KeyServiceClient) *streamSigner {
	ctx, cancel := context.WithCancel(context.Background())
	return &streamSigner{keys: keys, closeCtx: ctx, closeFn: cancel}
}

// errFallback says this request goes as a unary Sign: the daemon does not
// offer SignStream, or the request is too large to share a message.
var errFallback = errors.New("sign stream unavailable")

// sign sends req over the stream and waits for its answer or ctx.
func (s *streamSigner) sign(ctx context.Context, req *keydv1.SignRequest) (*keydv1.SignResponse, error) {
	size := proto.Size(req)
	if size > streamBatchBytes/2 {
		// Alone in a message it could still exceed the daemon's limit,
		// which would end the stream for everyone; unary, only this call
		// fails.
		return nil, errFallback
	}
	if !utf8.ValidString(req.Keyset) || !utf8.ValidString(req.Kid) || !utf8.ValidString(req.Purpose) {
		// Protobuf cannot encode it: the failed send would end the
		// stream, failing every request on it with this one's error.
		return nil, errFallback
	}
	st, id, ch, err := s.register(ctx)
	if err != nil {
		return nil, err
	}
	item := &keydv1.SignStreamItem{Id: id, Request: req}
	if d, ok := ctx.Deadline(); ok {
		ms := time.Until(d).Milliseconds()
		if ms <= 0 {
			st.forget(id)
			return nil, fromStatus(status.FromContextError(context.DeadlineExceeded).Err())
		}
		if ms < 1<<31 {
			item.TimeoutMs = uint32(ms)
		}
	}
	if n := int64(size/streamUnit + 1); n > 1 {
		st.mu.Lock()
		st.big[id] = n
		st.mu.Unlock()
	}
	if err := st.enqueue(item); err != nil {
		// The receiver sees the same failure and answers every pending
		// request, this one included.
		s.drop(st)
	}
	select {
	case resp := <-ch:
		if codes.Code(resp.Code) == codes.Unimplemented {
			// The daemon has no SignStream (Sign never answers this).
			return nil, errFallback
		}
		if resp.Code != int32(codes.OK) || resp.Response == nil {
			if resp.Code == int32(codes.OK) {
				return nil, &Error{Code: codes.Internal, Message: "sign stream: empty response"}
			}
			return nil, &Error{Code: codes.Code(resp.Code), Message: resp.Message}
		}
		return resp.Response, nil
	case <-ctx.Done():
		st.forget(id)
		return nil, fromStatus(status.FromContextError(ctx.Err()).Err())
	}
}

// enqueue queues item and, unless another caller is sending, sends the
// queue. It returns the send error, if it sent and the send failed.
func (st *signStream) enqueue(item *keydv1.SignStreamItem) error {
	st.qmu.Lock()
	st.queue = append(st.queue, item)
	if st.sending {
		if len(st.queue) >= max(st.compactAt, streamQueueCompact) {
			// A send is in progress, perhaps one the daemon does not
			// read: drop the requests of callers that gave up
			// meanwhile, rather than keep every one until it does.
			live, _ := st.live(st.queue)
			clear(st.queue[len(live):])
			st.queue = live
			st.compactAt = 2 * len(live)
		}
		st.qmu.Unlock()
		return nil
	}
	st.sending = true
	if st.inFlight() > 1 {
		// Others' requests are on their way: give their callers, which
		// may be runnable right now, a moment to queue theirs, so that
		// they share this message.
		st.qmu.Unlock()
		runtime.Gosched()
		st.qmu.Lock()
	}
	return st.drain(true)
}

// drain sends the queue; st.qmu is held on entry and released on return.
// Inline (on a caller's goroutine) it sends only while the daemon has room
// for the batch, so that the send does not block; once the daemon may stop
// reading, it hands the rest to a new goroutine, so that no caller waits
// for the daemon beyond its own context.
func (st *signStream) drain(inline bool) error {
	var err error
	for len(st.queue) > 0 && err == nil {
		q := st.queue
		batch, rest, units := split(q)
		if inline && st.unanswered.Load()+units > streamInFlight {
			st.qmu.Unlock()
			go func() {
				st.qmu.Lock()
				if st.drain(false) != nil {
					st.broken()
				}
			}()
			return nil
		}
		st.queue = append(st.spare[:0], rest...)
		clear(rest)
		st.qmu.Unlock()
		if live, units := st.live(batch); len(live) > 0 {
			st.unanswered.Add(units)
			err = st.stream.Send(&keydv1.SignStreamRequest{Requests: live})
		}
		clear(batch)
		st.qmu.Lock()
		st.spare = q[:0]
	}
	if err != nil {
		st.queue = nil // the stream is broken; fail answers them
	}
	st.sending = false
	st.qmu.Unlock()
	return err
}

// inFlight returns the number of requests waiting for an answer.
func (st *signStream) inFlight() int {
	st.mu.Lock()
	defer st.mu.Unlock()
	return len(st.pending)
}

// split returns the first message's worth of q, the rest, and the units
// of the first.
func split(q []*keydv1.SignStreamItem) (batch, rest []*keydv1.SignStreamItem, units int64) {
	size := 0
	for i, it := range q {
		n := proto.Size(it) + 3 // the field's tag and length
		size += n
		if i == streamBatch || (i > 0 && size > streamBatchBytes) {
			return q[:i], q[i:], units
		}
		units += int64(n/streamUnit + 1)
	}
	return q, nil, units
}

// live drops from batch, in place, the requests whose callers stopped
// waiting while they were queued, and returns the units of the others.
func (st *signStream) live(batch []*keydv1.SignStreamItem) (out []*keydv1.SignStreamItem, units int64) {
	st.mu.Lock()
	defer st.mu.Unlock()
	out = batch[:0]
	for _, it := range batch {
		n, big := st.big[it.Id]
		if _, ok := st.pending[it.Id]; ok {
			out = append(out, it)
			units += max(n, 1)
		} else if big {
			delete(st.big, it.Id)
		}
	}
	return out, units
}

// register returns the open stream (opening one if needed) and a fresh id
// with its answer channel. It waits for a stream being opened only as long
// as ctx lives.
func (s *streamSigner) register(ctx context.Context) (*signStream, uint64, chan *keydv1.SignStreamResult, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, 0, nil, fmt.Errorf("%w: client closed", ErrUnavailable)
	}
	if s.unary {
		s.mu.Unlock()
		return nil, 0, nil, errFallback
	}
	st := s.cur
	if st == nil {
		op := s.opening
		if op == nil {
			op = &streamOpen{done: make(chan struct{})}
			s.opening = op
			go s.open(op)
		}
		s.mu.Unlock()
		select {
		case <-op.done:
		case <-ctx.Done():
			return nil, 0, nil, fromStatus(status.FromContextError(ctx.Err()).Err())
		}
		if op.err != nil {
			return nil, 0, nil, op.err
		}
		st = op.st
		s.mu.Lock()
	}
	s.nextID++
	id := s.nextID
	s.mu.Unlock()
	ch := make(chan *keydv1.SignStreamResult, 1)
	st.mu.Lock()
	if st.err != nil {
		err := st.err
		st.mu.Unlock()
		s.drop(st)
		if status.Code(err) == codes.Unimplemented {
			// The daemon has no SignStream: like the requests the stream
			// took before it ended, this one goes as a unary Sign.
			return nil, 0, nil, errFallback
		}
		return nil, 0, nil, err
	}
	st.pending[id] = ch
	st.mu.Unlock()
	return st, id, ch, nil
}

// open opens a SignStream for op, makes it the current stream and starts
// its receiver. It is bounded by the client's life, not by a caller's.
func (s *streamSigner) open(op *streamOpen) {
	sctx, cancel := context.WithCancel(s.closeCtx)
	stream, err := s.keys.SignStream(sctx)
	s.mu.Lock()
	s.opening = nil
	switch {
	case err != nil && s.closed:
		cancel()
		op.err = fmt.Errorf("%w: client closed", ErrUnavailable)
	case err != nil:
		cancel()
		op.err = fromStatus(err)
	default:
		st := &signStream{stream: stream, cancel: cancel, pending: map[uint64]chan *keydv1.SignStreamResult{}, big: map[uint64]int64{}}
		st.broken = func() { s.drop(st) }
		op.st = st
		s.cur = op.st
		go s.receive(op.st)
	}
	s.mu.Unlock()
	close(op.done)
}

// receive delivers answers until the stream ends, then fails whatever is
// still pending and lets the next call open a new stream.
func (s *streamSigner) receive(st *signStream) {
	for {
		resp, err := st.stream.Recv()
		if err != nil {
			if status.Code(err) == codes.Unimplemented {
				s.mu.Lock()
				s.unary = true
				s.mu.Unlock()
			}
			s.drop(st)
			st.fail(err)
			return
		}
		st.mu.Lock()
		units := int64(len(resp.Results))
		if len(st.big) > 0 {
			for _, r := range resp.Results {
				if n, ok := st.big[r.Id]; ok {
					units += n - 1
					delete(st.big, r.Id)
				}
			}
		}
		st.unanswered.Add(-units)
		for _, r := range resp.Results {
			if ch, ok := st.pending[r.Id]; ok {
				delete(st.pending, r.Id)
				ch <- r // buffered, and only this one is ever sent on it
			}
		}
		st.mu.Unlock()
	}
}

func (st *signStream) forget(id uint64) {
	st.mu.Lock()
	delete(st.pending, id)
	st.mu.Unlock()
}

// fail answers every pending request with err's status.
func (st *signStream) fail(err error) {
	code, msg := codes.Unavailable, "sign stream closed"
	if s, ok := status.FromError(err); ok && s.Code() != codes.OK {
		code, msg = s.Code(), s.Message()
	}
	if code == codes.Canceled {
		code, msg = codes.Unavailable, "sign stream closed by the client"
	}
	st.mu.Lock()
	st.err = &Error{Code: code, Message: msg}
	pending := st.pending
	st.pending = map[uint64]chan *keydv1.SignStreamResult{}
	st.mu.Unlock()
	for id, ch := range pending {
		ch <- &keydv1.SignStreamResult{Id: id, Code: int32(code), Message: msg}
	}
	st.cancel()
}

// drop forgets st as the current stream, so the next call opens a new one.
func (s *streamSigner) drop(st *signStream) {
	s.mu.Lock()
	if s.cur == st {
		s.cur = nil
	}
	s.mu.Unlock()
}

func (s *streamSigner) close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.closeFn()
}
