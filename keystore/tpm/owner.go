package tpm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/keyd-dev/keyd/keystore"
)

// The TPM is serial, and swtpm serves one connection at a time: every TPM
// command goes through the one connection, used by whoever holds the
// Backend's token (a one-slot channel, so waiting for it honours the
// caller's context). The holder also owns tpmState.

// tpmState is what the token holder knows about the TPM.
type tpmState struct {
	conn conn // nil when disconnected

	// ready means the TPM is started, this connection's stale transient
	// objects are flushed and srk holds the storage root key, checked
	// against the pinned name. Anything that may have invalidated that (a
	// reset, a lost connection, a handle error) clears it.
	ready bool
	srk   tpm2.NamedHandle

	// cached is the one key kept loaded besides the SRK, so that a run of
	// signatures by the same key (the usual case: one active key) costs one
	// TPM2_Sign each. Loading another key flushes it first.
	cached cachedKey

	// cmd is a buffer for hand-encoded commands.
	cmd []byte

	// detached is the command in flight when its caller's context ended;
	// release hands the token to a goroutine that waits for its response
	// (see do).
	detached *detached
	// dirty means that a command that changes the TPM's objects was not
	// carried out, or its response was dropped, because its caller's
	// context ended: keyd no longer knows what the TPM holds, and release
	// forgets the loaded objects (invalidate), so that prepare flushes
	// them.
	dirty bool

	// After a failed connection attempt or a command timeout, calls fail
	// fast with ErrUnavailable until downUntil instead of each waiting for
	// a timeout of its own.
	downUntil time.Time
	downErr   error

	// lost is set, for good, when the TPM's SRK no longer has the pinned
	// name: the TPM was cleared or replaced, and no key can ever load again.
	lost error

	// answered means the TPM answered the last command sent with
	// TPM_RC_SUCCESS: an error that follows it and is no TPM response
	// code is about that answer (see run).
	answered bool
}

// cachedKey is the key kept loaded: key id's blob at handle h.
type cachedKey struct {
	id   string
	blob *keyBlob
	h    tpm2.TPMHandle
	// verified is set once a signature made through h has verified
	// against blob's public key (see Backend.sign).
	verified bool
}

// detached is a command whose caller's context ended while it was in
// flight (see do).
type detached struct {
	cc     uint32                 // its command code
	finish func() ([]byte, error) // waits for its response
}

// connError is a transport failure: the connection is closed.
type connError struct {
	err     error
	timeout bool
}

func (e *connError) Error() string {
	if e.timeout {
		return fmt.Sprintf("TPM did not answer in time: %v", e.err)
	}
	return "TPM connection: " + e.err.Error()
}

func (e *connError) Unwrap() error { return e.err }

// answerError is an error that came after the TPM answered TPM_RC_SUCCESS
// and is no TPM response code or transport failure: go-tpm could not parse
// the answer, or keyd refused what it held. Its text is err's; mapErr
// reports it as ErrUnavailable unless err says more.
type answerError struct{ err error }

func (e *answerError) Error() string { return e.err.Error() }
func (e *answerError) Unwrap() error { return e.err }

var (
	errProtocol = errors.New("malformed TPM response")
	// errStale means the TPM's state is not what keyd believed (a handle
	// it holds is gone or not its own): re-initialise and retry.
	errStale = errors.New("TPM state changed under keyd")
)

// Retry policy for TPM_RC_RETRY, TPM_RC_YIELDED and TPM_RC_TESTING: the
// command was not executed, so it is sent again, at most maxRetries times.
const (
	maxRetries   = 3
	retryBackoff = 20 * time.Millisecond
)

// acquire takes the token, or fails with the context's error or ErrClosed.
func (b *Backend) acquire(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case b.tok <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	if b.isClosed() {
		b.release()
		return keystore.ErrClosed
	}
	return nil
}

// release gives the token back. If the holder's last command is still in
// flight (its context ended), a goroutine waits for the response first,
// holding the token (see do).
func (b *Backend) release() {
	st := &b.st
	if d := st.detached; d != nil {
		go b.complete(d)
		return
	}
	if st.dirty {
		b.invalidate()
	}
	<-b.tok
}

// complete waits for the response of a detached command, drops it, and
// releases the token.
func (b *Backend) complete(d *detached) {
	_, err := d.finish()
	st := &b.st
	st.detached = nil
	switch {
	case err != nil:
		b.drop(err)
	case !sideEffectFree(d.cc):
		st.dirty = true
	}
	if st.dirty {
		b.invalidate()
	}
	b.log.Debug("dropped the response to a TPM command whose caller gave up", "cc", fmt.Sprintf("%#x", d.cc), "err", err)
	<-b.tok
}

// sideEffectFree reports whether a command leaves the TPM's objects as they
// were, so that dropping its response loses nothing keyd keeps track of.
func sideEffectFree(cc uint32) bool {
	switch tpm2.TPMCC(cc) {
	case tpm2.TPMCCSign, tpm2.TPMCCGetCapability, tpm2.TPMCCReadPublic, tpm2.TPMCCTestParms, tpm2.TPMCCCreate:
		return true
	}
	return false
}

// op is one use of the TPM by the token holder: it implements go-tpm's
// transport.TPM over the backend's connection.
type op struct {
	b       *Backend
	ctx     context.Context
	timeout time.Duration
}

// Send sends one command with the per-command deadline, retrying it on
// TPM_RC_RETRY, TPM_RC_YIELDED and TPM_RC_TESTING. A transport error or a
// timeout closes the connection and is returned as a *connError. Once the
// op's context has ended, Send sends nothing more and returns the context's
// error; a command in flight then is left to finish in the background (see
// do).
func (o *op) Send(cmd []byte) ([]byte, error) {
	b := o.b
	st := &b.st
	for attempt := 0; ; attempt++ {
		if st.detached != nil || o.ctx.Err() != nil {
			if !sideEffectFree(commandCode(cmd)) {
				st.dirty = true
			}
			return nil, o.ctxErr()
		}
		if st.conn == nil {
			return nil, &connError{err: errors.New("not connected")}
		}
		st.answered = false
		rsp, err := b.roundTrip(o.ctx, cmd, time.Now().Add(o.timeout))
		if err != nil {
			if st.detached != nil {
				return nil, o.ctxErr()
			}
			b.drop(err)
			return nil, &connError{err: err, timeout: isTimeout(err)}
		}
		rc := responseCode(rsp)
		if !retryable(rc) || attempt >= maxRetries {
			st.answered = rc == uint32(tpm2.TPMRCSuccess)
			return rsp, nil
		}
		b.log.Debug("TPM asked to retry", "rc", fmt.Sprintf("%#x", rc), "attempt", attempt+1)
		if err := o.pause(attempt); err != nil {
			return nil, err
		}
	}
}

// ctxErr is the error of the op's context, which has ended.
func (o *op) ctxErr() error {
	if err := o.ctx.Err(); err != nil {
		return err
	}
	return errInterrupted // not reached: a command is detached only when its context ended
}

// roundTrip sends cmd on the connection, or to the test hook when it takes
// the command, and returns the response, or errInterrupted when ctx ends
// first: then st.detached holds the command in flight.
func (b *Backend) roundTrip(ctx context.Context, cmd []byte, deadline time.Time) ([]byte, error) {
	c := b.st.conn
	if b.hook == nil && (c.interruptible() || ctx.Done() == nil) {
		rsp, err := c.roundTrip(ctx, cmd, deadline)
		if err == errInterrupted {
			b.st.detached = &detached{cc: commandCode(cmd), finish: func() ([]byte, error) { return c.finish(deadline) }}
		}
		return rsp, err
	}
	// The hook (tests), or a connection that cannot be interrupted: wait
	// for it in another goroutine.
	hook := b.hook
	exchange := func() ([]byte, error) {
		if hook != nil {
			if rsp, ok, err := hook(cmd); ok {
				return rsp, err
			}
		}
		return c.roundTrip(context.Background(), cmd, deadline)
	}
	if ctx.Done() == nil {
		return exchange()
	}
	type result struct {
		rsp []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		rsp, err := exchange()
		done <- result{rsp, err}
	}()
	select {
	case r := <-done:
		return r.rsp, r.err
	case <-ctx.Done():
		b.st.detached = &detached{cc: commandCode(cmd), finish: func() ([]byte, error) {
			r := <-done
			return r.rsp, r.err
		}}
		return nil, errInterrupted
	}
}

// pause waits before retry attempt+1, unless the context ends first.
func (o *op) pause(attempt int) error {
	t := time.NewTimer(retryBackoff << attempt)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-o.ctx.Done():
		return o.ctx.Err()
	}
}

func retryable(rc uint32) bool {
	switch tpm2.TPMRC(rc) {
	case tpm2.TPMRCRetry, tpm2.TPMRCYielded, tpm2.TPMRCTesting:
		return true
	}
	return false
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// drop closes the connection after a transport error. The TPM may still
// hold objects loaded through it (swtpm keeps them; /dev/tpmrm0 flushes
// them): prepare flushes them after the next connect.
func (b *Backend) drop(err error) {
	st := &b.st
	if st.conn != nil {
		st.conn.close()
		st.conn = nil
	}
	b.invalidate()
	if isTimeout(err) {
		st.downUntil = time.Now().Add(b.cooldown)
		st.downErr = &connError{err: err, timeout: true}
	}
	b.log.Warn("TPM connection lost", "tpm", b.ep.String(), "err", err)
}

// invalidate forgets the loaded objects after a reset or a handle error;
// prepare flushes whatever is still there.
func (b *Backend) invalidate() {
	st := &b.st
	st.ready = false
	st.srk = tpm2.NamedHandle{}
	st.cached = cachedKey{}
	st.dirty = false
}

// do runs fn with the TPM while holding the token. It connects and prepares
// the TPM first where needed, and runs fn once more when the first run
// showed that the TPM was reset (TPM_RC_INITIALIZE), restarted (the
// connection broke at once) or lost keyd's objects (a handle error): then
// the TPM is re-initialised, the SRK re-created and checked, and the key
// blobs re-loaded. A timeout is not retried.
//
// The caller waits for the token and for the result only as long as ctx
// allows. fn runs in the caller's goroutine — handing the work to another
// goroutine cost 15–25 µs (p50) of a ≈ 320 µs TPM2_Sign on swtpm, in
// wake-ups — and every wait in it ends with ctx: the connection's
// reads and writes (streamConn interrupts them), the test hook and a
// connection that cannot be interrupted (another goroutine waits for them),
// the retry backoff and the dial. A TPM command cannot be abandoned
// half-way without losing the connection, so a command in flight when ctx
// ends is detached: Send returns ctx's error, sends nothing more for this
// caller, and release leaves the token to a goroutine that waits for the
// response (or the command's timeout) and drops it. When a command that
// changes the TPM's objects (a load, a flush) is not sent, or its response
// is dropped, keyd forgets what it had loaded, and prepare flushes it all
// at the next use.
func (b *Backend) do(ctx context.Context, timeout time.Duration, fn func(o *op) error) (err error) {
	if err := b.acquire(ctx); err != nil {
		return err
	}
	defer func() {
		b.release()
		if err != nil && ctx.Err() != nil {
			err = ctx.Err()
		}
	}()
	return b.run(ctx, timeout, fn)
}

// run is do's work, by the token holder.
func (b *Backend) run(ctx context.Context, timeout time.Duration, fn func(o *op) error) error {
	o := &op{b: b, ctx: ctx, timeout: timeout}
	b.st.answered = false // not an earlier call's answer
	var err error
	for attempt := 0; attempt < 2; attempt++ {
		// A reset or a broken connection can come while ready
		// re-initialises the TPM as well as during fn: either way the
		// call runs once more.
		if err = b.ready(ctx); err == nil {
			if err = ctx.Err(); err != nil {
				return err
			}
			err = fn(o)
		}
		if err == nil || !b.recoverable(err) {
			break
		}
		b.log.Warn("TPM state lost; re-initialising and retrying once", "err", err)
	}
	var rc tpm2.TPMRC
	var ce *connError
	if err != nil && b.st.answered && !errors.As(err, &rc) && !errors.As(err, &ce) {
		// A response keyd cannot use is the device's fault or the
		// transport's, as a malformed TPM2_Sign response is
		// (errProtocol), not keyd's internal error.
		err = &answerError{err}
	}
	return err
}

// recoverable classifies fn's error, updating the state, and reports
// whether a second run may succeed.
func (b *Backend) recoverable(err error) bool {
	var ce *connError
	switch {
	case errors.As(err, &ce):
		return !ce.timeout
	case errors.Is(err, errStale):
		b.invalidate()
		return true
	case errors.Is(err, tpm2.TPMRCInitialize):
		b.invalidate()
		return true
	case staleHandle(err):
		b.invalidate()
		return true
	case errors.Is(err, tpm2.TPMRCObjectMemory):
		// No free slot: something keyd lost track of is still loaded
		// (a flush that failed on a TPM that keeps objects). prepare
		// flushes every transient object.
		b.invalidate()
		return true
	}
	return false
}

// staleHandle reports whether err says a handle in the command does not
// name a loaded object.
func staleHandle(err error) bool {
	var rc tpm2.TPMRC
	if !errors.As(err, &rc) {
		return false
	}
	if rc >= tpm2.TPMRCReferenceH0 && rc <= tpm2.TPMRCReferenceH6 {
		return true
	}
	var f1 tpm2.TPMFmt1Error
	if errors.As(rc, &f1) {
		if isHandle, _ := f1.Handle(); isHandle && (rc.Is(tpm2.TPMRCHandle) || rc.Is(tpm2.TPMRCValue)) {
			return true
		}
		// TPM2_FlushContext takes its handle as a parameter: a handle
		// that names no loaded object is TPM_RC_HANDLE on parameter 1.
		if isParam, _ := f1.Parameter(); isParam && rc.Is(tpm2.TPMRCHandle) {
			return true
		}
	}
	return false
}

// onSession reports whether rc is about an authorization session.
func onSession(rc tpm2.TPMRC) bool {
	var f1 tpm2.TPMFmt1Error
	if !errors.As(rc, &f1) {
		return false
	}
	isSession, _ := f1.Session()
	return isSession
}

// ready makes sure the connection is up and the TPM prepared. Called by the
// token holder.
func (b *Backend) ready(ctx context.Context) error {
	st := &b.st
	if st.lost != nil {
		return st.lost
	}
	if st.conn == nil {
		if time.Now().Before(st.downUntil) {
			return fmt.Errorf("%w: %v (retrying after %s)", keystore.ErrUnavailable, st.downErr, st.downUntil.Format(time.TimeOnly))
		}
		c, err := b.ep.dial(ctx, time.Now().Add(b.cmdTimeout))
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			st.downUntil = time.Now().Add(b.cooldown)
			st.downErr = &connError{err: err, timeout: isTimeout(err)}
			return fmt.Errorf("%w: connect to TPM %s: %v", keystore.ErrUnavailable, b.ep, err)
		}
		st.conn = c
		st.ready = false
		b.log.Info("TPM connected", "tpm", b.ep.String())
	}
	if st.ready {
		return nil
	}
	o := &op{b: b, ctx: ctx, timeout: b.cmdTimeout}
	if err := b.prepare(o); err != nil {
		if st.lost != nil {
			return st.lost
		}
		return err // run classifies it; do's callers map it
	}
	st.downUntil = time.Time{}
	return nil
}

// prepare starts the TPM if it needs it (after a reset), flushes the
// transient objects left by an earlier connection, re-creates the storage
// root key and checks its name against the pinned one.
func (b *Backend) prepare(o *op) error {
	st := &b.st
	handles, err := transientHandles(o)
	if errors.Is(err, tpm2.TPMRCInitialize) {
		b.log.Warn("TPM not started (reset or power-on); sending TPM2_Startup(CLEAR)", "tpm", b.ep.String())
		if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(o); err != nil && !errors.Is(err, tpm2.TPMRCInitialize) {
			return fmt.Errorf("TPM2_Startup: %w", err)
		}
		handles, err = transientHandles(o)
	}
	if err != nil {
		return fmt.Errorf("list transient objects: %w", err)
	}
	if err := b.flushHandles(o, handles); err != nil {
		// Going on would leave the slot taken for good; the next use
		// prepares again.
		return err
	}
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(b.ownerAuth)},
		InPublic:      tpm2.New2B(srkTemplate()),
	}.Execute(o)
	if err != nil {
		return fmt.Errorf("create the storage root key: %w", err)
	}
	srk := tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}
	if b.pinned != nil && !bytes.Equal(rsp.Name.Buffer, b.pinned.name) {
		if _, err := (tpm2.FlushContext{FlushHandle: srk.Handle}).Execute(o); err != nil {
			b.log.Warn("cannot flush the storage root key", "err", err)
		}
		st.lost = fmt.Errorf("%w: the TPM's storage root key has name %x, not the %x pinned in %s: the TPM was cleared or replaced (or the SRK template changed), so no key in %s can load; keyd never creates replacement keys",
			keystore.ErrKeyLost, rsp.Name.Buffer, b.pinned.name, b.pinPath(), b.dir)
		b.log.Error("TPM storage root key changed; every key is lost", "tpm", b.ep.String(), "err", st.lost)
		return st.lost
	}
	st.srk = srk
	st.ready = true
	return nil
}

// flushHandles flushes the transient objects handles.
func (b *Backend) flushHandles(o *op, handles []tpm2.TPMHandle) error {
	for _, h := range handles {
		if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(o); err != nil {
			return fmt.Errorf("flush the stale transient object %#x: %w", uint32(h), err)
		}
		b.log.Info("flushed a transient object left in the TPM", "handle", fmt.Sprintf("%#x", uint32(h)))
	}
	return nil
}

// transientHandles lists the transient objects in the TPM (with
// /dev/tpmrm0: those of this connection).
func transientHandles(tpm transport.TPM) ([]tpm2.TPMHandle, error) {
	var out []tpm2.TPMHandle
	next := uint32(tpm2.TPMHTTransient) << 24
	for range 16 {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: next, PropertyCount: 64}.Execute(tpm)
		if err != nil {
			return nil, err
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			return nil, err
		}
		for _, h := range hs.Handle {
			if uint32(h)>>24 != uint32(tpm2.TPMHTTransient) {
				return out, nil
			}
			out = append(out, h)
			next = uint32(h) + 1
		}
		if !rsp.MoreData || len(hs.Handle) == 0 {
			break
		}
	}
	return out, nil
}

// property reads one TPM_PT property.
func property(o *op, pt tpm2.TPMPT) (uint32, error) {
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: uint32(pt), PropertyCount: 1}.Execute(o)
	if err != nil {
		return 0, err
	}
	props, err := rsp.CapabilityData.Data.TPMProperties()
	if err != nil {
		return 0, err
	}
	for _, p := range props.TPMProperty {
		if p.Property == pt {
			return p.Value, nil
		}
	}
	return 0, fmt.Errorf("TPM does not report property %#x", uint32(pt))
}

// flushCached flushes the cached key, if any.
func (b *Backend) flushCached(o *op) error {
	c := &b.st.cached
	if c.h == 0 {
		return nil
	}
	if _, err := (tpm2.FlushContext{FlushHandle: c.h}).Execute(o); err != nil {
		// The key may still be loaded (the TPM asked to retry once
		// too often, or the caller gave up during a backoff): keyd no
		// longer knows what the TPM holds, and release forgets it all,
		// so that prepare flushes every transient object at the next
		// use instead of a slot leaking for good.
		b.st.dirty = true
		return fmt.Errorf("flush key: %w", err)
	}
	*c = cachedKey{}
	return nil
}

// load returns the handle of key id loaded under the SRK, from the cache or
// by TPM2_Load (flushing the cached key first). A key just loaded is not
// verified yet.
func (b *Backend) load(o *op, id string, blob *keyBlob) (tpm2.TPMHandle, error) {
	st := &b.st
	if st.cached.h != 0 && st.cached.id == id && st.cached.blob == blob {
		return st.cached.h, nil
	}
	if err := b.flushCached(o); err != nil {
		return 0, err
	}
	rsp, err := tpm2.Load{
		ParentHandle: st.srk,
		InPrivate:    tpm2.TPM2BPrivate{Buffer: blob.priv},
		InPublic:     tpm2.BytesAs2B[tpm2.TPMTPublic](blob.pub),
	}.Execute(o)
	if err != nil {
		return 0, b.loadFailed(o, err)
	}
	st.cached = cachedKey{id: id, blob: blob, h: rsp.ObjectHandle}
	return rsp.ObjectHandle, nil
}

// loadFailed classifies a TPM2_Load error. A blob that the TPM rejects
// (integrity, binding, a bad size or value) under the right SRK is lost for
// good; but if the SRK handle no longer names the pinned SRK, the state is
// stale and the load is retried after re-initialising. Any other refusal
// (the TPM needs a self-test, is in field upgrade, failed) says nothing
// about the blob: it is ErrUnavailable, never a lost key, because the
// rotation layer records a lost key for good.
func (b *Backend) loadFailed(o *op, err error) error {
	var rc tpm2.TPMRC
	if !errors.As(err, &rc) || rc.IsWarning() || staleHandle(err) || errors.Is(err, tpm2.TPMRCInitialize) {
		return err // TPM_RC_OBJECT_MEMORY is a warning too: recoverable sees it
	}
	if !blobRefused(rc) {
		return fmt.Errorf("%w: TPM2_Load: %v", keystore.ErrUnavailable, err)
	}
	rp, rerr := tpm2.ReadPublic{ObjectHandle: b.st.srk.Handle}.Execute(o)
	if rerr != nil {
		var ce *connError
		if errors.As(rerr, &ce) {
			return rerr
		}
		return fmt.Errorf("%w: storage root key unreadable: %v", errStale, rerr)
	}
	want := b.st.srk.Name.Buffer
	if b.pinned != nil {
		want = b.pinned.name
	}
	if !bytes.Equal(rp.Name.Buffer, want) {
		return fmt.Errorf("%w: SRK handle names another object", errStale)
	}
	return fmt.Errorf("%w: the TPM refuses the key blob under the right storage root key (%v)", keystore.ErrKeyLost, err)
}

// blobRefused reports whether rc, the answer to a TPM2_Load, says that the
// TPM finds the key blob itself wrong: an error on inPrivate or inPublic
// (parameters 1 and 2: integrity, binding, size, key, value, attributes,
// a scheme or type), or a sensitive area that does not unmarshal after
// decryption.
func blobRefused(rc tpm2.TPMRC) bool {
	if rc.Is(tpm2.TPMRCSensitive) {
		return true
	}
	var f1 tpm2.TPMFmt1Error
	if !errors.As(rc, &f1) {
		return false
	}
	isParam, n := f1.Parameter()
	return isParam && (n == 1 || n == 2)
}

// passingCondition reports whether rc is the TPM's state rather than an
// answer about the command: a warning (retry, testing, lockout, no slot…),
// a failure, not started, a self-test needed, field upgrade mode, or a
// reboot needed.
func passingCondition(rc tpm2.TPMRC) bool {
	switch rc {
	case tpm2.TPMRCFailure, tpm2.TPMRCInitialize, tpm2.TPMRCNeedsTest, tpm2.TPMRCUpgrade, tpm2.TPMRCReboot:
		return true
	}
	return rc.IsWarning()
}

// mapErr turns a TPM or transport error into one wrapping a keystore
// sentinel, keeping the TPM's detail in the text.
func (b *Backend) mapErr(err error) error {
	if err == nil {
		return nil
	}
	for _, s := range []error{keystore.ErrKeyLost, keystore.ErrUnavailable, keystore.ErrLocked, keystore.ErrClosed,
		keystore.ErrNotFound, keystore.ErrUnsupportedAlgorithm, keystore.ErrInsecureStorage, keystore.ErrAlreadyExists,
		context.Canceled, context.DeadlineExceeded} {
		if errors.Is(err, s) {
			return err
		}
	}
	var ce *connError
	if errors.As(err, &ce) {
		return fmt.Errorf("%w: TPM %s: %v", keystore.ErrUnavailable, b.ep, err)
	}
	// A handle error that outlived do's re-initialisation is the TPM's
	// state too (someone else flushing or resetting it), not the key's.
	if errors.Is(err, errStale) || errors.Is(err, errProtocol) || staleHandle(err) {
		return fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	var ae *answerError
	if errors.As(err, &ae) {
		return fmt.Errorf("%w: %v: %v", keystore.ErrUnavailable, errProtocol, err)
	}
	var rc tpm2.TPMRC
	if errors.As(err, &rc) {
		switch {
		case rc == tpm2.TPMRCLockout:
			return fmt.Errorf("%w: the TPM is in dictionary-attack lockout (keyd's keys are noDA; something else used bad authorization): %v", keystore.ErrUnavailable, err)
		case passingCondition(rc):
			return fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
		case rc.Is(tpm2.TPMRCBadAuth), rc.Is(tpm2.TPMRCAuthFail):
			return fmt.Errorf("%w: owner hierarchy authorization refused (check owner_auth_file): %v", keystore.ErrLocked, err)
		case rc.Is(tpm2.TPMRCSize) && onSession(rc):
			// keyd's only non-empty password is the owner's.
			return fmt.Errorf("%w: owner hierarchy authorization refused: longer than this TPM takes (check owner_auth_file): %v", keystore.ErrLocked, err)
		case rc == tpm2.TPMRCDisabled, rc.Is(tpm2.TPMRCHierarchy):
			return fmt.Errorf("%w: the owner hierarchy is disabled: %v", keystore.ErrLocked, err)
		}
	}
	return err
}
