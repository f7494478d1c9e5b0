package client

import (
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Sentinel errors, one per gRPC code the daemon answers with. Errors from
// the daemon match them with errors.Is and keep the daemon's message.
var (
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrPermissionDenied   = errors.New("permission denied")
	ErrUnauthenticated    = errors.New("unauthenticated")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrNotFound           = errors.New("not found")
	ErrUnavailable        = errors.New("keyd unavailable")
	ErrKeyLost            = errors.New("key lost")
	ErrResourceExhausted  = errors.New("resource exhausted")
	ErrDeadlineExceeded   = errors.New("deadline exceeded")
	ErrInternal           = errors.New("internal error in keyd")
)

// Error is an error answered by the daemon.
type Error struct {
	Code    codes.Code
	Message string
}

func (e *Error) Error() string { return "keyd: " + e.Message }

// GRPCStatus lets status.FromError see the original status.
func (e *Error) GRPCStatus() *status.Status { return status.New(e.Code, e.Message) }

// Is matches the sentinel of e's code.
func (e *Error) Is(target error) bool { return sentinelOf(e.Code) == target }

func sentinelOf(c codes.Code) error {
	switch c {
	case codes.InvalidArgument:
		return ErrInvalidArgument
	case codes.PermissionDenied:
		return ErrPermissionDenied
	case codes.Unauthenticated:
		return ErrUnauthenticated
	case codes.FailedPrecondition:
		return ErrFailedPrecondition
	case codes.NotFound:
		return ErrNotFound
	case codes.Unavailable:
		return ErrUnavailable
	case codes.DataLoss:
		return ErrKeyLost
	case codes.ResourceExhausted:
		return ErrResourceExhausted
	case codes.DeadlineExceeded:
		return ErrDeadlineExceeded
	case codes.Internal, codes.Unknown:
		return ErrInternal
	}
	return nil
}

// fromStatus maps a gRPC error back to an *Error (the one place that does).
func fromStatus(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	return &Error{Code: st.Code(), Message: st.Message()}
}
