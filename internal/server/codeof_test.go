package server

import (
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/keyd-dev/keyd/keystore"
)

// Each keystore sentinel, wrapped as backends wrap it, reaches the caller
// as the gRPC code its meaning calls for (S1: refused storage is
// FAILED_PRECONDITION).
func TestCodeOfKeystoreErrors(t *testing.T) {
	for err, want := range map[error]codes.Code{
		keystore.ErrInsecureStorage:      codes.FailedPrecondition,
		keystore.ErrLocked:               codes.FailedPrecondition,
		keystore.ErrUnsupportedAlgorithm: codes.FailedPrecondition,
		keystore.ErrKeyLost:              codes.DataLoss,
		keystore.ErrUnavailable:          codes.Unavailable,
		keystore.ErrClosed:               codes.Unavailable,
	} {
		wrapped := fmt.Errorf("sign k1: %w", err)
		if got := codeOf(wrapped); got != want {
			t.Errorf("codeOf(%q) = %v, want %v", wrapped, got, want)
		}
	}
}
