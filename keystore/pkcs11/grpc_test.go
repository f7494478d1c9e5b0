package pkcs11

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/audit"
	"github.com/keyd-dev/keyd/internal/authz"
	"github.com/keyd-dev/keyd/internal/listener"
	"github.com/keyd-dev/keyd/internal/policy"
	"github.com/keyd-dev/keyd/internal/server"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/rotation"
)

// discardAudit takes every record.
type discardAudit struct{}

func (discardAudit) Record(audit.Record) error { return nil }

// overGRPC serves b through keyd's API as the daemon does — the key
// lifecycle with one DPoP key set "d" (ES256), the Sign handler and its
// policy, gRPC on a Unix socket with peer credentials — and returns a
// client. Everything stops at the test's cleanup, before its leak checks.
func overGRPC(t *testing.T, b *Backend) *client.Client {
	t.Helper()
	dir, err := os.MkdirTemp("", "kp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	store, err := rotation.OpenStore(filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	mgr, err := rotation.New(t.Context(), rotation.Config{Backend: b, Store: store, KeySets: []rotation.KeySet{
		{Name: "d", Purpose: string(policy.DPoP), Spec: keystore.KeySpec{Algorithm: keystore.ES256}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	me, err := authz.NewList(authz.Spec{UIDs: []int{os.Geteuid()}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(server.Config{Manager: mgr, Admins: me, Audit: discardAudit{},
		KeySets: map[string]server.KeySet{"d": {Allow: me, Policy: policy.Policy{Purpose: policy.DPoP}}}})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "k.sock")
	lis, err := listener.Unix(sock, 0o600, -1)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(authz.PeerCredentials()))
	srv.Register(g)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	cl, err := client.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// proofCode asks cl for one DPoP proof within timeout and returns the
// gRPC code of the answer.
func proofCode(cl *client.Client, timeout time.Duration) (codes.Code, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	_, err := cl.DPoP("d").Proof(ctx, "GET", "https://rs.example/")
	return status.Code(err), err // the client's errors carry their status
}

// wantCode fails the test unless a proof gets want.
func wantCode(t *testing.T, cl *client.Client, timeout time.Duration, want codes.Code, what string) {
	t.Helper()
	if c, err := proofCode(cl, timeout); c != want {
		t.Errorf("%s: proof = %v (%v); want %v", what, c, err, want)
	}
}

// sameKey fails the test unless the key set's only version is still kid,
// active: no key was lost or replaced.
func sameKey(t *testing.T, cl *client.Client, kid string) {
	t.Helper()
	keys, err := cl.ListKeys(t.Context(), "d")
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 1 || keys[0].Kid != kid || keys[0].State != "active" {
		t.Errorf("key versions %+v; want only %s, active", keys, kid)
	}
}

// The P rows that the fault wrapper produces, seen as a caller sees them:
// the gRPC code of a DPoP proof while the fault lasts and after, the key
// unchanged, and goroutines and threads back to their baseline.
func TestFaultCodesOverGRPC(t *testing.T) {
	setup := func(t *testing.T) (*faultModule, *client.Client, string) {
		t.Helper()
		checkGoroutines(t)
		f := newFaultModule()
		b, _ := faultBackend(t, f, options{recoverBackoff: time.Millisecond, hangAfter: 100 * time.Millisecond})
		cl := overGRPC(t, b)
		k, err := cl.ActiveKey(t.Context(), "d")
		if err != nil {
			t.Fatal(err)
		}
		wantCode(t, cl, 10*time.Second, codes.OK, "before the fault")
		return f, cl, k.Kid
	}

	// P2, P4: a stale session or a lost login is recovered within the
	// call; a fault that outlives the recovery is UNAVAILABLE, then OK
	// once it is gone.
	for name, c := range map[string]uint{
		"P2 CKR_SESSION_HANDLE_INVALID": p11.CKR_SESSION_HANDLE_INVALID,
		"P2 CKR_SESSION_CLOSED":         p11.CKR_SESSION_CLOSED,
		"P2 CKR_DEVICE_REMOVED":         p11.CKR_DEVICE_REMOVED,
		"P2 CKR_TOKEN_NOT_PRESENT":      p11.CKR_TOKEN_NOT_PRESENT,
		"P4 CKR_USER_NOT_LOGGED_IN":     p11.CKR_USER_NOT_LOGGED_IN,
	} {
		t.Run(name, func(t *testing.T) {
			f, cl, kid := setup(t)
			f.set("Sign", times(1, c))
			wantCode(t, cl, 10*time.Second, codes.OK, "one fault")
			f.set("Sign", always(c))
			wantCode(t, cl, 10*time.Second, codes.Unavailable, "a lasting fault")
			f.clear()
			time.Sleep(10 * time.Millisecond) // past the recovery backoff
			wantCode(t, cl, 10*time.Second, codes.OK, "after the fault")
			sameKey(t, cl, kid)
		})
	}

	// P6: the token refuses more sessions: UNAVAILABLE, not a hang.
	t.Run("P6 CKR_SESSION_COUNT", func(t *testing.T) {
		f, cl, kid := setup(t)
		f.set("OpenSession", always(p11.CKR_SESSION_COUNT))
		f.set("Sign", times(1, p11.CKR_SESSION_HANDLE_INVALID)) // the pooled session dies
		if c, err := proofCode(cl, 10*time.Second); c != codes.Unavailable && c != codes.ResourceExhausted {
			t.Errorf("no session to be had: proof = %v (%v); want UNAVAILABLE or RESOURCE_EXHAUSTED", c, err)
		}
		f.clear()
		time.Sleep(10 * time.Millisecond)
		wantCode(t, cl, 10*time.Second, codes.OK, "after the fault")
		sameKey(t, cl, kid)
	})

	// P6, P7: the device hangs in C_Sign with both sessions taken; many
	// callers get DEADLINE_EXCEEDED at their own deadlines (the pool is
	// bounded, waiters honour their deadline), then OK once it answers.
	t.Run("P6 P7 hung C_Sign", func(t *testing.T) {
		f, cl, kid := setup(t)
		block := make(chan struct{})
		f.mu.Lock()
		f.block = block
		f.mu.Unlock()
		var wg sync.WaitGroup
		got := make(chan codes.Code, 20)
		for range 20 {
			wg.Go(func() {
				c, _ := proofCode(cl, 300*time.Millisecond)
				got <- c
			})
		}
		wg.Wait()
		close(got)
		for c := range got {
			if c != codes.DeadlineExceeded {
				t.Errorf("proof while the device hangs = %v; want DEADLINE_EXCEEDED", c)
			}
		}
		f.mu.Lock()
		f.block = nil
		f.mu.Unlock()
		close(block)
		wantCode(t, cl, 10*time.Second, codes.OK, "after the device answered")
		sameKey(t, cl, kid)
	})
}

// The P rows SoftHSM produces for real, seen as a caller sees them: the
// gRPC code of a DPoP proof while the fault lasts, what became of the key,
// and goroutines and threads back to their baseline (checkGoroutines, at
// the test's cleanup).
func TestRealFaultsOverGRPC(t *testing.T) {
	type fixture struct {
		f       *faultModule
		b       *Backend
		tok     *testToken
		cl      *client.Client
		kid, id string
	}
	setup := func(t *testing.T, o options) fixture {
		t.Helper()
		checkGoroutines(t)
		x := fixture{f: newFaultModule()}
		x.b, x.tok = faultBackend(t, x.f, o)
		x.cl = overGRPC(t, x.b)
		k, err := x.cl.ActiveKey(t.Context(), "d")
		if err != nil {
			t.Fatal(err)
		}
		ids, err := x.b.List(t.Context())
		if err != nil || len(ids) != 1 {
			t.Fatalf("List = %q, %v; want the key set's one key", ids, err)
		}
		x.kid, x.id = k.Kid, ids[0]
		wantCode(t, x.cl, 10*time.Second, codes.OK, "before the fault")
		return x
	}

	// P1: the token's directory removed under keyd: DATA_LOSS, and again
	// (no key is made in its place); the version is recorded lost, not
	// replaced.
	t.Run("P1 token directory removed", func(t *testing.T) {
		x := setup(t, options{recoverBackoff: time.Millisecond, recheck: 10 * time.Millisecond})
		x.tok.wipe(t)
		time.Sleep(20 * time.Millisecond) // past the session copy's recheck
		for range 3 {
			wantCode(t, x.cl, 10*time.Second, codes.DataLoss, "after the token's directory was removed")
		}
		keys, err := x.cl.ListKeys(t.Context(), "d")
		if err != nil {
			t.Fatal(err)
		}
		if len(keys) != 1 || keys[0].Kid != x.kid || keys[0].State != "lost" {
			t.Errorf("key versions %+v; want only %s, lost", keys, x.kid)
		}
	})

	// P2: another part of the process finalizes and initializes the
	// module again: the next call recovers within itself (one more login)
	// and signs with the same key.
	t.Run("P2 module re-initialized", func(t *testing.T) {
		x := setup(t, options{})
		raw := x.b.lib.ctx
		if err := raw.Finalize(); err != nil {
			t.Fatal(err)
		}
		if err := raw.Initialize(); err != nil {
			t.Fatal(err)
		}
		wantCode(t, x.cl, 10*time.Second, codes.OK, "after the re-initialization")
		sameKey(t, x.cl, x.kid)
		if n := x.f.logins.Load(); n != 2 {
			t.Errorf("%d C_Login calls; want 2 (start, one recovery)", n)
		}
	})

	// P3: another application changes the user PIN (C_SetPIN) and the
	// login is lost: FAILED_PRECONDITION, with exactly one more C_Login
	// (no retry loop, which would lock a real HSM's PIN); the key stays on
	// the token and active in keyd's records.
	t.Run("P3 PIN changed", func(t *testing.T) {
		x := setup(t, options{recoverBackoff: time.Millisecond})
		const newPIN = "3333"
		ctx := x.b.lib.ctx
		h := rawSession(t, x.b)
		defer ctx.CloseSession(h)
		if err := ctx.SetPIN(h, testUserPIN, newPIN); err != nil {
			t.Fatal(err)
		}
		if err := ctx.Logout(h); err != nil {
			t.Fatal(err)
		}
		for range 5 {
			wantCode(t, x.cl, 10*time.Second, codes.FailedPrecondition, "after the PIN changed")
			time.Sleep(2 * time.Millisecond)
		}
		if n := x.f.logins.Load(); n != 2 {
			t.Errorf("%d C_Login calls; want 2 (start, one attempt with the old PIN)", n)
		}
		sameKey(t, x.cl, x.kid)
		if err := ctx.Login(h, p11.CKU_USER, newPIN); err != nil {
			t.Fatal(err)
		}
		defer ctx.Logout(h)
		if objs := rawFind(t, x.b, h, x.id, p11.CKO_PRIVATE_KEY); len(objs) != 1 {
			t.Errorf("%d private key objects of %s on the token; want 1", len(objs), x.id)
		}
	})
}
