package rotation

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/keyd-dev/keyd/internal/jws"
	"github.com/keyd-dev/keyd/keystore"
)

// now is the schedule's clock: the wall clock, but never ahead of the wall
// clock at start plus the monotonic time elapsed since (see
// Config.Monotonic).
func (m *Manager) now() time.Time {
	w := m.wall()
	guard := m.guard()
	if w.After(guard.Add(time.Second)) {
		if !m.jumped.Swap(true) {
			m.log.Warn("the wall clock jumped forward; the key schedule keeps monotonic time until keyd restarts",
				"wall", w.UTC(), "schedule_clock", guard.UTC())
		}
		return guard
	}
	if w.After(guard) {
		return guard
	}
	return w
}

// guard is the wall clock at start plus the monotonic time elapsed since.
func (m *Manager) guard() time.Time { return m.wallStart.Add(m.mono() - m.monoStart) }

// after returns now+d counted from the latest of now, the wall clock and
// the guard: a persisted deadline is later compared with a corrected wall
// clock (a jump back undone, a restart after a jump forward), so it must
// not be early on either clock.
func (m *Manager) after(now time.Time, d time.Duration) time.Time {
	base := now
	if w := m.wall(); w.After(base) {
		base = w
	}
	if g := m.guard(); g.After(base) {
		base = g
	}
	return base.Add(d)
}

// RotateResult says what a rotation did.
type RotateResult struct {
	// Active is the active version after the rotation.
	Active Version
	// Previous is the version that stopped being active (zero if none).
	Previous Version
	// Next is the version published to activate later (zero when the
	// rotation was immediate).
	Next Version
}

// Rotate replaces the active key of keyset. When the key set pre-publishes
// (verifiers cache its JWK Set) and immediate is false, a next key is
// published now and activates after the schedule's Prepublish; otherwise, or
// when a next key already exists and immediate is true, the new key is
// active at once and the previous active key drains. A backend failure
// leaves the active key unchanged.
func (m *Manager) Rotate(ctx context.Context, keyset string, immediate bool) (RotateResult, error) {
	if err := m.lockOp(ctx); err != nil {
		return RotateResult{}, fmt.Errorf("rotate %q: %w; nothing was changed", keyset, err)
	}
	defer m.unlockOp()
	s, ok := m.sets[keyset]
	if !ok {
		return RotateResult{}, fmt.Errorf("rotate %q: %w", keyset, ErrUnknownKeySet)
	}
	now := m.now()
	if next := m.nextOf(s); next != nil {
		if !immediate {
			return RotateResult{Active: m.activeVersion(s), Next: next.v}, nil
		}
		prev, err := m.activateLocked(s, next, now)
		if err != nil {
			return RotateResult{}, err
		}
		return RotateResult{Active: next.v, Previous: prev}, nil
	}
	if s.cfg.Prepublish && s.cfg.Schedule.Prepublish > 0 && !immediate && s.active != nil {
		nv, err := m.createLocked(ctx, s, Next, now.Add(s.cfg.Schedule.Prepublish))
		if err != nil {
			return RotateResult{}, err
		}
		return RotateResult{Active: s.active.v, Next: nv}, nil
	}
	prev := m.activeVersion(s)
	nv, err := m.createLocked(ctx, s, Active, time.Time{})
	if err != nil {
		return RotateResult{}, err
	}
	if prev.Kid != "" {
		prev = m.versionOf(prev.Kid, s)
	}
	return RotateResult{Active: nv, Previous: prev}, nil
}

func (m *Manager) activeVersion(s *setState) Version {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if s.active == nil {
		return Version{}
	}
	return s.active.v
}

func (m *Manager) versionOf(kid string, s *setState) Version {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if e := s.byKid[kid]; e != nil {
		return e.v
	}
	return Version{}
}

func (m *Manager) nextOf(s *setState) *entry {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var next *entry
	for _, e := range s.byKid {
		// One being revoked (its revocation not recorded yet) signs
		// nothing: activating it would leave the key set without a key.
		if e.v.State == Next && !e.revoking.Load() && (next == nil || e.v.ActivateAt.Before(next.v.ActivateAt)) {
			next = e
		}
	}
	return next
}

// createLocked generates a new version for s in the crash-safe order
// intent → backend → record. As Active it replaces the active version,
// which drains; as Next it is published to activate at activateAt.
func (m *Manager) createLocked(ctx context.Context, s *setState, state State, activateAt time.Time) (Version, error) {
	id, err := m.newID(s.cfg.Name)
	if err != nil {
		return Version{}, err
	}
	now := m.now()
	intent := Version{
		KeySet:    s.cfg.Name,
		ID:        id,
		Alg:       s.cfg.Spec.Algorithm,
		Purpose:   s.cfg.Purpose,
		Backend:   m.backend.Name(),
		State:     Pending,
		CreatedAt: now,
		ChangedAt: now,
	}
	if s.cfg.Spec.Algorithm.IsRSA() {
		intent.RSABits = s.cfg.Spec.Bits()
	}
	if err := m.persistWith(nil, intent); err != nil {
		return Version{}, fmt.Errorf("record intent: %w", err)
	}
	m.failpoint("rotate.after_intent")

	pub, err := m.backend.Generate(ctx, id, s.cfg.Spec)
	if err != nil {
		// The key may exist anyway (session lost after C_GenerateKeyPair).
		m.abandonLocked(ctx, intent)
		return Version{}, fmt.Errorf("generate %s key for key set %q: %w", s.cfg.Spec, s.cfg.Name, err)
	}
	m.failpoint("rotate.after_generate")

	jwk, err := jws.PublicJWK(pub)
	if err == nil {
		intent.Kid, err = jwk.Thumbprint()
	}
	if err == nil {
		jwk.Kid, jwk.Alg, jwk.Use = intent.Kid, string(intent.Alg), "sig"
		intent.JWK, err = json.Marshal(jwk)
	}
	if err != nil {
		m.abandonLocked(ctx, intent)
		return Version{}, fmt.Errorf("public key of new key %s: %w", id, err)
	}
	now = m.now()
	nv := intent
	nv.State, nv.ChangedAt = state, now
	changes := map[*entry]Version{}
	var prev Version
	if state == Active {
		nv.ActivatedAt = m.activatedAt(s, now)
		nv.DeactivateAt = m.deactivateAt(s, now)
		if old := s.active; old != nil {
			prev = m.drained(s, old.v, now)
			changes[old] = prev
		}
	} else {
		// Published from now on: it signs no earlier than Prepublish from
		// now, however long the generation took.
		nv.ActivateAt = activateAt
		if earliest := m.after(now, s.cfg.Schedule.Prepublish); nv.ActivateAt.Before(earliest) {
			nv.ActivateAt = earliest
		}
	}
	if err := m.persistWith(changes, nv); err != nil {
		m.abandonLocked(ctx, intent)
		return Version{}, fmt.Errorf("record new key: %w", err)
	}

	ne := &entry{v: nv}
	ne.state.Store(int32(state))
	m.mu.Lock()
	wasStale := StaleKids(m.setVersionsLocked(s))
	m.all = append(m.all, ne)
	s.byKid[nv.Kid] = ne
	var events []Event
	if state == Active {
		if old := s.active; old != nil {
			old.v = prev
			old.state.Store(int32(prev.State))
			events = append(events, Event{Version: prev, Previous: Active})
		}
		s.active = ne
	}
	events = append(events, Event{Version: nv, Previous: Pending})
	events = append(events, m.unpublishedLocked(s, wasStale)...)
	m.publishLocked(events)
	m.mu.Unlock()
	m.failpoint("rotate.after_commit")

	if state == Active {
		m.log.Info("key activated", "keyset", s.cfg.Name, "kid", nv.Kid, "alg", nv.Alg, "previous_kid", prev.Kid, "deactivate_at", nv.DeactivateAt)
	} else {
		m.log.Info("next key published", "keyset", s.cfg.Name, "kid", nv.Kid, "alg", nv.Alg, "activate_at", nv.ActivateAt)
	}
	return nv, nil
}

func (m *Manager) deactivateAt(s *setState, now time.Time) time.Time {
	if s.cfg.Schedule.Period <= 0 {
		return time.Time{}
	}
	return m.after(now, s.cfg.Schedule.Period)
}

// activatedAt is the activation time of a version of s that activates at
// now: now, or just after the latest activation recorded in s when the
// clock stands behind it (a wall clock set back). The activations of a key
// set stay ordered by ActivatedAt, which is how Plan and StaleKids tell
// whether a lost key was replaced.
func (m *Manager) activatedAt(s *setState, now time.Time) time.Time {
	at := now
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, e := range s.byKid {
		if !e.v.ActivatedAt.Before(at) {
			at = e.v.ActivatedAt.Add(time.Nanosecond)
		}
	}
	return at
}

// drained returns v as a draining version from now.
func (m *Manager) drained(s *setState, v Version, now time.Time) Version {
	v.State, v.ChangedAt = Draining, now
	v.DeactivateAt = time.Time{}
	if d := s.cfg.Schedule.Drain; d > 0 {
		v.RetireAt = m.after(now, d)
	}
	return v
}

// activateLocked makes next the active version of s; the active one drains.
func (m *Manager) activateLocked(s *setState, next *entry, now time.Time) (Version, error) {
	nv := next.v
	nv.State, nv.ChangedAt, nv.ActivatedAt = Active, now, m.activatedAt(s, now)
	nv.ActivateAt = time.Time{}
	nv.DeactivateAt = m.deactivateAt(s, now)
	changes := map[*entry]Version{next: nv}
	var prev Version
	old := s.active
	if old != nil {
		prev = m.drained(s, old.v, now)
		changes[old] = prev
	}
	m.failpoint("activate.before_commit")
	if err := m.persistWith(changes); err != nil {
		return Version{}, fmt.Errorf("record activation: %w", err)
	}
	m.mu.Lock()
	wasStale := StaleKids(m.setVersionsLocked(s))
	next.v = nv
	next.state.Store(int32(Active))
	var events []Event
	if old != nil {
		old.v = prev
		old.state.Store(int32(Draining))
		events = append(events, Event{Version: prev, Previous: Active})
	}
	s.active = next
	events = append(events, Event{Version: nv, Previous: Next})
	events = append(events, m.unpublishedLocked(s, wasStale)...)
	m.publishLocked(events)
	m.mu.Unlock()
	m.log.Info("key activated", "keyset", s.cfg.Name, "kid", nv.Kid, "previous_kid", prev.Kid, "deactivate_at", nv.DeactivateAt)
	return prev, nil
}

// unpublishedLocked returns an event for each lost version of s whose kid
// was among wasStale and is stale no more: an activation replaced the lost
// active key, which leaves the JWK Set (see StaleKids) although its state
// stays lost, and watchers must hear of it. Callers hold m.mu.
func (m *Manager) unpublishedLocked(s *setState, wasStale []string) []Event {
	if len(wasStale) == 0 {
		return nil
	}
	stale := StaleKids(m.setVersionsLocked(s))
	var events []Event
	for _, e := range m.all {
		if e.v.KeySet == s.cfg.Name && e.v.State == Lost && slices.Contains(wasStale, e.v.Kid) && !slices.Contains(stale, e.v.Kid) {
			events = append(events, Event{Version: e.v, Previous: Lost})
		}
	}
	return events
}

// setState changes e's state (no backend involved) and publishes it.
func (m *Manager) setStateLocked(e *entry, v Version, point string) error {
	prev := e.v.State
	m.failpoint(point)
	if err := m.persistWith(map[*entry]Version{e: v}); err != nil {
		return fmt.Errorf("record %s of %s: %w", v.State, v.Kid, err)
	}
	m.mu.Lock()
	e.v = v
	e.state.Store(int32(v.State))
	if s := m.sets[v.KeySet]; s != nil && s.active == e && v.State != Active {
		s.active = nil
	}
	m.publishLocked([]Event{{Version: v, Previous: prev}})
	m.mu.Unlock()
	return nil
}

// retireLocked unpublishes a draining version.
func (m *Manager) retireLocked(s *setState, e *entry, now time.Time) error {
	v := e.v
	if v.State == Lost {
		// Gone from the backend already: only unpublished, nothing to
		// destroy.
		v.LostFrom, v.ChangedAt, v.RetireAt = Retired, now, time.Time{}
		if err := m.setStateLocked(e, v, "retire.before_commit"); err != nil {
			return err
		}
		m.log.Info("lost key unpublished at its retire time", "keyset", s.cfg.Name, "kid", v.Kid)
		return nil
	}
	v.State, v.ChangedAt, v.RetireAt = Retired, now, time.Time{}
	if r := s.cfg.Schedule.Retain; r > 0 {
		v.DestroyAt = m.after(now, r)
	}
	if err := m.setStateLocked(e, v, "retire.before_commit"); err != nil {
		return err
	}
	m.log.Info("key retired (unpublished)", "keyset", s.cfg.Name, "kid", v.Kid, "destroy_at", v.DestroyAt)
	return nil
}

// DestroyWait bounds how long a destroy waits for signatures in flight with
// the key (past it the destroy is deferred to the next tick), and, unless
// Config.DestroyTimeout says otherwise, the backend's Destroy itself.
const DestroyWait = 10 * time.Second

// errInFlight defers a destroy: signatures still hold the key.
var errInFlight = errors.New("signatures in flight")

// destroyLocked removes an unpublished version from the backend, after the
// signatures in flight with it have finished. It is idempotent: a key the
// backend no longer has counts as destroyed.
func (m *Manager) destroyLocked(ctx context.Context, s *setState, e *entry, now time.Time) error {
	deadline := time.Now().Add(DestroyWait)
	for e.refs.Load() > 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("destroy %s: %w", e.v.Kid, errInFlight)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	// Bounded: a device that does not answer must not hold the lifecycle
	// lock (rotations, revocations, other key sets' steps) for as long as
	// it hangs. A destroy cut off here that the device still carries out
	// is found done by the next attempt (ErrNotFound).
	dctx, cancel := context.WithTimeout(ctx, m.destroyTO)
	err := m.backend.Destroy(dctx, e.v.ID)
	cancel()
	if err != nil && !errors.Is(err, keystore.ErrNotFound) {
		return fmt.Errorf("destroy %s: %w", e.v.Kid, err)
	}
	m.failpoint("destroy.after_backend")
	v := e.v
	v.State, v.ChangedAt, v.DestroyAt = Destroyed, now, time.Time{}
	if err := m.setStateLocked(e, v, "destroy.before_commit"); err != nil {
		return err
	}
	m.log.Info("key destroyed", "keyset", s.cfg.Name, "kid", v.Kid)
	return nil
}

// abandonLocked removes what the backend made under the intent's ID and
// drops the intent; if that fails the intent stays recorded, so the next
// start's reconcile removes the key instead of leaving an orphan.
func (m *Manager) abandonLocked(ctx context.Context, intent Version) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.destroyTO)
	defer cancel()
	err := m.backend.Destroy(dctx, intent.ID)
	if err == nil || errors.Is(err, keystore.ErrNotFound) {
		if perr := m.persist(); perr != nil { // drop the intent
			m.log.Error("could not drop the intent record of a failed generation; it is cleaned up at next start", "id", intent.ID, "err", perr)
		}
		return
	}
	m.log.Error("could not remove the key of a failed generation; its intent stays recorded and is removed once the backend destroys again", "id", intent.ID, "err", err)
	e := &entry{v: intent}
	e.state.Store(int32(Pending))
	m.mu.Lock()
	m.all = append(m.all, e)
	m.mu.Unlock()
	if perr := m.persist(); perr != nil {
		m.log.Error("could not keep the intent record of a failed generation", "id", intent.ID, "err", perr)
	}
}

// DestroyedKeep is how long the record of a destroyed key is kept. Until
// then ListKeys shows it, and a key that comes back into the backend (a
// token restored from a backup) is recognised and destroyed again (P11).
// Then the record is dropped, so that the state does not grow with every
// rotation for ever; a key that came back after that is one keyd has no
// record of: left alone, and never used.
const DestroyedKeep = 30 * 24 * time.Hour

// pruneLocked drops the records of keys destroyed more than DestroyedKeep
// ago. Callers hold the lifecycle token (lockOp).
func (m *Manager) pruneLocked() {
	cut := m.now().Add(-DestroyedKeep)
	n, err := m.dropLocked(func(e *entry) bool { return e.v.State == Destroyed && e.v.ChangedAt.Before(cut) })
	switch {
	case err != nil:
		m.log.Error("could not record that the records of keys destroyed long ago were dropped; the next change records it", "err", err)
	case n > 0:
		m.log.Info("dropped the records of keys destroyed long ago", "records", n, "destroyed_before", cut)
	}
}

// dropLocked removes the entries gone reports from the manager and, if it
// removed any, records the versions left. Callers hold the lifecycle token (lockOp).
func (m *Manager) dropLocked(gone func(*entry) bool) (int, error) {
	m.mu.Lock()
	n := len(m.all)
	for _, e := range m.all {
		if s := m.sets[e.v.KeySet]; s != nil && gone(e) && s.byKid[e.v.Kid] == e {
			delete(s.byKid, e.v.Kid)
		}
	}
	m.all = slices.DeleteFunc(m.all, gone)
	n -= len(m.all)
	m.mu.Unlock()
	if n == 0 {
		return 0, nil
	}
	return n, m.persist()
}

// sweepIntentsLocked removes the intents that abandonLocked had to keep
// (the backend could not destroy what a failed generation may have made):
// their keys are destroyed and their records dropped. During an outage
// each tick's failed rotation keeps one; they go at the first tick the
// backend destroys again, not only at the next start. It stops at the
// first failure, so that a backend still down costs one wait. Callers hold
// the lifecycle token (lockOp).
func (m *Manager) sweepIntentsLocked(ctx context.Context) {
	m.mu.RLock()
	var pending []*entry
	for _, e := range m.all {
		if e.v.State == Pending {
			pending = append(pending, e)
		}
	}
	m.mu.RUnlock()
	gone := map[*entry]bool{}
	for _, e := range pending {
		dctx, cancel := context.WithTimeout(ctx, m.destroyTO)
		err := m.backend.Destroy(dctx, e.v.ID)
		cancel()
		if err != nil && !errors.Is(err, keystore.ErrNotFound) {
			break
		}
		gone[e] = true
	}
	n, err := m.dropLocked(func(e *entry) bool { return gone[e] })
	switch {
	case err != nil:
		m.log.Error("could not drop the intent records of failed generations; the next start drops them", "err", err)
	case n > 0:
		m.log.Info("removed what failed key generations left", "intents", n)
	}
}

// Revoke unpublishes the version with kid and makes it unusable at once,
// before it waits for any other lifecycle change in progress (a slow key
// generation, a destroy waiting for its signatures): from then on the
// version signs nothing in this process, even if recording the revocation
// then fails (each Tick then tries to record it, and holds the key set's
// scheduled changes until it can). A signature in flight with it is
// discarded (see Lease.Valid). When the revoked version was the active
// one, a new active key is generated at once (or a published next key
// activated) so the key set keeps working; so it is when the revoked
// version was the key set's lost active key (see StaleKids) and no other
// lost active key is left.
// keyset, when not empty, must be the version's key set.
func (m *Manager) Revoke(ctx context.Context, kid, keyset string) (Version, error) {
	s, e := m.findKid(kid, keyset)
	if e == nil {
		return Version{}, fmt.Errorf("revoke %s: %w", kid, ErrUnknownKid)
	}
	e.revoking.Store(true)
	if err := m.lockOp(ctx); err != nil {
		// Run records it once the change in progress lets go.
		select {
		case m.kick <- struct{}{}:
		default:
		}
		return Version{}, fmt.Errorf("revoke %s: %w; the key signs nothing from now on, and keyd records its revocation as soon as no other key change is in progress", kid, err)
	}
	defer m.unlockOp()
	return m.revokeLocked(ctx, s, e)
}

// revokeLocked records the revocation of e, a version of s being revoked,
// and replaces it when it was the active key (see Revoke). Callers hold
// the lifecycle token (lockOp).
func (m *Manager) revokeLocked(ctx context.Context, s *setState, e *entry) (Version, error) {
	kid := e.v.Kid
	if e.v.State == Revoked || e.v.State == Destroyed {
		// Revoked already: perhaps by a call that could not make the
		// replacement, which this one retries.
		if s.active == nil && !m.hasLost(s.cfg.Name) {
			if err := m.replaceLocked(ctx, s); err != nil {
				return e.v, fmt.Errorf("%s is revoked, but making a new active key for key set %q failed (revoke again or rotate to retry): %w", kid, s.cfg.Name, err)
			}
		}
		return e.v, nil
	}
	now := m.now()
	v := e.v
	prevState := v.State
	wasActive := s.active == e
	wasStale := prevState == Lost && v.LostFrom == Active && stale(v, m.setVersions(s))
	v.State, v.ChangedAt = Revoked, now
	v.ActivateAt, v.DeactivateAt, v.RetireAt = time.Time{}, time.Time{}, time.Time{}
	if r := s.cfg.Schedule.Retain; r > 0 {
		v.DestroyAt = m.after(now, r)
	}
	if err := m.setStateLocked(e, v, "revoke.before_commit"); err != nil {
		return Version{}, fmt.Errorf("revoke %s: it signs nothing more in this process, but the revocation could not be recorded (retry): %w", kid, err)
	}
	m.log.Warn("key revoked", "keyset", s.cfg.Name, "kid", kid, "previous_state", prevState.String())
	// A lost active key (published stale) is replaced like an active one,
	// unless the key set has another lost active key still to deal with.
	if wasActive || (wasStale && !m.hasLost(s.cfg.Name)) {
		if err := m.replaceLocked(ctx, s); err != nil {
			return v, fmt.Errorf("revoked %s, but making its replacement failed (revoke it again or rotate %q to retry): %w", kid, s.cfg.Name, err)
		}
	}
	return v, nil
}

// replaceLocked gives s, whose active key was revoked, a new active key:
// its published next key, or one made now. Callers hold the lifecycle
// token (lockOp).
func (m *Manager) replaceLocked(ctx context.Context, s *setState) error {
	if next := m.nextOf(s); next != nil {
		_, err := m.activateLocked(s, next, m.now())
		return err
	}
	_, err := m.createLocked(ctx, s, Active, time.Time{})
	return err
}

// findKid returns the version with kid and its key set, in keyset if not
// empty, or nil.
func (m *Manager) findKid(kid, keyset string) (*setState, *entry) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, name := range m.order {
		if keyset != "" && name != keyset {
			continue
		}
		if e, ok := m.sets[name].byKid[kid]; ok {
			return m.sets[name], e
		}
	}
	return nil, nil
}

// Tick carries out whatever the schedules say is due now, for every key set.
// A failing step (a backend outage, say) is logged and returned, leaves the
// key set as it was, and is tried again at the next tick.
func (m *Manager) Tick(ctx context.Context) error {
	if err := m.lockOp(ctx); err != nil {
		return fmt.Errorf("rotation tick: %w", err)
	}
	defer m.unlockOp()
	return m.tickLocked(ctx)
}

func (m *Manager) tickLocked(ctx context.Context) error {
	m.sweepIntentsLocked(ctx)
	m.pruneLocked()
	var errs []error
	for _, name := range m.order {
		s := m.sets[name]
		if err := m.finishRevokesLocked(ctx, s); err != nil {
			m.failures.Add(1)
			m.log.Error("a revocation is still not recorded, or the revoked active key not replaced; the key signs nothing, and the key set's scheduled changes wait for it",
				"keyset", name, "err", err)
			// The plan cannot see that a version is being revoked: it
			// would activate a revoked next key, or keep a revoked active
			// one.
			errs = append(errs, fmt.Errorf("key set %q: %w", name, err))
			continue
		}
		now := m.now()
		for _, a := range Plan(now, s.cfg.Schedule, m.setVersions(s)) {
			if err := m.execLocked(ctx, s, a, now); err != nil {
				if errors.Is(err, errInFlight) {
					m.log.Info("destroy deferred: signatures still in flight", "keyset", name, "kid", a.Kid)
					continue
				}
				m.failures.Add(1)
				m.log.Error("scheduled key change failed; the key set stays as it is and the change is retried",
					"keyset", name, "action", a.Kind.String(), "kid", a.Kid, "err", err)
				errs = append(errs, fmt.Errorf("key set %q: %s: %w", name, a.Kind, err))
				if a.Kind == Destroy {
					// Nothing later depends on a key leaving the backend,
					// and a destroy that keeps failing (a read-only token)
					// must not keep a draining key published and signing
					// past its drain, nor hold up the rotation.
					continue
				}
				break // later actions of this plan may depend on this one
			}
		}
	}
	return errors.Join(errs...)
}

// finishRevokesLocked records the revocations of versions of s that a
// Revoke could not record (a failed save, or a Revoke that gave up
// waiting for the lifecycle token): they sign nothing already, and
// until the record says so the schedule would treat them as it did before
// (activate a revoked next key, say, leaving the key set without a key
// that signs). Callers hold the lifecycle token (lockOp).
func (m *Manager) finishRevokesLocked(ctx context.Context, s *setState) error {
	m.mu.RLock()
	var unrecorded []*entry
	for _, e := range m.all {
		if e.v.KeySet == s.cfg.Name && e.revoking.Load() && e.v.State != Revoked && e.v.State != Destroyed && e.v.State != Pending {
			unrecorded = append(unrecorded, e)
		}
	}
	m.mu.RUnlock()
	for _, e := range unrecorded {
		if _, err := m.revokeLocked(ctx, s, e); err != nil {
			return err
		}
		m.log.Warn("recorded a revocation that could not be recorded when it was made", "keyset", s.cfg.Name, "kid", e.v.Kid)
	}
	return nil
}

func (m *Manager) setVersions(s *setState) []Version {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.setVersionsLocked(s)
}

// setVersionsLocked is setVersions for a caller that holds m.mu.
func (m *Manager) setVersionsLocked(s *setState) []Version {
	var vs []Version
	for _, e := range m.all {
		if e.v.KeySet == s.cfg.Name && e.v.State != Pending && e.v.State != Destroyed {
			vs = append(vs, e.v)
		}
	}
	return vs
}

func (m *Manager) execLocked(ctx context.Context, s *setState, a Action, now time.Time) error {
	var e *entry
	if a.Kid != "" {
		m.mu.RLock()
		e = s.byKid[a.Kid]
		m.mu.RUnlock()
		if e == nil {
			return fmt.Errorf("%w: %s", ErrUnknownKid, a.Kid)
		}
	}
	switch a.Kind {
	case CreateActive:
		_, err := m.createLocked(ctx, s, Active, time.Time{})
		return err
	case CreateNext:
		nv, err := m.createLocked(ctx, s, Next, a.ActivateAt)
		if now := m.now(); err == nil && !nv.ActivateAt.After(now) {
			// No prepublish: due at once, not at the next tick.
			_, err = m.activateLocked(s, s.byKid[nv.Kid], now)
		}
		return err
	case Activate:
		_, err := m.activateLocked(s, e, now)
		return err
	case Retire:
		return m.retireLocked(s, e, now)
	case Destroy:
		return m.destroyLocked(ctx, s, e, now)
	}
	return fmt.Errorf("unknown action %v", a.Kind)
}

// NextTick returns when the schedules next need the manager, or the zero
// time when nothing is scheduled.
func (m *Manager) NextTick() time.Time {
	now := m.now()
	var at time.Time
	for _, name := range m.order {
		t := NextDue(now, m.sets[name].cfg.Schedule, m.setVersions(m.sets[name]))
		if !t.IsZero() && (at.IsZero() || t.Before(at)) {
			at = t
		}
	}
	return at
}

// Run ticks until ctx ends: at each scheduled transition, and at least every
// interval (so a failed step is retried and a clock that jumped is seen).
func (m *Manager) Run(ctx context.Context, interval time.Duration) {
	for {
		m.Tick(ctx)
		wait := interval
		if at := m.NextTick(); !at.IsZero() {
			if d := at.Sub(m.now()); d < wait {
				wait = d
			}
		}
		if wait < 10*time.Millisecond {
			wait = 10 * time.Millisecond
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-m.kick:
			t.Stop()
		case <-t.C:
		}
	}
}

// Failures counts scheduled changes that failed since start (for metrics).
func (m *Manager) Failures() int64 { return m.failures.Load() }
