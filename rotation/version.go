// Package rotation owns the lifecycle of keyd's key versions: which key of a
// key set is active, which are published, draining or gone, and the
// crash-safe order in which those facts change.
//
//	next ──▶ active ──▶ draining ──▶ retired ──▶ destroyed
//	any state ──revoke──▶ revoked
//
// The Manager keeps the versions in memory, persists every transition in a
// Store before it is visible, and hands out Leases: a signature holds a lease
// on its version for as long as it is being made, so a version is never
// destroyed under a signature in flight, and a signature finished after its
// version was revoked is thrown away.
package rotation

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/keyd-dev/keyd/keystore"
)

// State is a key version's lifecycle state.
type State int

// The states. Pending is the intent record written before the backend
// generates a key: it is never published, and a pending version found at
// start is an interrupted generation that reconciliation cleans up.
const (
	Pending State = iota
	Next
	Active
	Draining
	Retired
	Destroyed
	Revoked
	// Lost is a version the metadata says exists but whose key the backend
	// no longer has (a wiped token, a cleared TPM). It is never replaced
	// silently: signing with it is ErrKeyLost until an operator acts.
	Lost
)

var stateNames = [...]string{"pending", "next", "active", "draining", "retired", "destroyed", "revoked", "lost"}

func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// MarshalText implements encoding.TextMarshaler.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *State) UnmarshalText(b []byte) error {
	for i, n := range stateNames {
		if n == string(b) {
			*s = State(i)
			return nil
		}
	}
	return fmt.Errorf("unknown key state %q", b)
}

// Published reports whether versions in this state appear in the JWKS.
// A lost version may appear too, marked stale: see StaleKids.
func (s State) Published() bool { return s == Next || s == Active || s == Draining }

// Published returns the versions among vs that belong in a JWK Set, in
// their order: those in a published state (next, active, draining) and,
// per key set, a stale one (see StaleKids).
func Published(vs []Version) []Version {
	var out []Version
	for _, v := range vs {
		if v.State.Published() || stale(v, vs) {
			out = append(out, v)
		}
	}
	return out
}

// StaleKids returns the kids of the stale versions among vs: published
// keys that the backend lost. A key set's active key that was lost stays
// published until an operator rotates (a new key activates) or revokes it;
// a draining key that was lost, until its retire time, as it would have.
// They can no longer sign, but Published keeps their last-known public
// keys, so that what they signed before the loss still verifies and the
// key set's JWK Set does not silently change (RELIABILITY P1). Whoever
// publishes them marks them stale.
func StaleKids(vs []Version) []string {
	var kids []string
	for _, v := range vs {
		if stale(v, vs) {
			kids = append(kids, v.Kid)
		}
	}
	return kids
}

func stale(v Version, vs []Version) bool {
	if v.State != Lost {
		return false
	}
	switch v.LostFrom {
	case Draining:
		// Until the planner's retire time passes (see Plan).
		return true
	case Active:
		return !replaced(v, vs)
	}
	return false
}

// replaced reports whether a version of v's key set that is not lost
// activated after v.
func replaced(v Version, vs []Version) bool {
	for _, o := range vs {
		if o.KeySet == v.KeySet && o.State != Lost && o.ActivatedAt.After(v.ActivatedAt) {
			return true
		}
	}
	return false
}

// Version is one key of a key set.
type Version struct {
	KeySet string `json:"keyset"`
	// ID names the key in the backend; never reused.
	ID string `json:"id"`
	// Kid is the RFC 7638 SHA-256 thumbprint of the public key.
	Kid       string             `json:"kid,omitempty"`
	Alg       keystore.Algorithm `json:"alg"`
	RSABits   int                `json:"rsa_bits,omitempty"`
	Purpose   string             `json:"purpose"`
	Backend   string             `json:"backend"`
	State     State              `json:"state"`
	CreatedAt time.Time          `json:"created_at"`
	// ActivatedAt is when the version became active (zero before).
	ActivatedAt time.Time `json:"activated_at,omitzero"`
	// ActivateAt is when a next version activates.
	ActivateAt time.Time `json:"activate_at,omitzero"`
	// DeactivateAt is when an active version is due to be replaced (zero:
	// no scheduled rotation).
	DeactivateAt time.Time `json:"deactivate_at,omitzero"`
	// RetireAt is when a draining version is unpublished (zero: never
	// automatically).
	RetireAt time.Time `json:"retire_at,omitzero"`
	// DestroyAt is when a retired or revoked version is destroyed in the
	// backend (zero: never automatically).
	DestroyAt time.Time `json:"destroy_at,omitzero"`
	// ChangedAt is the time of the last transition.
	ChangedAt time.Time `json:"changed_at"`
	// JWK is the public key as an RFC 7517 JWK (public members only).
	JWK json.RawMessage `json:"jwk,omitempty"`
	// LostFrom is, for a lost version, the state it was in when the
	// backend was found not to hold it (Pending, the zero value, when
	// unknown: records written before keyd kept it).
	LostFrom State `json:"lost_from,omitempty"`
}

// Spec is the key the version holds.
func (v Version) Spec() keystore.KeySpec {
	return keystore.KeySpec{Algorithm: v.Alg, RSABits: v.RSABits}
}

// Errors of the lifecycle.
var (
	// ErrUnknownKeySet: no key set of that name is configured.
	ErrUnknownKeySet = errors.New("unknown key set")
	// ErrNotSignable: the version exists but may not sign (next, retired,
	// revoked, destroyed), or the kid is not a version of the key set.
	ErrNotSignable = errors.New("key version is not signable")
	// ErrNoActiveKey: the key set has no active version.
	ErrNoActiveKey = errors.New("key set has no active key")
	// ErrKeyLost: the metadata says the key exists but the backend lost it.
	ErrKeyLost = errors.New("key lost from the backend")
	// ErrUnknownKid: no version has that kid.
	ErrUnknownKid = errors.New("unknown kid")
	// ErrLocked: another keyd owns the state directory.
	ErrLocked = errors.New("state directory in use by another keyd")
	// ErrCorruptState: the metadata file cannot be read as keyd wrote it.
	ErrCorruptState = errors.New("key metadata is corrupt")
)
