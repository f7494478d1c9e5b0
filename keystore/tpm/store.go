package tpm

import (
	"bytes"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/google/go-tpm/tpm2"

	"github.com/keyd-dev/keyd/internal/keyfile"
	"github.com/keyd-dev/keyd/keystore"
)

const (
	keySuffix  = ".tpmkey"
	tombSuffix = ".destroyed"
	tempInfix  = keyfile.TempInfix
	pinFile    = "srk.name"
	lockFile   = "lock"

	// maxFile bounds what is read from the state directory; an RSA-3072
	// key file is about 1.3 KB.
	maxFile = 64 << 10

	pemType = "TSS2 PRIVATE KEY"
)

// oidLoadableKey is id-loadablekey (2.23.133.10.1.3) of the TSS2 key format.
var oidLoadableKey = asn1.ObjectIdentifier{2, 23, 133, 10, 1, 3}

// tssKey is the ASN.1 body of a "TSS2 PRIVATE KEY" PEM block, the key file
// format of tpm2-tss-engine and tpm2-openssl, restricted to what keyd
// writes: a loadable key with an empty auth, no policy and no import secret,
// whose parent is the owner hierarchy's storage root key (0x40000001).
type tssKey struct {
	Type      asn1.ObjectIdentifier
	EmptyAuth bool `asn1:"optional,explicit,tag:0"`
	Parent    int64
	Pubkey    []byte // TPM2B_PUBLIC, size included
	Privkey   []byte // TPM2B_PRIVATE, size included
}

// keyBlob is a key as stored: the TPM2B_PUBLIC and TPM2B_PRIVATE contents
// TPM2_Create returned, and what checkPublic made of the public area.
type keyBlob struct {
	pub  []byte // TPMT_PUBLIC, as the TPM marshalled it
	priv []byte // the TPM-encrypted private area
	kind keyKind
	key  any // *ecdsa.PublicKey or *rsa.PublicKey
}

// newBlob checks and wraps the public and private areas.
func newBlob(pub, priv []byte) (*keyBlob, error) {
	p, err := tpm2.Unmarshal[tpm2.TPMTPublic](pub)
	if err != nil {
		return nil, fmt.Errorf("public area: %v", err)
	}
	if len(priv) == 0 {
		return nil, errors.New("empty private area")
	}
	kind, key, err := checkPublic(p)
	if err != nil {
		return nil, err
	}
	return &keyBlob{pub: pub, priv: priv, kind: kind, key: key}, nil
}

func sized(b []byte) []byte {
	out := make([]byte, 2+len(b))
	binary.BigEndian.PutUint16(out, uint16(len(b)))
	copy(out[2:], b)
	return out
}

func unsized(b []byte) ([]byte, bool) {
	if len(b) < 2 || int(binary.BigEndian.Uint16(b)) != len(b)-2 {
		return nil, false
	}
	return b[2:], true
}

// encodeKey returns the key file for blob.
func encodeKey(blob *keyBlob) ([]byte, error) {
	der, err := asn1.Marshal(tssKey{
		Type:      oidLoadableKey,
		EmptyAuth: true,
		Parent:    int64(tpm2.TPMRHOwner),
		Pubkey:    sized(blob.pub),
		Privkey:   sized(blob.priv),
	})
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemType, Bytes: der}), nil
}

// decodeKey parses a key file. It fails with ErrKeyLost if the file is not a
// key keyd wrote, and with ErrInsecureStorage or ErrUnsupportedAlgorithm
// from checkPublic.
func decodeKey(data []byte) (*keyBlob, error) {
	block, rest := pem.Decode(data)
	if block == nil || block.Type != pemType || len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("no PEM %q block: %w", pemType, keystore.ErrKeyLost)
	}
	var k tssKey
	if tail, err := asn1.Unmarshal(block.Bytes, &k); err != nil || len(tail) != 0 {
		return nil, fmt.Errorf("TSS2 key: %v: %w", err, keystore.ErrKeyLost)
	}
	if !k.Type.Equal(oidLoadableKey) || !k.EmptyAuth || k.Parent != int64(tpm2.TPMRHOwner) {
		return nil, fmt.Errorf("TSS2 key of type %v, parent %#x: not a key keyd wrote: %w", k.Type, k.Parent, keystore.ErrKeyLost)
	}
	pub, ok1 := unsized(k.Pubkey)
	priv, ok2 := unsized(k.Privkey)
	if !ok1 || !ok2 {
		return nil, fmt.Errorf("TSS2 key: bad TPM2B size: %w", keystore.ErrKeyLost)
	}
	blob, err := newBlob(pub, priv)
	if err != nil {
		if errors.Is(err, keystore.ErrInsecureStorage) || errors.Is(err, keystore.ErrUnsupportedAlgorithm) {
			return nil, err
		}
		return nil, fmt.Errorf("%v: %w", err, keystore.ErrKeyLost)
	}
	return blob, nil
}

// pin is the storage root key's identity as recorded in srk.name.
type pin struct {
	template string
	name     []byte
}

func (p pin) encode() []byte {
	return fmt.Appendf(nil, "# keyd TPM storage root key. Do not edit: a TPM whose SRK has another name\n"+
		"# (cleared, replaced, or a different template) cannot load keyd's keys.\n"+
		"template=%s\nname=%s\n", p.template, hex.EncodeToString(p.name))
}

func decodePin(data []byte) (pin, error) {
	var p pin
	for line := range strings.Lines(string(data)) {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return pin{}, fmt.Errorf("bad line %q", line)
		}
		switch k {
		case "template":
			p.template = v
		case "name":
			n, err := hex.DecodeString(v)
			if err != nil {
				return pin{}, fmt.Errorf("name: %v", err)
			}
			p.name = n
		default:
			return pin{}, fmt.Errorf("unknown key %q", k)
		}
	}
	if p.template == "" || len(p.name) == 0 {
		return pin{}, errors.New("template or name missing")
	}
	return p, nil
}

// keyID returns the ID of a key file name "<id>.tpmkey".
func keyID(name string) (string, bool) {
	return keyfile.ID(name, keySuffix)
}

// isTemp reports whether name is a temporary file "<name>.tmp-<digits>"
// (os.CreateTemp's random part is decimal).
func isTemp(name string) bool {
	i := strings.LastIndex(name, tempInfix)
	if i <= 0 {
		return false
	}
	rnd := name[i+len(tempInfix):]
	base := name[:i]
	return rnd != "" && strings.Trim(rnd, "0123456789") == "" &&
		(base == pinFile || strings.HasSuffix(base, keySuffix))
}

// The rules keyfile.Read applies (keyfile.CheckInfo).
var (
	keyFileRule = keyfile.KeyRule
	pinRule     = keyfile.Rule{Mask: 0o022}
	// The owner auth file may be root's, readable by keyd's group.
	authFileRule = keyfile.Rule{Mask: 0o007, RootOK: true}
)

// lockDir takes an exclusive lock on dir/lock, held until the file is
// closed, so two processes never share a state directory.
func lockDir(dir string) (*os.File, error) {
	f, err := keyfile.LockDir(dir, lockFile)
	if errors.Is(err, keyfile.ErrInUse) {
		return nil, fmt.Errorf("state directory %s is in use by another keyd (or another tpm backend in this process)", dir)
	}
	return f, err
}
