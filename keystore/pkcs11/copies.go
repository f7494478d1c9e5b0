package pkcs11

import (
	"bytes"
	"context"
	"fmt"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyd-dev/keyd/keystore"
)

// Session copies.
//
// SoftHSM2 re-reads a token object's state from its files (the token's
// generation file and the object's file, each under an fcntl lock) on every
// use, so a C_SignInit with a token object costs about 1.4 times one with a
// session object, which lives in the module's memory. keyd therefore signs
// with a session copy of each key, made inside the token by C_CopyObject
// with CKA_TOKEN false: PKCS#11 never lets a copy be less protected than
// its source, so the copy is CKA_SENSITIVE, not extractable and CKA_PRIVATE
// as the key is, and its value never leaves the token. Copies are made on
// the anchor session, so they last as long as the login; they go with it
// (C_Finalize, a dead anchor, a logout), and keyd makes new ones after
// recovering.
//
// A copy would go on signing after its token object is deleted (the token
// wiped, the key destroyed by another tool). So keyd looks at the token
// object (C_GetAttributeValue of its CKA_ID, for which SoftHSM checks its
// file) before using a copy if it has not seen the object for recheck
// (100 ms; the look costs about what a C_SignInit with the token object
// does, so at most ten times a second per key), and before every use while
// a failure is recorded (Health saw the token fail, or a call failed even
// after recovering): a key gone from the token fails as ErrKeyLost within
// recheck at the most — at once after Health noticed.
// Destroy destroys the copy with the key.
//
// A token that refuses the copy (an HSM whose policy forbids C_CopyObject)
// is signed with through the token objects, as with Config.NoSessionCopies.

// defaultRecheck is how long a session copy is used without looking at its
// token object.
const defaultRecheck = 100 * time.Millisecond

// sessionCopy is a session copy of a key, made on one anchor session.
type sessionCopy struct {
	h      p11.ObjectHandle
	anchor uint64 // the anchor it was made on (Backend.anchors then)
	gen    uint64 // the module generation it was made in
	ckaID  []byte // the key's CKA_ID, which the copy has too
}

// signHandle returns the object C_SignInit of k should use on s: k's session
// copy, made now if k has none yet, or k's token object if there can be no
// copy. It fails only if k's token object no longer answers.
func (b *Backend) signHandle(s *session, id string, k *key) (p11.ObjectHandle, error) {
	if b.noCopies || b.copyRefused.Load() {
		return k.priv, nil
	}
	c := k.copy.Load()
	if c != nil && c.anchor != b.liveAnchor.Load() {
		// The anchor it was made on is gone (a recovery that failed
		// after opening a new one, say), and the copy with it: its
		// handle may name another object by now.
		k.copy.CompareAndSwap(c, nil)
		c = nil
	}
	if c == nil {
		if k.copyFailed.Load() {
			return k.priv, nil
		}
		if c = b.copyKey(s, id, k); c == nil {
			return k.priv, nil
		}
	}
	if now := time.Now().UnixNano(); now-k.seen.Load() > int64(b.opts.recheck) || b.failing.Load() != nil {
		if err := b.seeTokenObject(s, k); err != nil {
			return 0, err
		}
		k.seen.Store(now)
	}
	return c.h, nil
}

// seeTokenObject checks that k's token object is still on the token, with
// k's CKA_ID.
func (b *Backend) seeTokenObject(s *session, k *key) error {
	a, err := b.m.GetAttributeValue(s.h, k.priv, []*p11.Attribute{p11.NewAttribute(p11.CKA_ID, nil)})
	if err != nil {
		return fmt.Errorf("C_GetAttributeValue of the key's token object: %w", err)
	}
	if !bytes.Equal(a[0].Value, k.ckaID) {
		// The handle names another object now: find the key again.
		return fmt.Errorf("the key's token object handle names another object: %w", p11.Error(p11.CKR_OBJECT_HANDLE_INVALID))
	}
	return nil
}

// copyKey makes (or finds again, after a recovery that kept the anchor) the
// session copy of k on the anchor and records it in k. It returns nil —
// sign with the token object this time — if the anchor is busy (a
// recovery or a health probe holds it) or is not of s's epoch, and for good
// in this epoch if the token will not copy.
func (b *Backend) copyKey(s *session, id string, k *key) *sessionCopy {
	if !b.dev.TryLock() {
		return nil
	}
	defer b.dev.Unlock()
	if c := k.copy.Load(); c != nil {
		return c
	}
	b.mu.RLock()
	ep, forget, closed := b.epoch, b.forget, b.closed
	b.mu.RUnlock()
	if closed || ep != s.epoch || !b.haveAnchor || b.libGen != b.lib.gen || s.gen != b.libGen {
		return nil
	}
	if c := b.copies[id]; c != nil {
		if b.live(c) && bytes.Equal(c.ckaID, k.ckaID) && b.isCopy(c) {
			k.seen.Store(0) // found again: look at the token object first
			k.copy.Store(c)
			return c
		}
		b.dropCopy(id)
	}
	h, err := b.m.CopyObject(b.anchor, k.priv, []*p11.Attribute{p11.NewAttribute(p11.CKA_TOKEN, false)})
	if err != nil {
		k.copyFailed.Store(true)
		if copyRefused(err) && b.copyRefused.CompareAndSwap(false, true) {
			b.log.Info("the token does not copy keys into session objects; signing with the token objects",
				"token", b.label, "err", ckrName(err))
		}
		return nil
	}
	c := &sessionCopy{h: h, anchor: b.anchors, gen: b.libGen, ckaID: k.ckaID}
	b.mu.RLock()
	gone := b.forget != forget || b.closed
	b.mu.RUnlock()
	if gone || !b.isCopy(c) {
		// Destroy ran meanwhile (this may be a copy of a destroyed
		// key), or the copy is not what k's handle should have given.
		_ = b.m.DestroyObject(b.anchor, h)
		k.copyFailed.Store(true)
		return nil
	}
	b.copies[id] = c
	k.seen.Store(time.Now().UnixNano())
	k.copy.Store(c)
	return c
}

// copyRefused reports whether a C_CopyObject error says the token will not
// copy keys (its policy, a read-only session, an attribute it will not set)
// rather than that it could not this time (memory, a session or device
// failure, which a recovery handles).
func copyRefused(err error) bool {
	return !passing(err) && !recoverable(err)
}

// live reports whether c was made on the current anchor, which is open in
// the current module generation. The caller holds b.dev.
func (b *Backend) live(c *sessionCopy) bool {
	return b.haveAnchor && c.anchor == b.anchors && c.gen == b.libGen && b.libGen == b.lib.gen
}

// isCopy reports whether c's handle still names a session copy with c's
// CKA_ID (a logout destroys private session objects, and a module may hand
// their numbers out again). The caller holds b.dev.
func (b *Backend) isCopy(c *sessionCopy) bool {
	a, err := b.m.GetAttributeValue(b.anchor, c.h, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_TOKEN, nil),
		p11.NewAttribute(p11.CKA_ID, nil),
	})
	return err == nil && len(a[0].Value) == 1 && a[0].Value[0] == 0 && bytes.Equal(a[1].Value, c.ckaID)
}

// dropCopy forgets id's copy, destroying it if it is still there. The caller
// holds b.dev.
func (b *Backend) dropCopy(id string) {
	c := b.copies[id]
	if c == nil {
		return
	}
	defer b.lib.reading()() // a reader may nest: copyKey calls this inside one
	delete(b.copies, id)
	if b.live(c) && b.isCopy(c) {
		if err := b.m.DestroyObject(b.anchor, c.h); err != nil {
			b.log.Warn("cannot destroy a key's session copy; it goes when the login ends", "id", id, "err", ckrName(err))
		}
	}
}

// discardCopy destroys id's session copy for Destroy, waiting for the
// anchor until ctx ends; it fails (ErrUnavailable) only if ctx ended first.
// The caller holds no pooled session.
func (b *Backend) discardCopy(ctx context.Context, id string) error {
	if !lockWithin(&b.dev, ctx.Done()) {
		return fmt.Errorf("%w: token %q: the key's session copy could not be destroyed: %w", keystore.ErrUnavailable, b.label, ctx.Err())
	}
	defer b.dev.Unlock()
	b.dropCopy(id)
	return nil
}

// dropLostCopy destroys the session copy of a key found gone from the token,
// if the anchor is free now (a Sign that already has its answer does not
// wait for a recovery); otherwise the copy goes with the login. keyd never
// signs with it: the key's cache entry is gone and the key cannot be found.
func (b *Backend) dropLostCopy(id string) {
	if !b.dev.TryLock() {
		return
	}
	defer b.dev.Unlock()
	b.dropCopy(id)
}
