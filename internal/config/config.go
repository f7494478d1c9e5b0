// Package config reads and validates keyd's YAML configuration.
//
// Decoding is strict: an unknown field is an error, so a typo never silently
// turns a setting off. Validate reports every problem at once, each prefixed
// with where it is ("keysets[1].audience: ..."), and is what `keyd
// check-config` runs.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/keyd-dev/keyd/internal/authz"
	"github.com/keyd-dev/keyd/internal/policy"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/pkcs11"
	"github.com/keyd-dev/keyd/keystore/tpm"
	"github.com/keyd-dev/keyd/rotation"
)

// Config is the whole configuration file.
type Config struct {
	// Socket is the path of the Unix socket the gRPC API listens on.
	Socket string `yaml:"socket"`
	// SocketMode is the socket's permission bits, an octal string ("0660").
	SocketMode string `yaml:"socket_mode"`
	// SocketGroup optionally names the group that owns the socket.
	SocketGroup string `yaml:"socket_group"`
	// AdminSocket, when set, is a separate socket (mode 0600, owned by
	// keyd's user) that alone serves KeyAdminService (rotate, revoke); the
	// main socket then serves KeyService only.
	AdminSocket string `yaml:"admin_socket"`
	// StateDir holds the key metadata (and the soft keystore's keys).
	StateDir string `yaml:"state_dir"`
	// AuditLog is the file every sign decision is appended to, one JSON line each.
	AuditLog string `yaml:"audit_log"`
	// AuditSyslog, when set, also sends every record to syslog; a
	// signature is then released when at least one of the two sinks has
	// its record (the log falls over to syslog, and back).
	AuditSyslog *AuditSyslog `yaml:"audit_syslog"`
	// Admins may call KeyAdminService (rotate, revoke). Default: root and
	// the daemon's own uid.
	Admins *Allow `yaml:"admins"`
	// HTTP optionally serves /jwks/{keyset}.json (for an authorization
	// server's jwks_uri) and /healthz over HTTP.
	HTTP *HTTP `yaml:"http"`
	// TCP optionally serves the gRPC API on TCP, with mutual TLS only.
	TCP *TCP `yaml:"tcp"`
	// Limits bound what callers can make the daemon do.
	Limits Limits `yaml:"limits"`
	// LogLevel is debug, info (default), warn or error.
	LogLevel string `yaml:"log_level"`
	// Backend says where keys live: exactly one of its members is set.
	Backend Backend `yaml:"backend"`
	// KeySets are the named, rotating series of keys callers sign with.
	KeySets []KeySet `yaml:"keysets"`
}

// TCP is the mutual-TLS listener: TLS 1.3, a client certificate from
// ClientCAFile required; callers are matched by the certificate's URI or DNS
// SANs against the allow lists' identities.
type TCP struct {
	Listen       string `yaml:"listen"`
	CertFile     string `yaml:"cert_file"`
	KeyFile      string `yaml:"key_file"`
	ClientCAFile string `yaml:"client_ca_file"`
}

// Limits bound what callers can make the daemon do.
type Limits struct {
	// SignRate is how many Sign requests per second each caller (uid) may
	// make; 0 means no limit. Past it: RESOURCE_EXHAUSTED.
	SignRate float64 `yaml:"sign_rate"`
	// SignBurst is how many Sign requests a caller may make at once above
	// the rate (default: one second's worth).
	SignBurst int `yaml:"sign_burst"`
	// MaxConnections bounds the open connections of each listener: the
	// socket, tcp and http (default 1024; the admin socket has 64);
	// further clients wait in the kernel's accept queue.
	MaxConnections int `yaml:"max_connections"`
	// MaxConnectionsPerUID bounds the open connections of one local user
	// (default a quarter of MaxConnections), so that one cannot take them
	// all; a connection past it is closed at once.
	MaxConnectionsPerUID int `yaml:"max_connections_per_uid"`
}

// AuditSyslog is the audit log's second sink.
type AuditSyslog struct {
	// Address is the syslog socket (default /dev/log, which journald
	// serves too).
	Address string `yaml:"address"`
	// Tag is the syslog tag (default keyd-audit).
	Tag string `yaml:"tag"`
}

// HTTP is the optional HTTP listener.
type HTTP struct {
	// Listen is host:port, e.g. 127.0.0.1:8089.
	Listen string `yaml:"listen"`
	// Metrics serves /metrics on this listener (default true). Set it
	// false when the listener is reachable by those who may fetch the JWK
	// Set but should not see keyd's metrics (key set names, rates).
	Metrics *bool `yaml:"metrics"`
}

// ServesMetrics reports whether /metrics is served.
func (h *HTTP) ServesMetrics() bool { return h.Metrics == nil || *h.Metrics }

// Allow is an allow list of local callers, matched against the peer
// credentials of the socket connection.
type Allow struct {
	UIDs   []int    `yaml:"uids"`
	GIDs   []int    `yaml:"gids"`
	Users  []string `yaml:"users"`
	Groups []string `yaml:"groups"`
	// Identities are client-certificate identities (URI or DNS SANs) of
	// callers over the mutual-TLS listener; "spiffe://td/path/*" matches
	// every path below.
	Identities []string `yaml:"identities"`
}

// Empty reports whether the list allows nobody.
func (a Allow) Empty() bool {
	return !a.local() && len(a.Identities) == 0
}

// local reports whether a lists local callers (uids, gids, users, groups).
func (a Allow) local() bool {
	return len(a.UIDs) > 0 || len(a.GIDs) > 0 || len(a.Users) > 0 || len(a.Groups) > 0
}

// Backend selects the key store: exactly one member is set.
type Backend struct {
	// Soft keeps keys in files under StateDir/keys. For development only.
	Soft *SoftBackend `yaml:"soft"`
	// TPM keeps keys in a TPM 2.0: only TPM-encrypted blobs are on disk.
	TPM *TPMBackend `yaml:"tpm"`
	// PKCS11 keeps keys in a PKCS#11 token (an HSM, or SoftHSM2 for tests).
	PKCS11 *PKCS11Backend `yaml:"pkcs11"`
}

// PKCS11Backend configures the PKCS#11 keystore. The PIN comes from a file
// or an environment variable, never from this file.
type PKCS11Backend struct {
	// Module is the absolute path of the PKCS#11 library.
	Module string `yaml:"module"`
	// URI selects the token (RFC 7512): pkcs11:token=keyd, or by serial.
	URI string `yaml:"uri"`
	// PINFile holds the user PIN (mode 0600 or 0640).
	PINFile string `yaml:"pin_file"`
	// PINEnv names an environment variable holding the user PIN.
	PINEnv string `yaml:"pin_env"`
	// MaxSessions bounds the session pool (default min(GOMAXPROCS, 4)).
	MaxSessions int `yaml:"max_sessions"`
	// SessionCopies, true by default, signs with session copies of the
	// keys made inside the token (C_CopyObject); false signs with the
	// token objects.
	SessionCopies *bool `yaml:"session_copies"`
	// OpenTimeout bounds opening the token at start: loading and
	// initializing the module, logging in and the first health probe
	// (default 1m). Past it keyd exits (status 1) so that its supervisor
	// starts it again, rather than hang on a module that does not answer.
	OpenTimeout Duration `yaml:"open_timeout"`
}

// DefaultPKCS11OpenTimeout is backend.pkcs11.open_timeout's default.
const DefaultPKCS11OpenTimeout = time.Minute

// TPMBackend configures the TPM 2.0 keystore.
type TPMBackend struct {
	// Device is the TPM device (default /dev/tpmrm0 when Address is empty).
	Device string `yaml:"device"`
	// Address is a TPM simulator's command port: tcp://127.0.0.1:2321 or
	// unix:///path (swtpm).
	Address string `yaml:"address"`
	// OwnerAuthFile holds the owner hierarchy's authorization, if it has one.
	OwnerAuthFile string `yaml:"owner_auth_file"`
	// Dir overrides where key blobs live (default StateDir/tpm).
	Dir string `yaml:"dir"`
	// CommandTimeout bounds each TPM command (default 5s).
	CommandTimeout Duration `yaml:"command_timeout"`
	// KeygenTimeout bounds RSA key generation in the TPM (default 2m).
	KeygenTimeout Duration `yaml:"keygen_timeout"`
}

// SoftBackend configures the software keystore.
type SoftBackend struct {
	// Dir overrides the key directory (default StateDir/keys).
	Dir string `yaml:"dir"`
}

// KeySet declares one key set.
type KeySet struct {
	Name    string `yaml:"name"`
	Purpose string `yaml:"purpose"`
	Alg     string `yaml:"alg"`
	// RSABits is 2048 (default) or 3072, for RS256 and PS256.
	RSABits int   `yaml:"rsa_bits"`
	Allow   Allow `yaml:"allow"`

	// ClientID is iss and sub of client assertions.
	ClientID string `yaml:"client_id"`
	// Audience is the only aud of client assertions: the authorization
	// server's issuer, or its token endpoint for servers that demand that.
	Audience string `yaml:"audience"`
	// Typ is the typ header of client assertions (default
	// client-authentication+jwt; "" sends none).
	Typ *string `yaml:"typ"`
	// MaxLifetime bounds exp - now for client assertions and JWTs (default 5m).
	MaxLifetime Duration `yaml:"max_lifetime"`
	// Issuers are the iss values a jwt key set may sign.
	Issuers []string `yaml:"issuers"`
	// IatSkew is the accepted distance of a caller-supplied iat from now
	// (default 60s).
	IatSkew Duration `yaml:"iat_skew"`
	// Rotation is the key set's schedule; without it keys change only when
	// an operator rotates them (drain and retain still apply).
	Rotation *Rotation `yaml:"rotation"`
	// JWKSCache is how long verifiers may cache the JWK Set (default 5m):
	// new keys are published at least this long before they sign
	// (client_assertion, jwt), and the HTTP JWKS says max-age no longer.
	JWKSCache Duration `yaml:"jwks_cache"`
	// TokenLifetime is the lifetime of the access tokens bound to a dpop
	// key set's keys (default 1h): a draining key must keep proving for
	// them until they expire.
	TokenLifetime Duration `yaml:"token_lifetime"`
}

// Rotation is a key set's schedule.
type Rotation struct {
	// Period is how long a key is active.
	Period Duration `yaml:"period"`
	// Prepublish is how long a new key is published before it signs
	// (default: jwks_cache for client_assertion and jwt, 0 for dpop).
	Prepublish *Duration `yaml:"prepublish"`
	// Drain is how long the previous key stays published and usable
	// (default: token_lifetime for dpop; max_lifetime + iat_skew +
	// jwks_cache otherwise).
	Drain *Duration `yaml:"drain"`
	// Retain is how long an unpublished key stays in the backend before it
	// is destroyed (default 24h).
	Retain *Duration `yaml:"retain"`
}

// MaxPublishedKeys bounds how many keys of one key set a schedule keeps
// published at once (next, active and draining): generous for any real
// schedule (five-minute DPoP keys for one-hour tokens keep 13), but a
// period of milliseconds against a drain of an hour would pile up
// millions of keys in the backend and the JWK Set.
const MaxPublishedKeys = 32

// Defaults of the schedule.
const (
	DefaultJWKSCache     = 5 * time.Minute
	DefaultTokenLifetime = time.Hour
	DefaultRetain        = 24 * time.Hour
)

// Duration is a time.Duration written as a Go duration string ("5m").
type Duration time.Duration

// UnmarshalYAML implements yaml.Unmarshaler.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	// A *yaml.TypeError lets the decoder go on, so that the problem is
	// reported with the rest of the file's (see Parse).
	bad := func(format string, args ...any) error {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d, column %d: ", n.Line, n.Column) + fmt.Sprintf(format, args...)}}
	}
	var s string
	if err := n.Decode(&s); err != nil {
		return bad("want a duration such as 5m or 90s")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		hint := ""
		if strings.HasSuffix(s, "d") {
			hint = " (durations have no days: write 24h for 1d)"
		}
		return bad("%q is not a duration such as 5m or 90s%s", s, hint)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML implements yaml.Marshaler.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// Load reads and validates the configuration file at path.
func Load(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	defer f.Close()
	// One byte more than the cap tells a file of the cap from a longer one
	// (or a device such as /dev/zero, which never ends).
	b, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	if len(b) > maxConfigSize {
		return nil, fmt.Errorf("read config: %s is longer than %d KiB; is it the configuration?", path, maxConfigSize>>10)
	}
	return Parse(b, path)
}

// maxConfigSize bounds a configuration file.
const maxConfigSize = 1 << 20

// Parse decodes and validates a configuration. name is used in messages.
func Parse(b []byte, name string) (*Config, error) {
	var c Config
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var problems []error
	if err := dec.Decode(&c); err != nil {
		var te *yaml.TypeError
		switch {
		case errors.Is(err, io.EOF):
			return nil, fmt.Errorf("%s: the configuration is empty", name)
		case errors.As(err, &te):
			// Unknown fields and type mismatches: yaml.v3 decodes the rest,
			// so report these together with everything Validate finds.
			for _, e := range te.Errors {
				problems = append(problems, errors.New(strings.TrimPrefix(e, "yaml: ")))
			}
		default:
			return nil, fmt.Errorf("%s: %w", name, err)
		}
	}
	// Decode reads the first document only: a second one would be
	// silently ignored, settings and all.
	var extra yaml.Node
	switch err := dec.Decode(&extra); {
	case errors.Is(err, io.EOF):
	case err != nil:
		problems = append(problems, errors.New(strings.TrimPrefix(err.Error(), "yaml: ")))
	case len(extra.Content) > 0 && extra.Content[0].Tag != "!!null":
		problems = append(problems, errors.New("a second YAML document (after \"---\"): keyd reads one document per file"))
	}
	c.applyDefaults()
	if err := c.Validate(); err != nil {
		problems = append(problems, err)
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("%s: invalid configuration:\n%w", name, errors.Join(problems...))
	}
	return &c, nil
}

func (c *Config) applyDefaults() {
	if c.SocketMode == "" {
		c.SocketMode = "0660"
	}
	if c.AuditLog == "" && c.StateDir != "" {
		c.AuditLog = filepath.Join(c.StateDir, "audit.jsonl")
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.Limits.MaxConnections == 0 {
		c.Limits.MaxConnections = 1024
	}
	if c.Limits.MaxConnectionsPerUID == 0 {
		c.Limits.MaxConnectionsPerUID = max(c.Limits.MaxConnections/4, 1)
	}
}

// Validate checks the configuration and returns every problem at once,
// joined with errors.Join.
func (c *Config) Validate() error {
	var errs []error
	add := func(where, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", where, fmt.Sprintf(format, args...)))
	}
	switch {
	case c.Socket == "":
		add("socket", "required: the path of the Unix socket to listen on")
	case strings.HasPrefix(c.Socket, "@") || strings.ContainsRune(c.Socket, 0):
		add("socket", "abstract sockets are not allowed: they have no file permissions")
	case !filepath.IsAbs(c.Socket):
		add("socket", "%q must be an absolute path", c.Socket)
	case len(c.Socket) > 107:
		add("socket", "path is %d bytes; Unix socket paths are limited to 107", len(c.Socket))
	}
	if _, err := c.Mode(); err != nil {
		add("socket_mode", "%v", err)
	}
	if c.StateDir == "" {
		add("state_dir", "required: the directory for key metadata")
	} else if !filepath.IsAbs(c.StateDir) {
		add("state_dir", "%q must be an absolute path", c.StateDir)
	}
	if a := c.AdminSocket; a != "" {
		switch {
		case strings.HasPrefix(a, "@"):
			add("admin_socket", "abstract sockets are not allowed: they have no file permissions")
		case strings.ContainsRune(a, 0):
			add("admin_socket", "abstract sockets are not allowed: they have no file permissions")
		case !filepath.IsAbs(a):
			add("admin_socket", "%q must be an absolute path", a)
		case len(a) > 107:
			add("admin_socket", "path is %d bytes; Unix socket paths are limited to 107", len(a))
		case a == c.Socket:
			add("admin_socket", "must differ from socket")
		}
	}
	if a := c.AuditSyslog; a != nil && a.Address != "" && !filepath.IsAbs(a.Address) {
		add("audit_syslog.address", "%q must be the absolute path of a Unix datagram socket", a.Address)
	}
	if c.AuditLog != "" && !filepath.IsAbs(c.AuditLog) {
		add("audit_log", "%q must be an absolute path", c.AuditLog)
	}
	if c.HTTP != nil {
		if !validListen(c.HTTP.Listen) {
			add("http.listen", "%q: want host:port, e.g. 127.0.0.1:8089", c.HTTP.Listen)
		}
	}
	if c.HTTP != nil && c.TCP != nil && sameListen(c.HTTP.Listen, c.TCP.Listen) {
		add("http.listen", "%q: the same port as tcp.listen %q; the two listeners need ports of their own", c.HTTP.Listen, c.TCP.Listen)
	}
	if t := c.TCP; t != nil {
		if !validListen(t.Listen) {
			add("tcp.listen", "%q: want host:port, e.g. 0.0.0.0:7443", t.Listen)
		}
		for name, f := range map[string]string{"cert_file": t.CertFile, "key_file": t.KeyFile, "client_ca_file": t.ClientCAFile} {
			switch {
			case f == "":
				add("tcp."+name, "required: keyd serves TCP only with mutual TLS")
			case !filepath.IsAbs(f):
				add("tcp."+name, "%q must be an absolute path", f)
			}
		}
	}
	if c.Limits.SignRate < 0 || c.Limits.SignBurst < 0 || c.Limits.MaxConnections < 0 || c.Limits.MaxConnectionsPerUID < 0 {
		add("limits", "values must not be negative")
	}
	if r := c.Limits.SignRate; math.IsNaN(r) || math.IsInf(r, 0) {
		add("limits.sign_rate", "%v is not a number of requests per second (0 means no limit)", r)
	}
	if c.Limits.SignBurst > 0 && c.Limits.SignRate == 0 {
		add("limits.sign_burst", "needs limits.sign_rate: without a rate there is no limit for a burst to exceed")
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		add("log_level", "%q: want debug, info, warn or error", c.LogLevel)
	}
	if c.Admins != nil {
		for _, e := range c.Admins.validate() {
			add("admins", "%v", e)
		}
		if len(c.Admins.Identities) > 0 {
			// The mutual-TLS listener serves KeyService only.
			add("admins.identities", "admin calls (rotate, revoke) are served on the Unix socket (or admin_socket) only, never over tcp: list uids, gids, users or groups")
		}
	}
	switch n := c.Backend.count(); {
	case n == 0:
		add("backend", "choose a backend: soft: {}, pkcs11: {...} or tpm: {...}")
	case n > 1:
		add("backend", "choose one backend, not %d", n)
	}
	if b := c.Backend.Soft; b != nil && b.Dir != "" && !filepath.IsAbs(b.Dir) {
		add("backend.soft.dir", "%q must be an absolute path", b.Dir)
	}
	if b := c.Backend.PKCS11; b != nil {
		switch {
		case b.Module == "":
			add("backend.pkcs11.module", "required: the absolute path of the PKCS#11 library")
		case !filepath.IsAbs(b.Module):
			add("backend.pkcs11.module", "%q must be an absolute path", b.Module)
		}
		if b.URI == "" {
			add("backend.pkcs11.uri", "required: the token, as an RFC 7512 URI such as pkcs11:token=keyd")
		} else if u, err := pkcs11.ParseURI(b.URI); err != nil {
			add("backend.pkcs11.uri", "%v", err)
		} else if u.Token == "" && u.Serial == "" && !u.HasSlotID {
			add("backend.pkcs11.uri", "%q: name the token with token=, serial= or slot-id=", b.URI)
		}
		switch {
		case b.PINFile == "" && b.PINEnv == "":
			add("backend.pkcs11", "set pin_file or pin_env: the PIN is never written in the configuration")
		case b.PINFile != "" && b.PINEnv != "":
			add("backend.pkcs11", "set pin_file or pin_env, not both")
		case b.PINFile != "" && !filepath.IsAbs(b.PINFile):
			add("backend.pkcs11.pin_file", "%q must be an absolute path", b.PINFile)
		case b.PINEnv != "" && !envName(b.PINEnv):
			// Not quoted: a value that is no variable name may be the PIN.
			add("backend.pkcs11.pin_env", "must be the name of an environment variable (letters, digits and _, not starting with a digit), such as KEYD_PKCS11_PIN; the PIN goes in that variable, never in the configuration")
		}
		if b.OpenTimeout < 0 {
			add("backend.pkcs11.open_timeout", "must not be negative")
		}
		if b.MaxSessions < 0 || b.MaxSessions > pkcs11.MaxSessionsLimit {
			add("backend.pkcs11.max_sessions", "%d: want 0 (automatic) to %d", b.MaxSessions, pkcs11.MaxSessionsLimit)
		}
	}
	if b := c.Backend.TPM; b != nil {
		if b.Dir != "" && !filepath.IsAbs(b.Dir) {
			add("backend.tpm.dir", "%q must be an absolute path", b.Dir)
		}
		if b.OwnerAuthFile != "" && !filepath.IsAbs(b.OwnerAuthFile) {
			add("backend.tpm.owner_auth_file", "%q must be an absolute path", b.OwnerAuthFile)
		}
		if c.StateDir != "" {
			if err := c.TPMConfig().Validate(); err != nil {
				add("backend.tpm", "%v", err)
			}
		}
	}
	if len(c.KeySets) == 0 {
		add("keysets", "declare at least one key set")
	}
	seen := map[string]int{}
	for i, ks := range c.KeySets {
		where := fmt.Sprintf("keysets[%d]", i)
		if ks.Name != "" {
			where = fmt.Sprintf("keysets[%d] (%s)", i, ks.Name)
		}
		if err := ValidKeySetName(ks.Name); err != nil {
			add(where+".name", "%v", err)
		} else if j, dup := seen[ks.Name]; dup {
			add(where+".name", "%q is already declared by keysets[%d]", ks.Name, j)
		} else {
			seen[ks.Name] = i
		}
		for _, e := range ks.validate() {
			add(where, "%v", e)
		}
		if spec, err := ks.KeySpec(); err == nil && spec.Algorithm == keystore.EdDSA && c.Backend.TPM != nil {
			add(where+".alg", "EdDSA: the tpm backend cannot make EdDSA keys (TPM 2.0 has no Ed25519); use ES256")
		}
		if c.TCP == nil && len(ks.Allow.Identities) > 0 && !ks.Allow.local() {
			add(where+".allow", "only identities, which only callers over the mutual-TLS listener have, and there is no tcp listener: nobody could use this key set; configure tcp or list local uids, gids, users or groups")
		}
	}
	return errors.Join(errs...)
}

// envName reports whether s is a portable environment variable name.
func envName(s string) bool {
	for i, r := range s {
		if !(r == '_' || r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || i > 0 && r >= '0' && r <= '9') {
			return false
		}
	}
	return s != ""
}

// sameListen reports whether listening on a and on b would take the same
// port: the same port number on the same host, or on any host when either
// is a wildcard (empty, 0.0.0.0 or ::). Port 0 picks a free one each time.
func sameListen(a, b string) bool {
	ha, pa, errA := net.SplitHostPort(a)
	hb, pb, errB := net.SplitHostPort(b)
	if errA != nil || errB != nil {
		return false
	}
	na, errA := net.LookupPort("tcp", pa)
	nb, errB := net.LookupPort("tcp", pb)
	if errA != nil || errB != nil || na != nb || na == 0 {
		return false
	}
	wild := func(h string) bool { return h == "" || h == "0.0.0.0" || h == "::" }
	return ha == hb || wild(ha) || wild(hb)
}

// validListen reports whether addr is a host:port a TCP listener can be
// given: a port from 0 to 65535 (or a service name).
func validListen(addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	if err != nil || port == "" {
		return false
	}
	_, err = net.LookupPort("tcp", port)
	return err == nil
}

// ValidKeySetName reports whether name may name a key set: 1 to 40
// characters from [a-z0-9_-], starting with a letter or digit.
func ValidKeySetName(name string) error {
	if name == "" {
		return errors.New("required")
	}
	if len(name) > 40 {
		return fmt.Errorf("%q is longer than 40 characters", name)
	}
	for i, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || (i > 0 && (r == '-' || r == '_'))
		if !ok {
			return fmt.Errorf("%q: use lower-case letters, digits, '-' and '_', starting with a letter or digit", name)
		}
	}
	return nil
}

func (a Allow) validate() []error {
	var errs []error
	// (uid_t)-1 is no id, and a larger value would be cut to 32 bits
	// (1<<32 to uid 0).
	const maxID = 1<<32 - 2
	for _, u := range a.UIDs {
		if u < 0 || u > maxID {
			errs = append(errs, fmt.Errorf("uids: %d is not a uid (0 to %d)", u, maxID))
		}
	}
	for _, g := range a.GIDs {
		if g < 0 || g > maxID {
			errs = append(errs, fmt.Errorf("gids: %d is not a gid (0 to %d)", g, maxID))
		}
	}
	for _, n := range append(append([]string(nil), a.Users...), a.Groups...) {
		if n == "" {
			errs = append(errs, errors.New("users/groups: empty name"))
		}
	}
	// The daemon parses identities at start; a bad one is an error of the
	// file, not of the host.
	if _, err := authz.NewList(authz.Spec{Identities: a.Identities}, nil); err != nil {
		errs = append(errs, fmt.Errorf("identities: %w", err))
	}
	return errs
}

func (ks KeySet) validate() []error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	spec, err := ks.KeySpec()
	if err != nil {
		add("alg: %v", err)
	}
	_ = spec
	if ks.RSABits != 0 && !keystore.Algorithm(ks.Alg).IsRSA() {
		add("rsa_bits: only for RS256 and PS256")
	}
	p, err := ks.Policy()
	if err != nil {
		add("purpose: %v", err)
	} else if err := p.Validate(); err != nil {
		add("%v", err)
	}
	if err == nil {
		errs = append(errs, ks.validateSchedule(p)...)
	}
	if p.Purpose != policy.ClientAssertion {
		if ks.ClientID != "" {
			add("client_id: only for purpose client_assertion")
		}
		if ks.Audience != "" {
			add("audience: only for purpose client_assertion")
		}
		if ks.Typ != nil {
			add("typ: only for purpose client_assertion")
		}
	}
	if p.Purpose != policy.JWT && len(ks.Issuers) > 0 {
		add("issuers: only for purpose jwt")
	}
	if p.Purpose == policy.DPoP && ks.MaxLifetime != 0 {
		add("max_lifetime: not for purpose dpop (proofs are bounded by iat_skew)")
	}
	for _, e := range ks.Allow.validate() {
		add("allow: %v", e)
	}
	if ks.Allow.Empty() {
		add("allow: list the uids, gids, users or groups that may sign with this key set")
	}
	return errs
}

func dur(d *Duration, def time.Duration) time.Duration {
	if d == nil {
		return def
	}
	return time.Duration(*d)
}

func orDefault(d Duration, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return time.Duration(d)
}

// Schedule returns the key set's rotation schedule with its defaults.
func (ks KeySet) Schedule() rotation.Schedule {
	cache := orDefault(ks.JWKSCache, DefaultJWKSCache)
	var s rotation.Schedule
	var prepublish, drain time.Duration
	if ks.Purpose == string(policy.DPoP) {
		drain = orDefault(ks.TokenLifetime, DefaultTokenLifetime)
	} else {
		prepublish = cache
		drain = orDefault(ks.MaxLifetime, policy.DefaultMaxLifetime) + orDefault(ks.IatSkew, policy.DefaultSkew) + cache
	}
	s.Prepublish, s.Drain, s.Retain = prepublish, drain, DefaultRetain
	if r := ks.Rotation; r != nil {
		s.Period = time.Duration(r.Period)
		s.Prepublish = dur(r.Prepublish, prepublish)
		s.Drain = dur(r.Drain, drain)
		s.Retain = dur(r.Retain, DefaultRetain)
	}
	return s
}

// validateSchedule rejects schedules that would break clients.
func (ks KeySet) validateSchedule(p policy.Policy) []error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if ks.JWKSCache < 0 || ks.TokenLifetime < 0 {
		add("jwks_cache and token_lifetime must not be negative")
	}
	if ks.TokenLifetime != 0 && p.Purpose != policy.DPoP {
		add("token_lifetime: only for purpose dpop (the lifetime of DPoP-bound access tokens)")
	}
	s := ks.Schedule()
	if r := ks.Rotation; r != nil {
		if r.Period <= 0 {
			add("rotation.period: required and positive, e.g. 24h")
		}
		for name, d := range map[string]*Duration{"prepublish": r.Prepublish, "drain": r.Drain, "retain": r.Retain} {
			if d != nil && *d < 0 {
				add("rotation.%s: must not be negative", name)
			}
		}
		if r.Retain != nil && *r.Retain == 0 {
			// The lifecycle schedules no destroy for a retain of zero: an
			// unpublished key would stay in the backend for good.
			add("rotation.retain: must be positive: with 0 retired and revoked keys would never be destroyed; write e.g. 1m to destroy them soon after they are unpublished")
		}
		if r.Period > 0 && s.Prepublish >= time.Duration(r.Period) {
			add("rotation.prepublish (%v) must be shorter than rotation.period (%v)", s.Prepublish, time.Duration(r.Period))
		}
		if p := time.Duration(r.Period); p > 0 && s.Drain > 0 {
			// The active key, the draining ones (a new one every period,
			// each for drain) and a next key while it is pre-published.
			n := 1 + s.Drain/p
			if s.Drain%p != 0 {
				n++
			}
			if s.Prepublish > 0 {
				n++
			}
			if n > MaxPublishedKeys {
				add("rotation.period (%v) is too short for rotation.drain (%v): %d keys would be published at once, at most %d are allowed; a key set that rotates much faster than its keys drain piles keys up in the backend and the JWK Set", p, s.Drain, n, MaxPublishedKeys)
			}
		}
	}
	cache := orDefault(ks.JWKSCache, DefaultJWKSCache)
	if ml, sk := orDefault(ks.MaxLifetime, policy.DefaultMaxLifetime), orDefault(ks.IatSkew, policy.DefaultSkew); ml >= 0 && sk >= 0 && cache >= 0 &&
		(ml > math.MaxInt64-sk || ml+sk > math.MaxInt64-cache) {
		add("max_lifetime + iat_skew + jwks_cache overflows")
		return errs
	}
	switch p.Purpose {
	case policy.DPoP:
		if tl := orDefault(ks.TokenLifetime, DefaultTokenLifetime); s.Drain < tl {
			add("rotation.drain (%v) must cover token_lifetime (%v): a DPoP-bound token needs proofs from its key until it expires", s.Drain, tl)
		}
	default:
		if s.Prepublish < cache {
			add("rotation.prepublish (%v) must cover jwks_cache (%v): verifiers must see a new key before it signs", s.Prepublish, cache)
		}
		need := orDefault(ks.MaxLifetime, policy.DefaultMaxLifetime) + orDefault(ks.IatSkew, policy.DefaultSkew)
		if s.Drain < need {
			add("rotation.drain (%v) must cover max_lifetime + iat_skew (%v): tokens signed before a rotation must stay verifiable", s.Drain, need)
		}
	}
	return errs
}

// JWKSMaxAge is how long verifiers may cache the key set's JWK Set: its
// jwks_cache, and never longer than a new key is pre-published.
func (ks KeySet) JWKSMaxAge() time.Duration {
	age := orDefault(ks.JWKSCache, DefaultJWKSCache)
	if p := ks.Schedule().Prepublish; p > 0 && p < age {
		age = p
	}
	return age
}

// RotationKeySet returns the key set as the lifecycle manager sees it.
func (ks KeySet) RotationKeySet() (rotation.KeySet, error) {
	spec, err := ks.KeySpec()
	if err != nil {
		return rotation.KeySet{}, err
	}
	return rotation.KeySet{
		Name: ks.Name, Purpose: ks.Purpose, Spec: spec, Schedule: ks.Schedule(),
		Prepublish: ks.Purpose != string(policy.DPoP),
	}, nil
}

// KeySpec returns the key the set generates.
func (ks KeySet) KeySpec() (keystore.KeySpec, error) {
	if ks.Alg == "" {
		return keystore.KeySpec{}, errors.New("required (ES256, ES384, RS256, PS256 or EdDSA)")
	}
	alg, err := keystore.ParseAlgorithm(ks.Alg)
	if err != nil {
		return keystore.KeySpec{}, err
	}
	s := keystore.KeySpec{Algorithm: alg, RSABits: ks.RSABits}
	return s, s.Validate()
}

// Policy returns the key set's signing policy.
func (ks KeySet) Policy() (policy.Policy, error) {
	if ks.Purpose == "" {
		return policy.Policy{}, errors.New("required (dpop, client_assertion or jwt)")
	}
	pu, err := policy.ParsePurpose(ks.Purpose)
	if err != nil {
		return policy.Policy{}, err
	}
	return policy.Policy{
		Purpose:     pu,
		Skew:        time.Duration(ks.IatSkew),
		ClientID:    ks.ClientID,
		Audience:    ks.Audience,
		Typ:         ks.Typ,
		MaxLifetime: time.Duration(ks.MaxLifetime),
		Issuers:     ks.Issuers,
	}, nil
}

// Mode returns the socket mode.
func (c *Config) Mode() (os.FileMode, error) {
	v, err := strconv.ParseUint(c.SocketMode, 8, 32)
	if err != nil || v > 0o777 {
		return 0, fmt.Errorf("%q is not an octal permission such as \"0660\"", c.SocketMode)
	}
	if v&0o007 != 0 {
		return 0, fmt.Errorf("%q gives access to every user on the host; use 0660 or stricter", c.SocketMode)
	}
	if v&0o220 == 0 {
		// Connecting to a socket takes write permission on it.
		return 0, fmt.Errorf("%q lets neither the owner nor the group write to the socket, which connecting needs: no caller but root could; use 0660 (callers in socket_group) or 0600", c.SocketMode)
	}
	return os.FileMode(v), nil
}

func (b Backend) count() int {
	n := 0
	if b.Soft != nil {
		n++
	}
	if b.TPM != nil {
		n++
	}
	if b.PKCS11 != nil {
		n++
	}
	return n
}

// TPMConfig returns the TPM keystore's configuration (without a logger).
func (c *Config) TPMConfig() tpm.Config {
	b := c.Backend.TPM
	if b == nil {
		return tpm.Config{}
	}
	dir := b.Dir
	if dir == "" {
		dir = filepath.Join(c.StateDir, "tpm")
	}
	return tpm.Config{
		Device:         b.Device,
		Address:        b.Address,
		OwnerAuthFile:  b.OwnerAuthFile,
		StateDir:       dir,
		CommandTimeout: time.Duration(b.CommandTimeout),
		KeygenTimeout:  time.Duration(b.KeygenTimeout),
	}
}

// PKCS11Config returns the PKCS#11 keystore's configuration (without a
// logger), reading the PIN from its file or environment variable.
func (c *Config) PKCS11Config() (pkcs11.Config, error) {
	b := c.Backend.PKCS11
	if b == nil {
		return pkcs11.Config{}, errors.New("no pkcs11 backend configured")
	}
	var pin pkcs11.PIN
	var err error
	if b.PINFile != "" {
		pin, err = pkcs11.PINFromFile(b.PINFile)
	} else {
		pin, err = pkcs11.PINFromEnv(b.PINEnv)
	}
	if err != nil {
		return pkcs11.Config{}, fmt.Errorf("backend.pkcs11: %w", err)
	}
	return pkcs11.Config{Module: b.Module, URI: b.URI, PIN: pin, MaxSessions: b.MaxSessions,
		NoSessionCopies: b.SessionCopies != nil && !*b.SessionCopies}, nil
}

// PKCS11OpenTimeout is backend.pkcs11.open_timeout, or its default.
func (c *Config) PKCS11OpenTimeout() time.Duration {
	if b := c.Backend.PKCS11; b != nil && b.OpenTimeout > 0 {
		return time.Duration(b.OpenTimeout)
	}
	return DefaultPKCS11OpenTimeout
}

// SoftDir is the soft keystore's directory.
func (c *Config) SoftDir() string {
	if c.Backend.Soft != nil && c.Backend.Soft.Dir != "" {
		return c.Backend.Soft.Dir
	}
	return filepath.Join(c.StateDir, "keys")
}
