package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"runtime/debug"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/internal/authz"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// Bounds of one SignStream.
const (
	// streamInFlight bounds the requests of one stream being served at once;
	// past it the stream stops reading until one finishes (back-pressure).
	streamInFlight = 32
	// streamTimeout bounds one request when the caller gives no timeout.
	streamTimeout = 30 * time.Second
)

// SignStream implements keyd.v1.KeyService: each request is served by Sign,
// concurrently up to streamInFlight, and answered by id.
func (s *Server) SignStream(stream grpc.BidiStreamingServer[keydv1.SignStreamRequest, keydv1.SignStreamResponse]) error {
	ctx := stream.Context()
	var (
		sendMu sync.Mutex
		wg     sync.WaitGroup
		sem    = make(chan struct{}, streamInFlight)
	)
	defer wg.Wait()
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return nil
		}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			out := s.serveStreamRequest(ctx, req)
			sendMu.Lock()
			err := stream.Send(out)
			sendMu.Unlock()
			if err != nil && ctx.Err() == nil {
				s.log.LogAttrs(ctx, slog.LevelInfo, "sign stream: send failed", slog.String("err", err.Error()))
			}
		}()
	}
}

func (s *Server) serveStreamRequest(ctx context.Context, req *keydv1.SignStreamRequest) (out *keydv1.SignStreamResponse) {
	out = &keydv1.SignStreamResponse{Id: req.Id}
	defer func() {
		if r := recover(); r != nil {
			s.log.LogAttrs(ctx, slog.LevelError, "panic in sign stream", slog.Any("panic", r), slog.String("stack", string(debug.Stack())))
			out.Response, out.Code, out.Message = nil, int32(codes.Internal), "internal error; the daemon log has the details"
		}
	}()
	if req.Request == nil {
		out.Code, out.Message = int32(codes.InvalidArgument), "sign stream: request is required"
		return out
	}
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
		// One line per refused request, as the unary interceptor writes
		// for Sign (successes are in the audit log).
		if s.log.Enabled(ctx, slog.LevelInfo) {
			c, _ := authz.FromContext(ctx)
			s.log.LogAttrs(ctx, slog.LevelInfo, "rpc",
				slog.String("method", keydv1.KeyService_SignStream_FullMethodName),
				slog.Uint64("uid", uint64(c.UID)), slog.Int64("pid", int64(c.PID)),
				slog.String("code", st.Code().String()),
				slog.Duration("took", time.Since(start)))
		}
		return out
	}
	out.Response = resp
	return out
}
