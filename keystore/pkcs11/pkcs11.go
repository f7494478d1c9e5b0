// Package pkcs11 is the PKCS#11 key store: keys generated and kept on a
// token (an HSM, or SoftHSM2 for tests) through github.com/miekg/pkcs11.
// It is custody only: it generates, lists, signs with and destroys keys and
// knows nothing of JOSE, gRPC or rotation.
//
// # Configuration
//
// Config names the module (the PKCS#11 library), the token by an RFC 7512
// URI (pkcs11:token=keyd, pkcs11:serial=…, pkcs11:slot-id=…; see ParseURI)
// and the user PIN, read with PINFromFile or PINFromEnv and never printed.
//
// # Objects
//
// Generate makes a key pair on the token: the private key with CKA_TOKEN,
// CKA_PRIVATE, CKA_SENSITIVE and CKA_SIGN true and CKA_EXTRACTABLE,
// CKA_DECRYPT, CKA_UNWRAP and CKA_DERIVE false; the public key as a public
// token object. Both carry CKA_LABEL "keyd:<id>" (id is the keystore key ID)
// and a CKA_ID of "keyd:" followed by 16 random bytes. keyd lists, uses and
// destroys only objects whose label and CKA_ID both start with "keyd:"; other
// objects on the token are left alone. No API reads, wraps or exports a
// private key.
//
// Key IDs and destroy: Generate refuses an ID whose label exists on the
// token (keystore.ErrAlreadyExists). The token keeps no record of destroyed
// keys, so after Destroy a Generate of the same ID succeeds with a new key;
// keyd's rotation layer never reuses IDs.
//
// Algorithms: ES256 and ES384 sign with CKM_ECDSA over a digest made in Go
// (SoftHSM 2.6 has no CKM_ECDSA_SHA256), and the raw r||s it returns is
// converted to ASN.1 DER (crypto.Signer semantics); RS256 signs with
// CKM_RSA_PKCS over the SHA-256 DigestInfo; PS256 with CKM_RSA_PKCS_PSS,
// SHA-256, MGF1-SHA-256 and a 32-byte salt; EdDSA with CKM_EDDSA over the
// message. New probes the token's mechanism list: Algorithms lists only what
// the token can do, and Generate of anything else fails with
// keystore.ErrUnsupportedAlgorithm naming the missing mechanisms, so a
// missing mechanism shows when a key set is created, never at its first
// signature.
//
// # Sessions and login
//
// One session (the anchor) holds the login for the life of the Backend:
// PKCS#11 login belongs to the application, and closing every session would
// log it out. Operations run on a pool of at most MaxSessions further
// sessions; a caller waits for a free one until its context ends. So at most
// MaxSessions+2 goroutines (the pool, a recovery, a health probe) are ever
// inside the module (in cgo, each on its own OS thread), whatever the load.
//
// Cancellation: a PKCS#11 call cannot be interrupted. The context bounds
// the wait for a session; Sign, Public and List also return when the context
// ends while their call runs, and the call finishes in the background, its
// session going back to the pool only then (so the bound above holds).
// Generate and Destroy wait for each other only until the context ends, but
// run to completion once started.
//
// # Failures
//
// A call that fails with CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,
// CKR_USER_NOT_LOGGED_IN, CKR_OBJECT_HANDLE_INVALID, CKR_KEY_HANDLE_INVALID,
// CKR_DEVICE_REMOVED, CKR_DEVICE_ERROR, CKR_TOKEN_NOT_PRESENT,
// CKR_SLOT_ID_INVALID, CKR_CRYPTOKI_NOT_INITIALIZED or CKR_GENERAL_ERROR
// has its session evicted (never returned to the pool), and the Backend
// recovers once: it logs in again on the anchor if the login was lost,
// opens a new anchor if the anchor died, or, if the module or device is
// gone, finalizes and initializes the module and finds the token again by
// its URI. Every recovery drops all cached object handles (they die with the
// login) and keys are re-found by CKA_ID. The call is then retried once; if
// it fails again the error wraps keystore.ErrUnavailable and Health reports
// the Backend unhealthy until a call succeeds. A failed recovery is not
// tried again for a second.
//
// C_Finalize never runs while any thread is inside the module (SoftHSM
// crashes if it does): every call holds the module's read lock, and a
// re-initialization first takes back its own pool's sessions, then waits
// (up to 10 s) for the other calls to leave. Session handles that may be
// stale are never used or closed, because modules hand the same numbers
// out again (see session), and "the key is not on the token" is believed
// only when a second search, on a new session or after a recovery, agrees:
// a false ErrKeyLost would be a false DATA_LOSS.
//
// Login is attempted exactly once per start (New) and once per recovery that
// finds the login gone. If the token refuses the PIN (CKR_PIN_INCORRECT,
// CKR_PIN_LOCKED, CKR_PIN_EXPIRED, …) the Backend is locked: every later
// call and Health fail with keystore.ErrLocked without calling C_Login
// again, until keyd is restarted with a fixed PIN — a real HSM locks its PIN
// after a few wrong ones, so keyd never retries one.
//
// A key this Backend knew (generated, or found once) that is no longer on
// the token while the token answers and the session is logged in fails with
// keystore.ErrKeyLost; one it never saw fails with keystore.ErrNotFound.
// Neither makes a replacement.
//
// # Processes
//
// A PKCS#11 module is process-wide: Backends on the same module share one
// C_Initialize (the first initializes, the last Close finalizes), and a
// recovery that re-initializes the module invalidates the other Backends'
// sessions too (they recover on their next call). keyd never forks to do
// PKCS#11 work. Two processes writing the same SoftHSM token can corrupt it;
// keeping a second keyd away is the daemon's job, not this package's.
package pkcs11

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyd-dev/keyd/internal/jws"
	"github.com/keyd-dev/keyd/keystore"
)

// Config configures a PKCS#11 Backend.
type Config struct {
	// Module is the absolute path of the PKCS#11 library, such as
	// /usr/lib/softhsm/libsofthsm2.so.
	Module string

	// URI selects the token, an RFC 7512 PKCS#11 URI with at least one of
	// token=, serial= or slot-id= (pkcs11:token=keyd). See ParseURI.
	URI string

	// PIN is the token's user PIN, from PINFromFile or PINFromEnv.
	PIN PIN

	// MaxSessions bounds the sessions used for operations (one more holds
	// the login). Zero means min(GOMAXPROCS, 4): more sessions than cores
	// only add latency. It is lowered to what the token allows.
	MaxSessions int

	// NoSessionCopies makes keyd sign with the keys' token objects
	// instead of session copies of them made inside the token (see
	// signHandle), for a token whose policy must not see C_CopyObject.
	NoSessionCopies bool

	// Logger receives lifecycle events and failures; nil discards them.
	Logger *slog.Logger
}

// Prefixes of the CKA_LABEL and CKA_ID of keyd's objects.
const (
	labelPrefix = "keyd:"
	idPrefix    = "keyd:"
	idRandom    = 16
)

// Defaults of options.
const (
	defaultRecoverBackoff = time.Second
	defaultHangAfter      = 10 * time.Second
	defaultCloseWait      = 10 * time.Second
	maxMaxSessions        = MaxSessionsLimit
)

// MaxSessionsLimit is the largest Config.MaxSessions.
const MaxSessionsLimit = 256

// options are knobs for tests.
type options struct {
	// wrap, if set, wraps the module, to inject faults or count calls.
	wrap func(module) module
	// recoverBackoff is how long after a failed recovery the next may start.
	recoverBackoff time.Duration
	// hangAfter is how long a device call may run before Health reports
	// the device hung.
	hangAfter time.Duration
	// closeWait bounds how long Close waits for running device calls, and a
	// re-initialization for the calls inside the module to return.
	closeWait time.Duration
	// recheck is how long a key's session copy is used without looking
	// at the key's token object.
	recheck time.Duration
}

// Backend is the PKCS#11 keystore.Backend. It is safe for concurrent use.
type Backend struct {
	log   *slog.Logger
	lib   *library
	m     module
	uri   URI
	pin   PIN
	label string // the token's label, for messages
	// serial is the serial number of the token opened at start: keyd
	// never logs in to another token, even one the URI would match (a
	// token swapped in the same reader).
	serial string
	n      int // pool size
	caps   map[keystore.Algorithm]capability
	algs   []keystore.Algorithm
	opts   options
	// noCopies is Config.NoSessionCopies; copyRefused is set when the
	// token refused C_CopyObject.
	noCopies    bool
	copyRefused atomic.Bool

	// sem holds one token per session checked out of the pool (or being
	// opened); idle holds the sessions not in use.
	sem  chan struct{}
	idle chan *session
	done chan struct{} // closed by Close

	// wmu serializes Generate and Destroy, so the label check and the
	// creation of a key cannot interleave with another's. They wait for
	// it only until their context ends: a C_GenerateKeyPair may take
	// seconds (an RSA key on a real HSM), or never return on a wedged one.
	wmu sync.Mutex

	// objs is held for reading by every search of the token's objects
	// (find) and for writing around C_GenerateKeyPair: SoftHSM 2.6 fails
	// a key generation that a search on another session runs into, with
	// CKR_GENERAL_ERROR or CKR_TEMPLATE_INCONSISTENT. A signature with a
	// cached key searches nothing.
	objs sync.RWMutex

	// dev serializes recoveries and every use of the anchor session.
	dev        sync.Mutex
	anchor     p11.SessionHandle
	haveAnchor bool
	libGen     uint64 // the module generation the anchor was opened in
	anchors    uint64 // counts anchors opened (handle numbers repeat)
	// anchorAlone is set by a recovery that found the anchor dead but
	// the pool's idle sessions open: those are closed, not forgotten.
	anchorAlone bool
	// liveAnchor is anchors while the anchor is open, 0 when there is
	// none: read without b.dev by signers, whose session copies live on
	// the anchor they were made on.
	liveAnchor atomic.Uint64
	// recovering is set while a recovery holds b.dev (a health probe
	// then reports the recovery instead of waiting for it).
	recovering atomic.Bool
	// futile is when a call last failed again right after a recovery
	// (unix nanoseconds): recoveries wait recoverBackoff after it, as
	// after a failed one, so that a fault recovery does not cure does
	// not re-initialize the module on every call.
	futile   atomic.Int64
	lastFail time.Time // when the last recovery failed
	// copies are the keys' session copies, by key ID, made on the anchor
	// (one of this or an earlier anchor: see live).
	copies map[string]*sessionCopy

	// probing limits Health to one device probe at a time.
	probing sync.Mutex

	mu       sync.RWMutex
	closed   bool
	locked   error // set for good when the token refuses the PIN
	slot     uint
	epoch    uint64 // bumped by each recovery; sessions and handles belong to one
	dead     uint64 // sessions of epochs before this one are presumed closed already
	forget   uint64 // bumped by each Destroy, so a racing lookup does not cache
	cache    map[string]*key
	known    map[string][]byte // key ID → CKA_ID of every key this Backend has seen
	sessions map[*session]struct{}
	// destroying is the ID of the key a Destroy is deleting (Destroys are
	// serialized by wmu): a lookup that misses it then says ErrNotFound,
	// not ErrKeyLost.
	destroying string

	failing atomic.Pointer[failure]
}

// failure is why Health reports the Backend unhealthy.
type failure struct {
	err error
	at  time.Time
}

// session is a pooled session.
//
// A session handle is only a number, and modules hand numbers out again:
// SoftHSM restarts from 1 after C_Initialize, and others reuse closed
// sessions' numbers. So a session whose handle may be stale is never used or
// closed: its number may belong to another caller's new session by now. A
// session opened before the module was initialized again (gen) is dropped
// unused; one that answered CKR_SESSION_HANDLE_INVALID or CKR_SESSION_CLOSED,
// or that belongs to an epoch whose recovery found the anchor dead and not
// every idle session open (see idleAlive), is dropped without
// C_CloseSession.
type session struct {
	h     p11.SessionHandle
	gen   uint64 // module generation it was opened in
	epoch uint64
	// since is when the device call running on the session began (unix
	// nanoseconds), 0 when none is.
	since atomic.Int64
}

// key is a key found on the token in one epoch.
type key struct {
	// epoch and gen are those of the session that found the key: the
	// handle is good only on sessions of the same epoch and module
	// generation (another part of the process may initialize the module
	// again, and handles are numbered afresh after C_Initialize).
	epoch uint64
	gen   uint64
	ckaID []byte
	priv  p11.ObjectHandle // the private key's token object
	kind  kind
	pub   crypto.PublicKey

	// copy is the session copy C_SignInit uses (see signHandle), once
	// made; copyFailed is set if the token would not make it in this
	// epoch. seen is when the token object was last seen (unix
	// nanoseconds).
	copy       atomic.Pointer[sessionCopy]
	copyFailed atomic.Bool
	seen       atomic.Int64
}

var _ keystore.Backend = (*Backend)(nil)

// New loads the module, finds the token cfg.URI selects, probes its
// mechanisms, opens the anchor session and logs in once.
//
// New fails if the configuration is invalid, the module cannot be loaded or
// initialized, or no token (or more than one) matches the URI. If the token
// refuses the PIN, New logs the failure and returns a locked Backend whose
// calls and Health fail with keystore.ErrLocked: it never tries the PIN
// again, and a daemon restarted in a loop tries it once per start.
//
// PKCS#11 calls cannot be interrupted: when ctx ends before the module has
// opened the token (a network HSM that does not answer), New returns
// ErrUnavailable at once and the opening goes on in the background; a
// Backend it opens late is closed.
func New(ctx context.Context, cfg Config) (*Backend, error) {
	return openWithin(ctx, cfg, options{})
}

// openWithin is open, abandoned when ctx ends (see New).
func openWithin(ctx context.Context, cfg Config, o options) (*Backend, error) {
	if ctx.Done() == nil {
		return open(ctx, cfg, o)
	}
	type result struct {
		b   *Backend
		err error
	}
	ch := make(chan result, 1)
	go func() {
		b, err := open(ctx, cfg, o)
		ch <- result{b, err}
	}()
	select {
	case r := <-ch:
		return r.b, r.err
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.err == nil {
				r.b.Close()
			}
		}()
		return nil, fmt.Errorf("pkcs11: %w: the module did not open the token in time (%w); the opening goes on in the background", keystore.ErrUnavailable, context.Cause(ctx))
	}
}

func open(ctx context.Context, cfg Config, o options) (*Backend, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("pkcs11: %w", err)
	}
	var problems []error
	if cfg.Module == "" {
		problems = append(problems, errors.New("module: the path of the PKCS#11 library is empty"))
	}
	uri, err := ParseURI(cfg.URI)
	if err != nil {
		problems = append(problems, fmt.Errorf("uri: %w", err))
	} else if !uri.selects() {
		problems = append(problems, fmt.Errorf("uri %s: name the token with token=, serial= or slot-id=", uri))
	}
	if cfg.PIN.IsZero() {
		problems = append(problems, errors.New("pin: no PIN (use pin_file or an environment variable)"))
	}
	if cfg.MaxSessions < 0 || cfg.MaxSessions > maxMaxSessions {
		problems = append(problems, fmt.Errorf("max_sessions %d: want 0 (automatic) to %d", cfg.MaxSessions, maxMaxSessions))
	}
	if err := errors.Join(problems...); err != nil {
		return nil, fmt.Errorf("pkcs11: %w", err)
	}
	if o.recoverBackoff == 0 {
		o.recoverBackoff = defaultRecoverBackoff
	}
	if o.hangAfter == 0 {
		o.hangAfter = defaultHangAfter
	}
	if o.closeWait == 0 {
		o.closeWait = defaultCloseWait
	}
	if o.recheck == 0 {
		o.recheck = defaultRecheck
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}

	lib, err := loadLibrary(cfg.Module)
	if err != nil {
		return nil, fmt.Errorf("pkcs11: %w", err)
	}
	var m module = lib.ctx
	if o.wrap != nil {
		m = o.wrap(m)
	}
	gen, err := lib.acquire(m)
	if err != nil {
		return nil, fmt.Errorf("pkcs11: module %s: %w: %w", lib.path, keystore.ErrUnavailable, err)
	}
	b := &Backend{
		log:      log.With("backend", "pkcs11", "uri", uri.String()),
		lib:      lib,
		m:        m,
		uri:      uri,
		pin:      cfg.PIN,
		opts:     o,
		noCopies: cfg.NoSessionCopies,
		copies:   map[string]*sessionCopy{},
		done:     make(chan struct{}),
		libGen:   gen,
		cache:    map[string]*key{},
		known:    map[string][]byte{},
		sessions: map[*session]struct{}{},
	}
	if len(uri.Ignored) > 0 {
		b.log.Warn("PKCS#11 URI attributes ignored", "attributes", uri.Ignored)
	}
	done := lib.reading()
	err = b.start(cfg.MaxSessions)
	if err != nil {
		b.closeAnchor()
	}
	done()
	if err != nil {
		if rerr := lib.release(m, o.closeWait); rerr != nil {
			b.log.Error("cannot finalize the PKCS#11 module", "err", rerr)
		}
		return nil, fmt.Errorf("pkcs11: %w", err)
	}
	return b, nil
}

// start finds the token, probes it, sizes the pool and logs in.
func (b *Backend) start(maxSessions int) error {
	slot, ti, err := b.findToken()
	if err != nil {
		return err
	}
	b.slot, b.label, b.serial = slot, ti.Label, ti.SerialNumber
	if err := b.probeMechanisms(slot); err != nil {
		return err
	}

	n := maxSessions
	if n == 0 {
		n = min(runtime.GOMAXPROCS(0), 4)
	}
	if lim := ti.MaxRwSessionCount; lim != p11.CK_EFFECTIVELY_INFINITE && lim != p11.CK_UNAVAILABLE_INFORMATION {
		if lim < 2 {
			return fmt.Errorf("token %q allows %d read/write session(s); keyd needs at least 2", b.label, lim)
		}
		if uint(n) > lim-1 {
			b.log.Warn("PKCS#11 session pool lowered to what the token allows", "asked", n, "sessions", lim-1)
			n = int(lim - 1)
		}
	}
	b.n = n
	b.sem = make(chan struct{}, n)
	b.idle = make(chan *session, n)

	b.dev.Lock()
	err = b.openAnchor(slot)
	if errors.Is(err, keystore.ErrLocked) {
		b.closeAnchor() // no use without the login
	}
	b.dev.Unlock()
	if err != nil && !errors.Is(err, keystore.ErrLocked) {
		return fmt.Errorf("token %q: %w: %w", b.label, keystore.ErrUnavailable, err)
	}
	b.log.Info("PKCS#11 key store opened", "token", ti.Label, "serial", ti.SerialNumber,
		"model", ti.Model, "slot", slot, "algorithms", b.algs, "sessions", n, "session_copies", !b.noCopies, "locked", err != nil)
	return nil
}

// findToken returns the slot and token info of the one token b.uri selects.
func (b *Backend) findToken() (uint, p11.TokenInfo, error) {
	slots, err := b.m.GetSlotList(true)
	if err != nil {
		return 0, p11.TokenInfo{}, fmt.Errorf("C_GetSlotList: %w", err)
	}
	var (
		seen    []string
		matches []uint
		infos   []p11.TokenInfo
	)
	for _, s := range slots {
		ti, err := b.m.GetTokenInfo(s)
		if err != nil {
			seen = append(seen, fmt.Sprintf("slot %d (%s)", s, ckrName(err)))
			continue
		}
		if ti.Flags&p11.CKF_TOKEN_INITIALIZED == 0 {
			continue
		}
		seen = append(seen, fmt.Sprintf("%q (serial %s, slot %d)", ti.Label, ti.SerialNumber, s))
		if b.uri.matches(s, ti) {
			matches = append(matches, s)
			infos = append(infos, ti)
		}
	}
	switch len(matches) {
	case 0:
		list := "none"
		if len(seen) > 0 {
			list = strings.Join(seen, ", ")
		}
		return 0, p11.TokenInfo{}, fmt.Errorf("%w: no initialized token matches %s (tokens: %s)", keystore.ErrUnavailable, b.uri, list)
	case 1:
		if b.serial != "" && infos[0].SerialNumber != b.serial {
			return 0, p11.TokenInfo{}, fmt.Errorf("%w: the token matching %s in slot %d has serial %q, not %q, the one keyd opened at start; keyd will not log in to another token (restart keyd to use it)",
				keystore.ErrUnavailable, b.uri, matches[0], strings.TrimRight(infos[0].SerialNumber, " "), strings.TrimRight(b.serial, " "))
		}
		return matches[0], infos[0], nil
	}
	return 0, p11.TokenInfo{}, fmt.Errorf("%d tokens match %s: add serial= to the URI to choose one", len(matches), b.uri)
}

// matches reports whether the token in slot with info ti is the one u
// selects. CK_TOKEN_INFO fields are blank-padded.
func (u URI) matches(slot uint, ti p11.TokenInfo) bool {
	eq := func(want, got string) bool {
		return want == "" || strings.TrimRight(want, " ") == strings.TrimRight(got, " ")
	}
	return (!u.HasSlotID || u.SlotID == slot) && eq(u.Token, ti.Label) && eq(u.Manufacturer, ti.ManufacturerID) &&
		eq(u.Serial, ti.SerialNumber) && eq(u.Model, ti.Model)
}

// probeMechanisms fills b.caps and b.algs from the token's mechanisms.
func (b *Backend) probeMechanisms(slot uint) error {
	list, err := b.m.GetMechanismList(slot)
	if err != nil {
		return fmt.Errorf("token %q: C_GetMechanismList: %w", b.label, err)
	}
	have := map[uint]bool{}
	for _, m := range list {
		have[m.Mechanism] = true
	}
	b.caps = map[keystore.Algorithm]capability{}
	for _, alg := range keystore.Algorithms() {
		a := algorithms[alg]
		if !have[a.gen] || !have[a.sign] {
			b.log.Info("token lacks an algorithm", "alg", string(alg), "needs", a.need)
			continue
		}
		var c capability
		if gi, err := b.m.GetMechanismInfo(slot, []*p11.Mechanism{p11.NewMechanism(a.gen, nil)}); err == nil {
			if gi.Flags != 0 && gi.Flags&p11.CKF_GENERATE_KEY_PAIR == 0 {
				b.log.Info("token lacks an algorithm", "alg", string(alg), "needs", a.need, "why", "no CKF_GENERATE_KEY_PAIR")
				continue
			}
			c = capability{minBits: gi.MinKeySize, maxBits: gi.MaxKeySize}
		}
		if si, err := b.m.GetMechanismInfo(slot, []*p11.Mechanism{p11.NewMechanism(a.sign, nil)}); err == nil &&
			si.Flags != 0 && si.Flags&p11.CKF_SIGN == 0 {
			b.log.Info("token lacks an algorithm", "alg", string(alg), "needs", a.need, "why", "no CKF_SIGN")
			continue
		}
		if alg.IsRSA() && !c.fits(2048) && !c.fits(3072) {
			b.log.Info("token lacks an algorithm", "alg", string(alg), "why", "RSA keys of 2048 and 3072 bits are outside its range",
				"min_bits", c.minBits, "max_bits", c.maxBits)
			continue
		}
		b.caps[alg] = c
		b.algs = append(b.algs, alg)
	}
	if len(b.algs) == 0 {
		return fmt.Errorf("token %q offers none of keyd's algorithms (ES256, ES384, RS256, PS256, EdDSA)", b.label)
	}
	return nil
}

// openAnchor opens the anchor session on slot and logs in. The caller holds
// b.dev.
func (b *Backend) openAnchor(slot uint) error {
	h, err := b.m.OpenSession(slot, p11.CKF_SERIAL_SESSION)
	if err != nil {
		return fmt.Errorf("C_OpenSession: %w", err)
	}
	b.anchor, b.haveAnchor, b.libGen = h, true, b.lib.gen
	b.anchors++
	b.liveAnchor.Store(b.anchors)
	return b.login(h)
}

// closeAnchor closes the anchor session, if there is one and it is live. The
// caller holds b.dev (or is New, before anyone else can) and is inside the
// module (lib.reading).
func (b *Backend) closeAnchor() {
	if b.haveAnchor && b.libGen == b.lib.gen {
		_ = b.m.CloseSession(b.anchor)
	}
	b.haveAnchor = false
	b.liveAnchor.Store(0)
}

// forgetAnchor drops an anchor known to be dead without closing it: its
// number may be another session's by now.
func (b *Backend) forgetAnchor() {
	b.haveAnchor = false
	b.liveAnchor.Store(0)
}

// login calls C_Login once. A refused PIN — or a login failure that does
// not say it could not be attempted (see loginUnjudged) — locks the Backend
// for good.
func (b *Backend) login(h p11.SessionHandle) error {
	err := b.m.Login(h, p11.CKU_USER, b.pin.s)
	if err == nil || isCode(err, p11.CKR_USER_ALREADY_LOGGED_IN) {
		return nil
	}
	if loginUnjudged(err) {
		return fmt.Errorf("C_Login: %w", err)
	}
	why := "refused the PIN"
	if !pinFailed(err) {
		why = "refused the login without saying why, which keyd takes for a refused PIN"
	}
	from := b.pin.from
	if from == "" {
		from = "pin_file or pin_env"
	}
	lerr := fmt.Errorf("%w: token %q %s; keyd tries a PIN once and will not try it again: fix the PIN (%s) and restart keyd: %w",
		keystore.ErrLocked, b.label, why, from, err)
	b.mu.Lock()
	b.locked = lerr
	b.mu.Unlock()
	b.log.Error("PKCS#11 login refused; key store locked until restart", "token", b.label, "err", ckrName(err))
	return lerr
}

// Name returns "pkcs11".
func (b *Backend) Name() string { return "pkcs11" }

// Algorithms returns the algorithms the token's mechanisms allow, in the
// order of keystore.Algorithms.
func (b *Backend) Algorithms() []keystore.Algorithm { return slices.Clone(b.algs) }

// Generate creates a key pair under id on the token. It fails with
// ErrInvalidID, ErrUnsupportedAlgorithm (naming the mechanisms the token
// lacks), ErrAlreadyExists if an object labelled "keyd:<id>" exists,
// ErrUnavailable, ErrLocked, ErrClosed or the context's error (checked
// before the token is touched; once generation starts it runs to the end).
func (b *Backend) Generate(ctx context.Context, id string, spec keystore.KeySpec) (crypto.PublicKey, error) {
	if err := b.beginID(ctx, id); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	if err := spec.Validate(); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	c, ok := b.caps[spec.Algorithm]
	if !ok {
		return nil, fmt.Errorf("generate %s: %w: %s needs %s, which token %q does not offer",
			id, keystore.ErrUnsupportedAlgorithm, spec.Algorithm, algorithms[spec.Algorithm].need, b.label)
	}
	if spec.Algorithm.IsRSA() && !c.fits(spec.Bits()) {
		return nil, fmt.Errorf("generate %s: %w: token %q makes RSA keys of %d to %d bits, not %d",
			id, keystore.ErrUnsupportedAlgorithm, b.label, c.minBits, c.maxBits, spec.Bits())
	}
	ckaID := make([]byte, len(idPrefix)+idRandom)
	copy(ckaID, idPrefix)
	if _, err := rand.Read(ckaID[len(idPrefix):]); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	label := labelPrefix + id

	if !lockWithin(&b.wmu, ctx.Done()) {
		return nil, fmt.Errorf("generate %s: waiting for another key's generation or destruction: %w", id, ctx.Err())
	}
	defer b.wmu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	var pub crypto.PublicKey
	err := b.do(ctx, false, func(s *session) error {
		if err := b.checkLogin(s); err != nil {
			return err
		}
		hs, err := b.find(s, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_TOKEN, true),
			p11.NewAttribute(p11.CKA_LABEL, label),
		}, 0)
		if err != nil {
			return err
		}
		if len(hs) > 0 {
			// An earlier attempt of this call may have made the key
			// before its session died: adopt it rather than fail.
			for _, h := range hs {
				a, err := b.m.GetAttributeValue(s.h, h, []*p11.Attribute{p11.NewAttribute(p11.CKA_ID, nil)})
				if isCode(err, p11.CKR_ATTRIBUTE_TYPE_INVALID) {
					continue // an object without CKA_ID is not keyd's
				}
				if err != nil {
					// A dead session or stale handle recovers and
					// runs this again; anything else fails the call
					// rather than pass for someone else's object.
					return fmt.Errorf("C_GetAttributeValue: %w", err)
				}
				if bytes.Equal(a[0].Value, ckaID) {
					k, err := b.lookup(s, id)
					if err != nil {
						return err
					}
					pub, err = keystore.ClonePublic(k.pub)
					return err
				}
			}
			return fmt.Errorf("%w: token %q has an object labelled %q", keystore.ErrAlreadyExists, b.label, label)
		}
		b.mu.RLock()
		_, existed := b.known[id]
		b.mu.RUnlock()
		if existed {
			// Gone from the token behind keyd's back: the ID named
			// another key, and IDs are never reused.
			return fmt.Errorf("%w: key %s was on token %q and is gone from it; IDs are never reused", keystore.ErrAlreadyExists, id, b.label)
		}
		pubT, privT := keyAttrs(spec, label, ckaID)
		mech := []*p11.Mechanism{p11.NewMechanism(algorithms[spec.Algorithm].gen, nil)}
		b.objs.Lock()
		pubH, privH, err := b.m.GenerateKeyPair(s.h, mech, pubT, privT)
		b.objs.Unlock()
		if err != nil {
			return fmt.Errorf("C_GenerateKeyPair %v: %w", spec, err)
		}
		k, err := b.readPublic(s, pubH)
		if err != nil {
			return fmt.Errorf("read the new public key: %w", err)
		}
		k.ckaID, k.priv, k.epoch, k.gen = ckaID, privH, s.epoch, s.gen
		b.mu.Lock()
		if !b.closed {
			b.known[id] = ckaID
			if b.epoch == s.epoch {
				b.cache[id] = k
			}
		}
		b.mu.Unlock()
		pub, err = keystore.ClonePublic(k.pub)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	b.log.Info("key generated", "id", id, "spec", spec.String())
	return pub, nil
}

// Public returns the public key of id, read from its public key object.
func (b *Backend) Public(ctx context.Context, id string) (crypto.PublicKey, error) {
	if err := b.beginID(ctx, id); err != nil {
		return nil, fmt.Errorf("public %s: %w", id, err)
	}
	var pub crypto.PublicKey
	err := b.do(ctx, true, func(s *session) error {
		k, err := b.lookup(s, id)
		if err != nil {
			return err
		}
		pub, err = keystore.ClonePublic(k.pub)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("public %s: %w", id, err)
	}
	return pub, nil
}

// Sign signs digest with key id, with the semantics of keystore.Backend:
// ECDSA keys take the digest of their curve's hash and return ASN.1 DER, RSA
// keys take crypto.SHA256 (PKCS #1 v1.5) or *rsa.PSSOptions (SHA-256, salt
// 32 bytes), Ed25519 keys take the message and crypto.Hash(0).
func (b *Backend) Sign(ctx context.Context, id string, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := b.beginID(ctx, id); err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	// Only a signature clears a recorded failure (see Health), and only
	// the one recorded before it began: one recorded meanwhile stands.
	f := b.failing.Load()
	var sig []byte
	err := b.do(ctx, true, func(s *session) error {
		k, err := b.lookup(s, id)
		if err != nil {
			return err
		}
		if alg := algOfSign(k.kind, opts); alg != "" && !slices.Contains(b.algs, alg) {
			return fmt.Errorf("%w: %s needs %s, which token %q does not offer",
				keystore.ErrUnsupportedAlgorithm, alg, algorithms[alg].need, b.label)
		}
		mech, data, err := signParams(k.kind, digest, opts)
		if err != nil {
			return err
		}
		h, err := b.signHandle(s, id, k)
		if err != nil {
			return b.destroyedWhileSigning(id, k, err)
		}
		if err := b.m.SignInit(s.h, []*p11.Mechanism{mech}, h); err != nil {
			return b.destroyedWhileSigning(id, k, fmt.Errorf("C_SignInit: %w", err))
		}
		out, err := b.m.Sign(s.h, data)
		if err != nil {
			return fmt.Errorf("C_Sign: %w", err)
		}
		switch k.kind {
		case kindP256:
			out, err = ecdsaDER(out, 32)
		case kindP384:
			out, err = ecdsaDER(out, 48)
		}
		if err != nil {
			return err
		}
		sig = out
		return nil
	})
	if err != nil {
		if errors.Is(err, keystore.ErrKeyLost) || errors.Is(err, keystore.ErrNotFound) {
			b.dropLostCopy(id)
		}
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	if f != nil {
		b.failing.CompareAndSwap(f, nil)
	}
	return sig, nil
}

// destroyedWhileSigning returns err, a failure of Sign with key k, or, if err
// says k's handle is invalid and keyd's own Destroy of id has run since k
// was found (or runs now), a missing: do then looks for the key again on a
// new session (ErrNotFound if it is gone) instead of recovering, which would
// drop every key's handles and the pool's idle sessions for one key that is
// simply gone.
func (b *Backend) destroyedWhileSigning(id string, k *key, err error) error {
	switch code(err) {
	case p11.CKR_OBJECT_HANDLE_INVALID, p11.CKR_KEY_HANDLE_INVALID:
	default:
		return err
	}
	b.mu.RLock()
	destroyed := b.destroying == id || !bytes.Equal(b.known[id], k.ckaID)
	b.mu.RUnlock()
	if !destroyed {
		return err
	}
	return &missing{keystore.ErrNotFound}
}

// List returns the IDs of the keys keyd made on the token: private keys
// whose CKA_LABEL is "keyd:<valid id>" and whose CKA_ID starts with "keyd:",
// sorted. It fails with ErrUnavailable rather than return an empty list from
// a token that does not answer or a session that is not logged in.
func (b *Backend) List(ctx context.Context) ([]string, error) {
	if err := b.begin(ctx); err != nil {
		return nil, fmt.Errorf("list: %w", err)
	}
	var ids []string
	err := b.do(ctx, true, func(s *session) error {
		ids = ids[:0]
		if err := b.checkLogin(s); err != nil {
			return err
		}
		b.mu.RLock()
		slot := b.slot
		b.mu.RUnlock()
		if _, err := b.m.GetTokenInfo(slot); err != nil {
			return fmt.Errorf("C_GetTokenInfo: %w", err)
		}
		hs, err := b.find(s, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY),
			p11.NewAttribute(p11.CKA_TOKEN, true),
		}, 0)
		if err != nil {
			return err
		}
		var skipped error
		for _, h := range hs {
			a, err := b.m.GetAttributeValue(s.h, h, []*p11.Attribute{
				p11.NewAttribute(p11.CKA_LABEL, nil),
				p11.NewAttribute(p11.CKA_ID, nil),
			})
			if isCode(err, p11.CKR_OBJECT_HANDLE_INVALID) {
				// Destroyed meanwhile, by someone else — or the
				// login that found it ended (see below).
				skipped = err
				continue
			}
			if err != nil {
				return fmt.Errorf("C_GetAttributeValue: %w", err)
			}
			id, ok := strings.CutPrefix(string(a[0].Value), labelPrefix)
			if ok && ownID(a[1].Value) && keystore.ValidID(id) == nil {
				ids = append(ids, id)
			}
		}
		// A logout during the search hides every private key, and one
		// after it kills the handles it found: the list is believed
		// only from a session still logged in, and a skipped handle
		// only if no recovery (a new login) came in between.
		if err := b.checkLogin(s); err != nil {
			return err
		}
		if skipped != nil {
			b.mu.RLock()
			moved := b.epoch != s.epoch
			b.mu.RUnlock()
			if moved {
				return fmt.Errorf("C_GetAttributeValue: %w", skipped)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list: %w", err)
	}
	slices.Sort(ids)
	if n := len(ids); n > 0 {
		ids = slices.Compact(ids)
		if len(ids) != n {
			b.log.Warn("token holds several keyd keys under one label; Sign of those IDs fails")
		}
	}
	return append([]string{}, ids...), nil
}

// Destroy deletes the private and public key objects of id. It fails with
// ErrNotFound if the token has no private key labelled "keyd:<id>" (a
// public half left by an interrupted destroy is removed then too).
func (b *Backend) Destroy(ctx context.Context, id string) error {
	if err := b.beginID(ctx, id); err != nil {
		return fmt.Errorf("destroy %s: %w", id, err)
	}
	label := labelPrefix + id
	if !lockWithin(&b.wmu, ctx.Done()) {
		return fmt.Errorf("destroy %s: waiting for another key's generation or destruction: %w", id, ctx.Err())
	}
	defer b.wmu.Unlock()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("destroy %s: %w", id, err)
	}
	b.mu.Lock()
	delete(b.cache, id)
	b.forget++
	b.destroying = id
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		b.destroying = ""
		b.mu.Unlock()
	}()
	err := b.do(ctx, false, func(s *session) error {
		if err := b.checkLogin(s); err != nil {
			return err
		}
		// Token objects only: the key's session copy is discardCopy's.
		hs, err := b.find(s, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_TOKEN, true),
			p11.NewAttribute(p11.CKA_LABEL, label),
		}, 0)
		if err != nil {
			return err
		}
		var privs, others []p11.ObjectHandle
		for _, h := range hs {
			a, err := b.m.GetAttributeValue(s.h, h, []*p11.Attribute{
				p11.NewAttribute(p11.CKA_CLASS, nil),
				p11.NewAttribute(p11.CKA_ID, nil),
			})
			if isCode(err, p11.CKR_ATTRIBUTE_TYPE_INVALID) {
				continue // an object without CKA_ID (CKO_DATA…) is not keyd's
			}
			if err != nil {
				return fmt.Errorf("C_GetAttributeValue: %w", err)
			}
			if !ownID(a[1].Value) {
				continue
			}
			if ulong(a[0].Value) == p11.CKO_PRIVATE_KEY {
				privs = append(privs, h)
			} else {
				others = append(others, h)
			}
		}
		// The private key first: once it is gone the key cannot sign.
		for _, h := range slices.Concat(privs, others) {
			if err := b.m.DestroyObject(s.h, h); err != nil {
				return fmt.Errorf("C_DestroyObject: %w", err)
			}
		}
		if len(privs) == 0 {
			return &missing{keystore.ErrNotFound}
		}
		return nil
	})
	if err == nil || errors.Is(err, keystore.ErrNotFound) {
		b.mu.Lock()
		delete(b.known, id)
		delete(b.cache, id)
		b.forget++
		b.mu.Unlock()
	}
	// The copy goes too, whatever became of the token objects: a key
	// that stays is copied again when it signs. A copy that could not be
	// destroyed fails the call, so that the caller tries again (the token
	// objects being gone then, with ErrNotFound) rather than believe the
	// key material gone from the token's memory.
	if cerr := b.discardCopy(ctx, id); cerr != nil && (err == nil || errors.Is(err, keystore.ErrNotFound)) {
		return fmt.Errorf("destroy %s: %w", id, cerr)
	}
	if err != nil {
		return fmt.Errorf("destroy %s: %w", id, err)
	}
	b.log.Info("key destroyed", "id", id)
	return nil
}

// Health reports whether the Backend can sign: nil, or an error wrapping
// ErrClosed, ErrLocked (the PIN was refused) or ErrUnavailable (a call
// failed even after recovering, less than a second ago; a device call has
// been running for more than 10 s; the login is gone and cannot be
// restored; or the token does not answer C_GetTokenInfo — as SoftHSM does
// once its token directory is deleted). It is cheap: C_GetSessionInfo on
// the anchor session and C_GetTokenInfo, no signature, one probe at a time,
// and it returns when ctx ends even if the device does not answer. A probe
// that finds the anchor's session or login gone recovers them (at most
// once a second after a failed recovery), so the Backend heals without
// traffic. While a failure is recorded, the probe also signs a fixed digest
// with one of the keys this Backend knows (found again on the anchor by
// CKA_ID), and only a probe that signs clears the failure: a fault that only
// C_SignInit or C_Sign meet keeps Health failing, instead of flapping to
// healthy each time a probe that never signs passes.
func (b *Backend) Health(ctx context.Context) error {
	b.mu.RLock()
	closed, locked, slot, ep := b.closed, b.locked, b.slot, b.epoch
	b.mu.RUnlock()
	switch {
	case closed:
		return keystore.ErrClosed
	case locked != nil:
		return locked
	}
	if d := b.stuck(); d > 0 {
		return fmt.Errorf("%w: token %q: a PKCS#11 call has been running for %v", keystore.ErrUnavailable, b.label, d.Round(time.Millisecond))
	}
	f := b.failing.Load()
	if f != nil && time.Since(f.at) < b.opts.recoverBackoff {
		return f.err
	}
	sign := f != nil
	for attempt := 0; ; attempt++ {
		err := b.probeWithin(ctx, slot, sign)
		switch {
		case err == nil:
			if f != nil {
				// Not one recorded while the probe ran (which did
				// not sign if f was nil).
				b.failing.CompareAndSwap(f, nil)
			}
			return nil
		case errors.Is(err, errBusy), ctx.Err() != nil:
			return fmt.Errorf("%w: token %q: %w", keystore.ErrUnavailable, b.label, err)
		case attempt == 0 && recoverable(err) && !isCode(err, p11.CKR_GENERAL_ERROR) && !errors.As(err, new(*probeSignError)):
			// The anchor lost its session or its login: recover
			// now, then probe once more if the probe is to sign.
			if rerr := b.recover(ctx, ep, err); rerr != nil || !sign {
				return rerr
			}
			b.mu.RLock()
			slot, ep = b.slot, b.epoch
			b.mu.RUnlock()
			continue
		}
		werr := fmt.Errorf("%w: token %q: %w", keystore.ErrUnavailable, b.label, err)
		b.setFailing(werr)
		return werr
	}
}

// probeWithin runs probe on a goroutine of its own, one probe at a time,
// and returns its outcome or, if ctx ends first, ctx's error (the probe goes
// on in the background).
func (b *Backend) probeWithin(ctx context.Context, slot uint, sign bool) error {
	if !b.probing.TryLock() {
		return fmt.Errorf("%w: token %q: the previous health probe is still waiting for the device", keystore.ErrUnavailable, b.label)
	}
	ch := make(chan error, 1)
	go func() {
		// The probe's lock is released before the caller hears the
		// outcome, so that its next Health does not find it held.
		ch <- func() error {
			defer b.probing.Unlock()
			return b.probe(slot, sign)
		}()
	}()
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return fmt.Errorf("health: %w", ctx.Err())
	}
}

// errBusy is what a health probe says while a recovery holds the anchor.
var errBusy = errors.New("recovery in progress")

// probe checks the anchor session is logged in and the token answers, and
// with sign that the token signs (see probeSign).
func (b *Backend) probe(slot uint, sign bool) error {
	if !b.dev.TryLock() {
		if b.recovering.Load() {
			return errBusy
		}
		b.dev.Lock() // a session copy being made or destroyed: a moment
	}
	defer b.dev.Unlock()
	defer b.lib.reading()()
	if !b.haveAnchor || b.libGen != b.lib.gen {
		return p11.Error(p11.CKR_SESSION_HANDLE_INVALID)
	}
	info, err := b.m.GetSessionInfo(b.anchor)
	if err != nil {
		return fmt.Errorf("C_GetSessionInfo: %w", err)
	}
	if !loggedIn(info.State) {
		return fmt.Errorf("session state %d: %w", info.State, p11.Error(p11.CKR_USER_NOT_LOGGED_IN))
	}
	if _, err := b.m.GetTokenInfo(slot); err != nil {
		return fmt.Errorf("C_GetTokenInfo: %w", err)
	}
	if sign {
		// The pool's calls open sessions: a failure recorded because the
		// token refused them clears only once it opens one again.
		h, err := b.m.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
		if err != nil {
			return &probeSignError{fmt.Errorf("C_OpenSession (health probe): %w", err)}
		}
		_ = b.m.CloseSession(h)
		return b.probeSign()
	}
	return nil
}

// probeSign signs a fixed digest on the anchor with one of the keys this
// Backend knows: the first, by key ID, that is on the token and whose
// algorithm the token offers, found by its CKA_ID (no cached handle is
// trusted), trying at most probeKeys keys. It returns nil if there is no
// such key: a key gone from the token is Sign's DATA_LOSS, and a key the
// token cannot sign with (its mechanism refused), nothing about the device.
// A failure is a *probeSignError. The caller holds b.dev and is inside the
// module.
func (b *Backend) probeSign() error {
	b.mu.RLock()
	ids := make([]string, 0, len(b.known))
	for id := range b.known {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	if len(ids) > probeKeys {
		ids = ids[:probeKeys]
	}
	ckaIDs := make([][]byte, len(ids))
	for i, id := range ids {
		ckaIDs[i] = b.known[id]
	}
	b.mu.RUnlock()
	for _, ckaID := range ckaIDs {
		done, err := b.probeSignWith(ckaID)
		if err != nil {
			return &probeSignError{err}
		}
		if done {
			return nil
		}
	}
	return nil
}

// probeKeys bounds the keys a signing probe tries.
const probeKeys = 4

// probeSignError is a failure of the signing part of a health probe: the
// token answers, but does not sign. Health records it without recovering,
// since Sign has recovered already when a failure is recorded.
type probeSignError struct{ err error }

func (e *probeSignError) Error() string { return e.err.Error() }
func (e *probeSignError) Unwrap() error { return e.err }

// probeSignWith signs the probe's digest with the private key whose CKA_ID
// is ckaID. done is false if there is no such key or the token cannot sign
// with it.
func (b *Backend) probeSignWith(ckaID []byte) (done bool, err error) {
	hs, err := b.find(&session{h: b.anchor}, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_ID, ckaID),
	}, 1)
	if err != nil || len(hs) == 0 {
		return false, err
	}
	a, err := b.m.GetAttributeValue(b.anchor, hs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_KEY_TYPE, nil)})
	if err != nil {
		return false, fmt.Errorf("C_GetAttributeValue: %w", err)
	}
	kt := ulong(a[0].Value)
	var params []byte
	if kt != p11.CKK_RSA {
		a, err := b.m.GetAttributeValue(b.anchor, hs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_EC_PARAMS, nil)})
		if err != nil {
			return false, fmt.Errorf("C_GetAttributeValue: %w", err)
		}
		params = a[0].Value
	}
	k := kindOf(kt, params)
	alg := algOfSign(k, nil) // RS256 for an RSA key: PS256 if the token lacks it
	if alg == keystore.RS256 && !slices.Contains(b.algs, alg) {
		alg = keystore.PS256
	}
	if alg == "" || !slices.Contains(b.algs, alg) {
		return false, nil
	}
	digest, err := jws.Digest(alg, []byte("keyd health probe"))
	if err != nil {
		return false, nil
	}
	mech, data, err := signParams(k, digest, alg.SignerOpts())
	if err != nil {
		return false, nil
	}
	if err := b.m.SignInit(b.anchor, []*p11.Mechanism{mech}, hs[0]); err != nil {
		if errors.Is(classify(err), keystore.ErrUnsupportedAlgorithm) {
			return false, nil
		}
		return false, fmt.Errorf("C_SignInit (health probe): %w", err)
	}
	if _, err := b.m.Sign(b.anchor, data); err != nil {
		return false, fmt.Errorf("C_Sign (health probe): %w", err)
	}
	return true, nil
}

// stuck returns how long the oldest running device call has been running,
// if that is longer than hangAfter, or 0.
func (b *Backend) stuck() time.Duration {
	now := time.Now().UnixNano()
	var oldest int64
	b.mu.RLock()
	for s := range b.sessions {
		if t := s.since.Load(); t != 0 && (oldest == 0 || t < oldest) {
			oldest = t
		}
	}
	b.mu.RUnlock()
	if oldest == 0 {
		return 0
	}
	if d := time.Duration(now - oldest); d > b.opts.hangAfter {
		return d
	}
	return 0
}

// Close makes later calls fail with ErrClosed, waits (up to 10 s) for
// running device calls, closes the sessions, which logs out, and finalizes
// the module if no other Backend uses it. Closing twice returns nil. If a
// device call is still running after the wait, Close leaves the module
// initialized (finalizing under a running call is undefined) and says so.
func (b *Backend) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	close(b.done)
	b.mu.Unlock()

	deadline := time.NewTimer(b.opts.closeWait)
	defer deadline.Stop()
	for i := 0; i < b.n; i++ {
		select {
		case b.sem <- struct{}{}:
		case <-deadline.C:
			b.log.Error("PKCS#11 calls still running at close; the module stays initialized", "running", b.n-i)
			return fmt.Errorf("pkcs11: close: %d PKCS#11 call(s) still running after %v; the module was not finalized", b.n-i, b.opts.closeWait)
		}
	}
	if !lockWithin(&b.dev, deadline.C) {
		return fmt.Errorf("pkcs11: close: a recovery is still running after %v; the module was not finalized", b.opts.closeWait)
	}
	// Another Backend on the module may be initializing it again, which
	// a hung device makes last: wait for that only until the deadline.
	done, ok := b.lib.readingWithin(deadline.C)
	if !ok {
		b.dev.Unlock()
		return fmt.Errorf("pkcs11: close: the module is still being initialized again after %v; it was not finalized", b.opts.closeWait)
	}
	b.drainIdle()
	b.closeAnchor()
	done()
	b.dev.Unlock()
	b.mu.Lock()
	b.cache, b.known = nil, nil
	b.mu.Unlock()
	if err := b.lib.release(b.m, b.opts.closeWait); err != nil {
		return fmt.Errorf("pkcs11: close: %w", err)
	}
	b.log.Info("PKCS#11 key store closed")
	return nil
}

// lockWithin locks mu unless stop is closed or fires first.
func lockWithin[T any](mu *sync.Mutex, stop <-chan T) bool { return tryWithin(mu.TryLock, stop) }

// tryWithin calls try every millisecond until it succeeds, or until stop
// is closed or fires first.
func tryWithin[T any](try func() bool, stop <-chan T) bool {
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for !try() {
		select {
		case <-stop:
			return false
		case <-tick.C:
		}
	}
	return true
}

// usable reports ErrClosed if b is closed and the lock error if a wrong PIN
// locked it.
func (b *Backend) usable() error {
	b.mu.RLock()
	closed, locked := b.closed, b.locked
	b.mu.RUnlock()
	switch {
	case closed:
		return keystore.ErrClosed
	case locked != nil:
		return locked
	}
	return nil
}

// begin checks that b is open and not locked and ctx is live.
func (b *Backend) begin(ctx context.Context) error {
	if err := b.usable(); err != nil {
		return err
	}
	return ctx.Err()
}

// beginID is begin, and checks that id is valid.
func (b *Backend) beginID(ctx context.Context, id string) error {
	if err := b.begin(ctx); err != nil {
		return err
	}
	return keystore.ValidID(id)
}

// do runs fn on a pooled session. If fn (or opening the session) fails with
// a recoverable error, do recovers and runs fn once more on a new session;
// a second such failure returns ErrUnavailable and marks the Backend
// unhealthy. With abandon, do returns when ctx ends even while fn runs; fn
// then finishes in the background.
func (b *Backend) do(ctx context.Context, abandon bool, fn func(*session) error) error {
	fresh := false
	for attempt := 0; ; attempt++ {
		if err := b.usable(); err != nil {
			return err
		}
		ep, err := b.attempt(ctx, abandon, fresh, fn)
		if err == nil {
			return nil
		}
		var miss *missing
		if errors.As(err, &miss) {
			// Believe "not on the token" only when a second look on a
			// new session (or after a recovery) says so too.
			if attempt > 0 {
				return miss.err
			}
			fresh = true
			continue
		}
		if !recoverable(err) {
			if deviceFailed(err) {
				b.setFailing(fmt.Errorf("%w: token %q: %w", keystore.ErrUnavailable, b.label, err))
			}
			return classify(err)
		}
		if attempt > 0 {
			uerr := fmt.Errorf("%w: token %q failed again after recovering (%s): %w", keystore.ErrUnavailable, b.label, ckrName(err), err)
			b.futile.Store(time.Now().UnixNano())
			b.setFailing(uerr)
			b.log.Error("PKCS#11 call failed after recovery", "token", b.label, "err", ckrName(err))
			return uerr
		}
		if rerr := b.recover(ctx, ep, err); rerr != nil {
			return rerr
		}
	}
}

// attempt runs fn once on a pooled session (a newly opened one if fresh)
// and returns the epoch of that session (or of the failed attempt to get
// one) with fn's error.
func (b *Backend) attempt(ctx context.Context, abandon, fresh bool, fn func(*session) error) (uint64, error) {
	// Getting the session may call C_OpenSession (or C_CloseSession on a
	// stale idle one), which a hung device does not return from either: with
	// abandon it runs in the background too, holding its place in the pool.
	get := func() (uint64, error) {
		s, ep, err := b.acquire(ctx, fresh)
		if err != nil {
			return ep, err
		}
		done := b.lib.reading()
		if s.gen != b.lib.gen {
			// The module was initialized again since the session was
			// opened: the handle is stale and may be someone else's.
			err = fmt.Errorf("session opened before the module was initialized again: %w", p11.Error(p11.CKR_SESSION_HANDLE_INVALID))
		} else {
			s.since.Store(time.Now().UnixNano())
			err = fn(s)
			s.since.Store(0)
		}
		done()
		b.release(s, err)
		return ep, err
	}
	if !abandon || ctx.Done() == nil {
		return get()
	}
	type result struct {
		ep  uint64
		err error
	}
	ch := make(chan result, 1)
	go func() {
		ep, err := get()
		ch <- result{ep, err}
	}()
	select {
	case r := <-ch:
		return r.ep, r.err
	case <-ctx.Done():
		b.mu.RLock()
		ep := b.epoch
		b.mu.RUnlock()
		return ep, fmt.Errorf("the PKCS#11 call goes on in the background: %w", ctx.Err())
	}
}

// acquire takes a session from the pool, or opens one (always, if fresh),
// waiting for a free place in the pool until ctx ends. It returns the
// current epoch.
func (b *Backend) acquire(ctx context.Context, fresh bool) (*session, uint64, error) {
	select {
	case b.sem <- struct{}{}:
	default:
		select {
		case b.sem <- struct{}{}:
		case <-ctx.Done():
			return nil, 0, fmt.Errorf("waiting for one of %d PKCS#11 sessions: %w", b.n, ctx.Err())
		case <-b.done:
			return nil, 0, keystore.ErrClosed
		}
	}
	b.mu.RLock()
	ep, slot, closed := b.epoch, b.slot, b.closed
	b.mu.RUnlock()
	if closed {
		<-b.sem
		return nil, ep, keystore.ErrClosed
	}
	for !fresh {
		var s *session
		select {
		case s = <-b.idle:
		default:
		}
		if s == nil {
			break
		}
		if s.epoch == ep {
			return s, ep, nil
		}
		b.retire(s, nil)
	}
	// The session is registered while it is being opened, so that a
	// C_OpenSession the device does not return from shows in Health
	// (stuck) as a hung C_Sign does.
	s := &session{epoch: ep}
	s.since.Store(time.Now().UnixNano())
	b.mu.Lock()
	b.sessions[s] = struct{}{}
	b.mu.Unlock()
	done := b.lib.reading()
	h, err := b.m.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	s.h, s.gen = h, b.lib.gen
	done()
	s.since.Store(0)
	if err != nil {
		b.mu.Lock()
		delete(b.sessions, s)
		b.mu.Unlock()
		<-b.sem
		return nil, ep, fmt.Errorf("C_OpenSession: %w", err)
	}
	return s, ep, nil
}

// release returns s to the pool, or retires it if its call failed with a
// recoverable error, it belongs to an older epoch or b is closed.
func (b *Backend) release(s *session, err error) {
	b.mu.RLock()
	ep, closed := b.epoch, b.closed
	b.mu.RUnlock()
	if closed || s.epoch != ep || recoverable(err) {
		b.retire(s, err)
	} else {
		select {
		case b.idle <- s:
		default:
			b.retire(s, nil)
		}
	}
	<-b.sem
}

// retire closes s, unless it may be dead already (see session), in which
// case it is only forgotten. err is the error of its last call, if any.
func (b *Backend) retire(s *session, err error) {
	done := b.lib.reading()
	b.mu.RLock()
	dead := s.epoch < b.dead
	b.mu.RUnlock()
	switch {
	case s.gen != b.lib.gen, dead, sessionDead(err):
	default:
		_ = b.m.CloseSession(s.h) // it may fail if the device is gone; that is fine
	}
	done()
	b.mu.Lock()
	delete(b.sessions, s)
	b.mu.Unlock()
}

// sessionDead reports whether err says the session no longer exists.
func sessionDead(err error) bool {
	switch code(err) {
	case p11.CKR_SESSION_HANDLE_INVALID, p11.CKR_SESSION_CLOSED, p11.CKR_CRYPTOKI_NOT_INITIALIZED:
		return true
	}
	return false
}

// drainIdle retires the idle sessions.
func (b *Backend) drainIdle() {
	for {
		select {
		case s := <-b.idle:
			b.retire(s, nil)
		default:
			return
		}
	}
}

// recover re-connects after cause, a recoverable error seen in epoch ep. If
// another call recovered since ep, there is nothing to do. It waits for a
// recovery already running, and for its own, only until ctx ends: a
// recovery calls into the module (C_Finalize, C_Initialize, C_Login…),
// which may hang on a device that has gone away, so it runs on a goroutine
// of its own that holds b.dev until it is done, and the caller — a Sign
// with a deadline, a health probe — gets ErrUnavailable in time.
func (b *Backend) recover(ctx context.Context, ep uint64, cause error) error {
	if !lockWithin(&b.dev, ctx.Done()) {
		return fmt.Errorf("%w: token %q: waiting for a recovery: %w", keystore.ErrUnavailable, b.label, ctx.Err())
	}
	ch := make(chan error, 1)
	go func() {
		// The lock is released before the caller hears the outcome,
		// so that its next call finds the anchor free.
		ch <- func() error {
			defer b.dev.Unlock()
			return b.recoverLocked(ep, cause)
		}()
	}()
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%w: token %q: recovering from %s goes on in the background: %w", keystore.ErrUnavailable, b.label, ckrName(cause), ctx.Err())
	}
}

// recoverLocked is recover's work, with b.dev held.
func (b *Backend) recoverLocked(ep uint64, cause error) error {
	b.mu.RLock()
	cur, closed, locked := b.epoch, b.closed, b.locked
	b.mu.RUnlock()
	switch {
	case closed:
		return keystore.ErrClosed
	case locked != nil:
		return locked
	case cur != ep:
		return nil
	}
	if !b.lastFail.IsZero() && time.Since(b.lastFail) < b.opts.recoverBackoff {
		return fmt.Errorf("%w: token %q: %s, and the last recovery failed %v ago: %w", keystore.ErrUnavailable, b.label,
			ckrName(cause), time.Since(b.lastFail).Round(time.Millisecond), cause)
	}
	if d := time.Duration(time.Now().UnixNano() - b.futile.Load()); d < b.opts.recoverBackoff {
		return fmt.Errorf("%w: token %q: %s, and a call failed again after the last recovery %v ago: %w", keystore.ErrUnavailable, b.label,
			ckrName(cause), d.Round(time.Millisecond), cause)
	}
	b.recovering.Store(true)
	defer b.recovering.Store(false)
	anchors := b.anchors
	b.anchorAlone = false
	giveBack, err := b.reconnect(cause)
	// The pool's places, if reconnect took them, go back only after the
	// epoch moved on: a caller waiting for one must open its session in
	// the new epoch, or its session would count as one of before (and be
	// forgotten, not closed, if the anchor died).
	defer giveBack()
	if err != nil {
		b.lastFail = time.Now()
		if errors.Is(err, keystore.ErrLocked) || errors.Is(err, keystore.ErrClosed) {
			return err
		}
		werr := fmt.Errorf("%w: token %q: recovering from %s failed: %w", keystore.ErrUnavailable, b.label, ckrName(cause), err)
		b.setFailing(werr)
		b.log.Error("PKCS#11 recovery failed", "token", b.label, "cause", ckrName(cause), "err", err)
		return werr
	}
	b.lastFail = time.Time{}
	b.mu.Lock()
	b.epoch++
	if b.anchors != anchors && !b.anchorAlone {
		// The anchor died: the sessions of before went with it, most
		// likely (all sessions closed, a restart): do not close them.
		b.dead = b.epoch
	}
	clear(b.cache)
	b.mu.Unlock()
	b.drainIdle()
	b.log.Warn("PKCS#11 connection recovered; object handles will be found again", "token", b.label, "cause", ckrName(cause))
	return nil
}

// reconnect makes the anchor session live and logged in, doing as little
// as it can. The caller holds b.dev and is not inside the module. If
// reconnect took the pool's places (to re-initialize the module), giveBack
// returns them; the caller calls it in any case, after moving the epoch on.
func (b *Backend) reconnect(cause error) (giveBack func(), err error) {
	giveBack = func() {}
	done := b.lib.reading()
	light, err := b.reconnectLight(cause)
	if !light {
		b.forgetAnchor() // C_Finalize closes it, whatever its state
	}
	done()
	if light {
		return giveBack, err
	}
	// The module or the device is gone: initialize the module again and
	// find the token, whose slot may have changed. First stop this
	// Backend's own calls, so they cannot keep the module busy.
	giveBack, ok := b.quiesce(b.opts.closeWait)
	if !ok {
		select {
		case <-b.done:
			// Close holds the places, and waits for this recovery.
			return func() {}, keystore.ErrClosed
		default:
		}
		return func() {}, fmt.Errorf("calls still running after %v; not re-initializing the module under them", b.opts.closeWait)
	}
	gen, err := b.lib.reinitialize(b.m, b.libGen, b.opts.closeWait)
	if err != nil {
		return giveBack, err
	}
	b.libGen = gen
	defer b.lib.reading()()
	slot, _, err := b.findToken()
	if err != nil {
		return giveBack, err
	}
	b.mu.Lock()
	b.slot = slot
	b.mu.Unlock()
	b.log.Warn("PKCS#11 module initialized again", "token", b.label, "slot", slot)
	return giveBack, b.openAnchor(slot)
}

// quiesce takes every place in the pool, waiting up to wait for running
// calls to return, so none of this Backend's calls is inside the module. It
// returns the function that gives the places back.
func (b *Backend) quiesce(wait time.Duration) (giveBack func(), ok bool) {
	timer := time.NewTimer(wait)
	defer timer.Stop()
	held := 0
	giveBack = func() {
		for ; held > 0; held-- {
			<-b.sem
		}
	}
	for held < b.n {
		select {
		case b.sem <- struct{}{}:
			held++
		case <-timer.C:
			giveBack()
			return nil, false
		case <-b.done:
			// Close takes the places and then waits for the recovery
			// that calls this: give up rather than wait for each other.
			giveBack()
			return nil, false
		}
	}
	return giveBack, true
}

// reconnectLight restores the login without re-initializing the module if
// it can; light reports whether it could (err is then the outcome).
func (b *Backend) reconnectLight(cause error) (light bool, err error) {
	if deviceGone(cause) && b.libGen == b.lib.gen {
		return false, nil
	}
	if b.haveAnchor && b.libGen == b.lib.gen {
		info, err := b.m.GetSessionInfo(b.anchor)
		if err == nil {
			if loggedIn(info.State) {
				return true, nil // only handles or a pooled session went stale
			}
			return true, b.login(b.anchor) // logged out elsewhere
		}
		if deviceGone(err) || !sessionDead(err) {
			// The device is gone, or the module cannot say whether the
			// anchor lives: a new anchor beside a live one would leave
			// that one open for good, with its session copies in the
			// token's memory. Initializing the module again closes
			// every session.
			return false, nil
		}
	}
	// The anchor died (or another Backend initialized the module again)
	// but the module answers: a new anchor — on the token keyd opened at
	// start, found again (another may sit in its slot by now: the PIN
	// must not go to it).
	b.forgetAnchor()
	// Before the new anchor can take a dead session's number: if the
	// pool's sessions still answer, the anchor died alone, and they are
	// closed (not forgotten, which would leave them open on the token).
	b.anchorAlone = b.idleAlive()
	slot, _, err := b.findToken()
	if err != nil {
		if deviceGone(err) {
			return false, nil
		}
		return true, err
	}
	b.mu.Lock()
	b.slot = slot
	b.mu.Unlock()
	if err := b.openAnchor(slot); err == nil || !deviceGone(err) {
		return true, err
	}
	return false, nil
}

// idleAlive reports whether the pool has idle sessions and every one of
// them is still open (C_GetSessionInfo answers). The caller holds b.dev
// and is inside the module.
func (b *Backend) idleAlive() bool {
	var idle []*session
	for len(idle) < b.n {
		select {
		case s := <-b.idle:
			idle = append(idle, s)
			continue
		default:
		}
		break
	}
	b.mu.RLock()
	dead := b.dead
	b.mu.RUnlock()
	alive := len(idle) > 0
	for _, s := range idle {
		if !alive {
			break
		}
		if s.gen != b.lib.gen || s.epoch < dead {
			alive = false
			break
		}
		_, err := b.m.GetSessionInfo(s.h)
		alive = err == nil
	}
	for _, s := range idle {
		select {
		case b.idle <- s:
		default:
			// The pool refilled meanwhile. A session that may be dead
			// is forgotten, not closed (see session).
			var err error
			if !alive {
				err = p11.Error(p11.CKR_SESSION_HANDLE_INVALID)
			}
			b.retire(s, err)
		}
	}
	return alive
}

func (b *Backend) setFailing(err error) {
	b.failing.Store(&failure{err: err, at: time.Now()})
}

func loggedIn(state uint) bool {
	return state == p11.CKS_RO_USER_FUNCTIONS || state == p11.CKS_RW_USER_FUNCTIONS
}

// checkLogin returns CKR_USER_NOT_LOGGED_IN if s is not logged in, so a
// search never mistakes invisible private objects for missing ones.
func (b *Backend) checkLogin(s *session) error {
	info, err := b.m.GetSessionInfo(s.h)
	if err != nil {
		return fmt.Errorf("C_GetSessionInfo: %w", err)
	}
	if !loggedIn(info.State) {
		return p11.Error(p11.CKR_USER_NOT_LOGGED_IN)
	}
	return nil
}

// find returns up to max (0: all) objects matching tmpl.
func (b *Backend) find(s *session, tmpl []*p11.Attribute, max int) ([]p11.ObjectHandle, error) {
	b.objs.RLock() // see objs
	defer b.objs.RUnlock()
	if err := b.m.FindObjectsInit(s.h, tmpl); err != nil {
		return nil, fmt.Errorf("C_FindObjectsInit: %w", err)
	}
	var all []p11.ObjectHandle
	for max <= 0 || len(all) < max {
		hs, _, err := b.m.FindObjects(s.h, 64)
		if err != nil {
			_ = b.m.FindObjectsFinal(s.h)
			return nil, fmt.Errorf("C_FindObjects: %w", err)
		}
		if len(hs) == 0 {
			break
		}
		all = append(all, hs...)
	}
	if err := b.m.FindObjectsFinal(s.h); err != nil {
		return nil, fmt.Errorf("C_FindObjectsFinal: %w", err)
	}
	return all, nil
}

// lookup returns key id: from the cache if it was found in s's epoch,
// otherwise found on the token (by CKA_ID if this Backend has seen the key,
// by label if not).
func (b *Backend) lookup(s *session, id string) (*key, error) {
	b.mu.RLock()
	k, known, forget := b.cache[id], b.known[id], b.forget
	b.mu.RUnlock()
	if k != nil && k.epoch == s.epoch && k.gen == s.gen {
		return k, nil
	}
	tmpl := []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_LABEL, labelPrefix+id),
	}
	if known != nil {
		tmpl = append(tmpl, p11.NewAttribute(p11.CKA_ID, known))
	}
	hs, err := b.find(s, tmpl, 2)
	if err != nil {
		return nil, err
	}
	var ckaID []byte
	switch len(hs) {
	case 0:
	case 1:
		a, err := b.m.GetAttributeValue(s.h, hs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_ID, nil)})
		if err != nil {
			return nil, fmt.Errorf("C_GetAttributeValue: %w", err)
		}
		ckaID = a[0].Value
	default:
		return nil, fmt.Errorf("token %q has several private keys labelled %q; keyd will not guess which to use", b.label, labelPrefix+id)
	}
	if ckaID == nil || !ownID(ckaID) {
		if err := b.checkLogin(s); err != nil {
			return nil, err
		}
		if known != nil && !b.beingDestroyed(id) {
			return nil, &missing{fmt.Errorf("%w: token %q no longer has the key (CKA_ID %x); keyd will not make a replacement",
				keystore.ErrKeyLost, b.label, known)}
		}
		return nil, &missing{keystore.ErrNotFound}
	}
	// keyd's public object has the private key's label and CKA_ID; a tool
	// may add another public object with the same CKA_ID (a common
	// convention), which keyd leaves alone.
	pubs, err := b.find(s, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PUBLIC_KEY),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_LABEL, labelPrefix+id),
		p11.NewAttribute(p11.CKA_ID, ckaID),
	}, 2)
	if err != nil {
		return nil, err
	}
	switch len(pubs) {
	case 0:
		if b.beingDestroyed(id) {
			return nil, &missing{keystore.ErrNotFound}
		}
		// Believed only if a second look says so too (see do): the
		// rotation layer records a lost key for good.
		return nil, &missing{fmt.Errorf("%w: token %q has the private key (CKA_ID %x) but no longer its public key object %q; keyd will not make a replacement",
			keystore.ErrKeyLost, b.label, ckaID, labelPrefix+id)}
	case 1:
	default:
		return nil, fmt.Errorf("token %q has several public key objects labelled %q with CKA_ID %x; keyd will not guess which to use",
			b.label, labelPrefix+id, ckaID)
	}
	k, err = b.readPublic(s, pubs[0])
	if err != nil {
		return nil, err
	}
	k.ckaID, k.priv, k.epoch, k.gen = ckaID, hs[0], s.epoch, s.gen
	b.mu.Lock()
	if b.epoch == s.epoch && b.forget == forget && !b.closed {
		b.cache[id] = k
		b.known[id] = ckaID
	}
	b.mu.Unlock()
	return k, nil
}

// beingDestroyed reports whether a Destroy of id is running: a key it has
// deleted part of is not lost.
func (b *Backend) beingDestroyed(id string) bool {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.destroying == id
}

// readPublic reads the public key object h.
func (b *Backend) readPublic(s *session, h p11.ObjectHandle) (*key, error) {
	a, err := b.m.GetAttributeValue(s.h, h, []*p11.Attribute{p11.NewAttribute(p11.CKA_KEY_TYPE, nil)})
	if err != nil {
		return nil, fmt.Errorf("C_GetAttributeValue: %w", err)
	}
	switch kt := ulong(a[0].Value); kt {
	case p11.CKK_RSA:
		a, err := b.m.GetAttributeValue(s.h, h, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_MODULUS, nil),
			p11.NewAttribute(p11.CKA_PUBLIC_EXPONENT, nil),
		})
		if err != nil {
			return nil, fmt.Errorf("C_GetAttributeValue: %w", err)
		}
		pub, err := publicRSA(a[0].Value, a[1].Value)
		if err != nil {
			return nil, err
		}
		return &key{kind: kindRSA, pub: pub}, nil
	case p11.CKK_EC, ckkECEdwards:
		a, err := b.m.GetAttributeValue(s.h, h, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_EC_PARAMS, nil),
			p11.NewAttribute(p11.CKA_EC_POINT, nil),
		})
		if err != nil {
			return nil, fmt.Errorf("C_GetAttributeValue: %w", err)
		}
		k := kindOf(kt, a[0].Value)
		if k == kindUnknown {
			return nil, fmt.Errorf("%w: key on an unsupported curve (CKA_EC_PARAMS %x)", keystore.ErrUnsupportedAlgorithm, a[0].Value)
		}
		pub, err := publicEC(k, a[1].Value)
		if err != nil {
			return nil, err
		}
		return &key{kind: k, pub: pub}, nil
	default:
		return nil, fmt.Errorf("%w: key type 0x%x", keystore.ErrUnsupportedAlgorithm, kt)
	}
}

// missing is a search's answer that a key is not on the token. do believes
// it only the second time, from a new session: a stale session can answer a
// search with nothing, and a wrong "lost" would be a false DATA_LOSS.
type missing struct{ err error }

func (m *missing) Error() string { return m.err.Error() }
func (m *missing) Unwrap() error { return m.err }

// ownID reports whether a CKA_ID is one keyd made.
func ownID(id []byte) bool {
	return len(id) > len(idPrefix) && bytes.HasPrefix(id, []byte(idPrefix))
}

// ulong decodes a CK_ULONG attribute value (native byte order, the size of
// a C unsigned long).
func ulong(v []byte) uint {
	switch len(v) {
	case 8:
		return uint(binary.NativeEndian.Uint64(v))
	case 4:
		return uint(binary.NativeEndian.Uint32(v))
	}
	return p11.CK_UNAVAILABLE_INFORMATION
}
