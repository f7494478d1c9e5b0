package main

import "syscall"

// keepOutOfCores stops keyd's memory — the PIN, the mTLS private key, the
// soft keystore's keys — from reaching a core file or a debugger of keyd's
// own uid, as ssh-agent and gpg-agent do: no core dumps (RLIMIT_CORE 0)
// and not dumpable (PR_SET_DUMPABLE 0, which also closes
// /proc/PID/environ, where a pin_env PIN sits, and /proc/PID/mem to other
// processes of keyd's uid).
func keepOutOfCores() error {
	if err := syscall.Setrlimit(syscall.RLIMIT_CORE, &syscall.Rlimit{}); err != nil {
		return err
	}
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, syscall.PR_SET_DUMPABLE, 0, 0); errno != 0 {
		return errno
	}
	return nil
}
