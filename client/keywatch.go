package client

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc/connectivity"
)

// KeyWatcher keeps a current view of key versions, fed by the daemon's
// WatchKeys stream: no polling. It reconnects (with backoff, capped at 5 s)
// when the stream breaks and starts over from a fresh snapshot. It is safe
// for concurrent use.
type KeyWatcher struct {
	mu       sync.RWMutex
	keys     map[string]Key // by kid
	synced   chan struct{}
	once     sync.Once
	onChange func(KeyEvent)
	err      error
}

// WatchOption configures WatchKeys.
type WatchOption func(*KeyWatcher)

// OnKeyChange calls f for every event after the first snapshot (f must not
// block for long: it runs on the watcher's goroutine).
func OnKeyChange(f func(KeyEvent)) WatchOption {
	return func(w *KeyWatcher) { w.onChange = f }
}

// WatchKeys starts watching the named key sets (all the caller may use when
// none are named) until ctx ends or the client is closed.
func (c *Client) WatchKeys(ctx context.Context, keysets []string, opts ...WatchOption) *KeyWatcher {
	w := &KeyWatcher{keys: map[string]Key{}, synced: make(chan struct{})}
	for _, o := range opts {
		o(w)
	}
	go w.run(ctx, c, keysets)
	return w
}

func (w *KeyWatcher) run(ctx context.Context, c *Client, keysets []string) {
	backoff := 50 * time.Millisecond
	syncedBefore := false
	for ctx.Err() == nil {
		fresh := map[string]Key{}
		syncedNow := false
		for ev, err := range c.Watch(ctx, keysets...) {
			if err != nil {
				w.mu.Lock()
				w.err = err
				w.mu.Unlock()
				break
			}
			switch ev.Type {
			case "snapshot":
				fresh[ev.Key.Kid] = ev.Key
			case "synced":
				w.mu.Lock()
				old := w.keys
				w.keys, w.err = fresh, nil
				w.mu.Unlock()
				// After a reconnect, what changed while the stream was down
				// is reported like any other change.
				if w.onChange != nil && syncedBefore {
					for kid, k := range fresh {
						// A key's JWK goes when it leaves the JWK Set
						// while its state stays lost (see Key.JWK).
						if o, ok := old[kid]; !ok || o.State != k.State || (len(o.JWK) == 0) != (len(k.JWK) == 0) {
							w.onChange(KeyEvent{Type: "changed", Key: k, Previous: o.State})
						}
					}
					for kid, o := range old {
						if _, ok := fresh[kid]; !ok {
							gone := o
							gone.State = "destroyed"
							w.onChange(KeyEvent{Type: "changed", Key: gone, Previous: o.State})
						}
					}
				}
				syncedBefore = true
				syncedNow = true
				backoff = 50 * time.Millisecond
				w.once.Do(func() { close(w.synced) })
			case "changed":
				w.mu.Lock()
				w.keys[ev.Key.Kid] = ev.Key
				w.mu.Unlock()
				if w.onChange != nil {
					w.onChange(ev)
				}
			}
		}
		if ctx.Err() != nil || c.conn.GetState() == connectivity.Shutdown {
			// A closed client's connection never comes back: stop, so
			// that Close ends the watcher too.
			return
		}
		if !syncedNow {
			backoff = min(backoff*2, 5*time.Second)
		}
		select {
		case <-ctx.Done():
			return
		case <-c.closed:
			return
		case <-time.After(backoff):
		}
	}
}

// Synced waits until the watcher has its first complete snapshot.
func (w *KeyWatcher) Synced(ctx context.Context) error {
	select {
	case <-w.synced:
		return nil
	case <-ctx.Done():
		w.mu.RLock()
		defer w.mu.RUnlock()
		if w.err != nil {
			return w.err
		}
		return ctx.Err()
	}
}

// Key returns the version with kid as last seen.
func (w *KeyWatcher) Key(kid string) (Key, bool) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	k, ok := w.keys[kid]
	return k, ok
}

// Signable reports whether kid can still sign (active or draining), as
// last seen. An unknown kid is not signable.
func (w *KeyWatcher) Signable(kid string) bool {
	k, ok := w.Key(kid)
	return ok && (k.State == "active" || k.State == "draining")
}

// Active returns the active version of keyset, as last seen.
func (w *KeyWatcher) Active(keyset string) (Key, bool) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	for _, k := range w.keys {
		if k.KeySet == keyset && k.State == "active" {
			return k, true
		}
	}
	return Key{}, false
}
