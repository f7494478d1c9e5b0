package rotation

// subscriber receives events on a buffered channel. A subscriber that falls
// behind is dropped (its channel closed) rather than allowed to stall
// lifecycle changes; it resubscribes and gets a fresh snapshot.
type subscriber struct {
	names map[string]bool // nil: every key set
	ch    chan Event
}

// Watch returns the current versions of the named key sets (every configured
// one when names is empty) and a channel of every later transition. The
// channel is closed when cancel is called or when the watcher falls more than
// 64 events behind; in the latter case the watcher should call Watch again.
func (m *Manager) Watch(names ...string) (snapshot []Version, events <-chan Event, cancel func()) {
	sub := &subscriber{ch: make(chan Event, 64)}
	if len(names) > 0 {
		sub.names = map[string]bool{}
		for _, n := range names {
			sub.names[n] = true
		}
	}
	m.mu.Lock()
	snapshot = m.versionsLocked(names)
	m.subs[sub] = struct{}{}
	m.mu.Unlock()
	cancel = func() {
		m.mu.Lock()
		if _, ok := m.subs[sub]; ok {
			delete(m.subs, sub)
			close(sub.ch)
		}
		m.mu.Unlock()
	}
	return snapshot, sub.ch, cancel
}

// publishLocked delivers events to subscribers. Callers hold m.mu for writing.
func (m *Manager) publishLocked(events []Event) {
	for sub := range m.subs {
		for _, ev := range events {
			if sub.names != nil && !sub.names[ev.Version.KeySet] {
				continue
			}
			select {
			case sub.ch <- ev:
			default:
				delete(m.subs, sub)
				close(sub.ch)
			}
			if _, still := m.subs[sub]; !still {
				break
			}
		}
	}
}
