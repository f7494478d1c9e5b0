package client

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// streamSigner multiplexes the client's signatures over one SignStream,
// opened on first use and reopened after it breaks. A daemon without
// SignStream makes it fall back to unary Sign for good.
type streamSigner struct {
	keys keydv1.KeyServiceClient

	mu       sync.Mutex
	cur      *signStream
	unary    bool // the daemon has no SignStream
	closed   bool
	nextID   uint64
	closeCtx context.Context
	closeFn  context.CancelFunc
}

type signStream struct {
	stream  keydv1.KeyService_SignStreamClient
	cancel  context.CancelFunc
	sendMu  sync.Mutex
	mu      sync.Mutex
	pending map[uint64]chan *keydv1.SignStreamResponse
	err     error // set once the stream broke
}

func newStreamSigner(keys keydv1.KeyServiceClient) *streamSigner {
	ctx, cancel := context.WithCancel(context.Background())
	return &streamSigner{keys: keys, closeCtx: ctx, closeFn: cancel}
}

// errFallback says the daemon does not offer SignStream.
var errFallback = errors.New("sign stream unavailable")

// sign sends req over the stream and waits for its answer or ctx.
func (s *streamSigner) sign(ctx context.Context, req *keydv1.SignRequest) (*keydv1.SignResponse, error) {
	st, id, ch, err := s.register(ctx)
	if err != nil {
		return nil, err
	}
	msg := &keydv1.SignStreamRequest{Id: id, Request: req}
	if d, ok := ctx.Deadline(); ok {
		ms := time.Until(d).Milliseconds()
		if ms <= 0 {
			st.forget(id)
			return nil, fromStatus(status.FromContextError(context.DeadlineExceeded).Err())
		}
		if ms < 1<<31 {
			msg.TimeoutMs = uint32(ms)
		}
	}
	st.sendMu.Lock()
	err = st.stream.Send(msg)
	st.sendMu.Unlock()
	if err != nil {
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

// register returns the open stream (opening one if needed) and a fresh id
// with its answer channel.
func (s *streamSigner) register(ctx context.Context) (*signStream, uint64, chan *keydv1.SignStreamResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, 0, nil, fmt.Errorf("%w: client closed", ErrUnavailable)
	}
	if s.unary {
		return nil, 0, nil, errFallback
	}
	if s.cur == nil {
		sctx, cancel := context.WithCancel(s.closeCtx)
		stream, err := s.keys.SignStream(sctx)
		if err != nil {
			cancel()
			return nil, 0, nil, fromStatus(err)
		}
		st := &signStream{stream: stream, cancel: cancel, pending: map[uint64]chan *keydv1.SignStreamResponse{}}
		s.cur = st
		go s.receive(st)
	}
	s.nextID++
	ch := make(chan *keydv1.SignStreamResponse, 1)
	st := s.cur
	st.mu.Lock()
	if st.err != nil {
		st.mu.Unlock()
		s.cur = nil
		return nil, 0, nil, st.err
	}
	st.pending[s.nextID] = ch
	st.mu.Unlock()
	return st, s.nextID, ch, nil
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
		ch, ok := st.pending[resp.Id]
		delete(st.pending, resp.Id)
		st.mu.Unlock()
		if ok {
			ch <- resp
		}
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
	st.pending = map[uint64]chan *keydv1.SignStreamResponse{}
	st.mu.Unlock()
	for id, ch := range pending {
		ch <- &keydv1.SignStreamResponse{Id: id, Code: int32(code), Message: msg}
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
