package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
)

// backendScripts run against every backend, not only the soft one.
var backendScripts = []string{"testdata/script/every-command.txtar"}

// requireHW reports whether a missing device must fail the run
// (KEYD_REQUIRE_HW=1, set by make test) rather than skip.
func requireHW() bool { return os.Getenv("KEYD_REQUIRE_HW") == "1" }

// harnessScript returns the absolute path of softhsm-test/script once tool
// is installed; without tool the test fails under KEYD_REQUIRE_HW=1
// (saying to run installer) and is skipped otherwise.
func harnessScript(t *testing.T, tool, installer, script string) string {
	t.Helper()
	if _, err := exec.LookPath(tool); err != nil {
		if requireHW() {
			t.Fatalf("%s not found and KEYD_REQUIRE_HW=1 (run softhsm-test/%s): %v", tool, installer, err)
		}
		t.Skipf("%s not installed", tool)
	}
	path, err := filepath.Abs(filepath.Join("../../softhsm-test", script))
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// TestScriptsOnTPM runs the backend scripts with keyd on a fresh swtpm
// per script.
func TestScriptsOnTPM(t *testing.T) {
	script := harnessScript(t, "swtpm", "install-swtpm.sh", "swtpm.sh")
	runBackendScripts(t, []string{"testdata/tpm/faults.txtar"}, func(env *testscript.Env) error {
		state := filepath.Join(env.WorkDir, "swtpm")
		cmd := exec.Command(script, "start", "-d", state)
		cmd.Env = append(os.Environ(), "SWTPM_NO_INSTALL=1")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return fmt.Errorf("swtpm.sh start: %v: %s", err, stderr.String())
		}
		env.Defer(func() { exec.Command(script, "stop", state).Run() })
		vars := exports(out)
		if vars["KEYD_TPM_ADDRESS"] == "" {
			return fmt.Errorf("swtpm.sh printed no KEYD_TPM_ADDRESS: %s", out)
		}
		env.Setenv("BACKEND", fmt.Sprintf("{tpm: {address: %q, command_timeout: 1s}}", vars["KEYD_TPM_ADDRESS"]))
		env.Setenv("BACKEND_NAME", "tpm")
		env.Setenv("TPM_PID", vars["KEYD_TPM_PID"])
		env.Setenv("TPM_CTRL", vars["KEYD_TPM_CTRL"])
		env.Setenv("TPM2TOOLS_TCTI", vars["TPM2TOOLS_TCTI"])
		return nil
	})
}

// exports parses lines such as `export K=V` or `K='V'`.
func exports(out []byte) map[string]string {
	m := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimPrefix(strings.TrimSpace(sc.Text()), "export ")
		k, v, ok := strings.Cut(line, "=")
		if ok {
			m[k] = strings.Trim(v, `'"`)
		}
	}
	return m
}

func runBackendScripts(t *testing.T, extra []string, setup func(*testscript.Env) error) {
	shared := &sharedBinary{}
	t.Cleanup(shared.remove)
	testscript.Run(t, testscript.Params{
		Files:               append(append([]string(nil), backendScripts...), extra...),
		RequireExplicitExec: true,
		Setup: func(env *testscript.Env) error {
			if err := setupScript(env); err != nil {
				return err
			}
			return setup(env)
		},
		Cmds: map[string]func(*testscript.TestScript, bool, []string){
			"expandenv": cmdExpandEnv,
			"verifyjwt": cmdVerifyJWT,
			"jsonget":   cmdJSONGet,
			"jwtpart":   cmdJWTPart,
			"asuser":    shared.cmdAsUser,
			"sleep":     cmdSleep,
			"waitstate": cmdWaitState,
		},
	})
}

// TestScriptsOnPKCS11 runs the backend scripts with keyd on a fresh
// SoftHSM2 token per script.
func TestScriptsOnPKCS11(t *testing.T) {
	script := harnessScript(t, "softhsm2-util", "install-softhsm.sh", "new-token.sh")
	runBackendScripts(t, []string{"testdata/pkcs11/faults.txtar", "testdata/pkcs11/destroy.txtar"}, func(env *testscript.Env) error {
		dir := filepath.Join(env.WorkDir, "softhsm")
		cmd := exec.Command(script, "keyd")
		cmd.Env = append(os.Environ(), "SOFTHSM_TEST_DIR="+dir)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return fmt.Errorf("new-token.sh: %v: %s", err, stderr.String())
		}
		vars := exports(out)
		if vars["SOFTHSM2_CONF"] == "" || vars["KEYD_PKCS11_PIN_FILE"] == "" {
			return fmt.Errorf("new-token.sh printed %s", out)
		}
		// keyd serve inherits SOFTHSM2_CONF, which SoftHSM reads.
		env.Setenv("SOFTHSM2_CONF", vars["SOFTHSM2_CONF"])
		env.Setenv("BACKEND", fmt.Sprintf("{pkcs11: {module: %q, uri: %q, pin_file: %q}}",
			vars["KEYD_PKCS11_MODULE"], vars["KEYD_PKCS11_URI"], vars["KEYD_PKCS11_PIN_FILE"]))
		env.Setenv("BACKEND_NAME", "pkcs11")
		env.Setenv("SOFTHSM_TOKENS", filepath.Join(vars["KEYD_SOFTHSM_DIR"], "tokens"))
		badpin := filepath.Join(env.WorkDir, "badpin")
		if err := os.WriteFile(badpin, []byte("9999"), 0o600); err != nil {
			return err
		}
		env.Setenv("BACKEND_BADPIN", fmt.Sprintf("{pkcs11: {module: %q, uri: %q, pin_file: %q}}",
			vars["KEYD_PKCS11_MODULE"], vars["KEYD_PKCS11_URI"], badpin))
		env.Setenv("BACKEND_QUICK", fmt.Sprintf("{pkcs11: {module: %q, uri: %q, pin_file: %q, open_timeout: 1s}}",
			vars["KEYD_PKCS11_MODULE"], vars["KEYD_PKCS11_URI"], vars["KEYD_PKCS11_PIN_FILE"]))
		return nil
	})
}

// cmdSleep waits: sleep DURATION (at most 10s).
func cmdSleep(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: sleep DURATION")
	}
	d, err := time.ParseDuration(args[0])
	if err != nil || d < 0 || d > 10*time.Second {
		ts.Fatalf("sleep: bad duration %q", args[0])
	}
	time.Sleep(d)
}

// cmdWaitState waits until `keyd keys list --json --keyset KEYSET` shows the
// version KID in STATE: waitstate KEYSET KID STATE TIMEOUT (at most 60s).
func cmdWaitState(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 4 {
		ts.Fatalf("usage: waitstate KEYSET KID STATE TIMEOUT")
	}
	timeout, err := time.ParseDuration(args[3])
	if err != nil || timeout <= 0 || timeout > time.Minute {
		ts.Fatalf("waitstate: bad timeout %q", args[3])
	}
	deadline := time.Now().Add(timeout)
	last := "no answer"
	for time.Now().Before(deadline) {
		if err := ts.Exec("keyd", "keys", "list", "--json", "--keyset", args[0]); err != nil {
			last = err.Error()
		} else {
			var vs []struct{ Kid, State string }
			if err := json.Unmarshal([]byte(ts.ReadFile("stdout")), &vs); err != nil {
				ts.Fatalf("waitstate: keys list: %v", err)
			}
			last = fmt.Sprintf("%+v", vs)
			for _, v := range vs {
				if v.Kid == args[1] && v.State == args[2] {
					return
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	ts.Fatalf("waitstate: %s is not %s after %v; last: %s", args[1], args[2], timeout, last)
}

// TestWrongPINExitStatus: keyd serve with a wrong PIN exits 77, which the
// shipped systemd unit does not restart into (each start costs a PIN try).
func TestWrongPINExitStatus(t *testing.T) {
	script := harnessScript(t, "softhsm2-util", "install-softhsm.sh", "new-token.sh")
	bin, dir := binaryAndDir(t, "kp")
	cmd := exec.Command(script, "keyd")
	cmd.Env = append(os.Environ(), "SOFTHSM_TEST_DIR="+filepath.Join(dir, "hsm"))
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	vars := exports(out)
	pin := filepath.Join(dir, "badpin")
	os.WriteFile(pin, []byte("9999"), 0o600)
	conf := filepath.Join(dir, "keyd.yaml")
	os.WriteFile(conf, []byte(fmt.Sprintf(`socket: %[1]s/k.sock
state_dir: %[1]s/state
backend: {pkcs11: {module: %[2]q, uri: %[3]q, pin_file: %[4]q}}
keysets: [{name: d, purpose: dpop, alg: ES256, allow: {uids: [0]}}]
`, dir, vars["KEYD_PKCS11_MODULE"], vars["KEYD_PKCS11_URI"], pin)), 0o600)
	serve := exec.Command(bin, "serve", "--config", conf)
	serve.Env = append(os.Environ(), "SOFTHSM2_CONF="+vars["SOFTHSM2_CONF"], "GORACE=atexit_sleep_ms=10")
	msg, err := serve.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 77 {
		t.Fatalf("keyd serve with a wrong PIN: %v, want exit status 77\n%s", err, msg)
	}
}
