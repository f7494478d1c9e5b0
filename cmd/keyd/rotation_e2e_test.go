package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/keyd-dev/keyd/client"
)

// TestScheduledRotationOverHTTP runs the real daemon on a schedule of
// seconds and watches its HTTP JWK Set while signing: every key is
// published before it signs anything (prepublish), stays published after it
// stopped signing (drain), then disappears; every assertion verifies against
// the JWK Set served right after it was made.
func TestScheduledRotationOverHTTP(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for several seconds")
	}
	t.Parallel()
	bin, dir := binaryAndDir(t, "kr")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cfg := fmt.Sprintf(`socket: %[1]s/k.sock
state_dir: %[1]s/state
http: {listen: %[2]s}
backend: {soft: {}}
keysets:
  - name: as
    purpose: client_assertion
    alg: ES256
    client_id: c1
    audience: https://issuer.example.com
    max_lifetime: 2s
    iat_skew: 1s
    jwks_cache: 1s
    rotation: {period: 3s, prepublish: 1s, drain: 3s, retain: 1s}
    allow: {uids: [%[3]d]}
`, dir, addr, os.Geteuid())
	if err := os.WriteFile(filepath.Join(dir, "keyd.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", "--config", filepath.Join(dir, "keyd.yaml"))
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=10")
	logf, _ := os.Create(filepath.Join(dir, "keyd.log"))
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "keyd.log"))
			t.Logf("keyd log:\n%s", b)
		}
	})

	cl, err := client.Dial(filepath.Join(dir, "k.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()

	fetch := func() (jose.JSONWebKeySet, string) {
		resp, err := http.Get("http://" + addr + "/jwks/as.json")
		if err != nil {
			return jose.JSONWebKeySet{}, ""
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var set jose.JSONWebKeySet
		if resp.StatusCode != 200 || json.Unmarshal(b, &set) != nil {
			t.Fatalf("GET jwks: %d %s", resp.StatusCode, b)
		}
		return set, resp.Header.Get("Cache-Control")
	}
	type seen struct{ firstPub, lastPub, firstSign, lastSign time.Time }
	kids := map[string]*seen{}
	get := func(kid string) *seen {
		if kids[kid] == nil {
			kids[kid] = &seen{}
		}
		return kids[kid]
	}
	start := time.Now()
	deadline := start.Add(20 * time.Second)
	var cc string
	for time.Now().Before(deadline) && len(kids) < 6 {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		tok, err := cl.ClientAssertion(ctx, "as")
		cancel()
		set, cacheControl := fetch()
		now := time.Now()
		if cacheControl != "" {
			cc = cacheControl
		}
		for _, k := range set.Keys {
			s := get(k.KeyID)
			if s.firstPub.IsZero() {
				s.firstPub = now
			}
			s.lastPub = now
		}
		if err != nil {
			if time.Since(start) > 2*time.Second { // the daemon is up by then
				t.Fatalf("assertion: %v", err)
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		jws, err := jose.ParseSigned(tok, []jose.SignatureAlgorithm{jose.ES256})
		if err != nil {
			t.Fatal(err)
		}
		kid := jws.Signatures[0].Header.KeyID
		keys := set.Key(kid)
		if len(keys) != 1 {
			t.Fatalf("assertion signed by %s, not in the JWK Set served right after", kid)
		}
		if _, err := jws.Verify(keys[0].Key); err != nil {
			t.Fatalf("assertion does not verify: %v", err)
		}
		s := get(kid)
		if s.firstSign.IsZero() {
			s.firstSign = now
		}
		s.lastSign = now
		time.Sleep(50 * time.Millisecond)
	}
	if cc != "public, max-age=1" {
		t.Errorf("Cache-Control %q, want max-age from the schedule (1s)", cc)
	}
	rotated, retired := 0, 0
	for kid, s := range kids {
		if s.firstSign.IsZero() {
			continue
		}
		if !s.firstPub.Equal(s.firstSign) || s.firstPub.Sub(start) > 3*time.Second { // keys after the first
			if lead := s.firstSign.Sub(s.firstPub); lead < 700*time.Millisecond {
				t.Errorf("kid %s published only %v before it signed (prepublish 1s)", kid, lead)
			}
			rotated++
		}
		if time.Since(s.lastPub) > 500*time.Millisecond { // gone from the JWK Set
			if tail := s.lastPub.Sub(s.lastSign); tail < 2500*time.Millisecond {
				t.Errorf("kid %s unpublished %v after its last signature (drain 3s)", kid, tail)
			}
			retired++
		}
	}
	if rotated < 2 || retired < 1 {
		var b strings.Builder
		for kid, s := range kids {
			fmt.Fprintf(&b, "%s pub %v..%v sign %v..%v\n", kid[:8], s.firstPub.Sub(start), s.lastPub.Sub(start), s.firstSign.Sub(start), s.lastSign.Sub(start))
		}
		t.Errorf("in %v: %d keys rotated in, %d retired; want ≥ 2 and ≥ 1:\n%s", time.Since(start), rotated, retired, b.String())
	}
}

// TestCrashAtEveryRotationStep kills the daemon (SIGKILL, through
// KEYD_FAILPOINT) at each step of a scheduled rotation, restarts it, and
// checks that the key set has an active key that the JWK Set publishes,
// that every published key is still in the backend (the restart's
// reconcile marks a missing one lost), that the backend holds no key keyd
// has no record of, and that signing works: on the soft keystore and on a
// SoftHSM2 token (P10, P11).
func TestCrashAtEveryRotationStep(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for several seconds")
	}
	shared := &sharedBinary{}
	t.Cleanup(shared.remove)
	bin, err := shared.get()
	if err != nil {
		t.Fatal(err)
	}
	t.Run("soft", func(t *testing.T) {
		crashAtEveryRotationStep(t, bin, func(t *testing.T, dir string) (string, []string) { return "{soft: {}}", nil })
	})
	t.Run("pkcs11", func(t *testing.T) {
		script := harnessScript(t, "softhsm2-util", "install-softhsm.sh", "new-token.sh")
		crashAtEveryRotationStep(t, bin, func(t *testing.T, dir string) (string, []string) {
			cmd := exec.Command(script, "keyd")
			cmd.Env = append(os.Environ(), "SOFTHSM_TEST_DIR="+filepath.Join(dir, "hsm"))
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("new-token.sh: %v", err)
			}
			vars := exports(out)
			return fmt.Sprintf("{pkcs11: {module: %q, uri: %q, pin_file: %q}}", vars["KEYD_PKCS11_MODULE"], vars["KEYD_PKCS11_URI"], vars["KEYD_PKCS11_PIN_FILE"]),
				[]string{"SOFTHSM2_CONF=" + vars["SOFTHSM2_CONF"]}
		})
	})
}

// crashAtEveryRotationStep is TestCrashAtEveryRotationStep on the backend
// that backend gives for a test directory: its YAML and keyd's environment.
func crashAtEveryRotationStep(t *testing.T, bin string, backend func(t *testing.T, dir string) (string, []string)) {
	for _, point := range []string{
		"rotate.after_intent", "rotate.after_generate", "rotate.after_commit",
		"activate.before_commit", "retire.before_commit",
		"destroy.after_backend", "destroy.before_commit",
	} {
		t.Run(point, func(t *testing.T) {
			t.Parallel()
			dir, err := os.MkdirTemp("", "kc")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			be, env := backend(t, dir)
			cfg := fmt.Sprintf(`socket: %[1]s/k.sock
state_dir: %[1]s/state
backend: %[3]s
keysets:
  - name: d
    purpose: dpop
    alg: ES256
    token_lifetime: 1s
    rotation: {period: 1s, drain: 1s, retain: 1s}
    allow: {uids: [%[2]d]}
`, dir, os.Geteuid(), be)
			conf := filepath.Join(dir, "keyd.yaml")
			if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
				t.Fatal(err)
			}
			run := func(failpoint string) *exec.Cmd {
				cmd := exec.Command(bin, "serve", "--config", conf)
				cmd.Env = append(append(os.Environ(), env...), "GORACE=atexit_sleep_ms=10", "KEYD_FAILPOINT="+failpoint)
				logf, _ := os.OpenFile(filepath.Join(dir, "keyd.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
				cmd.Stdout, cmd.Stderr = logf, logf
				cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				logf.Close()
				return cmd
			}
			crash := run(point)
			died := make(chan error, 1)
			go func() { died <- crash.Wait() }()
			select {
			case err := <-died:
				if ws, ok := crash.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
					b, _ := os.ReadFile(filepath.Join(dir, "keyd.log"))
					t.Fatalf("keyd exited (%v) instead of dying at %s:\n%s", err, point, b)
				}
			case <-time.After(15 * time.Second):
				crash.Process.Kill()
				<-died
				t.Fatalf("keyd never reached %s", point)
			}

			again := run("")
			stopped := false
			stop := func() {
				if !stopped {
					stopped = true
					again.Process.Signal(os.Interrupt)
					again.Wait()
				}
			}
			t.Cleanup(stop)
			cl, err := client.Dial(filepath.Join(dir, "k.sock"))
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			var p client.Proof
			for i := 0; ; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				p, err = cl.DPoP("d").Proof(ctx, "GET", "https://a.example/")
				cancel()
				if err == nil || i > 100 {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if err != nil {
				b, _ := os.ReadFile(filepath.Join(dir, "keyd.log"))
				t.Fatalf("no signature after the restart: %v\n%s", err, b)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			keys, err := cl.ListKeys(ctx, "d")
			if err != nil {
				t.Fatal(err)
			}
			raw, err := cl.JWKS(ctx, "d")
			if err != nil {
				t.Fatal(err)
			}
			var set jose.JSONWebKeySet
			json.Unmarshal(raw, &set)
			actives := 0
			for _, k := range keys {
				if k.State == "active" {
					actives++
					if len(set.Key(k.Kid)) != 1 {
						t.Errorf("active kid %s not in the JWK Set", k.Kid)
					}
				}
			}
			if actives != 1 {
				t.Errorf("%d active keys: %+v", actives, keys)
			}
			if len(set.Key(p.Kid)) != 1 {
				t.Errorf("the proof's kid %s is not published", p.Kid)
			}
			// Every published key is in the backend (the soft key files),
			// read once the daemon has stopped.
			stop()
			var state struct {
				Versions []struct{ ID, Kid, State string }
			}
			b, err := os.ReadFile(filepath.Join(dir, "state", "keys.json"))
			if err != nil || json.Unmarshal(b, &state) != nil {
				t.Fatalf("state: %v", err)
			}
			for _, v := range state.Versions {
				switch v.State {
				case "next", "active", "draining":
					if be != "{soft: {}}" {
						break // the restart's reconcile looked: else lost
					}
					if _, err := os.Stat(filepath.Join(dir, "state", "keys", v.ID+".key")); err != nil {
						t.Errorf("published %s key %s missing from the backend: %v", v.State, v.Kid, err)
					}
				case "lost", "pending":
					t.Errorf("version %s left %s", v.Kid, v.State)
				}
			}
			// An orphan of the crash (a key made but never recorded) is
			// removed at the restart, never left in the backend.
			if log, _ := os.ReadFile(filepath.Join(dir, "keyd.log")); bytes.Contains(log, []byte("has no record of")) {
				t.Errorf("the backend holds a key keyd has no record of after the restart:\n%s", log)
			}
		})
	}
}
