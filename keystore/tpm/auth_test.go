package tpm

import (
	"bytes"
	"crypto"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/internal/swtpmtest"
	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// TestForeignKeyAuth (T4): a key file whose key has a non-empty authValue
// (a file keyd did not make: keyd's keys have an empty one) makes TPM2_Sign
// fail with TPM_RC_BAD_AUTH. That is the key's fault, not the owner
// hierarchy's: Sign reports the key as unusable (ErrKeyLost), never as a
// refused owner authorization (ErrLocked, "check owner_auth_file"); the
// other keys keep signing, and the lockout counter stays 0.
func TestForeignKeyAuth(t *testing.T) {
	s := swtpmtest.Start(t)
	b := newTestBackend(t, s, Config{})
	ctx := t.Context()
	base := inspect(t, b)
	pub := keystoretest.MustGenerate(t, b, "k")

	// A noDA signing key under keyd's SRK, as keyd makes them, but with an
	// authValue: written as a key file that claims an empty auth.
	var blob *keyBlob
	err := b.do(ctx, b.cmdTimeout, func(o *op) error {
		rsp, err := tpm2.Create{
			ParentHandle: b.st.srk,
			InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
				UserAuth: tpm2.TPM2BAuth{Buffer: []byte("not-empty")},
			}},
			InPublic: tpm2.New2B(keyTemplate(kindP256)),
		}.Execute(o)
		if err != nil {
			return err
		}
		blob, err = newBlob(rsp.OutPublic.Bytes(), rsp.OutPrivate.Buffer)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	data, err := encodeKey(blob)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, b.keyPath("foreign"), data, 0o600)

	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	for i := range 3 {
		_, err := b.Sign(ctx, "foreign", d, crypto.SHA256)
		if !errors.Is(err, keystore.ErrKeyLost) || errors.Is(err, keystore.ErrLocked) || strings.Contains(err.Error(), "owner") {
			t.Fatalf("Sign %d by a key with a non-empty authValue = %v; want ErrKeyLost, not an owner-hierarchy error", i, err)
		}
		if i == 0 {
			t.Logf("Sign by a key with a non-empty authValue: %v", err)
		}
	}
	mustSign(t, b, "k", keystore.ES256, pub, d)
	if err := b.Health(ctx); err != nil {
		t.Errorf("Health after the foreign key's refusals: %v", err)
	}
	checkFootprint(t, b, base)
}

// TestBadAuthOnLoadedKey: TPM_RC_BAD_AUTH from TPM2_Sign by a key loaded
// by an earlier call may mean that the handle no longer names keyd's key:
// the call runs again after a fresh load and succeeds; the key is not
// reported lost (the rotation layer would record it lost for good).
func TestBadAuthOnLoadedKey(t *testing.T) {
	in := &injector{}
	b, base, pubs := twoKeys(t, in)
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k1", keystore.ES256, pubs["k1"], d)
	in.arm(tpm2.TPMCCSign, 0x9a2, 1) // TPM_RC_BAD_AUTH, session 1
	mustSign(t, b, "k1", keystore.ES256, pubs["k1"], d)
	if n := in.count(); n != 1 {
		t.Errorf("the injected TPM_RC_BAD_AUTH was sent %d times, want 1", n)
	}
	in.arm(0, 0, 0)
	checkFootprint(t, b, base)
}

// TestLockoutAnswer (T4): a TPM in dictionary-attack lockout (TPM_RC_LOCKOUT,
// 0x921, from something else than keyd) makes Sign fail with
// ErrUnavailable and a message naming the lockout, without a retry storm;
// the next Sign succeeds, and no slot or goroutine is left behind.
func TestLockoutAnswer(t *testing.T) {
	in := &injector{}
	b, base, pubs := twoKeys(t, in)
	d := keystoretest.Digest(keystore.ES256, []byte("m"))
	mustSign(t, b, "k1", keystore.ES256, pubs["k1"], d)
	g0, _ := baseline()
	in.arm(tpm2.TPMCCSign, uint32(tpm2.TPMRCLockout), 10)
	_, err := b.Sign(t.Context(), "k1", d, crypto.SHA256)
	if !errors.Is(err, keystore.ErrUnavailable) || !strings.Contains(err.Error(), "lockout") {
		t.Errorf("Sign on a TPM in lockout = %v, want ErrUnavailable naming the lockout", err)
	}
	if n := in.count(); n != 1 {
		t.Errorf("TPM2_Sign sent %d times to a TPM in lockout, want 1", n)
	}
	in.arm(0, 0, 0)
	mustSign(t, b, "k1", keystore.ES256, pubs["k1"], d)
	checkFootprint(t, b, base)
	if g, _ := settle(g0); g > g0 {
		t.Errorf("goroutines %d → %d", g0, g)
	}
}

// TestOwnerAuthTooLong: an owner auth file holding more than the TPM takes
// as an authorization (the TPM answers TPM_RC_SIZE on the password
// session) is a refused owner authorization, ErrLocked with a message
// that points at owner_auth_file, like a wrong one.
func TestOwnerAuthTooLong(t *testing.T) {
	s := swtpmtest.Start(t)
	s.Tool(t, "tpm2_changeauth", "-c", "o", "hunter2")
	path := filepath.Join(t.TempDir(), "auth")
	writeFile(t, path, append(bytes.Repeat([]byte("hunter2"), 10), '\n'), 0o600)
	_, err := newTestBackendErr(t, s, Config{OwnerAuthFile: path}, nil)
	if !errors.Is(err, keystore.ErrLocked) || !strings.Contains(err.Error(), "owner_auth_file") {
		t.Errorf("New with a 70-byte owner auth = %v, want ErrLocked naming owner_auth_file", err)
	}
}
