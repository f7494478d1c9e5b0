package config

import (
	"fmt"
	"os"
	"path/filepath"
)

// DefaultSocket is where client commands look for the daemon when neither
// --socket nor KEYD_SOCKET says: the socket of the embedded default
// configuration, in a per-user runtime directory.
func DefaultSocket() string {
	return filepath.Join(runtimeDir(), "keyd.sock")
}

func runtimeDir() string {
	if d := os.Getenv("XDG_RUNTIME_DIR"); filepath.IsAbs(d) {
		return filepath.Join(d, "keyd")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("keyd-%d", os.Geteuid()))
}

func stateDir() (string, error) {
	if d := os.Getenv("XDG_STATE_HOME"); filepath.IsAbs(d) {
		return filepath.Join(d, "keyd"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("no home directory for the default state directory: %w", err)
	}
	return filepath.Join(home, ".local", "state", "keyd"), nil
}

// Default returns the embedded default configuration: the soft keystore, a
// state directory and socket in per-user locations, and one key set "dpop"
// (purpose dpop, ES256) that the current user may sign with. It is for trying
// keyd, not for production.
func Default() (*Config, error) {
	sd, err := stateDir()
	if err != nil {
		return nil, err
	}
	uid := os.Geteuid()
	c := &Config{
		Socket:     DefaultSocket(),
		SocketMode: "0600",
		StateDir:   sd,
		AuditLog:   filepath.Join(sd, "audit.jsonl"),
		Backend:    Backend{Soft: &SoftBackend{}},
		KeySets: []KeySet{{
			Name:    "dpop",
			Purpose: "dpop",
			Alg:     "ES256",
			Allow:   Allow{UIDs: []int{uid}},
		}},
	}
	c.applyDefaults()
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("default configuration: %w", err)
	}
	return c, nil
}
