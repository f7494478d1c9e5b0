package listener

import (
	"syscall"
	"testing"
)

func statGID(t *testing.T, p string) uint32 {
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Gid
}
