package authz

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// dial opens one client connection that later calls reuse: gRPC clients
// (keyd's SignStream included) keep theirs open for as long as they run.
func (s *mtlsServer) dial(t *testing.T, cfg *tls.Config) *grpc.ClientConn {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(s.serverCA.cert)
	cfg.RootCAs = roots
	cfg.ServerName = "localhost"
	cc, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// check makes one health check on cc; a handler that ran is taken off
// s.callers.
func (s *mtlsServer) check(t *testing.T, cc *grpc.ClientConn) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	if err == nil {
		select {
		case <-s.callers:
		default:
		}
	}
	return err
}

// checkUntil makes health checks on cc until one ends with code want, for
// at most 5 lookEvery; it returns the last one's error.
func (s *mtlsServer) checkUntil(t *testing.T, cc *grpc.ClientConn, want codes.Code) error {
	t.Helper()
	deadline := time.Now().Add(5 * lookEvery)
	for {
		err := s.check(t, cc)
		if status.Code(err) == want || time.Now().After(deadline) {
			return err
		}
		time.Sleep(lookEvery / 20)
	}
}

// A client certificate counts only while a new handshake would accept it.
// A CA removed from the bundle refuses the next handshake already
// (TestMTLSReloadsFiles); a connection made before must not go on being
// the caller it was: its next call is refused too, as is a call after its
// certificate expired.
func TestMTLSOpenConnectionRecheckedPerCall(t *testing.T) {
	id := leafOpts{uris: []string{"spiffe://example.org/billing/api"}}

	t.Run("CA removed from the bundle", func(t *testing.T) {
		ca1, ca2 := newCA(t, "client CA 1"), newCA(t, "client CA 2")
		s := startMTLS(t, ca1)
		from1, _, _ := ca1.issue(t, id)
		cc := s.dial(t, withCert(from1))
		if err := s.check(t, cc); err != nil {
			t.Fatal(err)
		}
		writeFile(t, s.files.ClientCAFile, ca2.pem)
		// Calls look at the files at most every lookEvery.
		if err := s.checkUntil(t, cc, codes.Unauthenticated); status.Code(err) != codes.Unauthenticated {
			t.Fatalf("a call on a connection whose CA was removed from the bundle: %v, want Unauthenticated", err)
		}
		// Put back, the CA is trusted again.
		writeFile(t, s.files.ClientCAFile, append(append([]byte{}, ca2.pem...), ca1.pem...))
		if err := s.checkUntil(t, cc, codes.OK); err != nil {
			t.Fatalf("after the CA is back in the bundle: %v", err)
		}
	})

	t.Run("certificate expired", func(t *testing.T) {
		var skew atomic.Int64 // how far the server's clock is ahead
		now := func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
		ca := newCA(t, "client CA")
		s := startMTLSAt(t, ca, now)
		leaf := id
		leaf.notAfter = time.Now().Add(10 * time.Minute)
		cert, _, _ := ca.issue(t, leaf)
		cc := s.dial(t, withCert(cert))
		if err := s.check(t, cc); err != nil {
			t.Fatal(err)
		}
		skew.Store(int64(20 * time.Minute))
		err := s.check(t, cc)
		if status.Code(err) != codes.Unauthenticated {
			t.Fatalf("a call on a connection whose certificate expired: %v, want Unauthenticated", err)
		}
		if !strings.Contains(err.Error(), "expired") {
			t.Errorf("the refusal does not say the certificate expired: %v", err)
		}
	})
}
