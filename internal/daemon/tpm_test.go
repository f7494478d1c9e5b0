package daemon

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/config"
	"github.com/keyd-dev/keyd/internal/swtpmtest"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// proofCode asks for one DPoP proof and returns its gRPC code.
func proofCode(cl *client.Client, timeout time.Duration) (codes.Code, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	_, err := cl.DPoP("d").Proof(ctx, "GET", "https://a.example/")
	return status.Code(err), err // the client's errors carry their status
}

// awaitCode asks for proofs until one gets want, within limit; only
// UNAVAILABLE may come before.
func awaitCode(t *testing.T, cl *client.Client, want codes.Code, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		c, err := proofCode(cl, 5*time.Second)
		if c == want {
			return
		}
		if c != codes.Unavailable {
			t.Fatalf("proof = %v (%v), want %v (or UNAVAILABLE meanwhile)", c, err, want)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %v within %v; last: %v", want, limit, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestTPMFaultsOverGRPC (T1, T2, T3, T4, T6, T7): keyd on a real swtpm, seen
// through gRPC. A stopped TPM is UNAVAILABLE and recovers after SIGCONT; a
// killed and restarted swtpm and a TPM reset are survived without
// restarting keyd; 10 000 signatures and 100 rotations leave no transient
// object behind; goroutines come back to baseline; a TPM cleared while
// keyd runs is DATA_LOSS, with the active key kept, never replaced.
func TestTPMFaultsOverGRPC(t *testing.T) {
	swtpmtest.Require(t, "tpm2_clear", "tpm2_getcap")
	s := swtpmtest.Start(t)

	dir, err := os.MkdirTemp("", "kt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	yaml := fmt.Sprintf(`socket: %[1]s/k.sock
state_dir: %[1]s/state
backend: {tpm: {address: "%[3]s", command_timeout: 1s}}
keysets:
  - name: d
    purpose: dpop
    alg: ES256
    allow: {uids: [%[2]d]}
`, dir, os.Geteuid(), s.Addr())
	cfg, err := config.Parse([]byte(yaml), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	d, cl, stop := serveTPM(t, cfg)
	defer stop()
	awaitCode(t, cl, codes.OK, 10*time.Second)
	active := func() string {
		k, err := cl.ActiveKey(context.Background(), "d")
		if err != nil {
			t.Fatalf("active key: %v", err)
		}
		return k.Kid
	}
	time.Sleep(100 * time.Millisecond)
	g0 := runtime.NumGoroutine()
	kid0 := active()
	// sameKey: no key was lost or replaced by the fault.
	sameKey := func(what string) {
		t.Helper()
		keys, err := cl.ListKeys(context.Background(), "d")
		if err != nil {
			t.Fatal(err)
		}
		if len(keys) != 1 || keys[0].Kid != kid0 || keys[0].State != "active" {
			t.Errorf("after %s: key versions %+v; want only %s, active", what, keys, kid0)
		}
	}

	// T1: stopped, then continued.
	s.Signal(t, syscall.SIGSTOP)
	if c, err := proofCode(cl, 5*time.Second); c != codes.Unavailable {
		t.Errorf("proof on a stopped TPM = %v (%v), want UNAVAILABLE", c, err)
	}
	s.Signal(t, syscall.SIGCONT)
	awaitCode(t, cl, codes.OK, 15*time.Second)
	sameKey("the TPM was stopped and continued")

	// T2, T7: swtpm killed and restarted, five times; a TPM reset.
	for range 5 {
		s.Restart(t)
		awaitCode(t, cl, codes.OK, 15*time.Second)
	}
	s.Reset(t)
	if c, err := proofCode(cl, 5*time.Second); c != codes.OK {
		t.Errorf("proof after a TPM reset = %v (%v), want OK at once", c, err)
	}
	sameKey("swtpm restarts and a TPM reset")

	// T3: 100 rotations and 10 000 signatures.
	for i := range 100 {
		if _, err := d.Manager().Rotate(context.Background(), "d", true); err != nil {
			t.Fatalf("rotation %d: %v", i, err)
		}
		for j := range 100 {
			if c, err := proofCode(cl, 10*time.Second); c != codes.OK {
				t.Fatalf("rotation %d, proof %d: %v (%v)", i, j, c, err)
			}
		}
	}
	kid := active()
	keys, err := cl.ListKeys(context.Background(), "d")
	if err != nil {
		t.Fatal(err)
	}
	nkeys := len(keys)
	var g int
	for range 100 {
		if g = runtime.NumGoroutine(); g <= g0+2 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if g > g0+2 {
		t.Errorf("goroutines %d → %d after the faults", g0, g)
	}

	// T4: a fuzzed request stream: malformed and hostile requests on the
	// SignStream and unary Sign (random key sets, kids, claims, headers,
	// signing inputs, purposes), each answered with a refusal or a
	// signature; none may reach the TPM as an authorization attempt (the
	// lockout counter, read after keyd stops, stays 0).
	fuzzRequests(t, cl, 2000)
	if c, err := proofCode(cl, 10*time.Second); c != codes.OK {
		t.Errorf("proof after the fuzzed requests = %v (%v), want OK", c, err)
	}

	// keyd's Close flushes only the objects it knows of: whatever leaked
	// would still be in the TPM.
	stop()
	if out := s.Tool(t, "tpm2_getcap", "handles-transient"); strings.TrimSpace(out) != "" {
		t.Errorf("transient objects left in the TPM after keyd stopped: %s", out)
	}
	if out := s.Tool(t, "tpm2_getcap", "properties-variable"); !strings.Contains(out, "TPM2_PT_LOCKOUT_COUNTER: 0x0\n") {
		t.Errorf("lockout counter not 0:\n%s", out)
	}

	// T6: TPM2_Clear while keyd runs. swtpm serves one connection, and
	// keyd holds it: the same TPM state is cleared through other ports.
	_, cl, stop = serveTPM(t, cfg)
	defer stop()
	awaitCode(t, cl, codes.OK, 10*time.Second)
	s.Kill()
	other := swtpmtest.StartWith(t, s.Dir)
	other.Tool(t, "tpm2_clear", "-c", "p")
	other.Kill()
	s.Restart(t)
	awaitCode(t, cl, codes.DataLoss, 15*time.Second)
	if c, err := proofCode(cl, 5*time.Second); c != codes.DataLoss {
		t.Errorf("second proof after TPM2_Clear = %v (%v), want DATA_LOSS", c, err)
	}
	// The active key is recorded lost, not replaced by a new one.
	keys, err = cl.ListKeys(context.Background(), "d")
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != nkeys {
		t.Errorf("%d versions after TPM2_Clear, want %d: no key may be generated", len(keys), nkeys)
	}
	for _, k := range keys {
		if k.State == "active" || (k.Kid == kid && k.State != "lost") {
			t.Errorf("after TPM2_Clear: %s is %s; want the active key %s lost and none other active", k.Kid, k.State, kid)
		}
	}
	// The refusals leave nothing running behind them.
	stop()
	for range 100 {
		if g = runtime.NumGoroutine(); g <= g0 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if g > g0 {
		t.Errorf("goroutines %d → %d after TPM2_Clear and keyd's stop", g0, g)
	}
	if out := s.Tool(t, "tpm2_getcap", "handles-transient"); strings.TrimSpace(out) != "" {
		t.Errorf("transient objects left in the cleared TPM after keyd stopped: %s", out)
	}
}

// serveTPM runs a daemon with cfg in this process (see serve) and dials it.
func serveTPM(t *testing.T, cfg *config.Config) (*Daemon, *client.Client, func()) {
	t.Helper()
	d, stop := serve(t, cfg)
	cl, err := client.Dial(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	return d, cl, func() {
		cl.Close()
		stop()
	}
}

// fuzzRequests sends n requests built from random and hostile parts to
// keyd over cl's connection, half on a SignStream and half as unary Sign
// calls, and checks that each gets an answer, never an internal error.
func fuzzRequests(t *testing.T, cl *client.Client, n int) {
	t.Helper()
	r := rand.New(rand.NewPCG(1, 2))
	pick := func(xs ...string) string { return xs[r.IntN(len(xs))] }
	junk := func(max int) []byte {
		b := make([]byte, r.IntN(max))
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return b
	}
	// Protobuf strings are UTF-8: the client could not send others.
	text := func(max int) string { return strings.ToValidUTF8(string(junk(max)), "\uFFFD") }
	request := func() *keydv1.SignRequest {
		return &keydv1.SignRequest{
			Keyset:       pick("d", "", "D", "d\x00", "../d", strings.Repeat("d", 300)),
			Kid:          pick("", "x", strings.Repeat("A", 43), text(64)),
			Claims:       [][]byte{nil, junk(256), []byte(`{"htm":"GET","htu":"https://a.example/"}`), []byte(`{"htm":"GET","htu":"https://a.example/","nonce":"` + strings.Repeat("n", 5000) + `"}`), []byte(`{"htm":1}`)}[r.IntN(5)],
			Header:       [][]byte{nil, junk(128), []byte(`{"alg":"none"}`), []byte(`{"jwk":{"kty":"oct"}}`)}[r.IntN(4)],
			SigningInput: [][]byte{nil, junk(512)}[r.IntN(2)],
			Purpose:      pick("", "dpop", "client_assertion", "jwt", "admin", text(16)),
		}
	}
	keys := keydv1.NewKeyServiceClient(cl.Conn())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := keys.SignStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range n / 2 {
		if err := st.Send(&keydv1.SignStreamRequest{Requests: []*keydv1.SignStreamItem{{Id: uint64(i), Request: request()}}}); err != nil {
			t.Fatalf("stream send %d: %v", i, err)
		}
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	answered := 0
	for answered < n/2 {
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("stream after %d answers: %v", answered, err)
		}
		for _, res := range resp.Results {
			if codes.Code(res.Code) == codes.Internal || codes.Code(res.Code) == codes.Unknown {
				t.Errorf("fuzzed stream request answered %v: %s", codes.Code(res.Code), res.Message)
			}
			answered++
		}
	}
	for i := range n - n/2 {
		_, err := keys.Sign(ctx, request())
		if c := status.Code(err); c == codes.Internal || c == codes.Unknown {
			t.Errorf("fuzzed Sign %d answered %v", i, err)
		}
	}
}
