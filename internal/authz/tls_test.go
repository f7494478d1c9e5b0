package authz

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
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// --- certificates ---

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

var serial atomic.Int64

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func newCA(t *testing.T, name string) *testCA {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial.Add(1)),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &testCA{cert: c, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

type leafOpts struct {
	uris      []string
	dns       []string
	ips       []net.IP
	notBefore time.Time
	notAfter  time.Time
	usage     []x509.ExtKeyUsage
}

// issue returns a leaf certificate and its key, as PEM and as a
// tls.Certificate.
func (ca *testCA) issue(t *testing.T, o leafOpts) (tls.Certificate, []byte, []byte) {
	t.Helper()
	key := newKey(t)
	if o.notBefore.IsZero() {
		o.notBefore = time.Now().Add(-time.Minute)
	}
	if o.notAfter.IsZero() {
		o.notAfter = time.Now().Add(time.Hour)
	}
	if o.usage == nil {
		o.usage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial.Add(1)),
		Subject:      pkix.Name{CommonName: "leaf"},
		NotBefore:    o.notBefore,
		NotAfter:     o.notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  o.usage,
		DNSNames:     o.dns,
		IPAddresses:  o.ips,
	}
	for _, s := range o.uris {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, u)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	tc, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return tc, certPEM, keyPEM
}

// --- a real gRPC server over loopback TCP ---

type mtlsServer struct {
	addr     string
	serverCA *testCA
	files    TLSConfig
	// hsErrs receives every failed server handshake's error.
	hsErrs chan error
	// callers receives the caller of every RPC that reached a handler.
	callers chan Caller
}

// recordingCreds reports server handshake errors to the test.
type recordingCreds struct {
	credentials.TransportCredentials
	errs chan error
}

func (r recordingCreds) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, ai, err := r.TransportCredentials.ServerHandshake(c)
	if err != nil {
		select {
		case r.errs <- err:
		default:
		}
	}
	return conn, ai, err
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil { // a new inode, as agents do
		t.Fatal(err)
	}
}

func startMTLS(t *testing.T, clientCA *testCA) *mtlsServer {
	t.Helper()
	return startMTLSAt(t, clientCA, nil)
}

// startMTLSAt is startMTLS with the server's clock now (nil: time.Now).
func startMTLSAt(t *testing.T, clientCA *testCA, now func() time.Time) *mtlsServer {
	t.Helper()
	dir := t.TempDir()
	s := &mtlsServer{
		serverCA: newCA(t, "server CA"),
		files: TLSConfig{
			CertFile:     filepath.Join(dir, "server.pem"),
			KeyFile:      filepath.Join(dir, "server.key"),
			ClientCAFile: filepath.Join(dir, "clients.pem"),
			Now:          now,
		},
		hsErrs:  make(chan error, 16),
		callers: make(chan Caller, 16),
	}
	_, certPEM, keyPEM := s.serverCA.issue(t, leafOpts{
		dns: []string{"localhost"}, ips: []net.IP{net.IPv4(127, 0, 0, 1)},
		usage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	writeFile(t, s.files.CertFile, certPEM)
	writeFile(t, s.files.KeyFile, keyPEM)
	writeFile(t, s.files.ClientCAFile, clientCA.pem)

	creds, err := MTLSCredentials(s.files)
	if err != nil {
		t.Fatal(err)
	}
	capture := func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		c, err := FromContext(ctx)
		if err != nil {
			return nil, status.Error(codes.Unauthenticated, err.Error())
		}
		s.callers <- c
		return h(ctx, req)
	}
	g := grpc.NewServer(grpc.Creds(recordingCreds{creds, s.hsErrs}), grpc.UnaryInterceptor(capture), grpc.ConnectionTimeout(5*time.Second))
	healthpb.RegisterHealthServer(g, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = lis.Addr().String()
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	return s
}

// call makes one health check with the given client TLS settings.
func (s *mtlsServer) call(t *testing.T, cfg *tls.Config) error {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(s.serverCA.cert)
	cfg.RootCAs = roots
	cfg.ServerName = "localhost"
	cc, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

func (s *mtlsServer) handshakeErr(t *testing.T) error {
	t.Helper()
	select {
	case err := <-s.hsErrs:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("no server handshake error recorded")
		return nil
	}
}

// withCert sends c whatever CAs the server asks for (Go's client would
// otherwise send nothing when c's issuer is not among them).
func withCert(c tls.Certificate) *tls.Config {
	return &tls.Config{GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &c, nil }}
}

// --- tests ---

func TestMTLSRefusesBadClients(t *testing.T) {
	clientCA := newCA(t, "client CA")
	otherCA := newCA(t, "other CA")
	id := []string{"spiffe://example.org/billing/api"}

	fromOther, _, _ := otherCA.issue(t, leafOpts{uris: id})
	expired, _, _ := clientCA.issue(t, leafOpts{uris: id, notBefore: time.Now().Add(-2 * time.Hour), notAfter: time.Now().Add(-time.Hour)})
	notYet, _, _ := clientCA.issue(t, leafOpts{uris: id, notBefore: time.Now().Add(time.Hour), notAfter: time.Now().Add(2 * time.Hour)})
	serverOnly, _, _ := clientCA.issue(t, leafOpts{uris: id, usage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	noSAN, _, _ := clientCA.issue(t, leafOpts{})
	good, _, _ := clientCA.issue(t, leafOpts{uris: id})
	tls12 := withCert(good)
	tls12.MaxVersion = tls.VersionTLS12

	isInvalid := func(reason x509.InvalidReason) func(error) bool {
		return func(err error) bool {
			var e x509.CertificateInvalidError
			return errors.As(err, &e) && e.Reason == reason
		}
	}
	cases := []struct {
		name   string
		client *tls.Config
		want   func(error) bool // the server's handshake error
	}{
		{"no client certificate", &tls.Config{}, func(err error) bool {
			return strings.Contains(err.Error(), "client didn't provide a certificate")
		}},
		{"certificate from another CA", withCert(fromOther), func(err error) bool {
			var e x509.UnknownAuthorityError
			return errors.As(err, &e)
		}},
		{"expired certificate", withCert(expired), isInvalid(x509.Expired)},
		{"certificate not yet valid", withCert(notYet), isInvalid(x509.Expired)},
		{"server-only certificate", withCert(serverOnly), isInvalid(x509.IncompatibleUsage)},
		{"certificate without URI or DNS SAN", withCert(noSAN), func(err error) bool { return errors.Is(err, ErrNoCredentials) }},
		{"TLS 1.2 client", tls12, func(err error) bool {
			return strings.Contains(err.Error(), "unsupported versions")
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := startMTLS(t, clientCA) // its own, so a late handshake error cannot leak into another case
			err := s.call(t, tc.client)
			if status.Code(err) != codes.Unavailable {
				t.Errorf("RPC: %v, want code Unavailable", err)
			}
			if herr := s.handshakeErr(t); !tc.want(herr) {
				t.Errorf("server handshake error: %v", herr)
			}
			select {
			case c := <-s.callers:
				t.Errorf("a handler ran for %v", c)
			default:
			}
		})
	}
}

func TestMTLSCallerIdentity(t *testing.T) {
	clientCA := newCA(t, "client CA")
	s := startMTLS(t, clientCA)
	good, _, _ := clientCA.issue(t, leafOpts{
		uris: []string{"spiffe://example.org/billing/api"},
		dns:  []string{"Billing.Example.org"},
	})
	if err := s.call(t, withCert(good)); err != nil {
		t.Fatal(err)
	}
	c := <-s.callers
	want := []string{"spiffe://example.org/billing/api", "billing.example.org"}
	if c.Transport != TransportMTLS || !slices.Equal(c.Identities, want) || c.UID != 0 || c.PID != 0 {
		t.Fatalf("caller %+v, want transport mtls, identities %q", c, want)
	}
	if got := c.String(); got != "spiffe://example.org/billing/api,billing.example.org" {
		t.Errorf("String() = %q", got)
	}
	if got := c.Principal(); got != "id:spiffe://example.org/billing/api" {
		t.Errorf("Principal() = %q", got)
	}

	billing, err := NewList(Spec{Identities: []string{"spiffe://example.org/billing/*"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	payments, err := NewList(Spec{Identities: []string{"spiffe://example.org/payments/*", "payments.example.org"}, UIDs: []int{0}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !billing.Permits(c) {
		t.Error("billing's list refuses billing's certificate")
	}
	if payments.Permits(c) {
		t.Error("payments' list (with uid 0) permits billing's certificate")
	}
}

func TestMTLSReloadsFiles(t *testing.T) {
	ca1, ca2 := newCA(t, "client CA 1"), newCA(t, "client CA 2")
	s := startMTLS(t, ca1)
	id := leafOpts{uris: []string{"spiffe://example.org/billing/api"}}
	from1, _, _ := ca1.issue(t, id)
	from2, _, _ := ca2.issue(t, id)
	if err := s.call(t, withCert(from1)); err != nil {
		t.Fatal(err)
	}
	<-s.callers

	// A new bundle takes effect at the next handshake.
	writeFile(t, s.files.ClientCAFile, ca2.pem)
	if err := s.call(t, withCert(from2)); err != nil {
		t.Fatalf("certificate of the new CA: %v", err)
	}
	<-s.callers
	if err := s.call(t, withCert(from1)); status.Code(err) != codes.Unavailable {
		t.Fatalf("certificate of the removed CA: %v", err)
	}
	s.handshakeErr(t)

	// A broken file is ignored: the previous material stays.
	writeFile(t, s.files.ClientCAFile, []byte("half a PEM file"))
	writeFile(t, s.files.KeyFile, []byte("-----BEGIN PRIVATE KEY-----\n"))
	if err := s.call(t, withCert(from2)); err != nil {
		t.Fatalf("after a broken write: %v", err)
	}
	<-s.callers

	// A renewed server certificate is served.
	_, certPEM, keyPEM := s.serverCA.issue(t, leafOpts{
		dns: []string{"localhost"}, usage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		notAfter: time.Now().Add(3 * time.Hour).Truncate(time.Second),
	})
	writeFile(t, s.files.ClientCAFile, ca2.pem)
	writeFile(t, s.files.CertFile, certPEM)
	writeFile(t, s.files.KeyFile, keyPEM)
	var served time.Time
	cfg := withCert(from2)
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		served = cs.PeerCertificates[0].NotAfter
		return nil
	}
	if err := s.call(t, cfg); err != nil {
		t.Fatal(err)
	}
	<-s.callers
	if time.Until(served) < 2*time.Hour {
		t.Errorf("server certificate valid until %v: the renewed one was not served", served)
	}
}

func TestMTLSCredentialsErrors(t *testing.T) {
	dir := t.TempDir()
	serverCA, clientCA := newCA(t, "server CA"), newCA(t, "client CA")
	_, certPEM, keyPEM := serverCA.issue(t, leafOpts{dns: []string{"localhost"}})
	_, expiredPEM, expiredKey := serverCA.issue(t, leafOpts{dns: []string{"localhost"}, notBefore: time.Now().Add(-2 * time.Hour), notAfter: time.Now().Add(-time.Hour)})
	_, _, otherKey := serverCA.issue(t, leafOpts{dns: []string{"localhost"}})
	put := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		writeFile(t, p, b)
		return p
	}
	cert, key, cas := put("cert.pem", certPEM), put("key.pem", keyPEM), put("cas.pem", clientCA.pem)
	if _, err := MTLSCredentials(TLSConfig{CertFile: cert, KeyFile: key, ClientCAFile: cas}); err != nil {
		t.Fatalf("good files: %v", err)
	}
	cases := []struct {
		name string
		cfg  TLSConfig
		want string
	}{
		{"missing client CA", TLSConfig{CertFile: cert, KeyFile: key}, "all required"},
		{"no such CA file", TLSConfig{CertFile: cert, KeyFile: key, ClientCAFile: filepath.Join(dir, "nope")}, "no such file"},
		{"CA file without certificates", TLSConfig{CertFile: cert, KeyFile: key, ClientCAFile: put("empty.pem", []byte("\n"))}, "holds no PEM certificate"},
		{"CA file with a key", TLSConfig{CertFile: cert, KeyFile: key, ClientCAFile: put("withkey.pem", append(clientCA.pem, keyPEM...))}, `"PRIVATE KEY", want CERTIFICATE`},
		{"CA file with garbage", TLSConfig{CertFile: cert, KeyFile: key, ClientCAFile: put("garbage.pem", append(clientCA.pem, "junk"...))}, "not PEM"},
		{"key of another certificate", TLSConfig{CertFile: cert, KeyFile: put("other.key", otherKey), ClientCAFile: cas}, "does not match"},
		{"expired server certificate", TLSConfig{CertFile: put("exp.pem", expiredPEM), KeyFile: put("exp.key", expiredKey), ClientCAFile: cas}, "expired at"},
		{"key file others may read", TLSConfig{CertFile: cert, KeyFile: chmod(t, put("open.key", keyPEM), 0o644), ClientCAFile: cas}, "mode 0644 lets others (or the group) at it; chmod 0600"},
		{"key file its group may write", TLSConfig{CertFile: cert, KeyFile: chmod(t, put("gw.key", keyPEM), 0o620), ClientCAFile: cas}, "mode 0620 lets others"},
		{"no such key file", TLSConfig{CertFile: cert, KeyFile: filepath.Join(dir, "nope.key"), ClientCAFile: cas}, "mtls: key: stat"},
	}
	for _, tc := range cases {
		_, err := MTLSCredentials(tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}

func chmod(t *testing.T, path string, mode os.FileMode) string {
	t.Helper()
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

// A renewed key file that others may read is not loaded (the previous
// certificate stays served); once it is made private (a chmod, which
// changes neither its size nor its mtime), it is.
func TestMTLSReloadRefusesExposedKey(t *testing.T) {
	ca := newCA(t, "client CA")
	s := startMTLS(t, ca)
	from, _, _ := ca.issue(t, leafOpts{uris: []string{"spiffe://example.org/billing/api"}})
	_, certPEM, keyPEM := s.serverCA.issue(t, leafOpts{
		dns: []string{"localhost"}, usage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		notAfter: time.Now().Add(3 * time.Hour).Truncate(time.Second),
	})
	writeFile(t, s.files.CertFile, certPEM)
	writeFile(t, s.files.KeyFile, keyPEM)
	chmod(t, s.files.KeyFile, 0o644)
	served := func() time.Time {
		t.Helper()
		var notAfter time.Time
		cfg := withCert(from)
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			notAfter = cs.PeerCertificates[0].NotAfter
			return nil
		}
		if err := s.call(t, cfg); err != nil {
			t.Fatal(err)
		}
		<-s.callers
		return notAfter
	}
	if time.Until(served()) > 2*time.Hour {
		t.Error("the certificate whose key file others may read was loaded")
	}
	chmod(t, s.files.KeyFile, 0o600)
	if time.Until(served()) < 2*time.Hour {
		t.Error("the certificate was not loaded once its key file was made private")
	}
}

func TestFromContextTransports(t *testing.T) {
	// A Unix connection: ReadPeerCred marks the caller "unix".
	p := filepath.Join(t.TempDir(), "s")
	lis, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	client, err := net.Dial("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	conn, err := lis.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c, err := ReadPeerCred(conn)
	if err != nil {
		t.Fatal(err)
	}
	if c.Transport != TransportUnix || int(c.UID) != os.Geteuid() || c.Identities != nil {
		t.Errorf("unix caller %+v", c)
	}
	if got := c.Principal(); !strings.HasPrefix(got, "uid:") {
		t.Errorf("Principal() = %q", got)
	}

	// Both AuthInfo kinds, by value and by pointer; anything else is
	// ErrNoCredentials.
	unixCaller := Caller{UID: 7, Transport: TransportUnix}
	mtlsCaller := Caller{Transport: TransportMTLS, Identities: []string{"spiffe://example.org/x"}}
	for _, tc := range []struct {
		ai   credentials.AuthInfo
		want Caller
		err  error
	}{
		{AuthInfo{Caller: unixCaller}, unixCaller, nil},
		{&AuthInfo{Caller: unixCaller}, unixCaller, nil},
		{MTLSAuthInfo{Caller: mtlsCaller}, mtlsCaller, nil},
		{&MTLSAuthInfo{Caller: mtlsCaller}, mtlsCaller, nil},
		{credentials.TLSInfo{}, Caller{}, ErrNoCredentials},
		{nil, Caller{}, ErrNoCredentials},
	} {
		got, err := callerOf(tc.ai)
		if !errors.Is(err, tc.err) || got.String() != tc.want.String() || got.Transport != tc.want.Transport {
			t.Errorf("callerOf(%T) = %v, %v; want %v, %v", tc.ai, got, err, tc.want, tc.err)
		}
	}
}

func TestPermitsIdentities(t *testing.T) {
	l, err := NewList(Spec{
		UIDs: []int{0, 1001},
		GIDs: []int{0},
		Identities: []string{
			"spiffe://example.org/billing/api",
			"spiffe://example.org/payments/*",
			"Worker.Example.org",
			"urn:keyd:test",
		},
	}, fakeGroups{0: {0}})
	if err != nil {
		t.Fatal(err)
	}
	mtls := func(ids ...string) Caller { return Caller{Transport: TransportMTLS, Identities: ids} }
	cases := []struct {
		name string
		c    Caller
		want bool
	}{
		{"exact URI", mtls("spiffe://example.org/billing/api"), true},
		{"exact URI, second identity", mtls("spiffe://example.org/other", "spiffe://example.org/billing/api"), true},
		{"URI below an exact rule", mtls("spiffe://example.org/billing/api/v2"), false},
		{"URI prefix of an exact rule", mtls("spiffe://example.org/billing"), false},
		{"URI of another trust domain", mtls("spiffe://example.com/billing/api"), false},
		{"URI case differs", mtls("spiffe://example.org/Billing/api"), false},
		{"wildcard, one segment", mtls("spiffe://example.org/payments/api"), true},
		{"wildcard, two segments", mtls("spiffe://example.org/payments/api/v2"), true},
		{"wildcard base itself", mtls("spiffe://example.org/payments"), false},
		{"wildcard base with slash", mtls("spiffe://example.org/payments/"), false},
		{"wildcard, sibling with same prefix", mtls("spiffe://example.org/paymentsx/api"), false},
		{"wildcard, dot-dot segment", mtls("spiffe://example.org/payments/../admin"), false},
		{"wildcard, dot segment", mtls("spiffe://example.org/payments/./api"), false},
		{"wildcard, empty segment", mtls("spiffe://example.org/payments//api"), false},
		{"wildcard, query", mtls("spiffe://example.org/payments/api?x=1"), false},
		{"wildcard, trust domain suffix", mtls("spiffe://example.org.evil/payments/api"), false},
		{"DNS name (rule lower-cased)", mtls("worker.example.org"), true},
		{"DNS subdomain", mtls("a.worker.example.org"), false},
		{"URN", mtls("urn:keyd:test"), true},
		{"mTLS without identities", mtls(), false},
		{"mTLS never matches uid 0", Caller{Transport: TransportMTLS, UID: 0, GID: 0}, false},
		{"mTLS never matches uid 1001", Caller{Transport: TransportMTLS, UID: 1001, Identities: []string{"spiffe://example.org/nobody"}}, false},
		{"unix uid", Caller{Transport: TransportUnix, UID: 1001, GID: 9}, true},
		{"unix, zero transport", Caller{UID: 1001, GID: 9}, true},
		{"unix never matches identities", Caller{Transport: TransportUnix, UID: 5, GID: 9, Identities: []string{"spiffe://example.org/billing/api"}}, false},
		{"no transport, identities only", Caller{UID: 1001, Identities: []string{"spiffe://example.org/billing/api"}}, false},
		{"unknown transport", Caller{Transport: "vsock", UID: 1001}, false},
	}
	for _, tc := range cases {
		if got := l.Permits(tc.c); got != tc.want {
			t.Errorf("%s: Permits(%+v) = %v, want %v", tc.name, tc.c, got, tc.want)
		}
	}

	// A list of identities only never admits a Unix caller, root included.
	ids, err := NewList(Spec{Identities: []string{"spiffe://example.org/*"}}, fakeGroups{0: {0}})
	if err != nil {
		t.Fatal(err)
	}
	if ids.Permits(Caller{Transport: TransportUnix}) || ids.Permits(Caller{}) {
		t.Error("an identity-only list permits uid 0")
	}
	if !ids.Permits(mtls("spiffe://example.org/anything/at/all")) {
		t.Error("trust-domain wildcard refuses an identity of its domain")
	}
}

func TestIdentityRulesAreValidated(t *testing.T) {
	bad := []string{
		"",
		" spiffe://example.org/x",
		"*",
		"*.example.org",
		"spiffe://*",
		"spiffe://example.org/*/x",
		"spiffe://example.org/x*",
		"spiffe://example.org/x?y=1",
		"spiffe://example.org/x#f",
		"spiffe:///*",
		"not a name",
		"exa mple.org",
		"://nothing",
		// Compared as written, and no SPIFFE ID has an upper-case trust
		// domain: a rule that could never match.
		"spiffe://Example.org/x",
		"spiffe://EXAMPLE.ORG/*",
	}
	for _, rule := range bad {
		if _, err := NewList(Spec{Identities: []string{rule}}, nil); err == nil {
			t.Errorf("identity rule %q accepted", rule)
		}
	}
	for _, rule := range []string{"spiffe://example.org/x", "spiffe://example.org/*", "billing.example.org", "urn:x:y", "https://host.example/a/*"} {
		if _, err := NewList(Spec{Identities: []string{rule}}, nil); err != nil {
			t.Errorf("identity rule %q: %v", rule, err)
		}
	}
}

// A wildcard identity rule matches URIs "below" its path, "nor a path with
// an empty, "." or ".." segment" (Spec.Identities). A segment written with
// percent-encoding is the same segment (RFC 3986 §6.2.2.2): "%2e%2e" is
// "..", and "spiffe://example.org/billing/%2e%2e/admin" is
// "spiffe://example.org/admin", which "spiffe://example.org/billing/*" must
// not match.
func TestWildcardRefusesEncodedDotSegments(t *testing.T) {
	l, err := NewList(Spec{Identities: []string{"spiffe://example.org/billing/*"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, raw := range []string{
		"spiffe://example.org/billing/%2e%2e/admin",
		"spiffe://example.org/billing/%2E%2E",
		"spiffe://example.org/billing/api/%2e/x",
		"spiffe://example.org/billing/a%2F..%2Fadmin",
	} {
		u, err := url.Parse(raw) // as crypto/x509 parses a URI SAN
		if err != nil {
			t.Fatal(err)
		}
		ids := certIdentities(&x509.Certificate{URIs: []*url.URL{u}})
		if l.Permits(Caller{Transport: TransportMTLS, Identities: ids}) {
			t.Errorf("billing/* permits a certificate with URI SAN %s (identity %q)", raw, ids)
		}
	}
	u, _ := url.Parse("spiffe://example.org/billing/api%20v2")
	if !l.Permits(Caller{Transport: TransportMTLS, Identities: certIdentities(&x509.Certificate{URIs: []*url.URL{u}})}) {
		t.Error("billing/* refuses billing/api%20v2")
	}
}
