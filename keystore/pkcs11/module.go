package pkcs11

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	p11 "github.com/miekg/pkcs11"
)

// module is the subset of *p11.Ctx that keyd uses. Every PKCS#11 call goes
// through it, so a test can wrap it to return chosen CKR codes, count
// C_Login calls or block inside C_Sign. *p11.Ctx implements it.
type module interface {
	Initialize(opts ...p11.InitializeOption) error
	Finalize() error
	GetSlotList(tokenPresent bool) ([]uint, error)
	GetTokenInfo(slotID uint) (p11.TokenInfo, error)
	GetMechanismList(slotID uint) ([]*p11.Mechanism, error)
	GetMechanismInfo(slotID uint, m []*p11.Mechanism) (p11.MechanismInfo, error)
	OpenSession(slotID uint, flags uint) (p11.SessionHandle, error)
	CloseSession(sh p11.SessionHandle) error
	GetSessionInfo(sh p11.SessionHandle) (p11.SessionInfo, error)
	Login(sh p11.SessionHandle, userType uint, pin string) error
	FindObjectsInit(sh p11.SessionHandle, temp []*p11.Attribute) error
	FindObjects(sh p11.SessionHandle, max int) ([]p11.ObjectHandle, bool, error)
	FindObjectsFinal(sh p11.SessionHandle) error
	GetAttributeValue(sh p11.SessionHandle, o p11.ObjectHandle, a []*p11.Attribute) ([]*p11.Attribute, error)
	GenerateKeyPair(sh p11.SessionHandle, m []*p11.Mechanism, public, private []*p11.Attribute) (p11.ObjectHandle, p11.ObjectHandle, error)
	DestroyObject(sh p11.SessionHandle, oh p11.ObjectHandle) error
	CopyObject(sh p11.SessionHandle, o p11.ObjectHandle, temp []*p11.Attribute) (p11.ObjectHandle, error)
	SignInit(sh p11.SessionHandle, m []*p11.Mechanism, o p11.ObjectHandle) error
	Sign(sh p11.SessionHandle, message []byte) ([]byte, error)
}

var _ module = (*p11.Ctx)(nil)

// library is one PKCS#11 module loaded into the process.
//
// A module is process-wide state: it is loaded (dlopen) once and never
// unloaded, because unloading and reloading a library that registered
// atexit handlers or thread-local state (OpenSSL inside SoftHSM, vendor
// libraries) is not safe. C_Initialize may be called only once per process
// until C_Finalize, so Backends on the same module share one initialization,
// counted here: the first user initializes, the last one finalizes.
type library struct {
	path string
	ctx  *p11.Ctx

	// rw is held for reading around every call into the module and for
	// writing around C_Finalize: finalizing while another thread is inside
	// the module is undefined, and SoftHSM 2.6 crashes (SIGSEGV in
	// C_SignInit). The write lock is only ever taken with TryLock, so a
	// waiting writer never blocks readers and a reader may nest.
	rw sync.RWMutex

	mu    sync.Mutex
	users int
	// gen counts re-initializations (C_Finalize + C_Initialize) done by
	// keyd, so two Backends recovering at once re-initialize once.
	gen uint64
	// ours is set when keyd's C_Initialize did the initialization (not
	// CKR_CRYPTOKI_ALREADY_INITIALIZED), so keyd may finalize.
	ours bool
}

var libraries = struct {
	sync.Mutex
	m map[string]*library
}{m: map[string]*library{}}

// loadLibrary loads the module at path, once per process.
func loadLibrary(path string) (*library, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("module %q: want an absolute path (a bare name would be searched for in the library path)", path)
	}
	path = filepath.Clean(path)
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("module %s: not a regular file", path)
	}
	libraries.Lock()
	defer libraries.Unlock()
	if l, ok := libraries.m[path]; ok {
		return l, nil
	}
	ctx := p11.New(path)
	if ctx == nil {
		return nil, fmt.Errorf("module %s: cannot load it as a PKCS#11 library (dlopen or C_GetFunctionList failed)", path)
	}
	l := &library{path: path, ctx: ctx}
	libraries.m[path] = l
	return l, nil
}

// acquire initializes the module through m if this is its first user, and
// returns the module's generation.
func (l *library) acquire(m module) (uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.users == 0 {
		err := m.Initialize()
		switch {
		case err == nil:
			l.ours = true
		case isCode(err, p11.CKR_CRYPTOKI_ALREADY_INITIALIZED):
			// Another part of the process initialized it; leave it to them.
			l.ours = false
		default:
			return 0, fmt.Errorf("C_Initialize: %w", err)
		}
	}
	l.users++
	return l.gen, nil
}

// reading marks a call into the module; call the function it returns after.
func (l *library) reading() func() {
	l.rw.RLock()
	return l.rw.RUnlock
}

// readingWithin is reading, unless stop fires while the module is held
// for writing (a re-initialization): it then reports false.
func (l *library) readingWithin(stop <-chan time.Time) (done func(), ok bool) {
	if !tryWithin(l.rw.TryRLock, stop) {
		return nil, false
	}
	return l.rw.RUnlock, true
}

// exclusive waits up to wait for every call into the module to return and
// locks out new ones. It reports whether it got the lock.
func (l *library) exclusive(wait time.Duration) bool {
	deadline := time.Now().Add(wait)
	for !l.rw.TryLock() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(100 * time.Microsecond)
	}
	return true
}

// release drops one user, finalizing the module after the last. wait bounds
// how long it waits for calls still inside the module; if they do not
// return, the module stays initialized.
func (l *library) release(m module, wait time.Duration) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.users--
	if l.users > 0 || !l.ours {
		return nil
	}
	if !l.exclusive(wait) {
		l.users++ // keep the count honest: the module is still initialized
		return fmt.Errorf("calls still inside the module after %v; it was not finalized", wait)
	}
	defer l.rw.Unlock()
	l.ours = false
	if err := m.Finalize(); err != nil && !isCode(err, p11.CKR_CRYPTOKI_NOT_INITIALIZED) {
		return fmt.Errorf("C_Finalize: %w", err)
	}
	return nil
}

// reinitialize finalizes and initializes the module again, unless another
// user already did since seen (the generation that user last connected
// with). It returns the new generation. Every session of every user of the
// module is gone afterwards; the other users recover on their next call. It
// waits up to wait for the calls inside the module to return, and fails if
// they do not. The caller must not be inside the module.
func (l *library) reinitialize(m module, seen uint64, wait time.Duration) (uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.gen != seen {
		return l.gen, nil
	}
	if !l.exclusive(wait) {
		return l.gen, fmt.Errorf("calls still inside the module after %v; not finalizing under them", wait)
	}
	defer l.rw.Unlock()
	// A module that cannot finalize (it is not initialized any more, or
	// its device is gone) may still initialize: ignore the error and try.
	_ = m.Finalize()
	err := m.Initialize()
	if err != nil && !isCode(err, p11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		return l.gen, fmt.Errorf("C_Initialize: %w", err)
	}
	l.ours = err == nil
	l.gen++
	return l.gen, nil
}

// isCode reports whether err is the PKCS#11 return value code.
func isCode(err error, code uint) bool {
	var e p11.Error
	return errors.As(err, &e) && uint(e) == code
}
