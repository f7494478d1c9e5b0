package main

import (
	"os"
	"syscall"
)

// failpoint returns the crash hook for the lifecycle manager: when
// KEYD_FAILPOINT names a point, the process kills itself with SIGKILL
// there, as a power cut would. Crash-recovery tests use it; unset, it does
// nothing.
func failpoint() func(string) {
	want := os.Getenv("KEYD_FAILPOINT")
	if want == "" {
		return nil
	}
	return func(name string) {
		if name == want {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
		}
	}
}
