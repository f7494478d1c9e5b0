package rotation

import (
	"context"
	"crypto"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keyd-dev/keyd/internal/jws"
	"github.com/keyd-dev/keyd/keystore"
)

// KeySet is a configured key set as the lifecycle sees it.
type KeySet struct {
	Name     string
	Purpose  string
	Spec     keystore.KeySpec
	Schedule Schedule
	// Prepublish says whether a manual rotation publishes the new key for
	// Schedule.Prepublish before it activates (verifiers cache the JWK
	// Set), unless the operator asks for an immediate rotation.
	Prepublish bool
}

// Config wires a Manager.
type Config struct {
	Backend keystore.Backend
	Store   *Store
	KeySets []KeySet
	// Now is the wall clock; nil means time.Now.
	Now func() time.Time
	// Monotonic returns the time elapsed since an arbitrary origin, from a
	// clock that never jumps; nil means Go's monotonic clock. The schedule
	// runs on min(wall clock, wall clock at start + monotonic time
	// elapsed): a wall clock that jumps forward cannot skip a drain, and one
	// that jumps back only delays transitions, never repeats a rotation.
	// Deadlines are recorded from the later of the two clocks, so that
	// once the wall clock is corrected (or keyd restarts after a jump) a
	// deadline can only come late, never early.
	Monotonic func() time.Duration
	// Rand makes key IDs; nil means crypto/rand.
	Rand   io.Reader
	Logger *slog.Logger
	// Failpoint, when set, is called at named points of every lifecycle
	// change ("rotate.after_intent", "rotate.after_generate",
	// "rotate.after_commit", "activate.before_commit",
	// "retire.before_commit", "destroy.after_backend"), so crash tests can
	// kill the process there.
	Failpoint func(name string)
	// DestroyTimeout bounds each backend Destroy the manager makes (a
	// scheduled destroy, the removal of what a failed generation left), so
	// that a device that does not answer cannot hold the lifecycle lock;
	// a destroy cut off is tried again at a later tick. 0 means
	// DestroyWait.
	DestroyTimeout time.Duration
}

// Event is one lifecycle transition.
type Event struct {
	Version  Version
	Previous State // the state before, or Pending for a new version
}

// Manager executes the lifecycle of every configured key set. It is safe for
// concurrent use: signs take a read lock and a lease; lifecycle changes are
// serialized among themselves and persisted before they become visible.
type Manager struct {
	backend   keystore.Backend
	store     *Store
	wall      func() time.Time
	mono      func() time.Duration
	wallStart time.Time
	monoStart time.Duration
	jumped    atomic.Bool // a forward wall-clock jump was reported
	failures  atomic.Int64
	rand      io.Reader
	log       *slog.Logger
	failpoint func(string)

	// op serializes lifecycle changes and store writes: a token, taken
	// with lockOp so that a caller waiting behind another change (a
	// rotation whose backend hangs, a tick destroying keys) keeps its
	// deadline, and gives up without leaving its change to run later.
	op chan struct{}
	// kick wakes Run for a tick as soon as it can take the token: a
	// Revoke that gave up waiting for it left its revocation for a tick
	// to record, and until then the key stays published and the
	// revocation is not durable.
	kick chan struct{}
	// destroyTO bounds each backend Destroy (Config.DestroyTimeout).
	destroyTO time.Duration

	mu    sync.RWMutex
	sets  map[string]*setState
	order []string
	all   []*entry // every version, in creation order, as persisted
	subs  map[*subscriber]struct{}
}

type setState struct {
	cfg    KeySet
	active *entry
	byKid  map[string]*entry
}

type entry struct {
	v     Version      // guarded by Manager.mu
	state atomic.Int32 // mirrors v.State for lock-free checks
	refs  atomic.Int64 // leases in flight; destroy waits for zero
	// revoking is set by Revoke before it waits for other lifecycle
	// changes: from then on the version signs nothing (Acquire,
	// Lease.Valid), whether or not the revocation gets recorded.
	revoking atomic.Bool
}

// New loads the store, reconciles it with what the backend holds, and makes
// sure every configured key set has an active key (generating the first one
// on a first start). A version whose key the backend no longer has is marked
// Lost and never replaced silently; a store that records no key while the
// backend holds keyd's keys (the state file was lost) fails with
// ErrCorruptState.
func New(ctx context.Context, cfg Config) (*Manager, error) {
	if cfg.Backend == nil || cfg.Store == nil {
		return nil, errors.New("rotation: Backend and Store are required")
	}
	m := &Manager{
		backend:   cfg.Backend,
		store:     cfg.Store,
		wall:      cfg.Now,
		mono:      cfg.Monotonic,
		rand:      cfg.Rand,
		log:       cfg.Logger,
		failpoint: cfg.Failpoint,
		sets:      map[string]*setState{},
		subs:      map[*subscriber]struct{}{},
		op:        make(chan struct{}, 1),
		kick:      make(chan struct{}, 1),
		destroyTO: cfg.DestroyTimeout,
	}
	if m.destroyTO <= 0 {
		m.destroyTO = DestroyWait
	}
	if m.wall == nil {
		m.wall = time.Now
	}
	if m.mono == nil {
		origin := time.Now()
		m.mono = func() time.Duration { return time.Since(origin) }
	}
	m.wallStart, m.monoStart = m.wall(), m.mono()
	if m.rand == nil {
		m.rand = rand.Reader
	}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	if m.failpoint == nil {
		m.failpoint = func(string) {}
	}
	for _, ks := range cfg.KeySets {
		if _, dup := m.sets[ks.Name]; dup {
			return nil, fmt.Errorf("rotation: key set %q declared twice", ks.Name)
		}
		m.sets[ks.Name] = &setState{cfg: ks, byKid: map[string]*entry{}}
		m.order = append(m.order, ks.Name)
	}
	if err := m.lockOp(ctx); err != nil {
		return nil, fmt.Errorf("rotation: %w", err)
	}
	defer m.unlockOp()
	if err := m.reconcile(ctx); err != nil {
		return nil, err
	}
	for _, name := range m.order {
		s := m.sets[name]
		if s.active != nil && (s.active.v.Alg != s.cfg.Spec.Algorithm || (s.cfg.Spec.Algorithm.IsRSA() && s.active.v.Spec().Bits() != s.cfg.Spec.Bits())) {
			m.log.Warn("key set algorithm changed in the configuration; it takes effect at the next rotation",
				"keyset", name, "active", s.active.v.Spec().String(), "configured", s.cfg.Spec.String())
		}
		if s.active != nil && s.active.v.Purpose != s.cfg.Purpose {
			m.log.Warn("key set purpose changed in the configuration; its keys were made for the old purpose and sign nothing until the key set is rotated",
				"keyset", name, "active", s.active.v.Purpose, "configured", s.cfg.Purpose)
		}
		if s.active == nil && m.hasLost(name) {
			m.log.Error("key set has lost its active key; not generating a replacement: rotate it explicitly once the cause is understood", "keyset", name)
		}
	}
	// Keys of a key set the configuration no longer declares (removed or
	// renamed) stay in the backend: nothing publishes, rotates or destroys
	// them, and keys list no longer shows them. Say so at every start.
	unconfigured := map[string][]string{}
	var names []string
	for _, e := range m.all {
		if _, ok := m.sets[e.v.KeySet]; ok || e.v.State == Pending || e.v.State == Destroyed {
			continue
		}
		if _, seen := unconfigured[e.v.KeySet]; !seen {
			names = append(names, e.v.KeySet)
		}
		unconfigured[e.v.KeySet] = append(unconfigured[e.v.KeySet], e.v.Kid)
	}
	for _, name := range names {
		m.log.Warn("key set is no longer configured; its keys stay in the backend, unpublished and unused, and are not destroyed: declare the key set again to resume its schedule",
			"keyset", name, "kids", unconfigured[name])
	}
	// Whatever the schedule says is due now (a first key, overdue
	// transitions) happens before the daemon serves. Only a key set left
	// without an active key fails the start; other steps are retried (R4).
	if err := m.tickLocked(ctx); err != nil {
		for _, name := range m.order {
			if m.sets[name].active == nil && !m.hasLost(name) {
				return nil, err
			}
		}
		m.log.Error("scheduled key changes failed at start; the active keys are unchanged and the changes are retried", "err", err)
	}
	return m, nil
}

func (m *Manager) hasLost(keyset string) bool {
	var vs []Version
	for _, e := range m.all {
		if e.v.KeySet == keyset && e.v.State != Pending && e.v.State != Destroyed {
			vs = append(vs, e.v)
		}
	}
	return lostActive(vs)
}

// reconcile loads the store and compares it with the backend.
func (m *Manager) reconcile(ctx context.Context) error {
	stored, err := m.store.Load()
	if err != nil {
		return err
	}
	held, err := m.backend.List(ctx)
	if err != nil {
		return fmt.Errorf("list backend keys: %w", err)
	}
	if len(stored) == 0 && len(held) > 0 {
		// keyd records every key before the backend makes it, so this is
		// lost metadata, not a first start: new keys would silently
		// replace the active ones.
		return fmt.Errorf("%s: %w: it records no key, but the %s backend holds %d of keyd's keys (%s…), and keyd will not replace them with new keys: restore the file from a backup; or, if another keyd with its own state directory uses this backend, give this one a backend of its own; or, to start over, remove keyd's keys from the backend",
			m.store.path, ErrCorruptState, m.backend.Name(), len(held), held[0])
	}
	inBackend := map[string]bool{}
	for _, id := range held {
		inBackend[id] = true
	}
	known := map[string]bool{}
	changed := false
	for _, v := range stored {
		known[v.ID] = true
		switch {
		case v.State == Pending:
			// An interrupted generation: never published. Remove whatever
			// the backend made of it.
			if inBackend[v.ID] {
				if err := m.backend.Destroy(ctx, v.ID); err != nil && !errors.Is(err, keystore.ErrNotFound) {
					return fmt.Errorf("clean up interrupted generation of %s: %w", v.ID, err)
				}
			}
			m.log.Warn("cleaned up an interrupted key generation", "keyset", v.KeySet, "id", v.ID, "in_backend", inBackend[v.ID])
			changed = true
			continue
		case v.State == Destroyed && inBackend[v.ID]:
			// P11: the backend holds a key recorded destroyed. A delete
			// that reported success but left the object behind (SoftHSM
			// leaves the object file when it cannot unlink it, and the
			// key comes back at the next start), or a token restored from
			// a backup. Destroy it again; the version stays destroyed.
			if err := m.backend.Destroy(ctx, v.ID); err != nil && !errors.Is(err, keystore.ErrNotFound) {
				m.log.Error("a key recorded destroyed is back in the backend and could not be destroyed again; it cannot sign (its version is destroyed), the next start tries again",
					"keyset", v.KeySet, "kid", v.Kid, "id", v.ID, "err", err)
			} else {
				m.log.Warn("a key recorded destroyed was back in the backend; destroyed it again",
					"keyset", v.KeySet, "kid", v.Kid, "id", v.ID)
			}
		case v.State == Destroyed || v.State == Lost:
		case !inBackend[v.ID] && (v.State == Retired || v.State == Revoked):
			// Unpublished already: a destroy that was interrupted after the
			// backend deleted the key and before the record said so.
			m.log.Info("unpublished key already gone from the backend; recording it destroyed", "keyset", v.KeySet, "kid", v.Kid)
			v.State = Destroyed
			v.ChangedAt = m.now()
			changed = true
		case !inBackend[v.ID]:
			m.log.Error("key missing from the backend; marking it lost (DATA_LOSS), not replacing it",
				"keyset", v.KeySet, "kid", v.Kid, "id", v.ID, "state", v.State.String())
			v.State, v.LostFrom = Lost, v.State
			v.ChangedAt = m.now()
			changed = true
		default:
			pub, err := m.backend.Public(ctx, v.ID)
			if errors.Is(err, keystore.ErrKeyLost) || errors.Is(err, keystore.ErrNotFound) {
				// Listed but unloadable: lost, like a missing key.
				m.log.Error("key in the backend cannot be loaded; marking it lost (DATA_LOSS), not replacing it",
					"keyset", v.KeySet, "kid", v.Kid, "id", v.ID, "state", v.State.String(), "err", err)
				v.State, v.LostFrom = Lost, v.State
				v.ChangedAt = m.now()
				changed = true
				break
			}
			if errors.Is(err, keystore.ErrInsecureStorage) {
				// S1: not lost, only refused until an operator fixes
				// the storage; using it fails with FAILED_PRECONDITION.
				// The other keys must stay usable.
				m.log.Error("key in the backend is refused: its storage is not private; it cannot sign until that is fixed",
					"keyset", v.KeySet, "kid", v.Kid, "id", v.ID, "state", v.State.String(), "err", err)
				break
			}
			if err != nil {
				return fmt.Errorf("read public key %s: %w", v.ID, err)
			}
			kid, err := jws.Thumbprint(pub)
			if err != nil {
				return fmt.Errorf("public key %s: %w", v.ID, err)
			}
			if kid != v.Kid {
				m.log.Error("backend key differs from the recorded one; marking it lost (DATA_LOSS)",
					"keyset", v.KeySet, "kid", v.Kid, "backend_kid", kid, "id", v.ID)
				v.State, v.LostFrom = Lost, v.State
				v.ChangedAt = m.now()
				changed = true
			}
		}
		e := &entry{v: v}
		e.state.Store(int32(v.State))
		m.all = append(m.all, e)
		if s := m.sets[v.KeySet]; s != nil {
			if v.Kid != "" {
				s.byKid[v.Kid] = e
			}
			if v.State == Active {
				s.active = e
			}
		}
	}
	for _, id := range held {
		if !known[id] {
			m.log.Warn("backend holds a key keyd has no record of; leaving it alone", "id", id)
		}
	}
	if changed {
		return m.persist()
	}
	return nil
}

// persist writes every version. Callers hold the lifecycle token (lockOp).
func (m *Manager) persist() error {
	m.mu.RLock()
	vs := make([]Version, 0, len(m.all))
	for _, e := range m.all {
		vs = append(vs, e.v)
	}
	m.mu.RUnlock()
	return m.save(vs)
}

// persistWith writes every version plus the changes, without making the
// changes visible. Callers hold the lifecycle token (lockOp).
func (m *Manager) persistWith(changes map[*entry]Version, added ...Version) error {
	m.mu.RLock()
	vs := make([]Version, 0, len(m.all)+len(added))
	for _, e := range m.all {
		if v, ok := changes[e]; ok {
			vs = append(vs, v)
		} else {
			vs = append(vs, e.v)
		}
	}
	m.mu.RUnlock()
	return m.save(append(vs, added...))
}

// save saves vs. A save that wrote the file but could not sync its
// directory counts as done (see ErrNotDurable), with an error logged.
func (m *Manager) save(vs []Version) error {
	err := m.store.Save(vs)
	if errors.Is(err, ErrNotDurable) {
		m.log.Error("key metadata written, but the state directory could not be synced: a power loss now could bring back the previous state", "err", err)
		return nil
	}
	return err
}

func (m *Manager) newID(keyset string) (string, error) {
	var b [8]byte
	if _, err := io.ReadFull(m.rand, b[:]); err != nil {
		return "", fmt.Errorf("key id: %w", err)
	}
	return keyset + "." + hex.EncodeToString(b[:]), nil
}

// Lease is a hold on a version for one signature.
type Lease struct {
	m *Manager
	e *entry
	// Version is the version as it was when the lease was taken.
	Version Version
}

// Acquire returns a lease on the version of keyset that should sign: the
// active one, or, when kid is not empty, the version with that kid if it is
// active or draining. Release the lease when the signature is made.
func (m *Manager) Acquire(keyset, kid string) (Lease, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	s, ok := m.sets[keyset]
	if !ok {
		return Lease{}, fmt.Errorf("key set %q: %w", keyset, ErrUnknownKeySet)
	}
	var e *entry
	if kid == "" {
		e = s.active
		if e == nil {
			if m.hasLost(keyset) {
				return Lease{}, fmt.Errorf("key set %q: %w: its active key is gone from the %s backend", keyset, ErrKeyLost, m.backend.Name())
			}
			return Lease{}, fmt.Errorf("key set %q: %w", keyset, ErrNoActiveKey)
		}
	} else {
		e = s.byKid[kid]
		if e == nil {
			return Lease{}, fmt.Errorf("kid %s: %w: not a key of key set %q", kid, ErrNotSignable, keyset)
		}
	}
	switch st := State(e.state.Load()); {
	case st == Lost:
		return Lease{}, fmt.Errorf("kid %s of key set %q: %w", e.v.Kid, keyset, ErrKeyLost)
	case st != Active && st != Draining:
		return Lease{}, fmt.Errorf("kid %s of key set %q is %s: %w", e.v.Kid, keyset, st, ErrNotSignable)
	case e.revoking.Load():
		return Lease{}, fmt.Errorf("kid %s of key set %q is being revoked: %w", e.v.Kid, keyset, ErrNotSignable)
	case st == Draining && !e.v.RetireAt.IsZero() && !m.now().Before(e.v.RetireAt):
		// Its drain is over; the tick that unpublishes it is late (held
		// by a slow backend call, say). Verifiers were told it is gone.
		return Lease{}, fmt.Errorf("kid %s of key set %q finished draining at %s: %w", e.v.Kid, keyset, e.v.RetireAt.UTC().Format(time.RFC3339), ErrNotSignable)
	}
	e.refs.Add(1)
	return Lease{m: m, e: e, Version: e.v}, nil
}

// Sign signs with the leased key. A backend that no longer has a key it
// should have marks the version Lost and returns ErrKeyLost.
func (l *Lease) Sign(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	sig, err := l.m.backend.Sign(ctx, l.Version.ID, digest, opts)
	if err != nil {
		if errors.Is(err, keystore.ErrNotFound) || errors.Is(err, keystore.ErrKeyLost) {
			l.m.markLost(ctx, l.e)
			return nil, fmt.Errorf("kid %s: %w: %w", l.Version.Kid, ErrKeyLost, err)
		}
		return nil, err
	}
	return sig, nil
}

// Public returns the leased key's public key from the backend.
func (l *Lease) Public(ctx context.Context) (crypto.PublicKey, error) {
	return l.m.backend.Public(ctx, l.Version.ID)
}

// Valid reports whether the version may still sign: false once it was
// revoked (or lost) while the signature was being made.
func (l *Lease) Valid() bool {
	st := State(l.e.state.Load())
	return (st == Active || st == Draining) && !l.e.revoking.Load()
}

// Release ends the lease. It must be called exactly once.
func (l *Lease) Release() { l.e.refs.Add(-1) }

// InFlight returns the number of leases held on the version with kid.
func (m *Manager) InFlight(kid string) int64 {
	if _, e := m.findKid(kid, ""); e != nil {
		return e.refs.Load()
	}
	return 0
}

// lockOp takes the lifecycle token (see Manager.op), waiting until ctx
// ends; with ctx ended already it does not take it. Its error wraps ctx's.
func (m *Manager) lockOp(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		// The caller has gone: whatever it asked for is not done.
		return fmt.Errorf("the call ended before it began: %w", err)
	}
	select {
	case m.op <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waited for another key lifecycle change (a rotation, a revocation or a scheduled step) to finish: %w", ctx.Err())
	}
}

func (m *Manager) unlockOp() { <-m.op }

// markLost records e lost, unless ctx (the signature's) ends first: the
// version's next signature then finds it missing again.
func (m *Manager) markLost(ctx context.Context, e *entry) {
	if m.lockOp(ctx) != nil {
		return
	}
	defer m.unlockOp()
	if State(e.state.Load()) == Lost {
		return
	}
	v := e.v
	prev := v.State
	v.State, v.LostFrom, v.ChangedAt = Lost, prev, m.now()
	if err := m.persistWith(map[*entry]Version{e: v}); err != nil {
		m.log.Error("could not record a lost key", "kid", v.Kid, "err", err)
	}
	m.mu.Lock()
	e.v = v
	e.state.Store(int32(Lost))
	if s := m.sets[v.KeySet]; s != nil && s.active == e {
		s.active = nil
	}
	m.publishLocked([]Event{{Version: v, Previous: prev}})
	m.mu.Unlock()
	m.log.Error("key lost from the backend (DATA_LOSS); not replacing it", "keyset", v.KeySet, "kid", v.Kid, "id", v.ID)
}

// Versions returns the versions of the named key sets (all configured ones
// when names is empty), in creation order, pending intents left out.
func (m *Manager) Versions(names ...string) []Version {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.versionsLocked(names)
}

func (m *Manager) versionsLocked(names []string) []Version {
	var out []Version
	for _, e := range m.all {
		if e.v.State == Pending {
			continue
		}
		if _, configured := m.sets[e.v.KeySet]; !configured {
			continue
		}
		if len(names) > 0 && !slices.Contains(names, e.v.KeySet) {
			continue
		}
		out = append(out, e.v)
	}
	return out
}

// KeySets returns the configured key sets in configuration order.
func (m *Manager) KeySets() []KeySet {
	out := make([]KeySet, 0, len(m.order))
	for _, n := range m.order {
		out = append(out, m.sets[n].cfg)
	}
	return out
}

// KeySet returns the configured key set name.
func (m *Manager) KeySet(name string) (KeySet, bool) {
	s, ok := m.sets[name]
	if !ok {
		return KeySet{}, false
	}
	return s.cfg, true
}
