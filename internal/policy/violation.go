package policy

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrViolation is matched (with errors.Is) by every *Violation: the request
// asked for a token the key set's policy does not allow. The server maps it to
// INVALID_ARGUMENT; the Violation's message says what to change.
var ErrViolation = errors.New("policy violation")

// Violation is one reason a header or claims set was refused.
type Violation struct {
	// Claim names what was wrong: a claim ("htu", "exp"), a header parameter
	// ("header.typ", "header.alg"), or the whole input ("header", "claims")
	// when it is not one JSON object.
	Claim string
	// Reason says what was wrong and, where it can, how to fix it.
	Reason string
}

// Error returns the violation as one line, e.g.
// `claim "htu": must not have a query (the "?" and what follows)`. A long
// claim or parameter name, which the caller chose, is shortened (see
// quoteName).
func (v *Violation) Error() string {
	switch {
	case v.Claim == "header" || v.Claim == "claims":
		return v.Claim + ": " + v.Reason
	case strings.HasPrefix(v.Claim, "header."):
		return "header parameter " + quoteName(strings.TrimPrefix(v.Claim, "header.")) + ": " + v.Reason
	}
	return "claim " + quoteName(v.Claim) + ": " + v.Reason
}

// quoteName quotes a member name for a message, as %q does, shortened to
// about 80 bytes: the name is the caller's, up to MaxJSONSize bytes, and %q
// can triple it, so whole it would let one refused request write tens of KiB
// to the audit log.
func quoteName(name string) string { return strconv.Quote(truncate(name)) }

// Is reports whether target is ErrViolation.
func (v *Violation) Is(target error) bool { return target == ErrViolation }

func violation(claim, format string, args ...any) *Violation {
	return &Violation{Claim: claim, Reason: fmt.Sprintf(format, args...)}
}
