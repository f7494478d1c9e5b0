package tpm

import (
	"bufio"
	"context"
	"crypto"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/internal/swtpmtest"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// TestScript runs softhsm-test/swtpm.sh as a person or CI would: start
// prints the exports, keyd's backend works on KEYD_TPM_ADDRESS, tpm2-tools
// on TPM2TOOLS_TCTI, and stop kills the swtpm.
func TestScript(t *testing.T) {
	swtpmtest.Require(t, "tpm2_getcap")
	script, err := filepath.Abs("../../softhsm-test/swtpm.sh")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "swtpm")
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, script, "start", "-d", dir)
	cmd.Env = append(os.Environ(), "SWTPM_NO_INSTALL=1")
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("swtpm.sh start: %v: %s", err, ee.Stderr)
		}
		t.Fatalf("swtpm.sh start: %v", err)
	}
	env := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimPrefix(sc.Text(), "export "), "=")
		if !ok {
			t.Fatalf("swtpm.sh start printed %q, want export lines", sc.Text())
		}
		env[k] = v
	}
	pid, err := strconv.Atoi(env["KEYD_TPM_PID"])
	if err != nil {
		t.Fatalf("KEYD_TPM_PID: %v (output %q)", err, out)
	}
	t.Cleanup(func() {
		// Never leave swtpm running, whatever happened above.
		syscall.Kill(pid, syscall.SIGCONT)
		syscall.Kill(pid, syscall.SIGKILL)
	})
	for _, k := range []string{"KEYD_TPM_ADDRESS", "KEYD_TPM_CTRL", "KEYD_TPM_STATE_DIR", "KEYD_TPM_PIDFILE", "TPM2TOOLS_TCTI"} {
		if env[k] == "" {
			t.Errorf("swtpm.sh start did not export %s (output %q)", k, out)
		}
	}
	if data, err := os.ReadFile(env["KEYD_TPM_PIDFILE"]); err != nil || strings.TrimSpace(string(data)) != env["KEYD_TPM_PID"] {
		t.Errorf("PID file %s = %q, %v; want %s", env["KEYD_TPM_PIDFILE"], data, err, env["KEYD_TPM_PID"])
	}
	if env["KEYD_TPM_STATE_DIR"] != dir {
		t.Errorf("KEYD_TPM_STATE_DIR = %q, want %q", env["KEYD_TPM_STATE_DIR"], dir)
	}

	b, err := New(ctx, Config{Address: env["KEYD_TPM_ADDRESS"], StateDir: filepath.Join(t.TempDir(), "keys")})
	if err != nil {
		t.Fatalf("New on KEYD_TPM_ADDRESS=%s: %v", env["KEYD_TPM_ADDRESS"], err)
	}
	pub, err := b.Generate(ctx, "k", keystore.KeySpec{Algorithm: keystore.ES256})
	if err != nil {
		t.Fatal(err)
	}
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	sig, err := b.Sign(ctx, "k", d, crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := keystoretest.VerifyDER(keystore.ES256, pub, d, sig); err != nil {
		t.Fatal(err)
	}
	b.Close() // swtpm serves one connection: let tpm2_getcap in

	tool := exec.CommandContext(ctx, "tpm2_getcap", "properties-variable")
	tool.Env = append(os.Environ(), "TPM2TOOLS_TCTI="+env["TPM2TOOLS_TCTI"])
	if out, err := tool.CombinedOutput(); err != nil || !strings.Contains(string(out), "TPM2_PT_LOCKOUT_COUNTER: 0x0") {
		t.Errorf("tpm2_getcap on TPM2TOOLS_TCTI: %v: %s", err, out)
	}

	// A second start on the same state directory is refused while the
	// first runs.
	again := exec.CommandContext(ctx, script, "start", "-d", dir)
	again.Env = cmd.Env
	if out, err := again.CombinedOutput(); err == nil {
		t.Errorf("a second swtpm.sh start on %s succeeded: %s", dir, out)
	}

	stop := exec.CommandContext(ctx, script, "stop", dir)
	if out, err := stop.CombinedOutput(); err != nil {
		t.Fatalf("swtpm.sh stop: %v: %s", err, out)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("swtpm (pid %d) still there after stop: %v", pid, err)
	}
}

// TestUnixSocket: the backend speaks to swtpm over a Unix socket too.
func TestUnixSocket(t *testing.T) {
	swtpmtest.Require(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "swtpm.sock")
	cmd := exec.Command("swtpm", "socket", "--tpm2",
		"--tpmstate", "dir="+dir,
		"--server", "type=unixio,path="+sock,
		"--ctrl", "type=unixio,path="+sock+".ctrl",
		"--flags", "not-need-init,startup-clear")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	for i := 0; ; i++ {
		c, err := net.Dial("unix", sock+".ctrl")
		if err == nil {
			c.Close()
			break
		}
		if i > 200 {
			t.Fatalf("swtpm did not open %s: %v", sock, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	b, err := New(t.Context(), Config{Address: "unix://" + sock, StateDir: filepath.Join(dir, "keys")})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	pub, err := b.Generate(t.Context(), "k", keystore.KeySpec{Algorithm: keystore.RS256})
	if err != nil {
		t.Fatal(err)
	}
	mustSign(t, b, "k", keystore.RS256, pub, keystoretest.Digest(keystore.RS256, []byte("unix")))
}
