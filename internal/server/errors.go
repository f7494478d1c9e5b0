package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/internal/audit"
	"github.com/keyd-dev/keyd/internal/policy"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/rotation"
)

// codeOf is the one place that turns keyd's errors into gRPC codes.
func codeOf(err error) codes.Code {
	switch {
	case err == nil:
		return codes.OK
	case errors.Is(err, policy.ErrViolation), errors.Is(err, errBadRequest):
		return codes.InvalidArgument
	case errors.Is(err, errDenied), errors.Is(err, rotation.ErrUnknownKeySet):
		return codes.PermissionDenied
	case errors.Is(err, errUnauthenticated):
		return codes.Unauthenticated
	case errors.Is(err, errLimited):
		return codes.ResourceExhausted
	case errors.Is(err, rotation.ErrKeyLost), errors.Is(err, keystore.ErrKeyLost):
		return codes.DataLoss
	case errors.Is(err, rotation.ErrNotSignable), errors.Is(err, rotation.ErrNoActiveKey),
		errors.Is(err, keystore.ErrLocked), errors.Is(err, keystore.ErrInsecureStorage),
		errors.Is(err, keystore.ErrUnsupportedAlgorithm):
		return codes.FailedPrecondition
	case errors.Is(err, rotation.ErrUnknownKid):
		return codes.NotFound
	case errors.Is(err, keystore.ErrUnavailable), errors.Is(err, audit.ErrWrite), errors.Is(err, keystore.ErrClosed):
		return codes.Unavailable
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	}
	return codes.Internal
}

// toStatus maps err to a gRPC status whose message a person can act on.
// Internal errors are logged in full and answered without device detail.
func (s *Server) toStatus(ctx context.Context, op string, err error) error {
	if err == nil {
		return nil
	}
	c := codeOf(err)
	msg := err.Error()
	switch c {
	case codes.Internal:
		s.log.LogAttrs(ctx, slog.LevelError, "internal error", slog.String("op", op), slog.String("err", msg))
		msg = op + ": internal error; the daemon log has the details"
	case codes.DataLoss:
		msg = op + ": " + msg + "; the key is gone from the backend and keyd will not replace it silently: an operator must rotate or restore it"
	}
	return status.Error(c, msg)
}

// badRequest is a malformed request; it matches errBadRequest and reads as
// its message alone.
type badRequest struct{ msg string }

func (e *badRequest) Error() string        { return e.msg }
func (e *badRequest) Is(target error) bool { return target == errBadRequest }

func invalid(format string, args ...any) error {
	return &badRequest{msg: fmt.Sprintf(format, args...)}
}

var (
	errBadRequest      = errors.New("bad request")
	errDenied          = errors.New("permission denied")
	errUnauthenticated = errors.New("no caller credentials")
	errLimited         = errors.New("rate limited")
)
