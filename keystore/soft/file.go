package soft

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/keyd-dev/keyd/internal/keyfile"
	"github.com/keyd-dev/keyd/keystore"
)

const (
	pemType = "PRIVATE KEY"
	// maxKeyFile bounds what loadKey reads; an RSA-3072 PKCS #8 PEM is
	// about 2.5 KB.
	maxKeyFile = 64 << 10
)

// checkFile checks the key file at path without following a symlink. It fails
// with ErrNotFound if there is none and ErrInsecureStorage if it is unsafe.
func checkFile(path string) (fs.FileInfo, error) {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, keystore.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", keystore.ErrUnavailable, err)
	}
	return fi, keyfile.CheckInfo(path, "key file", fi, keyfile.KeyRule)
}

// loadKey reads and parses the key file at path after checking it. It fails
// with ErrNotFound, ErrInsecureStorage, ErrKeyLost (the file is unreadable as
// a key) or ErrUnsupportedAlgorithm (a key keyd does not sign with).
func loadKey(path string) (crypto.Signer, error) {
	data, err := keyfile.Read(path, "key file", keyfile.KeyRule, maxKeyFile)
	if err != nil {
		return nil, err
	}
	defer clear(data)
	block, _ := pem.Decode(data)
	if block == nil || block.Type != pemType {
		return nil, fmt.Errorf("key file %s has no PEM %q block: %w", path, pemType, keystore.ErrKeyLost)
	}
	defer clear(block.Bytes)
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("key file %s: %v: %w", path, err, keystore.ErrKeyLost)
	}
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		if k.Curve == elliptic.P256() || k.Curve == elliptic.P384() {
			return k, nil
		}
	case *rsa.PrivateKey:
		if n := k.N.BitLen(); n == 2048 || n == 3072 {
			return k, nil
		}
	case ed25519.PrivateKey:
		return k, nil
	}
	return nil, fmt.Errorf("key file %s holds a %s: %w", path, describe(key), keystore.ErrUnsupportedAlgorithm)
}

func describe(key any) string {
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		return "ECDSA " + k.Curve.Params().Name + " key"
	case *rsa.PrivateKey:
		return fmt.Sprintf("%d-bit RSA key", k.N.BitLen())
	}
	return fmt.Sprintf("%T", key)
}

// writeKey writes key to <id>.key atomically and without replacing an
// existing file (keyfile.WriteNew: ErrAlreadyExists if it exists). The
// caller holds b.wmu.
func (b *Backend) writeKey(id string, key crypto.Signer) (err error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encode key: %w", err)
	}
	defer clear(der)
	data := pem.EncodeToMemory(&pem.Block{Type: pemType, Bytes: der})
	defer clear(data)

	return keyfile.WriteNew(b.dir, id+keySuffix, data, b.fail)
}

func (b *Backend) fail(stage string) error {
	if b.failpoint == nil {
		return nil
	}
	return b.failpoint(stage)
}
