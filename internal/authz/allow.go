package authz

import (
	"fmt"
	"math"
	"os/user"
	"slices"
	"strconv"
	"sync"
	"time"
)

// List is a resolved allow list: user and group names have been turned into
// ids when it was built, so a decision never waits on name lookups.
type List struct {
	uids   []uint32
	gids   []uint32
	groups Groups
	// ids and idPrefixes match mTLS callers (see Spec.Identities).
	ids        []string
	idPrefixes []string
}

// Groups answers which supplementary groups a uid belongs to.
type Groups interface {
	Of(uid uint32) []uint32
}

// Spec is an allow list as configured. UIDs, GIDs, Users and Groups match
// callers on the Unix socket; Identities match callers on the mTLS
// listener. Neither kind of rule ever matches the other kind of caller.
type Spec struct {
	UIDs   []int
	GIDs   []int
	Users  []string
	Groups []string
	// Identities are client certificate identities: a URI SAN such as
	// "spiffe://example.org/billing" or a DNS SAN such as
	// "billing.example.org", matched exactly (DNS names without regard to
	// case). A URI ending in "/*" matches every URI below that path:
	// "spiffe://example.org/billing/*" matches
	// "spiffe://example.org/billing/api" and ".../billing/api/v2", but not
	// "spiffe://example.org/billing" itself, nor a path with an empty, "."
	// or ".." segment. There are no other wildcards.
	Identities []string
}

// NewList resolves spec. Names that do not exist are an error: an allow list
// that silently shrinks would lock out a service, or, after the name is
// created later, let in an unexpected one. groups answers supplementary
// group membership; nil means primary groups only.
func NewList(spec Spec, groups Groups) (*List, error) {
	l := &List{groups: groups}
	for _, u := range spec.UIDs {
		id, err := id32("uid", u)
		if err != nil {
			return nil, err
		}
		l.uids = append(l.uids, id)
	}
	for _, g := range spec.GIDs {
		id, err := id32("gid", g)
		if err != nil {
			return nil, err
		}
		l.gids = append(l.gids, id)
	}
	for _, name := range spec.Users {
		u, err := user.Lookup(name)
		if err != nil {
			return nil, fmt.Errorf("user %q: %w", name, err)
		}
		id, err := strconv.ParseUint(u.Uid, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("user %q: uid %q: %w", name, u.Uid, err)
		}
		l.uids = append(l.uids, uint32(id))
	}
	for _, name := range spec.Groups {
		g, err := user.LookupGroup(name)
		if err != nil {
			return nil, fmt.Errorf("group %q: %w", name, err)
		}
		id, err := strconv.ParseUint(g.Gid, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("group %q: gid %q: %w", name, g.Gid, err)
		}
		l.gids = append(l.gids, uint32(id))
	}
	for _, id := range spec.Identities {
		if err := l.addIdentity(id); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// id32 converts a configured uid or gid. A value uid_t cannot hold is an
// error, never truncated: 1<<32 would become 0 (root). (uid_t)-1 is no id.
func id32(kind string, v int) (uint32, error) {
	if v < 0 || v >= math.MaxUint32 {
		return 0, fmt.Errorf("%s %d is out of range (0 to %d)", kind, v, uint32(math.MaxUint32-1))
	}
	return uint32(v), nil
}

// Permits reports whether c is on the list. A Unix caller matches by its
// uid, its primary gid (from the socket's peer credentials) or one of its
// uid's supplementary groups; an mTLS caller matches by one of its
// certificate identities (Spec.Identities), never by uid or gid. A caller
// of any other transport, or a Unix caller with identities, matches
// nothing.
func (l *List) Permits(c Caller) bool {
	if l == nil {
		return false
	}
	switch {
	case c.Transport == TransportMTLS:
		return l.permitsIdentity(c.Identities)
	case c.Transport != "" && c.Transport != TransportUnix, len(c.Identities) > 0:
		return false
	}
	if slices.Contains(l.uids, c.UID) || slices.Contains(l.gids, c.GID) {
		return true
	}
	if l.groups == nil || len(l.gids) == 0 {
		return false
	}
	for _, g := range l.groups.Of(c.UID) {
		if slices.Contains(l.gids, g) {
			return true
		}
	}
	return false
}

// GroupCache looks up supplementary groups in the system's group database
// and caches the answer per uid for TTL.
type GroupCache struct {
	TTL time.Duration
	Now func() time.Time

	mu      sync.Mutex
	entries map[uint32]groupEntry
}

type groupEntry struct {
	gids    []uint32
	expires time.Time
}

// Of implements Groups. A uid without a user entry has no supplementary groups.
func (c *GroupCache) Of(uid uint32) []uint32 {
	now := time.Now
	if c.Now != nil {
		now = c.Now
	}
	t := now()
	c.mu.Lock()
	if e, ok := c.entries[uid]; ok && t.Before(e.expires) {
		c.mu.Unlock()
		return e.gids
	}
	c.mu.Unlock()

	var gids []uint32
	if u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10)); err == nil {
		if ids, err := u.GroupIds(); err == nil {
			for _, s := range ids {
				if g, err := strconv.ParseUint(s, 10, 32); err == nil {
					gids = append(gids, uint32(g))
				}
			}
		}
	}
	ttl := c.TTL
	if ttl == 0 {
		ttl = time.Minute
	}
	c.mu.Lock()
	if c.entries == nil {
		c.entries = map[uint32]groupEntry{}
	}
	if len(c.entries) > 4096 {
		clear(c.entries)
	}
	c.entries[uid] = groupEntry{gids: gids, expires: t.Add(ttl)}
	c.mu.Unlock()
	return gids
}
