package pkcs11

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyd-dev/keyd/keystore"
)

func TestPINFromFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for name, tt := range map[string]struct {
		content string
		want    string
	}{
		"plain":    {"2222", "2222"},
		"newline":  {"2222\n", "2222"},
		"crlf":     {"2222\r\n", "2222"},
		"spaces":   {" 22 22 ", " 22 22 "},
		"one only": {"2222\n\n", ""},
	} {
		p := write(name, tt.content, 0o600)
		pin, err := PINFromFile(p)
		if tt.want == "" {
			if err == nil {
				t.Errorf("%s: PINFromFile accepted %q", name, tt.content)
			}
			continue
		}
		if err != nil || pin.s != tt.want {
			t.Errorf("%s: PINFromFile = %q, %v; want %q", name, pin.s, err, tt.want)
		}
	}
	for name, content := range map[string]string{"empty": "", "newline only": "\n", "two lines": "a\nb", "nul": "a\x00b", "huge": strings.Repeat("1", 2000)} {
		if _, err := PINFromFile(write(name, content, 0o600)); err == nil {
			t.Errorf("%s: PINFromFile accepted %q", name, content)
		}
	}
	for _, mode := range []os.FileMode{0o644, 0o604, 0o620, 0o610, 0o666} {
		p := write(fmt.Sprintf("mode%o", mode), "2222", mode)
		if _, err := PINFromFile(p); !errors.Is(err, keystore.ErrInsecureStorage) || !strings.Contains(err.Error(), "chmod 0600") {
			t.Errorf("mode %04o: PINFromFile = %v; want ErrInsecureStorage saying chmod 0600", mode, err)
		}
	}
	// Group-readable is fine when the group is keyd's own.
	p := write("group", "2222", 0o640)
	if err := os.Chown(p, -1, os.Getegid()); err == nil {
		if _, err := PINFromFile(p); err != nil {
			t.Errorf("mode 0640 with keyd's group: %v", err)
		}
	}
	if _, err := PINFromFile(dir); err == nil {
		t.Error("PINFromFile accepted a directory")
	}
	if _, err := PINFromFile(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

func TestPINFromEnv(t *testing.T) {
	t.Setenv("KEYD_TEST_PIN", "2222\n")
	pin, err := PINFromEnv("KEYD_TEST_PIN")
	if err != nil || pin.s != "2222" {
		t.Errorf("PINFromEnv = %q, %v", pin.s, err)
	}
	t.Setenv("KEYD_TEST_EMPTY", "")
	for _, name := range []string{"", "KEYD_TEST_EMPTY", "KEYD_TEST_UNSET_PIN"} {
		if _, err := PINFromEnv(name); err == nil {
			t.Errorf("PINFromEnv(%q) succeeded", name)
		}
	}
	// A conventional name is named, to help fix a typo.
	if _, err := PINFromEnv("KEYD_TEST_UNSET_PIN"); err == nil || !strings.Contains(err.Error(), "KEYD_TEST_UNSET_PIN") {
		t.Errorf("unset KEYD_TEST_UNSET_PIN: %v, want it named", err)
	}
	// A PIN written into pin_env is a valid name too: it is never echoed.
	t.Setenv("s3cretPIN", "")
	for _, pinAsName := range []string{"123456", "s3cretPIN", "S3CRET", "abc_def"} {
		_, err := PINFromEnv(pinAsName)
		if err == nil || strings.Contains(err.Error(), pinAsName) {
			t.Errorf("PINFromEnv(%q) = %v: want an error that does not quote it", pinAsName, err)
		}
	}
}

// A PIN prints as REDACTED however it is printed.
func TestPINRedacted(t *testing.T) {
	pin := PIN{s: "s3cret"}
	cfg := Config{PIN: pin}
	var out []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d", "%T"} {
		out = append(out, fmt.Sprintf(verb, pin), fmt.Sprintf(verb, cfg), fmt.Sprintf(verb, &cfg))
	}
	j, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	out = append(out, string(j), pin.String(), pin.GoString(), pin.LogValue().String())
	var b strings.Builder
	slog.New(slog.NewJSONHandler(&b, nil)).Info("m", "pin", pin, "cfg", cfg)
	slog.New(slog.NewTextHandler(&b, nil)).Info("m", "pin", pin, "cfg", cfg)
	out = append(out, b.String())
	for _, s := range out {
		if strings.Contains(s, "s3cret") || strings.Contains(s, fmt.Sprintf("%x", "s3cret")) {
			t.Errorf("PIN shown: %s", s)
		}
	}
	if !strings.Contains(fmt.Sprint(pin), redacted) {
		t.Errorf("fmt.Sprint(pin) = %q", fmt.Sprint(pin))
	}
}
