package policy

import (
	"errors"
	"fmt"
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
// `claim "htu": must not have a query (the "?" and what follows)`.
func (v *Violation) Error() string {
	switch {
	case v.Claim == "header" || v.Claim == "claims":
		return v.Claim + ": " + v.Reason
	case strings.HasPrefix(v.Claim, "header."):
		return fmt.Sprintf("header parameter %q: %s", strings.TrimPrefix(v.Claim, "header."), v.Reason)
	}
	return fmt.Sprintf("claim %q: %s", v.Claim, v.Reason)
}

// Is reports whether target is ErrViolation.
func (v *Violation) Is(target error) bool { return target == ErrViolation }

func violation(claim, format string, args ...any) *Violation {
	return &Violation{Claim: claim, Reason: fmt.Sprintf(format, args...)}
}
