package pkcs11

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"unicode"

	"github.com/keyd-dev/keyd/internal/secretfile"
	"github.com/keyd-dev/keyd/keystore"
)

// redacted is what a PIN prints as, however it is printed.
const redacted = "REDACTED"

// PIN is a token user PIN. It never prints: String, GoString, Format (every
// fmt verb), LogValue (log/slog) and MarshalText all give "REDACTED". Make
// one with PINFromFile or PINFromEnv; keyd never takes a PIN inline in its
// configuration or on a command line.
type PIN struct {
	s string
	// from says where the PIN was read ("pin file /etc/keyd/pkcs11.pin",
	// "environment variable KEYD_PIN"), for the error of a refused PIN.
	from string
}

// String returns "REDACTED".
func (PIN) String() string { return redacted }

// GoString returns "pkcs11.PIN(REDACTED)".
func (PIN) GoString() string { return "pkcs11.PIN(" + redacted + ")" }

// Format prints "REDACTED" for every verb, so no %x or %d can print the
// PIN through reflection.
func (PIN) Format(f fmt.State, _ rune) { io.WriteString(f, redacted) }

// LogValue implements slog.LogValuer.
func (PIN) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalText implements encoding.TextMarshaler (and so JSON and YAML
// encoding) with "REDACTED".
func (PIN) MarshalText() ([]byte, error) { return []byte(redacted), nil }

// IsZero reports whether the PIN is empty (not set).
func (p PIN) IsZero() bool { return p.s == "" }

// maxPINFile bounds what PINFromFile reads: PINs are short (SoftHSM allows
// 255 bytes).
const maxPINFile = 1024

// PINFromFile reads a PIN from the file at path. One trailing newline ("\n"
// or "\r\n") is removed; a file that is empty, has more than one line, a NUL
// byte or more than 1 KiB is refused.
//
// The file must be private to keyd: it is refused, with an error wrapping
// keystore.ErrInsecureStorage, if it is not a regular file, if others have
// any permission on it, if its group may write or execute it, or if its
// group may read it and that group is not keyd's effective group (mode 0640
// root:keyd is fine for a daemon running with group keyd; 0644 never is).
// Symbolic links are followed (Kubernetes mounts secrets that way); the
// checks apply to the target.
func PINFromFile(path string) (PIN, error) {
	f, err := os.Open(path)
	if err != nil {
		return PIN{}, fmt.Errorf("pin file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return PIN{}, fmt.Errorf("pin file: %w", err)
	}
	if err := checkPINFile(path, fi); err != nil {
		return PIN{}, err
	}
	b, err := io.ReadAll(io.LimitReader(f, maxPINFile+1))
	if err != nil {
		return PIN{}, fmt.Errorf("pin file %s: %w", path, err)
	}
	if len(b) > maxPINFile {
		return PIN{}, fmt.Errorf("pin file %s: longer than %d bytes; it should hold only the PIN", path, maxPINFile)
	}
	pin, err := parsePIN(b)
	if err != nil {
		return PIN{}, fmt.Errorf("pin file %s: %w", path, err)
	}
	pin.from = "pin file " + path
	return pin, nil
}

func checkPINFile(path string, fi os.FileInfo) error {
	if err := secretfile.Check("pin file", path, fi); err != nil {
		return insecureFile{err}
	}
	return nil
}

// insecureFile is secretfile's refusal, which is also
// keystore.ErrInsecureStorage.
type insecureFile struct{ error }

func (e insecureFile) Is(target error) bool { return target == keystore.ErrInsecureStorage }
func (e insecureFile) Unwrap() error        { return e.error }

// PINFromEnv reads a PIN from the environment variable name, which must be
// set and not empty. One trailing newline is removed, as in PINFromFile.
func PINFromEnv(name string) (PIN, error) {
	if name == "" {
		return PIN{}, errors.New("pin environment variable: no name given")
	}
	what := envName(name)
	v, ok := os.LookupEnv(name)
	if !ok {
		return PIN{}, fmt.Errorf("pin %s is not set", what)
	}
	pin, err := parsePIN([]byte(v))
	if err != nil {
		return PIN{}, fmt.Errorf("pin %s: %w", what, err)
	}
	pin.from = what
	return pin, nil
}

// envName names the variable name for messages, when it looks like a
// variable's name (upper case, with an underscore: KEYD_PKCS11_PIN). A
// PIN written into pin_env by mistake (1234, or a word) is a valid name
// too, and must not reach a log or an error.
func envName(name string) string {
	conventional := strings.Contains(name, "_") && strings.IndexFunc(name, unicode.IsLower) < 0
	if !conventional {
		return "environment variable (the one backend.pkcs11.pin_env names)"
	}
	return "environment variable " + name
}

// parsePIN trims one trailing newline and refuses what cannot be a PIN.
func parsePIN(b []byte) (PIN, error) {
	b = bytes.TrimSuffix(b, []byte("\n"))
	b = bytes.TrimSuffix(b, []byte("\r"))
	switch {
	case len(b) == 0:
		return PIN{}, errors.New("the PIN is empty")
	case bytes.ContainsAny(b, "\n\r"):
		return PIN{}, errors.New("more than one line; it should hold only the PIN")
	case bytes.IndexByte(b, 0) >= 0:
		return PIN{}, errors.New("the PIN contains a NUL byte")
	}
	return PIN{s: string(b)}, nil
}
