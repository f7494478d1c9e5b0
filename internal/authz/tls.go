package authz

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc/credentials"

	"github.com/keyd-dev/keyd/internal/secretfile"
)

// Transports a Caller can arrive on.
const (
	// TransportUnix: the Unix socket; the caller is its SO_PEERCRED uid/gid.
	TransportUnix = "unix"
	// TransportMTLS: TCP with mutual TLS; the caller is the identity of its
	// verified client certificate.
	TransportMTLS = "mtls"
)

// MTLSAuthInfo carries an mTLS caller through gRPC's peer information, next
// to the TLS connection state.
type MTLSAuthInfo struct {
	credentials.TLSInfo
	Caller Caller

	// cert rechecks the connection's client certificate at each call;
	// nil (an AuthInfo built by hand) checks nothing.
	cert *connCert
}

// callerOf returns the caller an AuthInfo of this package carries.
func callerOf(ai credentials.AuthInfo) (Caller, error) {
	switch ai := ai.(type) {
	case AuthInfo:
		return ai.Caller, nil
	case *AuthInfo:
		if ai != nil {
			return ai.Caller, nil
		}
	case MTLSAuthInfo:
		return ai.caller()
	case *MTLSAuthInfo:
		if ai != nil {
			return ai.caller()
		}
	}
	return Caller{}, ErrNoCredentials
}

// caller returns the connection's caller if its client certificate would
// still pass the handshake now.
func (ai MTLSAuthInfo) caller() (Caller, error) {
	if ai.cert != nil {
		if err := ai.cert.check(); err != nil {
			return Caller{}, err
		}
	}
	return ai.Caller, nil
}

func mtlsString(ids []string) string {
	if len(ids) == 0 {
		return "mtls (no identity)"
	}
	return strings.Join(ids, ",")
}

// Principal names the caller for per-caller accounting (rate limits,
// metrics): "uid:1001" for a Unix caller, "id:" and its first identity
// ("id:spiffe://example.org/billing") for an mTLS caller. Two mTLS callers
// never share a principal with each other's or any Unix caller's.
func (c Caller) Principal() string {
	if c.Transport == TransportMTLS {
		if len(c.Identities) == 0 {
			return "id:"
		}
		return "id:" + c.Identities[0]
	}
	return fmt.Sprintf("uid:%d", c.UID)
}

// TLSConfig names the PEM files of the mutual TLS listener.
type TLSConfig struct {
	// CertFile and KeyFile are the server's certificate (chain) and
	// private key.
	CertFile, KeyFile string
	// ClientCAFile is the bundle of CA certificates that issue client
	// certificates (a SPIFFE trust bundle, say). Every certificate it
	// issues gets through the handshake; the allow lists decide the rest,
	// so use CAs that issue to keyd's callers only.
	ClientCAFile string
	// Logger, when set, logs reloads of the files.
	Logger *slog.Logger
	// Now is the clock certificates are checked against; nil means
	// time.Now.
	Now func() time.Time
}

// MTLSCredentials returns gRPC transport credentials for keyd's TCP
// listener: TLS 1.3 only, a client certificate required and verified
// against the ClientCAFile bundle (with the client-authentication extended
// key usage when the certificate lists any), no session resumption. The
// caller of a connection is the verified leaf certificate's identities:
// its URI SANs (SPIFFE IDs such as spiffe://example.org/billing) first, then
// its DNS SANs, in lower case; a certificate with neither is refused with
// ErrNoCredentials. FromContext returns that Caller (Transport
// TransportMTLS); allow lists match it by Spec.Identities only.
//
// A connection lives longer than the checks of its handshake: FromContext
// checks its certificate again at every call, and answers ErrNoCredentials
// once the certificate (or a certificate of its chain) has expired, or once
// the client CA bundle, reloaded (calls look at the files at most once a
// second, lookEvery), no longer has a CA that issued it. A client told so
// reconnects with a current certificate.
//
// The key file must be private to keyd (see secretfile.Check: mode 0600,
// or 0640 with keyd's group). The three files are read now, and read again
// by the first handshake after any of them changes (mtime, size, mode or
// inode), so short-lived certificates renewed on disk by an agent such as
// spiffe-helper take effect without a restart. A change that does not load
// (a half-written file, a key that does not match the certificate, an
// expired server certificate, a key file others may read) is logged and
// ignored: the previous certificates stay in use and the load is retried at
// the next change.
//
// An error names the file at fault; the credentials are for servers only.
func MTLSCredentials(cfg TLSConfig) (credentials.TransportCredentials, error) {
	if cfg.CertFile == "" || cfg.KeyFile == "" || cfg.ClientCAFile == "" {
		return nil, errors.New("mtls: cert, key and client CA files are all required")
	}
	r := &tlsReloader{cfg: cfg, log: cfg.Logger}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	st := r.stamps()
	cur, err := r.load(r.now())
	if err != nil {
		return nil, err
	}
	r.cur, r.stamp = cur, st
	base := cur.Clone()
	base.GetConfigForClient = r.configForClient
	return mtlsCreds{TransportCredentials: credentials.NewTLS(base), r: r}, nil
}

// serverTLSConfig is the fixed part of every handshake's configuration.
func serverTLSConfig(cert tls.Certificate, clientCAs *x509.CertPool, now func() time.Time) *tls.Config {
	return &tls.Config{
		Time:                   now,
		MinVersion:             tls.VersionTLS13,
		ClientAuth:             tls.RequireAndVerifyClientCert,
		ClientCAs:              clientCAs,
		Certificates:           []tls.Certificate{cert},
		SessionTicketsDisabled: true, // every connection is verified against the current CAs
	}
}

type tlsReloader struct {
	cfg TLSConfig
	log *slog.Logger

	mu     sync.Mutex
	cur    *tls.Config
	stamp  [3]fileStamp
	looked time.Time // when current last looked at the files
}

// lookEvery bounds how often the certificate checks of calls on open
// connections look at the three files (a stat each): a stat of a path on
// every call cost keyd a tenth of its signing throughput on the audit log
// (see audit.fileWatch). A CA taken out of the bundle is noticed by open
// connections within it; a new handshake always looks.
const lookEvery = time.Second

type fileStamp struct {
	mtime    time.Time
	size     int64
	mode     os.FileMode // a chmod may make a refused key file loadable
	dev, ino uint64
	err      bool
}

func (r *tlsReloader) stamps() [3]fileStamp {
	var s [3]fileStamp
	for i, p := range []string{r.cfg.CertFile, r.cfg.KeyFile, r.cfg.ClientCAFile} {
		fi, err := os.Stat(p)
		if err != nil {
			s[i].err = true
			continue
		}
		s[i].mtime, s[i].size, s[i].mode = fi.ModTime(), fi.Size(), fi.Mode()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			s[i].dev, s[i].ino = uint64(st.Dev), st.Ino
		}
	}
	return s
}

func (r *tlsReloader) now() time.Time {
	if r.cfg.Now != nil {
		return r.cfg.Now()
	}
	return time.Now()
}

// configForClient returns the configuration of one handshake, reloading
// the files first if they changed.
func (r *tlsReloader) configForClient(*tls.ClientHelloInfo) (*tls.Config, error) {
	return r.current(), nil
}

// recent is current, looking at the files only if lookEvery has passed
// since the last look.
func (r *tlsReloader) recent() *tls.Config {
	r.mu.Lock()
	cur, fresh := r.cur, time.Since(r.looked) < lookEvery
	r.mu.Unlock()
	if fresh {
		return cur
	}
	return r.current()
}

// clientCAs returns the client CA bundle in use, without reloading.
func (r *tlsReloader) clientCAs() *x509.CertPool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur.ClientCAs
}

// current returns the configuration in use, reloading the files first if
// they changed.
func (r *tlsReloader) current() *tls.Config {
	looked := time.Now()
	st := r.stamps()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.looked = looked
	if st != r.stamp {
		r.stamp = st
		if c, err := r.load(r.now()); err != nil {
			r.log.Warn("mtls: certificate files changed but do not load; keeping the previous ones", "err", err.Error())
		} else {
			r.cur = c
			r.log.Info("mtls: certificate files reloaded", "cert", r.cfg.CertFile, "client_ca", r.cfg.ClientCAFile)
		}
	}
	return r.cur
}

func (r *tlsReloader) load(now time.Time) (*tls.Config, error) {
	// The private key must be keyd's alone: whoever reads it can act as
	// this server to keyd's TCP callers.
	fi, err := os.Stat(r.cfg.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("mtls: key: %w", err)
	}
	if err := secretfile.Check("mtls: key", r.cfg.KeyFile, fi); err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(r.cfg.CertFile, r.cfg.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("mtls: cert %s and key %s: %w", r.cfg.CertFile, r.cfg.KeyFile, err)
	}
	if cert.Leaf != nil && now.After(cert.Leaf.NotAfter) {
		return nil, fmt.Errorf("mtls: cert %s expired at %s", r.cfg.CertFile, cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	pool, err := loadCAs(r.cfg.ClientCAFile)
	if err != nil {
		return nil, err
	}
	return serverTLSConfig(cert, pool, r.cfg.Now), nil
}

// loadCAs reads a PEM bundle strictly: every block must be a certificate
// that parses, and there must be at least one.
func loadCAs(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("mtls: client CA bundle: %w", err)
	}
	pool := x509.NewCertPool()
	n := 0
	for rest := b; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			if len(bytes.TrimSpace(rest)) > 0 {
				return nil, fmt.Errorf("mtls: client CA bundle %s: text that is not PEM after certificate %d", path, n)
			}
			break
		}
		if blk.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("mtls: client CA bundle %s: block %d is a %q, want CERTIFICATE", path, n+1, blk.Type)
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("mtls: client CA bundle %s: certificate %d: %w", path, n+1, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, fmt.Errorf("mtls: client CA bundle %s holds no PEM certificate", path)
	}
	return pool, nil
}

// mtlsCreds turns the TLS handshake's verified peer certificate into a
// Caller.
type mtlsCreds struct {
	credentials.TransportCredentials
	r *tlsReloader
}

func (c mtlsCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	// The bundle before and after the handshake: when they are the same,
	// it is the one the handshake verified the certificate against.
	before := c.r.clientCAs()
	conn, ai, err := c.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		return nil, nil, err
	}
	after := c.r.current().ClientCAs
	ti, ok := ai.(credentials.TLSInfo)
	if !ok {
		conn.Close()
		return nil, nil, fmt.Errorf("%w: TLS handshake returned %T", ErrNoCredentials, ai)
	}
	caller, err := callerFromTLS(ti.State)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	cert := &connCert{r: c.r, leaf: ti.State.PeerCertificates[0], intermediates: x509.NewCertPool()}
	for _, ic := range ti.State.PeerCertificates[1:] {
		cert.intermediates.AddCert(ic)
	}
	if before == after {
		cert.verified.Store(newVerified(after, ti.State.VerifiedChains[0]))
	} // else the bundle changed meanwhile: the first call verifies again
	return conn, MTLSAuthInfo{TLSInfo: ti, Caller: caller, cert: cert}, nil
}

// connCert is the client certificate of one connection, checked again at
// each call: a connection outlives its handshake by hours, and neither an
// expired certificate nor a CA taken out of the bundle may go on
// authenticating it.
type connCert struct {
	r             *tlsReloader
	leaf          *x509.Certificate
	intermediates *x509.CertPool // as the client sent them

	// verified is the bundle the certificate last verified against and
	// when that chain is valid; nil: not verified against any yet.
	verified atomic.Pointer[verifiedChain]
}

type verifiedChain struct {
	roots               *x509.CertPool
	notBefore, notAfter time.Time
}

// newVerified records chain, verified against roots, and the time during
// which every certificate of it is valid.
func newVerified(roots *x509.CertPool, chain []*x509.Certificate) *verifiedChain {
	v := &verifiedChain{roots: roots}
	for i, c := range chain {
		if i == 0 || c.NotBefore.After(v.notBefore) {
			v.notBefore = c.NotBefore
		}
		if i == 0 || c.NotAfter.Before(v.notAfter) {
			v.notAfter = c.NotAfter
		}
	}
	return v
}

// check reports, wrapping ErrNoCredentials, why the certificate would not
// pass the handshake now. While the bundle is the one it was verified
// against and the chain is valid, that costs no signature check.
func (c *connCert) check() error {
	now := c.r.now()
	roots := c.r.recent().ClientCAs
	if v := c.verified.Load(); v != nil && v.roots == roots && !now.Before(v.notBefore) && !now.After(v.notAfter) {
		return nil
	}
	chains, err := c.leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: c.intermediates,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return fmt.Errorf("%w: the connection's client certificate %s no longer verifies against %s (%w); reconnect with a current certificate",
			ErrNoCredentials, certName(c.leaf), c.r.cfg.ClientCAFile, err)
	}
	c.verified.Store(newVerified(roots, chains[0]))
	return nil
}

// certName names a certificate in messages: its first identity, else its
// subject.
func certName(c *x509.Certificate) string {
	if ids := certIdentities(c); len(ids) > 0 {
		return ids[0]
	}
	return strconv.Quote(c.Subject.String())
}

func (mtlsCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("mtls: keyd's mTLS credentials are for its server only")
}

func (c mtlsCreds) Clone() credentials.TransportCredentials {
	return mtlsCreds{TransportCredentials: c.TransportCredentials.Clone(), r: c.r}
}

// callerFromTLS builds the caller from a completed handshake. Only a
// certificate the handshake verified counts.
func callerFromTLS(st tls.ConnectionState) (Caller, error) {
	if len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
		return Caller{}, fmt.Errorf("%w: no verified client certificate", ErrNoCredentials)
	}
	leaf := st.VerifiedChains[0][0]
	ids := certIdentities(leaf)
	if len(ids) == 0 {
		return Caller{}, fmt.Errorf("%w: client certificate %q has no URI or DNS subject alternative name", ErrNoCredentials, leaf.Subject.String())
	}
	return Caller{Transport: TransportMTLS, Identities: ids}, nil
}

// certIdentities lists a certificate's URI SANs (with a scheme) and then its
// DNS SANs in lower case, without duplicates. A URI always contains ':', a
// DNS name never does, so the two kinds cannot be confused.
func certIdentities(c *x509.Certificate) []string {
	var ids []string
	for _, u := range c.URIs {
		if u == nil || u.Scheme == "" {
			continue
		}
		if s := u.String(); !slices.Contains(ids, s) {
			ids = append(ids, s)
		}
	}
	for _, d := range c.DNSNames {
		d = strings.ToLower(d)
		if d != "" && !strings.Contains(d, ":") && !slices.Contains(ids, d) {
			ids = append(ids, d)
		}
	}
	return ids
}

// addIdentity adds an identity rule (see Spec.Identities).
func (l *List) addIdentity(rule string) error {
	bad := func(why string) error { return fmt.Errorf("identity %q: %s", rule, why) }
	switch {
	case rule == "":
		return bad("empty")
	case strings.TrimSpace(rule) != rule:
		return bad("leading or trailing space")
	case !strings.Contains(rule, ":"):
		// A DNS name.
		if !validDNSName(rule) {
			return bad("not a URI (scheme://...) nor a DNS name; the only wildcard is a trailing /* on a URI")
		}
		l.ids = append(l.ids, strings.ToLower(rule))
		return nil
	}
	base, wildcard := strings.CutSuffix(rule, "/*")
	u, err := url.Parse(base)
	switch {
	case err != nil:
		return bad(err.Error())
	case u.Scheme == "" || u.Opaque != "" && wildcard:
		return bad("want scheme://authority/path, such as spiffe://example.org/billing")
	case strings.Contains(base, "*"):
		return bad("the only wildcard is a trailing /* (spiffe://example.org/billing/*)")
	case u.RawQuery != "" || u.Fragment != "" || strings.ContainsAny(base, "?#"):
		return bad("a query or fragment is never part of an identity")
	case wildcard && u.Host == "":
		return bad("a wildcard needs an authority: spiffe://trust-domain/path/*")
	case u.Scheme == "spiffe" && u.Host != strings.ToLower(u.Host):
		// Identities are compared as written: a rule no SPIFFE ID
		// can match would refuse its callers without saying why.
		return bad("a SPIFFE trust domain is lower case (SPIFFE ID spec); write " + strings.ToLower(u.Host))
	}
	if wildcard {
		l.idPrefixes = append(l.idPrefixes, u.String()+"/")
	} else {
		l.ids = append(l.ids, u.String())
	}
	return nil
}

// permitsIdentity reports whether any of ids is on the list.
func (l *List) permitsIdentity(ids []string) bool {
	_, ok := l.matchIdentity(ids)
	return ok
}

// AllowedIdentity returns the identity of mTLS caller c that the list
// permits (the first, when several are), or "" when it permits none of
// them or c is no mTLS caller. A certificate may carry several identities:
// the audit names the one a decision rested on, not merely the first.
func (l *List) AllowedIdentity(c Caller) string {
	if l == nil || c.Transport != TransportMTLS {
		return ""
	}
	id, _ := l.matchIdentity(c.Identities)
	return id
}

// matchIdentity returns the first of ids that is on the list.
func (l *List) matchIdentity(ids []string) (string, bool) {
	for _, id := range ids {
		if slices.Contains(l.ids, id) {
			return id, true
		}
		for _, p := range l.idPrefixes {
			if rest, ok := strings.CutPrefix(id, p); ok && cleanPath(rest) {
				return id, true
			}
		}
	}
	return "", false
}

// cleanPath reports whether rest is one or more path segments, none empty,
// "." or "..", without query or fragment. A segment counts as what it
// decodes to (RFC 3986 §6.2.2.2: "%2e%2e" is ".."), and one that decodes to
// a '/' or does not decode is refused.
func cleanPath(rest string) bool {
	if rest == "" || strings.ContainsAny(rest, "?#") {
		return false
	}
	for seg := range strings.SplitSeq(rest, "/") {
		d, err := url.PathUnescape(seg)
		if err != nil || d == "" || d == "." || d == ".." || strings.Contains(d, "/") {
			return false
		}
	}
	return true
}

// validDNSName accepts host names such as billing.example.org: labels of
// letters, digits, '-' and '_', separated by dots.
func validDNSName(s string) bool {
	if len(s) > 253 {
		return false
	}
	for label := range strings.SplitSeq(s, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return false
			}
		}
	}
	return true
}
