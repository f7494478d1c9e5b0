package tpm

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/internal/swtpmtest"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// TestStartupDeadlines (T1): a TPM that stops answering during New — at
// the first command, at TPM2_Startup, at the SRK's creation, during the
// algorithm probe or the PS256 self-test — makes New fail with
// ErrUnavailable within about one command timeout, leaving no goroutine
// behind; New succeeds once the TPM answers again.
func TestStartupDeadlines(t *testing.T) {
	for _, tc := range []struct {
		name      string
		cc        tpm2.TPMCC
		noStartup bool
	}{
		{"GetCapability", tpm2.TPMCCGetCapability, false},
		{"Startup", tpm2.TPMCCStartup, true},
		{"CreatePrimary", tpm2.TPMCCCreatePrimary, false},
		{"TestParms", tpm2.TPMCCTestParms, false},
		{"LoadExternal", tpm2.TPMCCLoadExternal, false},
		{"PSSSign", tpm2.TPMCCSign, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := swtpmtest.Start(t)
			if tc.noStartup {
				s.NoStartup = true
				s.Restart(t)
			}
			const timeout = time.Second
			g0, _ := baseline()
			var once sync.Once
			stopped := false
			hook := func(cmd []byte) ([]byte, bool, error) {
				if tpm2.TPMCC(commandCode(cmd)) == tc.cc {
					once.Do(func() {
						stopped = true
						s.Signal(t, syscall.SIGSTOP)
					})
				}
				return nil, false, nil
			}
			st := time.Now()
			b, err := newTestBackendErr(t, s, Config{CommandTimeout: timeout}, hook)
			took := time.Since(st)
			if stopped {
				s.Signal(t, syscall.SIGCONT)
			}
			if !stopped {
				t.Fatalf("New never sent %v (New = %v)", tc.cc, err)
			}
			if !errors.Is(err, keystore.ErrUnavailable) {
				t.Fatalf("New with the TPM stopped at %v = %v, want ErrUnavailable", tc.cc, err)
			}
			if b != nil {
				t.Fatal("New returned a backend with its error")
			}
			// Generous: one command timeout plus Close's own, on a busy machine.
			if took > 4*timeout+2*time.Second {
				t.Errorf("New with the TPM stopped at %v failed after %v; want about the command timeout %v", tc.cc, took, timeout)
			}
			t.Logf("stopped at %v: New failed after %v: %v", tc.cc, took, err)
			if g, _ := settle(g0); g > g0 {
				t.Errorf("goroutines %d → %d after a failed New", g0, g)
			}
			b, err = newTestBackendErr(t, s, Config{CommandTimeout: timeout}, nil)
			if err != nil {
				t.Fatalf("New once the TPM answers: %v", err)
			}
			keystoretest.MustGenerate(t, b, fmt.Sprintf("k-%s", strings.ToLower(tc.name)))
			if err := b.Health(t.Context()); err != nil {
				t.Errorf("Health: %v", err)
			}
		})
	}
}

// TestCloseOnStoppedTPM (T1): Close against a TPM that stopped answering
// returns within about a command timeout (its flushes have deadlines too),
// leaving no goroutine behind; a new backend works once the TPM answers.
func TestCloseOnStoppedTPM(t *testing.T) {
	s := swtpmtest.Start(t)
	const timeout = time.Second
	dir := filepath.Join(t.TempDir(), "state")
	b := newTestBackend(t, s, Config{StateDir: dir, CommandTimeout: timeout})
	pub := keystoretest.MustGenerate(t, b, "k")
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k", keystore.ES256, pub, d)
	g0, _ := baseline()
	s.Signal(t, syscall.SIGSTOP)
	st := time.Now()
	b.Close()
	took := time.Since(st)
	s.Signal(t, syscall.SIGCONT)
	if took > 3*timeout+2*time.Second {
		t.Errorf("Close on a stopped TPM took %v; want about the command timeout %v", took, timeout)
	}
	t.Logf("Close on a stopped TPM took %v", took)
	if g, _ := settle(g0); g > g0 {
		t.Errorf("goroutines %d → %d after Close", g0, g)
	}
	b = newTestBackend(t, s, Config{StateDir: dir, CommandTimeout: timeout})
	base := inspect(t, b)
	if len(base.transients) != 1 {
		t.Errorf("after New the TPM holds %#x; want only the SRK", base.transients)
	}
	mustSign(t, b, "k", keystore.ES256, pub, d)
	checkFootprint(t, b, base)
}
