package daemon

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/client"
)

type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newCA(t *testing.T) ca {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return ca{c, k}
}

func (c ca) issue(t *testing.T, server bool, uri string, notAfter time.Time) tls.Certificate {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), NotBefore: time.Now().Add(-2 * time.Hour), NotAfter: notAfter}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		u, _ := url.Parse(uri)
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &k.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// A13: the TCP listener serves only mutual TLS, and a certificate's identity
// is matched by the same allow lists: allowed, not allowed, from another CA,
// expired, and no certificate at all.
func TestMutualTLSListener(t *testing.T) {
	dir := t.TempDir()
	root, other := newCA(t), newCA(t)
	srvCert := root.issue(t, true, "", time.Now().Add(time.Hour))
	writePEM(t, filepath.Join(dir, "server.pem"), "CERTIFICATE", srvCert.Certificate[0])
	keyDER, _ := x509.MarshalPKCS8PrivateKey(srvCert.PrivateKey)
	writePEM(t, filepath.Join(dir, "server.key"), "PRIVATE KEY", keyDER)
	writePEM(t, filepath.Join(dir, "ca.pem"), "CERTIFICATE", root.cert.Raw)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := l.Addr().String()
	l.Close()
	socket, _ := startDaemon(t, fmt.Sprintf(`  - name: billing
    purpose: dpop
    alg: ES256
    allow: {identities: ["spiffe://example.org/billing/*"]}
tcp:
  listen: %s
  cert_file: %s/server.pem
  key_file: %s/server.key
  client_ca_file: %s/ca.pem
`, addr, dir, dir, dir))

	pool := x509.NewCertPool()
	pool.AddCert(root.cert)
	dial := func(certs ...tls.Certificate) *client.Client {
		cl, err := client.Dial(addr, client.WithTLS(&tls.Config{RootCAs: pool, Certificates: certs, MinVersion: tls.VersionTLS13}))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		return cl
	}
	proof := func(cl *client.Client, keyset string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := cl.DPoP(keyset).Proof(ctx, "GET", "https://a.example/")
		return err
	}
	good := dial(root.issue(t, false, "spiffe://example.org/billing/api", time.Now().Add(time.Hour)))
	if err := proof(good, "billing"); err != nil {
		t.Fatalf("allowed identity: %v", err)
	}
	auditLog, _ := os.ReadFile(filepath.Join(filepath.Dir(socket), "state", "audit.jsonl"))
	if !strings.Contains(string(auditLog), `"identity":"spiffe://example.org/billing/api","keyset":"billing"`) {
		t.Errorf("the audit record lacks the caller's certificate identity:\n%s", auditLog)
	}
	// The uid rules of key set d do not apply to mTLS callers.
	if err := proof(good, "d"); !errors.Is(err, client.ErrPermissionDenied) {
		t.Errorf("mTLS caller on a uid-only key set: %v", err)
	}
	if err := proof(dial(root.issue(t, false, "spiffe://example.org/payments/api", time.Now().Add(time.Hour))), "billing"); !errors.Is(err, client.ErrPermissionDenied) {
		t.Errorf("identity not allowed: %v", err)
	}
	for name, cl := range map[string]*client.Client{
		"another CA":     dial(other.issue(t, false, "spiffe://example.org/billing/api", time.Now().Add(time.Hour))),
		"expired":        dial(root.issue(t, false, "spiffe://example.org/billing/api", time.Now().Add(-time.Hour))),
		"no certificate": dial(),
	} {
		if err := proof(cl, "billing"); !errors.Is(err, client.ErrUnavailable) {
			t.Errorf("%s: %v, want the handshake refused (Unavailable)", name, err)
		}
	}
}

// The admin service on its own 0600 socket: rotate works there and not on
// the main socket, which serves KeyService only.
func TestAdminSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "kq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	admin := filepath.Join(dir, "admin.sock")
	socket, _ := startDaemon(t, "admin_socket: "+admin+"\n")
	fi, err := os.Stat(admin)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket: %v %v", fi, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	main, _ := client.Dial(socket)
	defer main.Close()
	if _, err := main.Rotate(ctx, "d", true); status.Code(err) != codes.Unimplemented {
		t.Errorf("rotate on the main socket: %v, want Unimplemented", err)
	}
	if _, err := main.DPoP("d").Proof(ctx, "GET", "https://a.example/"); err != nil {
		t.Errorf("sign on the main socket: %v", err)
	}
	adm, _ := client.Dial(admin)
	defer adm.Close()
	r, err := adm.Rotate(ctx, "d", true)
	if err != nil || r.Previous.State != "draining" {
		t.Fatalf("rotate on the admin socket: %+v %v", r, err)
	}
	if _, err := adm.DPoP("d").Proof(ctx, "GET", "https://a.example/"); status.Code(err) != codes.Unimplemented {
		t.Errorf("sign on the admin socket: %v, want Unimplemented", err)
	}
}

// A15: health per backend, cheap to poll (a cached status: no backend call).
func TestHealthPerBackend(t *testing.T) {
	socket, _ := startDaemon(t, "")
	cl, err := client.Dial(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	hc := healthpb.NewHealthClient(cl.Conn())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, svc := range []string{"", "keyd.v1.KeyService", "keyd.backend.soft"} {
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health %q: %v %v", svc, resp, err)
		}
	}
	start := time.Now()
	for range 200 {
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "keyd.backend.soft"}); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("200 health checks in %v", time.Since(start))
}
