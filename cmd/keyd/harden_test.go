package main

import (
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"syscall"
	"testing"
	"time"
)

// keyd serve holds the PIN, the mTLS private key and (soft keystore) the
// private keys in its memory: it must not write them into a core file.
// Like ssh-agent and gpg-agent it turns core dumps off for itself,
// whatever limit it was started with.
func TestServeDumpsNoCore(t *testing.T) {
	bin, dir := binaryAndDir(t, "kc")
	conf, sock := softConfig(t, dir)
	serve := exec.Command(bin, "serve", "--config", conf)
	serve.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=10")
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_CORE, &old); err != nil {
		t.Fatal(err)
	}
	// Started with core dumps allowed (as far as this process may).
	if err := syscall.Setrlimit(syscall.RLIMIT_CORE, &syscall.Rlimit{Cur: old.Max, Max: old.Max}); err != nil {
		t.Fatal(err)
	}
	err := serve.Start()
	syscall.Setrlimit(syscall.RLIMIT_CORE, &old)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- serve.Wait() }()
	t.Cleanup(func() {
		serve.Process.Signal(os.Interrupt)
		<-done
	})
	// The socket exists once keyd has set itself up.
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i == 1500 { // 30 s
			t.Fatal("keyd serve made no socket in 30 s")
		}
		select {
		case err := <-done:
			t.Fatalf("keyd serve exited: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	limits, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", serve.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^Max core file size +0 +`).Match(limits) {
		t.Errorf("keyd serve may dump core:\n%s", limits)
	}
}
