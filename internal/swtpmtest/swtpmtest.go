// Package swtpmtest runs a real swtpm (a TPM 2.0 simulator) on loopback
// for tests: started, stopped, killed, restarted, reset and inspected with
// tpm2-tools, by its PID. It is imported by tests only.
//
// A test that needs swtpm skips when it is not installed, or fails when
// KEYD_REQUIRE_HW=1 (make test and CI), so a missing TPM cannot pass as a
// skip.
package swtpmtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// SWTPM is a swtpm process started on loopback ports. It runs as a child
// of the test binary with SIGKILL as its parent-death signal, so it never
// outlives the test, even one that panics or times out; the test's cleanup
// also kills it by PID.
type SWTPM struct {
	// Dir is the TPM's state directory.
	Dir string
	// Port is the command port; the control port is Port+1.
	Port int
	// NoStartup starts swtpm without TPM2_Startup, as a TPM is after
	// power-on: the first command gets TPM_RC_INITIALIZE.
	NoStartup bool

	cmd  *exec.Cmd
	done chan struct{}
}

// Require skips the test when swtpm, swtpm_ioctl or the named tpm2-tools
// are missing, or fails it when KEYD_REQUIRE_HW=1.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range append([]string{"swtpm", "swtpm_ioctl"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			msg := fmt.Sprintf("%s not found (run softhsm-test/install-swtpm.sh): %v", tool, err)
			if os.Getenv("KEYD_REQUIRE_HW") == "1" {
				t.Fatal("KEYD_REQUIRE_HW=1: " + msg)
			}
			t.Skip(msg)
		}
	}
}

// Start starts a fresh swtpm with its own state directory.
func Start(t testing.TB) *SWTPM {
	t.Helper()
	return StartWith(t, t.TempDir())
}

// StartWith starts a swtpm on the TPM state in dir, on free ports. Another
// SWTPM on the same state must have been killed first.
func StartWith(t testing.TB, dir string) *SWTPM {
	t.Helper()
	Require(t)
	s := &SWTPM{Dir: dir}
	var lastErr error
	for range 10 {
		port, err := FreePortPair()
		if err != nil {
			t.Fatal(err)
		}
		s.Port = port
		if lastErr = s.start(); lastErr == nil {
			t.Cleanup(s.Kill)
			return s
		}
	}
	t.Fatalf("cannot start swtpm: %v", lastErr)
	return nil
}

// FreePortPair returns a port P such that P and P+1 were free on 127.0.0.1.
func FreePortPair() (int, error) {
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		p := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+1))
		l.Close()
		if err == nil {
			l2.Close()
			return p, nil
		}
	}
	return 0, errors.New("no free pair of ports")
}

func (s *SWTPM) start() error {
	flags := "not-need-init,startup-clear"
	if s.NoStartup {
		flags = "not-need-init"
	}
	cmd := exec.Command("swtpm", "socket", "--tpm2",
		"--tpmstate", "dir="+s.Dir,
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", s.Port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", s.Port+1),
		"--flags", flags,
		"--log", "file="+filepath.Join(s.Dir, "swtpm.log")+",level=1",
	)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	s.cmd, s.done = cmd, done
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return fmt.Errorf("swtpm exited: %s", strings.TrimSpace(stderr.String()))
		default:
		}
		// Both ports: swtpm opens the control port first, and a test
		// that dialed the command port in between was refused.
		if accepts(s.CtrlAddr()) && accepts(fmt.Sprintf("127.0.0.1:%d", s.Port)) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.Kill()
	return errors.New("swtpm did not open its control and command ports in 10s")
}

// accepts reports whether addr accepts a TCP connection (closed at once;
// swtpm then waits for the next).
func accepts(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// Kill stops swtpm for good (SIGKILL by PID) and waits until it is gone.
func (s *SWTPM) Kill() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	pid := s.cmd.Process.Pid
	syscall.Kill(pid, syscall.SIGCONT)
	syscall.Kill(pid, syscall.SIGKILL)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
	}
	s.cmd = nil
}

// Restart kills swtpm and starts it again on the same ports and state, as
// after a crash: TPM2_Startup(CLEAR) runs (unless NoStartup), transient
// objects are gone.
func (s *SWTPM) Restart(t testing.TB) {
	t.Helper()
	s.Kill()
	var err error
	for range 50 {
		if err = s.start(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond) // the port may still be held
	}
	t.Fatalf("restart swtpm: %v", err)
}

// Signal sends sig to swtpm (SIGSTOP freezes it, SIGCONT thaws it).
func (s *SWTPM) Signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(s.cmd.Process.Pid, sig); err != nil {
		t.Fatal(err)
	}
}

// Addr is the command port as keyd's tpm.address takes it.
func (s *SWTPM) Addr() string { return fmt.Sprintf("tcp://127.0.0.1:%d", s.Port) }

// CtrlAddr is the control port's host:port.
func (s *SWTPM) CtrlAddr() string { return fmt.Sprintf("127.0.0.1:%d", s.Port+1) }

// TCTI is the tpm2-tools TCTI string for s.
func (s *SWTPM) TCTI() string { return fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", s.Port) }

// Reset power-cycles the TPM through the control port (swtpm_ioctl -i):
// the next command gets TPM_RC_INITIALIZE until TPM2_Startup.
func (s *SWTPM) Reset(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "swtpm_ioctl", "--tcp", s.CtrlAddr(), "-i").CombinedOutput(); err != nil {
		t.Fatalf("swtpm_ioctl -i: %v: %s", err, out)
	}
}

// Tool runs a tpm2-tools command against swtpm and returns its output.
// swtpm serves one connection at a time: nothing else may be connected
// meanwhile.
func (s *SWTPM) Tool(t testing.TB, name string, args ...string) string {
	t.Helper()
	Require(t, name)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI="+s.TCTI())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}
