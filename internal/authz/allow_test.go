package authz

import (
	"testing"
)

type fakeGroups map[uint32][]uint32

func (f fakeGroups) Of(uid uint32) []uint32 { return f[uid] }

func TestPermits(t *testing.T) {
	l, err := NewList(Spec{UIDs: []int{1001}, GIDs: []int{50}, Users: []string{"root"}, Groups: []string{"root"}}, fakeGroups{2002: {7, 0}})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		c    Caller
		want bool
	}{
		{Caller{UID: 1001, GID: 9}, true},  // uid
		{Caller{UID: 3, GID: 50}, true},    // primary gid
		{Caller{UID: 0, GID: 99}, true},    // user name root
		{Caller{UID: 5, GID: 0}, true},     // group name root (gid 0)
		{Caller{UID: 2002, GID: 9}, true},  // supplementary group 0
		{Caller{UID: 3003, GID: 9}, false}, // nothing
	}
	for _, tc := range cases {
		if got := l.Permits(tc.c); got != tc.want {
			t.Errorf("Permits(%v) = %v, want %v", tc.c, got, tc.want)
		}
	}
	var nilList *List
	if nilList.Permits(Caller{}) {
		t.Error("a nil list permits")
	}
	empty, _ := NewList(Spec{}, nil)
	if empty.Permits(Caller{UID: 0}) {
		t.Error("an empty list permits root")
	}
}

func TestUnknownNamesAreErrors(t *testing.T) {
	if _, err := NewList(Spec{Users: []string{"no-such-user-keyd"}}, nil); err == nil {
		t.Error("unknown user accepted")
	}
	if _, err := NewList(Spec{Groups: []string{"no-such-group-keyd"}}, nil); err == nil {
		t.Error("unknown group accepted")
	}
}

func TestGroupCacheLooksUpRoot(t *testing.T) {
	var g GroupCache
	found := false
	for _, gid := range g.Of(0) {
		if gid == 0 {
			found = true
		}
	}
	if !found {
		t.Errorf("root's groups %v lack gid 0", g.Of(0))
	}
}

// An allow-list id outside the range of uid_t/gid_t must be refused, not
// truncated to 32 bits: uid 4294967296 (1<<32, a typo for 42949672 or a
// value from a system with another id range) would otherwise become uid 0
// and let root's processes in, and a negative id (when a caller builds the
// Spec without the config package's check) would become 4294967295-n.
func TestNewListRejectsOutOfRangeIDs(t *testing.T) {
	for _, spec := range []Spec{
		{UIDs: []int{1 << 32}},
		{UIDs: []int{1<<32 + 1001}},
		{UIDs: []int{-1}},
		{UIDs: []int{1<<32 - 1}}, // (uid_t)-1 is no uid
		{GIDs: []int{1 << 32}},
		{GIDs: []int{-1}},
	} {
		l, err := NewList(spec, nil)
		if err == nil {
			root := Caller{UID: 0, GID: 0, Transport: TransportUnix}
			t.Errorf("NewList(%+v) accepted; permits uid 0/gid 0: %v", spec, l.Permits(root))
		}
	}
	if _, err := NewList(Spec{UIDs: []int{0, 1001, 1<<32 - 2}, GIDs: []int{0, 65534}}, nil); err != nil {
		t.Fatalf("in-range ids refused: %v", err)
	}
}
