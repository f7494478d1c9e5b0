package client

import (
	"context"
	"runtime"
	"sync"
	"time"
	"weak"
)

// WatchKeys makes the client follow the lifecycle of its DPoP key set over
// keyd's WatchKeys stream (no polling) until ctx ends, and returns the
// watcher; its Synced waits for the first snapshot. Call it once, with a
// context that lives as long as the client: while that context lives,
// further calls return the same watcher. The caller must be allowed to use
// the DPoP key set, as it must be to sign proofs with it.
//
// A token stays bound to the key it was issued for (BoundKid, the cnf.jkt
// of the token), and Transport proves with that key for as long as the
// token is used, also after a rotation has made it a draining key; new
// tokens are always requested with the active key. What WatchKeys adds is
// that every TokenSource of this client (made before or after the call)
// knows when a token's key stops signing:
//
//   - Token does not hand out a token whose key has left draining
//     (retired, revoked, destroyed or lost), or whose draining key is
//     retired within ExpiryMargin (a draining key's retirement counts as
//     the token's expiry); it gets a new token, bound to the active key,
//     first.
//   - As soon as the stream says that a cached token's key has left
//     draining, the source drops that token and gets a new one in the
//     background, with the source's context, so the next request does not
//     wait for it (a failure is logged; the next Token tries again).
//
// Until the watcher has its first snapshot, or once ctx has ended, sources
// behave as without WatchKeys. Without it the client still recovers from a
// key that can no longer sign: Transport drops the token when keyd refuses
// to prove with its key, gets a new one and makes the request once with it.
func (o *OAuth) WatchKeys(ctx context.Context) *KeyWatcher {
	f := &o.keys
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.w != nil && f.ctx.Err() == nil {
		return f.w
	}
	f.ctx = ctx
	f.w = o.kc.WatchKeys(ctx, []string{o.cfg.DPoPKeySet}, OnKeyChange(o.keyChanged))
	return f.w
}

// keyFollower is what an OAuth knows of its DPoP key set's lifecycle: the
// watcher WatchKeys started, and the token sources to tell about changes.
type keyFollower struct {
	mu      sync.Mutex
	w       *KeyWatcher
	ctx     context.Context // the watcher's
	sources map[weak.Pointer[TokenSource]]struct{}
}

// watcher returns the watcher when its view can be relied on: it has a
// snapshot and has not stopped. Otherwise nil.
func (f *keyFollower) watcher() *KeyWatcher {
	f.mu.Lock()
	w, ctx := f.w, f.ctx
	f.mu.Unlock()
	if w == nil || ctx.Err() != nil || !w.hasSnapshot() {
		return nil
	}
	return w
}

// hasSnapshot reports, without waiting, whether the watcher has had its
// first complete snapshot.
func (w *KeyWatcher) hasSnapshot() bool {
	select {
	case <-w.synced:
		return true
	default:
		return false
	}
}

// track registers s to hear of key changes, for as long as s is reachable:
// the OAuth holds it weakly, so a source its caller dropped goes away.
func (o *OAuth) track(s *TokenSource) *TokenSource {
	f := &o.keys
	wp := weak.Make(s)
	f.mu.Lock()
	if f.sources == nil {
		f.sources = map[weak.Pointer[TokenSource]]struct{}{}
	}
	f.sources[wp] = struct{}{}
	f.mu.Unlock()
	runtime.AddCleanup(s, func(wp weak.Pointer[TokenSource]) {
		f.mu.Lock()
		delete(f.sources, wp)
		f.mu.Unlock()
	}, wp)
	return s
}

// liveSources returns the token sources still in use.
func (f *keyFollower) liveSources() []*TokenSource {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]*TokenSource, 0, len(f.sources))
	for wp := range f.sources {
		if s := wp.Value(); s != nil {
			out = append(out, s)
		}
	}
	return out
}

// signableState reports whether a key in state can prove for the tokens
// bound to it.
func signableState(state string) bool { return state == "active" || state == "draining" }

// boundKeyUsable reports whether a token bound to kid may be handed out at
// now, replaced margin before its key is retired. Without a reliable view
// (no WatchKeys, no snapshot yet), or for a kid the view does not have (a
// key newer than the last event, or a token from elsewhere), the answer is
// yes: Transport's fallback covers a key that really cannot sign.
func (o *OAuth) boundKeyUsable(kid string, now time.Time, margin time.Duration) bool {
	if kid == "" {
		return true
	}
	w := o.keys.watcher()
	if w == nil {
		return true
	}
	k, ok := w.Key(kid)
	if !ok {
		return true
	}
	switch k.State {
	case "active":
		return true
	case "draining":
		return k.RetireAt.IsZero() || now.Before(k.RetireAt.Add(-margin))
	}
	return false
}

// keyChanged is the watcher's OnKeyChange: when a key of the DPoP key set
// stops signing, every source whose token is bound to it replaces that
// token in the background. It returns at once (it runs on the watcher's
// goroutine).
func (o *OAuth) keyChanged(ev KeyEvent) {
	if ev.Key.KeySet != o.cfg.DPoPKeySet || signableState(ev.Key.State) {
		return
	}
	for _, s := range o.keys.liveSources() {
		go s.replaceBoundTo(ev.Key.Kid, ev.Key.State)
	}
}

// replaceBoundTo gets a new token in place of the cached one if that one
// is bound to kid (which is now in state) and would otherwise still be
// used. Concurrent Token calls wait for it, as for any fetch.
func (s *TokenSource) replaceBoundTo(kid, state string) {
	s.hold()
	defer s.release()
	tok := s.tok
	if tok == nil || BoundKid(tok) != kid || !s.fresh(tok, time.Now()) {
		return // another token by now, or one due for replacement anyway
	}
	s.invalidateLocked(tok)
	if s.ctx.Err() != nil {
		return
	}
	s.o.log.Info("the DPoP key of a cached access token stopped signing; getting a new token bound to the active key",
		"dpop_keyset", s.o.cfg.DPoPKeySet, "kid", kid, "state", state)
	next, err := s.fetch(s.ctx, s.tok)
	if err != nil {
		s.o.log.Warn("could not replace the access token in the background; the next request tries again",
			"dpop_keyset", s.o.cfg.DPoPKeySet, "kid", kid, "err", err)
		return
	}
	s.tok = next
}
