package rotation

import (
	"sort"
	"time"
)

// Schedule is a key set's rotation schedule.
type Schedule struct {
	// Period is how long a key stays active; zero means no scheduled
	// rotation (keys change only when an operator rotates them).
	Period time.Duration
	// Prepublish is how long a next key is published before it activates,
	// so that verifiers that cache the JWK Set learn it first. Zero
	// activates new keys at once (DPoP needs none: each proof carries its
	// public key).
	Prepublish time.Duration
	// Drain is how long the previous key stays published and usable, for
	// the tokens and assertions already made with it (or bound to it).
	Drain time.Duration
	// Retain is how long an unpublished (retired or revoked) key is kept in
	// the backend before it is destroyed.
	Retain time.Duration
}

// ActionKind says what an Action does.
type ActionKind int

// The actions a plan is made of.
const (
	// CreateActive makes a new key that signs at once: the key set has no
	// active key and no next key (first start, or the active key was
	// revoked).
	CreateActive ActionKind = iota + 1
	// CreateNext makes a new key, published now, activating at ActivateAt.
	CreateNext
	// Activate makes the next key Kid active; the active key drains.
	Activate
	// Retire unpublishes the draining key Kid.
	Retire
	// Destroy removes the retired or revoked key Kid from the backend.
	Destroy
)

var actionNames = [...]string{"", "create-active", "create-next", "activate", "retire", "destroy"}

func (k ActionKind) String() string {
	if k > 0 && int(k) < len(actionNames) {
		return actionNames[k]
	}
	return "unknown"
}

// Action is one step of a plan.
type Action struct {
	Kind ActionKind
	// Kid is the version concerned (Activate, Retire, Destroy).
	Kid string
	// ActivateAt is when a CreateNext key activates.
	ActivateAt time.Time
}

// Plan returns what must happen to one key set's versions at now under
// schedule s. It is pure: the same inputs give the same plan, and applying a
// plan's actions then planning again at the same now gives no further
// action (the planner never rotates twice for one deadline). Versions in
// states Pending and Destroyed are ignored; a Lost active key blocks any
// automatic replacement (an operator decides), while an older key lost
// after it stopped being the active one does not (see lostActive).
//
// Deadlines are read from the versions' recorded times, so a restart or a
// clock that stood still resumes the schedule where it was:
//   - next → active at ActivateAt, or at once when the key set has no
//     active key and no lost one: that is a Revoke of the active key
//     interrupted (a crash, a failed save) after it recorded the
//     revocation and before it activated the next key in its place, and
//     the key set must sign again as Revoke would have made it;
//   - active → draining when a next key activates; a next key is created
//     Prepublish before the active key's DeactivateAt (or at once, activating
//     after Prepublish, when that moment has passed);
//   - draining → retired at RetireAt (a draining key that was lost is
//     unpublished then: it stays lost, lost from retired);
//   - retired or revoked → destroyed at DestroyAt.
func Plan(now time.Time, s Schedule, versions []Version) []Action {
	var (
		active, next *Version
		actions      []Action
	)
	lost := lostActive(versions)
	vs := append([]Version(nil), versions...)
	sort.SliceStable(vs, func(i, j int) bool { return vs[i].CreatedAt.Before(vs[j].CreatedAt) })
	for i := range vs {
		v := &vs[i]
		switch v.State {
		case Active:
			if active == nil || v.ActivatedAt.After(active.ActivatedAt) {
				active = v
			}
		case Next:
			if next == nil || v.ActivateAt.Before(next.ActivateAt) {
				next = v
			}
		}
	}

	// Keys leave first, so a plan never grows the number of live keys
	// before it shrinks it.
	for _, v := range vs {
		switch v.State {
		case Draining:
			if !v.RetireAt.IsZero() && !now.Before(v.RetireAt) {
				actions = append(actions, Action{Kind: Retire, Kid: v.Kid})
			}
		case Retired, Revoked:
			if !v.DestroyAt.IsZero() && !now.Before(v.DestroyAt) {
				actions = append(actions, Action{Kind: Destroy, Kid: v.Kid})
			}
		case Lost:
			// A draining key that was lost stays published (stale)
			// until it would have retired.
			if v.LostFrom == Draining && !v.RetireAt.IsZero() && !now.Before(v.RetireAt) {
				actions = append(actions, Action{Kind: Retire, Kid: v.Kid})
			}
		}
	}

	switch {
	case next != nil:
		if !now.Before(next.ActivateAt) || (active == nil && !lost) {
			actions = append(actions, Action{Kind: Activate, Kid: next.Kid})
		}
	case active == nil:
		if !lost {
			actions = append(actions, Action{Kind: CreateActive})
		}
	case s.Period > 0:
		deactivate := deactivation(s, *active)
		if createAt := deactivate.Add(-s.Prepublish); !now.Before(createAt) {
			at := deactivate
			if min := now.Add(s.Prepublish); at.Before(min) {
				at = min
			}
			actions = append(actions, Action{Kind: CreateNext, ActivateAt: at})
		}
	}
	return actions
}

// lostActive reports whether the key set's signing key is lost: a lost
// version not older than the last activation of a version not lost.
func lostActive(vs []Version) bool {
	for _, v := range vs {
		if v.State == Lost && !replaced(v, vs) {
			return true
		}
	}
	return false
}

// NextDue returns the earliest moment after now at which Plan would act on
// versions, or the zero time when nothing is scheduled. The manager sleeps
// until then (or until its tick, whichever is first).
func NextDue(now time.Time, s Schedule, versions []Version) time.Time {
	var at time.Time
	consider := func(t time.Time) {
		if t.IsZero() || !t.After(now) {
			return
		}
		if at.IsZero() || t.Before(at) {
			at = t
		}
	}
	hasNext := false
	for _, v := range versions {
		switch v.State {
		case Next:
			hasNext = true
			consider(v.ActivateAt)
		case Draining:
			consider(v.RetireAt)
		case Retired, Revoked:
			consider(v.DestroyAt)
		case Lost:
			if v.LostFrom == Draining {
				consider(v.RetireAt)
			}
		}
	}
	if !hasNext && s.Period > 0 {
		for _, v := range versions {
			if v.State == Active {
				consider(deactivation(s, v).Add(-s.Prepublish))
			}
		}
	}
	return at
}

// deactivation is when active version v is due to be replaced under s,
// which has a period: its DeactivateAt, or, for a key activated while its
// key set had no period (a schedule added to the configuration later), a
// period after its activation.
func deactivation(s Schedule, v Version) time.Time {
	if v.DeactivateAt.IsZero() {
		return v.ActivatedAt.Add(s.Period)
	}
	return v.DeactivateAt
}
