// Package tpm is the TPM 2.0 key store: signing keys generated inside a TPM
// that can be used only by that TPM.
//
// # Keys
//
// Each key is created by TPM2_Create under the owner hierarchy's storage
// root key (SRK) with the attributes fixedTPM, fixedParent,
// sensitiveDataOrigin, userWithAuth, noDA and sign (and not decrypt,
// restricted or adminWithPolicy), an empty authValue and no policy: the
// private key never exists outside the TPM and cannot be duplicated to
// another one, keyd alone holds the (empty) authorization, no caller ever
// supplies TPM authorization, and no request can count towards the TPM's
// dictionary-attack lockout. ECDSA keys carry their scheme (ECDSA with
// SHA-256 on P-256, SHA-384 on P-384); RSA keys have the NULL scheme and each
// signature chooses RSASSA (RS256) or RSAPSS (PS256) with SHA-256.
//
// Only the key's TPM2B_PUBLIC and its TPM-encrypted TPM2B_PRIVATE are stored,
// in <StateDir>/<id>.tpmkey (mode 0600) as a PEM "TSS2 PRIVATE KEY" (the
// ASN.1 key format of tpm2-tss-engine and tpm2-openssl: a loadable key with
// an empty auth whose parent is 0x40000001, the owner hierarchy's SRK). The
// private blob is useless without this TPM. Saved contexts (TPM2_ContextSave)
// are never stored: they die with a TPM reset. Destroy removes the file;
// since the TPM holds nothing persistent for the key, the key is gone once
// every copy of the file (backups included) is.
//
// Files are written as in the soft backend: a temporary file (O_EXCL, 0600)
// is written, synced, hard-linked to its final name (so an existing key is
// never replaced) and the directory synced; Destroy writes a tombstone
// <id>.destroyed first, and Generate refuses an ID with a tombstone, so IDs
// are never reused; a key file found next to its tombstone (a crash in
// Destroy) is removed by New, and the key never signs again. New refuses a
// state directory that is a symlink, writable by group or others or owned
// by another user; loading refuses a key file that is a symlink, not
// regular, has any group or other permission bit or another owner
// (ErrInsecureStorage). New takes an exclusive lock on <StateDir>/lock, so
// two processes never share a state directory.
//
// # Storage root key
//
// The SRK is never made persistent: New, and every reconnection or TPM
// reset after it, re-creates it with TPM2_CreatePrimary from the TCG ECC
// NIST P-256 SRK template (see srkTemplate), which yields the same key as
// long as the owner seed is unchanged. Its Name (a hash of its public area)
// is pinned in <StateDir>/srk.name at the first start and checked at every
// re-creation. A different Name means the TPM was cleared (TPM2_Clear makes
// a new owner seed), is another TPM, or the template changed: keys cannot
// load, and New, Generate, Sign and Health fail with ErrKeyLost from then on
// (keyd never quietly makes new keys). A missing srk.name next to existing
// key files is ErrKeyLost too. The owner hierarchy's authorization, when it
// has one, is read from Config.OwnerAuthFile; the hierarchy's authorization
// is not subject to dictionary-attack lockout, and a wrong one fails with
// ErrLocked.
//
// # Algorithms
//
// ES256 needs ECC NIST P-256 and ECDSA; ES384 also needs P-384; RS256 needs
// RSA and RSASSA; RSA-3072 keys need TPM2_TestParms to accept 3072 bits.
// PS256 needs RSAPSS and a start-up self-test: the TPM signs with a
// throwaway key (a software key loaded with TPM2_LoadExternal, or if the TPM
// refuses that, a TPM-generated one) and the signature must verify with a
// salt as long as the hash, as RFC 7518 requires. swtpm passes; many
// hardware TPMs use the maximum salt, which JWS verifiers reject, and then
// PS256 is refused with ErrUnsupportedAlgorithm and a message saying why.
// EdDSA is never available: TPM 2.0 has no Ed25519. Algorithms lists what
// the probe found.
//
// Sign returns ASN.1 DER for ECDSA (the TPM's r and s as INTEGERs, however
// short the TPM returns them) and the modulus-sized signature for RSA. Every
// signature is checked for its form (the scheme asked for; ECDSA r and s
// non-zero and within the curve's size; RSA no longer than the modulus), and
// the first one after each TPM2_Load of a key is verified against the stored
// public key, proving that the handle names the key: a signature that does
// not verify makes the backend re-initialise the TPM and sign again once.
// Later signatures by the same loaded handle are not verified (see
// Backend.sign for why nothing else can be at that handle). TPM2_Sign, the
// one command of a signature by a loaded key, is encoded and parsed by keyd
// itself (sign.go); every other command goes through go-tpm.
//
// # The TPM connection
//
// The TPM is serial, and a TPM without a resource manager (swtpm) serves one
// connection: every command goes through one connection owned by whoever
// holds the backend's token, in the caller's goroutine. The caller's
// context bounds both the wait for the token and the wait for the result: a
// command in flight when the context ends finishes (or times out) in the
// background, holding the token, and its result is dropped, since
// abandoning it half-way would break the connection; no further command is
// sent for that caller. Each
// command has a deadline (Config.CommandTimeout; TPM2_Create of
// an RSA key, Config.KeygenTimeout), so a stopped TPM fails the call with
// ErrUnavailable instead of hanging keyd; after a timeout or a failed
// connection attempt, calls fail fast with ErrUnavailable for up to a second
// before the next attempt. TPM_RC_RETRY, TPM_RC_YIELDED and TPM_RC_TESTING
// are retried up to three times with a short backoff, then ErrUnavailable.
//
// After a broken connection keyd reconnects on the next call. After
// reconnecting, or a TPM_RC_INITIALIZE (the TPM was reset), it sends
// TPM2_Startup(CLEAR) if the TPM needs it, flushes every transient object
// still in the TPM (on a TPM without a resource manager keyd must be the
// TPM's only user; /dev/tpmrm0 shows each connection only its own objects),
// re-creates and checks the SRK and reloads key blobs as they are used. A
// call that hit a reset, a connection broken at once (swtpm restarted) or a
// stale handle is run a second time after this; a timeout is not retried.
//
// Keys are loaded when used and kept loaded one at a time: a signature by
// the key loaded last costs one TPM2_Sign; another key is loaded after the
// previous one is flushed; Destroy and Close flush too. So keyd holds at
// most two transient objects (the SRK and one key), within the three slots
// swtpm and many firmware TPMs have.
//
// # Errors
//
//	ErrUnavailable  connection refused or broken, command timeout, TPM
//	                warnings after retries (TPM_RC_RETRY, _YIELDED,
//	                _TESTING, _OBJECT_MEMORY, _LOCKOUT…), TPM_RC_FAILURE,
//	                _UPGRADE, _REBOOT, a handle error that outlives
//	                re-initialisation, a response keyd cannot parse, a
//	                signature of a form keyd did not ask for
//	ErrKeyLost      SRK name differs from the pinned one (TPM cleared or
//	                replaced, template changed); srk.name missing beside
//	                keys; a key blob the TPM refuses under the right SRK
//	                (TPM_RC_INTEGRITY…), a key file keyd cannot parse, or
//	                a key whose authValue is not empty (TPM_RC_BAD_AUTH on
//	                TPM2_Sign: a key file keyd did not make)
//	ErrLocked       owner hierarchy authorization refused
//	                (TPM_RC_BAD_AUTH, TPM_RC_AUTH_FAIL, TPM_RC_SIZE on the
//	                session: longer than the TPM takes) or hierarchy disabled
//	ErrInsecureStorage  unsafe state directory or key file; a key file
//	                whose key is not noDA/fixedTPM/fixedParent
//	ErrUnsupportedAlgorithm  EdDSA, algorithms the TPM lacks, PS256 that
//	                failed the self-test, signer options that do not fit the key
//
// The TPM's own code is kept in the error's text.
package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/internal/ecdsasig"
	"github.com/keyd-dev/keyd/internal/keyfile"
	"github.com/keyd-dev/keyd/keystore"
)

// Defaults for Config.
const (
	DefaultDevice         = "/dev/tpmrm0"
	DefaultCommandTimeout = 5 * time.Second
	DefaultKeygenTimeout  = 2 * time.Minute
)

// Config configures a TPM Backend.
type Config struct {
	// Device is the TPM character device; with neither Device nor Address
	// set it is /dev/tpmrm0, the kernel's resource manager (use it rather
	// than /dev/tpm0, which allows one user and no isolation).
	Device string

	// Address is a TPM simulator's command port instead of a device:
	// "tcp://127.0.0.1:2321" (swtpm --server type=tcp) or
	// "unix:///run/swtpm/sock" (type=unixio). The raw TPM command stream is
	// spoken; swtpm's control port is not used.
	Address string

	// OwnerAuthFile names a file holding the owner hierarchy's
	// authorization value (a trailing newline is ignored); empty means the
	// hierarchy has no authorization, as on most machines. The file must be
	// a regular file owned by keyd's user or root with no permission for
	// others (0600, or 0640 root:keyd); anything else is ErrInsecureStorage.
	OwnerAuthFile string

	// StateDir is where key blobs live: <StateDir>/<id>.tpmkey, the
	// tombstones <id>.destroyed, the pinned SRK name srk.name and a lock
	// file. It is created, mode 0700, if missing. Required.
	StateDir string

	// CommandTimeout bounds each TPM command (and each connection attempt);
	// zero means DefaultCommandTimeout (5 s).
	CommandTimeout time.Duration

	// KeygenTimeout bounds TPM2_Create of an RSA key, which takes seconds
	// on hardware TPMs; zero means DefaultKeygenTimeout (2 min). It is
	// never shorter than CommandTimeout.
	KeygenTimeout time.Duration

	// Logger receives lifecycle and fault messages; nil discards them.
	Logger *slog.Logger
}

// Validate reports every problem with cfg that can be seen without the TPM
// or the files (for keyd check-config): a missing StateDir, both Device and
// Address, a malformed Address, negative timeouts.
func (cfg Config) Validate() error {
	var errs []error
	if cfg.StateDir == "" {
		errs = append(errs, errors.New("state_dir is required"))
	}
	if _, err := parseEndpoint(cfg.Device, cfg.Address); err != nil {
		errs = append(errs, err)
	}
	if cfg.CommandTimeout < 0 {
		errs = append(errs, fmt.Errorf("command_timeout %v is negative", cfg.CommandTimeout))
	}
	if cfg.KeygenTimeout < 0 {
		errs = append(errs, fmt.Errorf("keygen_timeout %v is negative", cfg.KeygenTimeout))
	}
	return errors.Join(errs...)
}

// Backend is the TPM keystore.Backend. It is safe for concurrent use.
type Backend struct {
	dir           string
	ep            endpoint
	log           *slog.Logger
	ownerAuth     []byte
	cmdTimeout    time.Duration
	keygenTimeout time.Duration
	cooldown      time.Duration
	pinned        *pin
	lock          *os.File

	// Set by New's probe, read-only afterwards.
	algs     []keystore.Algorithm
	refused  map[keystore.Algorithm]string // why an algorithm is not offered
	rsa3072  bool
	pss      bool
	pssProbe string // how the PS256 self-test ran, for logs and tests

	// tok is the TPM's owner token: whoever holds it may use st.
	tok chan struct{}
	st  tpmState
	// hook, set by tests before use, may answer a command instead of the
	// TPM (ok true).
	hook func(cmd []byte) (rsp []byte, ok bool, err error)

	// wmu serializes changes to the state directory.
	wmu sync.Mutex

	mu     sync.RWMutex
	closed bool
	blobs  map[string]*keyBlob // loaded key files
	gone   map[string]struct{} // destroyed by this process (or its start, see scan)

	failpoint func(stage string) error // tests: abort writing a file
}

var _ keystore.Backend = (*Backend)(nil)

// New opens the key store in cfg.StateDir on the TPM cfg names, re-creates
// and checks the storage root key (pinning its name at the first start) and
// probes the algorithms. It fails with ErrUnavailable if the TPM cannot be
// reached, ErrKeyLost if the SRK is not the pinned one, ErrLocked if the
// owner authorization is refused and ErrInsecureStorage for an unsafe state
// directory or owner auth file.
func New(ctx context.Context, cfg Config) (*Backend, error) {
	return newBackend(ctx, cfg, nil)
}

// newBackend is New with a hook that may answer TPM commands, for tests.
func newBackend(ctx context.Context, cfg Config, hook func(cmd []byte) ([]byte, bool, error)) (*Backend, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	ep, _ := parseEndpoint(cfg.Device, cfg.Address)
	cmdTimeout := cfg.CommandTimeout
	if cmdTimeout == 0 {
		cmdTimeout = DefaultCommandTimeout
	}
	keygenTimeout := cfg.KeygenTimeout
	if keygenTimeout == 0 {
		keygenTimeout = DefaultKeygenTimeout
	}
	keygenTimeout = max(keygenTimeout, cmdTimeout)
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dir := filepath.Clean(cfg.StateDir)
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("tpm: create state directory: %w", err)
		}
	}
	if err := keyfile.CheckDir(dir, "state directory"); err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	var auth []byte
	if cfg.OwnerAuthFile != "" {
		data, err := keyfile.Read(cfg.OwnerAuthFile, "file", authFileRule, maxFile)
		if err != nil {
			if errors.Is(err, keystore.ErrNotFound) {
				err = fs.ErrNotExist
			}
			return nil, fmt.Errorf("tpm: owner auth file %s: %w", cfg.OwnerAuthFile, err)
		}
		auth = []byte(strings.TrimSuffix(strings.TrimSuffix(string(data), "\n"), "\r"))
	}
	lock, err := lockDir(dir)
	if err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	b := &Backend{
		dir:           dir,
		ep:            ep,
		log:           log.With("backend", "tpm", "dir", dir),
		ownerAuth:     auth,
		cmdTimeout:    cmdTimeout,
		keygenTimeout: keygenTimeout,
		cooldown:      min(cmdTimeout, time.Second),
		lock:          lock,
		refused:       map[keystore.Algorithm]string{},
		tok:           make(chan struct{}, 1),
		blobs:         map[string]*keyBlob{},
		gone:          map[string]struct{}{},
		hook:          hook,
	}
	if err := b.open(ctx); err != nil {
		b.Close()
		return nil, fmt.Errorf("tpm: %w", err)
	}
	b.log.Info("TPM key store opened", "tpm", ep.String(), "algorithms", fmt.Sprint(b.algs), "rsa3072", b.rsa3072, "ps256_selftest", b.pssProbe)
	return b, nil
}

// open checks the state directory, connects, checks or pins the SRK and
// probes the algorithms.
func (b *Backend) open(ctx context.Context) error {
	n, err := b.scan()
	if err != nil {
		return err
	}
	data, err := keyfile.Read(b.pinPath(), "file", pinRule, maxFile)
	switch {
	case errors.Is(err, keystore.ErrNotFound):
		if n > 0 {
			return fmt.Errorf("%w: %s is missing but %d key files exist: restore it from a backup (keyd will not re-pin a storage root key its keys may not belong to)", keystore.ErrKeyLost, b.pinPath(), n)
		}
	case err != nil:
		return err
	default:
		p, err := decodePin(data)
		if err != nil {
			return fmt.Errorf("%w: %s: %v", keystore.ErrKeyLost, b.pinPath(), err)
		}
		if p.template != srkTemplateID {
			return fmt.Errorf("%w: %s pins an SRK made from template %q, but this keyd uses %q", keystore.ErrKeyLost, b.pinPath(), p.template, srkTemplateID)
		}
		b.pinned = &p
	}

	var name []byte
	err = b.do(ctx, b.cmdTimeout, func(o *op) error {
		name = slices.Clone(b.st.srk.Name.Buffer)
		return b.probe(o)
	})
	if err != nil {
		return b.mapErr(err)
	}
	if b.pinned == nil {
		p := pin{template: srkTemplateID, name: name}
		b.wmu.Lock()
		err := keyfile.WriteNew(b.dir, pinFile, p.encode(), b.fail)
		b.wmu.Unlock()
		if err != nil {
			return fmt.Errorf("pin the storage root key: %w", err)
		}
		b.pinned = &p
		b.log.Info("storage root key pinned", "name", fmt.Sprintf("%x", name), "path", b.pinPath())
	}
	return nil
}

// scan removes temporary files left by a crash, finishes destroys that a
// crash interrupted (a key file next to its tombstone is removed, and the
// key counts as destroyed) and checks each key file, logging those that
// loading would refuse. It returns the number of keys.
func (b *Backend) scan() (int, error) {
	entries, err := os.ReadDir(b.dir)
	if err != nil {
		return 0, fmt.Errorf("read state directory: %w", err)
	}
	n := 0
	removed := false
	for _, e := range entries {
		name := e.Name()
		path := filepath.Join(b.dir, name)
		if isTemp(name) {
			if err := os.Remove(path); err != nil {
				b.log.Error("cannot remove leftover temporary file", "path", path, "err", err)
				continue
			}
			b.log.Warn("removed leftover temporary file from an interrupted write", "path", path)
			continue
		}
		id, ok := keyID(name)
		if !ok {
			continue
		}
		if keyfile.Tombstoned(b.log, id, path, b.tombstonePath(id)) {
			b.gone[id] = struct{}{}
			removed = true
			continue
		}
		n++
		if _, err := keyfile.Read(path, "file", keyFileRule, maxFile); err != nil {
			b.log.Error("key file refused; Public and Sign of this key will fail", "id", id, "err", err)
		}
	}
	if removed {
		if err := keyfile.SyncDir(b.dir); err != nil {
			return 0, fmt.Errorf("sync state directory: %w", err)
		}
	}
	return n, nil
}

// Name returns "tpm".
func (b *Backend) Name() string { return "tpm" }

// Algorithms returns the algorithms the TPM supports, as probed by New.
func (b *Backend) Algorithms() []keystore.Algorithm { return slices.Clone(b.algs) }

// supported reports whether spec can be generated, or why not.
func (b *Backend) supported(spec keystore.KeySpec) error {
	if !slices.Contains(b.algs, spec.Algorithm) {
		why := b.refused[spec.Algorithm]
		if why == "" {
			why = "not offered by this TPM"
		}
		return fmt.Errorf("%s: %w (%s)", spec.Algorithm, keystore.ErrUnsupportedAlgorithm, why)
	}
	if spec.Algorithm.IsRSA() && spec.Bits() == 3072 && !b.rsa3072 {
		return fmt.Errorf("%v: %w (this TPM does not accept RSA-3072 keys; use 2048 bits)", spec, keystore.ErrUnsupportedAlgorithm)
	}
	return nil
}

// Generate creates a key under id with TPM2_Create and stores its blobs. It
// fails with ErrAlreadyExists if id has a key file or a tombstone,
// ErrInvalidID, ErrUnsupportedAlgorithm, ErrUnavailable, ErrKeyLost (the
// TPM's SRK changed), ErrClosed or the context's error. A context that ends
// while the TPM generates the key makes Generate return its error at once;
// the TPM finishes in the background and the key is discarded, never
// stored.
func (b *Backend) Generate(ctx context.Context, id string, spec keystore.KeySpec) (crypto.PublicKey, error) {
	if err := b.beginID(ctx, id); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	if err := spec.Validate(); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	if err := b.supported(spec); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	kind, err := kindFor(spec)
	if err != nil {
		return nil, fmt.Errorf("generate %s %v: %w", id, spec, err)
	}
	if err := keyfile.CheckFree(b.keyPath(id), b.tombstonePath(id)); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	timeout := b.cmdTimeout
	if kind.isRSA() {
		timeout = b.keygenTimeout
		// A hardware TPM takes seconds to tens of seconds to find RSA
		// primes, and it is serial: say so before, not only after.
		b.log.Info("generating an RSA key in the TPM; this can take a while, and signatures wait for it", "id", id, "spec", spec.String(), "timeout", timeout)
	}
	var blob *keyBlob
	err = b.do(ctx, timeout, func(o *op) error {
		rsp, err := tpm2.Create{ParentHandle: b.st.srk, InPublic: tpm2.New2B(keyTemplate(kind))}.Execute(o)
		if err != nil {
			return err
		}
		blob, err = newBlob(rsp.OutPublic.Bytes(), rsp.OutPrivate.Buffer)
		if err != nil {
			return fmt.Errorf("the TPM returned an unexpected key: %w", err)
		}
		if blob.kind != kind {
			return fmt.Errorf("asked the TPM for a %s key, got %s", kind, blob.kind)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("generate %s %v: %w", id, spec, b.mapErr(err))
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	data, err := encodeKey(blob)
	if err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	b.wmu.Lock()
	err = b.openForWrite()
	if err == nil {
		err = keyfile.CheckFree(b.keyPath(id), b.tombstonePath(id))
	}
	if err == nil && b.cached(id) {
		// The file is gone but the key is loaded and signing: a new key
		// under its ID would be a reused ID.
		err = fmt.Errorf("%w (loaded, though its file is missing)", keystore.ErrAlreadyExists)
	}
	if err == nil {
		err = keyfile.WriteNew(b.dir, id+keySuffix, data, b.fail)
	}
	if err == nil {
		// Recorded before wmu goes: a Destroy of id that comes between
		// would otherwise be undone here, the key gone from the disk
		// and live in memory.
		b.mu.Lock()
		if !b.closed {
			delete(b.gone, id)
			b.blobs[id] = blob
		}
		b.mu.Unlock()
	}
	b.wmu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	b.log.Info("key generated", "id", id, "spec", spec.String())
	pub, err := keystore.ClonePublic(blob.key)
	if err != nil {
		return nil, fmt.Errorf("generate %s: %w", id, err)
	}
	return pub, nil
}

// Public returns the public key of id, from its key file: it works while
// the TPM is unreachable or lost, so last-known keys can still be published.
func (b *Backend) Public(ctx context.Context, id string) (crypto.PublicKey, error) {
	if err := b.beginID(ctx, id); err != nil {
		return nil, fmt.Errorf("public %s: %w", id, err)
	}
	blob, err := b.blob(id)
	if err != nil {
		return nil, fmt.Errorf("public %s: %w", id, err)
	}
	pub, err := keystore.ClonePublic(blob.key)
	if err != nil {
		return nil, fmt.Errorf("public %s: %w", id, err)
	}
	return pub, nil
}

// Sign signs digest with key id in the TPM. ECDSA keys take the hash of
// their curve (crypto.SHA256 for P-256, crypto.SHA384 for P-384) and return
// ASN.1 DER; RSA keys take crypto.SHA256 (RSASSA-PKCS1-v1_5) or
// *rsa.PSSOptions with Hash crypto.SHA256 and SaltLength
// rsa.PSSSaltLengthEqualsHash or 32 (RSAPSS; only if PS256 passed the
// self-test). Anything else fails with ErrUnsupportedAlgorithm. It also
// fails with ErrNotFound, ErrKeyLost, ErrUnavailable, ErrLocked, ErrClosed
// or the context's error.
func (b *Backend) Sign(ctx context.Context, id string, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := b.beginID(ctx, id); err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	blob, err := b.blob(id)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	scheme, err := b.scheme(blob, digest, opts)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	for attempt := range 2 {
		var sig []byte
		err := b.do(ctx, b.cmdTimeout, func(o *op) error {
			var err error
			sig, err = b.sign(o, id, blob, digest, scheme)
			return err
		})
		if err == nil {
			return sig, nil
		}
		if !errors.Is(err, errBadSignature) {
			return nil, fmt.Errorf("sign %s: %w", id, b.mapErr(err))
		}
		// The TPM signed with something else than this key: sign has
		// made the next attempt start over from a fresh SRK and a
		// fresh load.
		b.log.Error("TPM signature does not verify against the stored public key", "id", id, "attempt", attempt+1, "err", err)
	}
	return nil, fmt.Errorf("sign %s: %w: the TPM's signatures do not verify against the stored public key", id, keystore.ErrUnavailable)
}

// errBadSignature is a signature from the TPM that does not verify against
// the key's stored public key.
var errBadSignature = errors.New("TPM signature does not verify")

// sign is Sign's work, by the token holder: one TPM2_Sign by the loaded key
// (loading it first if needed), hand-encoded (see sign.go).
//
// Each signature gets the cheap structural checks of encodeSig: the
// signature scheme and hash asked for, ECDSA r and s non-zero and no longer
// than the curve's size, an RSA signature no longer than the modulus. The
// first signature after each TPM2_Load is also verified against the
// stored public key, which proves that the handle names this key (and not
// another object loaded there, as after an unnoticed reset or a handle
// reused by someone else); a signature that does not verify drops the
// loaded objects (errBadSignature), and Sign tries once more from a fresh
// SRK and load. Later signatures by the same loaded handle are not
// verified (an ECDSA P-256 verification costs ≈ 50 µs, 15 % of a TPM2_Sign
// on swtpm):
// the handle cannot name another object while keyd's connection lives.
// swtpm serves one connection at a time, /dev/tpmrm0 gives each open file
// its own handles, and /dev/tpm0 opens exclusively, so nobody else can
// flush the key and load something else at its handle; and whatever makes
// the TPM forget the key — a reset or restart — shows as TPM_RC_INITIALIZE,
// a handle error or a broken connection, after which keyd re-creates the
// SRK and reloads (and verifies) the key.
func (b *Backend) sign(o *op, id string, blob *keyBlob, digest []byte, scheme sigScheme) ([]byte, error) {
	// The caller looked its blob up before it held the TPM: a Destroy may
	// have completed meanwhile (its flush came too early, or gave up).
	if b.destroyed(id) {
		return nil, fmt.Errorf("%w (destroyed while the signature waited for the TPM)", keystore.ErrNotFound)
	}
	st := &b.st
	fresh := st.cached.h == 0 || st.cached.id != id || st.cached.blob != blob
	h, err := b.load(o, id, blob)
	if err != nil {
		return nil, err
	}
	st.cmd = appendSignCommand(st.cmd[:0], h, digest, scheme)
	rsp, err := o.Send(st.cmd)
	if err != nil {
		return nil, err
	}
	ts, err := parseSignResponse(rsp)
	if err != nil {
		return nil, keyAuthRefused(fresh, err)
	}
	sig, err := encodeSig(blob, scheme, ts)
	if err != nil {
		// The TPM answered with something keyd did not ask for: a
		// device fault, never a lost key or a caller's mistake.
		return nil, fmt.Errorf("%w: %w", keystore.ErrUnavailable, err)
	}
	if !st.cached.verified {
		if err := verifySig(blob, digest, scheme.alg, sig); err != nil {
			b.invalidate()
			return nil, fmt.Errorf("%w: %v", errBadSignature, err)
		}
		st.cached.verified = true
	}
	return sig, nil
}

// keyAuthRefused classifies a TPM2_Sign error. TPM_RC_BAD_AUTH (or
// TPM_RC_AUTH_FAIL) there is about the key's authValue, not the owner
// hierarchy's: keyd signs with an empty one, as its keys have. By a key
// this call has just loaded (fresh), the key's authValue is not empty: the
// key file is not one keyd made, and the key can never sign through keyd
// (ErrKeyLost). By a handle loaded earlier, the handle may no longer name
// the key: errStale, so that the call runs again after a fresh load.
func keyAuthRefused(fresh bool, err error) error {
	var rc tpm2.TPMRC
	if !errors.As(err, &rc) || !(rc.Is(tpm2.TPMRCBadAuth) || rc.Is(tpm2.TPMRCAuthFail)) {
		return err
	}
	if !fresh {
		return fmt.Errorf("%w: TPM2_Sign by a key loaded earlier: %w", errStale, err)
	}
	return fmt.Errorf("%w: the TPM refuses the key's empty authorization, so the key file is not one keyd made: %w", keystore.ErrKeyLost, err)
}

// scheme checks digest and opts against the key and returns the TPM
// signature scheme.
func (b *Backend) scheme(blob *keyBlob, digest []byte, opts crypto.SignerOpts) (sigScheme, error) {
	// nil, or a nil *rsa.PSSOptions, whose fields would panic below.
	if err := keystore.CheckOpts(opts); err != nil {
		return sigScheme{}, err
	}
	pssOpts, pss := opts.(*rsa.PSSOptions)
	var alg tpm2.TPMAlgID
	var hash tpm2.TPMAlgID
	want := blob.kind.hash()
	switch {
	case !blob.kind.isRSA():
		if pss || opts.HashFunc() != want {
			return sigScheme{}, fmt.Errorf("%s key signs %v digests, not %T %v: %w", blob.kind, want, opts, opts.HashFunc(), keystore.ErrUnsupportedAlgorithm)
		}
		alg, hash = tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA256
		if want == crypto.SHA384 {
			hash = tpm2.TPMAlgSHA384
		}
	case pss:
		if pssOpts.Hash != crypto.SHA256 || (pssOpts.SaltLength != rsa.PSSSaltLengthEqualsHash && pssOpts.SaltLength != crypto.SHA256.Size()) {
			return sigScheme{}, fmt.Errorf("RSA-PSS with hash %v and salt length %d: %w (PS256 wants SHA-256 and a 32-byte salt)", pssOpts.Hash, pssOpts.SaltLength, keystore.ErrUnsupportedAlgorithm)
		}
		if !b.pss {
			return sigScheme{}, fmt.Errorf("RSA-PSS: %w (%s)", keystore.ErrUnsupportedAlgorithm, b.refused[keystore.PS256])
		}
		alg, hash = tpm2.TPMAlgRSAPSS, tpm2.TPMAlgSHA256
	default:
		if opts.HashFunc() != crypto.SHA256 {
			return sigScheme{}, fmt.Errorf("RSA PKCS #1 v1.5 with hash %v: %w (RS256 wants SHA-256)", opts.HashFunc(), keystore.ErrUnsupportedAlgorithm)
		}
		alg, hash = tpm2.TPMAlgRSASSA, tpm2.TPMAlgSHA256
	}
	if len(digest) != want.Size() {
		return sigScheme{}, fmt.Errorf("digest is %d bytes, want %d for %v", len(digest), want.Size(), want)
	}
	return sigScheme{alg: alg, hash: hash}, nil
}

// encodeSig checks the TPM's signature against what was asked and turns it
// into what crypto.Signer returns: ASN.1 DER for ECDSA, the modulus-sized
// signature for RSA. These structural checks are made on every signature;
// sign verifies some signatures too.
func encodeSig(blob *keyBlob, scheme sigScheme, sig tpmSignature) ([]byte, error) {
	if sig.alg != scheme.alg || sig.hash != scheme.hash {
		return nil, fmt.Errorf("asked the TPM for a signature of scheme %#x with hash %#x, got %#x with %#x",
			uint16(scheme.alg), uint16(scheme.hash), uint16(sig.alg), uint16(sig.hash))
	}
	switch blob.kind {
	case kindP256, kindP384:
		if sig.alg != tpm2.TPMAlgECDSA {
			break
		}
		size := 32
		if blob.kind == kindP384 {
			size = 48
		}
		if len(sig.r) > size || len(sig.s) > size {
			return nil, fmt.Errorf("ECDSA signature with r or s longer than %d bytes", size)
		}
		// r and s may come back shorter than the curve size: left-padded
		// to r ‖ s, which ecdsasig encodes minimally (and refuses when r
		// or s is zero).
		raw := make([]byte, 2*size)
		copy(raw[size-len(sig.r):size], sig.r)
		copy(raw[2*size-len(sig.s):], sig.s)
		der, err := ecdsasig.DER(raw, size)
		if err != nil {
			return nil, fmt.Errorf("ECDSA signature from the TPM: %w", err)
		}
		return der, nil
	case kindRSA2048, kindRSA3072:
		if sig.alg != tpm2.TPMAlgRSASSA && sig.alg != tpm2.TPMAlgRSAPSS {
			break
		}
		size := blob.key.(*rsa.PublicKey).Size()
		if len(sig.sig) > size {
			return nil, fmt.Errorf("RSA signature of %d bytes, longer than the modulus", len(sig.sig))
		}
		if len(bytes.TrimLeft(sig.sig, "\x00")) == 0 {
			return nil, errors.New("RSA signature zero")
		}
		out := make([]byte, size) // never the response's memory
		copy(out[size-len(sig.sig):], sig.sig)
		return out, nil
	}
	return nil, fmt.Errorf("TPM returned a signature of type %#x for a %s key", uint16(sig.alg), blob.kind)
}

func leftPad(b []byte, size int) []byte {
	if len(b) >= size {
		return b
	}
	out := make([]byte, size)
	copy(out[size-len(b):], b)
	return out
}

// verifySig checks a signature against the key's stored public key.
func verifySig(blob *keyBlob, digest []byte, alg tpm2.TPMAlgID, sig []byte) error {
	switch k := blob.key.(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(k, digest, sig) {
			return errors.New("invalid ECDSA signature")
		}
		return nil
	case *rsa.PublicKey:
		if alg == tpm2.TPMAlgRSAPSS {
			return rsa.VerifyPSS(k, crypto.SHA256, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		}
		return rsa.VerifyPKCS1v15(k, crypto.SHA256, digest, sig)
	}
	return fmt.Errorf("key type %T", blob.key)
}

// List returns the IDs of the key files in the state directory, sorted. It
// does not need the TPM.
func (b *Backend) List(ctx context.Context) ([]string, error) {
	if err := b.begin(ctx); err != nil {
		return nil, fmt.Errorf("list: %w", err)
	}
	ids, err := keyfile.List(b.dir, keySuffix)
	if err != nil {
		return nil, fmt.Errorf("list: %w", err)
	}
	return ids, nil
}

// Destroy writes the tombstone of id, then removes its key file, and
// flushes the key from the TPM if it is loaded. It fails with ErrNotFound
// if there is no key file. It does not need the TPM: a key loaded while the
// TPM is unreachable is flushed when keyd reconnects.
func (b *Backend) Destroy(ctx context.Context, id string) error {
	if err := b.beginID(ctx, id); err != nil {
		return fmt.Errorf("destroy %s: %w", id, err)
	}
	if err := b.destroyFile(id); err != nil {
		return fmt.Errorf("destroy %s: %w", id, err)
	}
	b.log.Info("key destroyed", "id", id)
	// Best effort: a Sign cannot use the key any more (sign looks at
	// gone once it holds the TPM), and the next load of another key
	// flushes it anyway.
	if err := b.acquire(ctx); err == nil {
		if b.st.conn != nil && b.st.cached.id == id {
			o := &op{b: b, ctx: ctx, timeout: b.cmdTimeout}
			if err := b.flushCached(o); err != nil {
				b.log.Warn("cannot flush a destroyed key from the TPM", "id", id, "err", err)
			}
		}
		b.release()
	}
	return nil
}

func (b *Backend) destroyFile(id string) error {
	b.wmu.Lock()
	defer b.wmu.Unlock()
	if err := b.openForWrite(); err != nil {
		return err
	}
	path := b.keyPath(id)
	if _, err := os.Lstat(path); errors.Is(err, fs.ErrNotExist) && !b.cached(id) {
		return keystore.ErrNotFound
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	// A key whose file is gone but that is loaded is destroyed all the
	// same: tombstone, then dropped, so that it signs nothing more.
	if err := keyfile.WriteTombstone(b.dir, id+tombSuffix); err != nil {
		return fmt.Errorf("write tombstone: %w", err)
	}
	b.mu.Lock()
	delete(b.blobs, id)
	b.gone[id] = struct{}{}
	b.mu.Unlock()
	return keyfile.Remove(b.dir, id+keySuffix)
}

// Health checks that the TPM answers and still has the pinned storage root
// key, reconnecting and re-initialising it if needed. It returns nil,
// ErrUnavailable, ErrKeyLost, ErrLocked, ErrClosed or the context's error.
func (b *Backend) Health(ctx context.Context) error {
	if err := b.begin(ctx); err != nil {
		return fmt.Errorf("health: %w", err)
	}
	err := b.do(ctx, b.cmdTimeout, func(o *op) error {
		rp, err := tpm2.ReadPublic{ObjectHandle: b.st.srk.Handle}.Execute(o)
		if err != nil {
			return err
		}
		if string(rp.Name.Buffer) != string(b.pinned.name) {
			return fmt.Errorf("%w: the SRK handle names another object", errStale)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("health: %w", b.mapErr(err))
	}
	return nil
}

// Close flushes keyd's objects from the TPM, closes the connection and
// releases the state directory. A command in flight finishes (or times out)
// first. Later calls fail with ErrClosed; closing twice returns nil.
func (b *Backend) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	b.blobs = nil
	b.mu.Unlock()

	b.tok <- struct{}{}
	st := &b.st
	if st.conn != nil {
		// Each command has its deadline; no context may interrupt
		// them, since the connection is closed right after.
		o := &op{b: b, ctx: context.Background(), timeout: b.cmdTimeout}
		var err error
		if st.ready && !st.dirty {
			err = b.flushCached(o)
			if err == nil && st.srk.Handle != 0 {
				_, err = tpm2.FlushContext{FlushHandle: st.srk.Handle}.Execute(o)
			}
		} else {
			// keyd lost track of what it loaded through this
			// connection (invalidate): flush every transient object,
			// as prepare would have at the next use.
			var handles []tpm2.TPMHandle
			if handles, err = transientHandles(o); err == nil {
				err = b.flushHandles(o, handles)
			}
		}
		if err != nil {
			b.log.Warn("cannot flush keyd's objects from the TPM at close", "err", err)
		}
		if st.conn != nil {
			st.conn.close()
			st.conn = nil
		}
	}
	st.ready = false
	st.srk = tpm2.NamedHandle{}
	b.release()
	// A Generate or Destroy that began before Close writes nothing after
	// this (see openForWrite): the directory is released with no write
	// under way.
	b.wmu.Lock()
	if b.lock != nil {
		b.lock.Close()
	}
	b.wmu.Unlock()
	b.log.Info("TPM key store closed")
	return nil
}

func (b *Backend) isClosed() bool {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.closed
}

// begin checks that b is open and ctx is live.
func (b *Backend) begin(ctx context.Context) error {
	if b.isClosed() {
		return keystore.ErrClosed
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

// blob returns the key blob of id, reading its file the first time.
func (b *Backend) blob(id string) (*keyBlob, error) {
	b.mu.RLock()
	blob, ok := b.blobs[id]
	closed := b.closed
	b.mu.RUnlock()
	if closed {
		return nil, keystore.ErrClosed
	}
	if ok {
		return blob, nil
	}
	path := b.keyPath(id)
	data, err := keyfile.Read(path, "file", keyFileRule, maxFile)
	if err == nil {
		blob, err = decodeKey(data)
		if err != nil {
			err = fmt.Errorf("key file %s: %w", path, err)
		}
	}
	if err != nil {
		if !errors.Is(err, keystore.ErrNotFound) {
			b.log.Error("key file refused", "id", id, "err", err)
		}
		return nil, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	switch _, gone := b.gone[id]; {
	case b.closed:
		return nil, keystore.ErrClosed
	case gone:
		return nil, keystore.ErrNotFound
	}
	if bl, ok := b.blobs[id]; ok {
		return bl, nil // loaded concurrently; keep one
	}
	b.blobs[id] = blob
	return blob, nil
}

// cached reports whether key id's blob is loaded in memory.
func (b *Backend) cached(id string) bool {
	b.mu.RLock()
	defer b.mu.RUnlock()
	_, ok := b.blobs[id]
	return ok
}

// openForWrite returns ErrClosed once Close has begun. The caller holds
// wmu, which Close takes before it releases the state directory.
func (b *Backend) openForWrite() error {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.closed {
		return keystore.ErrClosed
	}
	return nil
}

// destroyed reports whether this process has destroyed key id.
func (b *Backend) destroyed(id string) bool {
	b.mu.RLock()
	defer b.mu.RUnlock()
	_, gone := b.gone[id]
	return gone
}

func (b *Backend) fail(stage string) error {
	if b.failpoint == nil {
		return nil
	}
	return b.failpoint(stage)
}

func (b *Backend) keyPath(id string) string       { return filepath.Join(b.dir, id+keySuffix) }
func (b *Backend) tombstonePath(id string) string { return filepath.Join(b.dir, id+tombSuffix) }
func (b *Backend) pinPath() string                { return filepath.Join(b.dir, pinFile) }
