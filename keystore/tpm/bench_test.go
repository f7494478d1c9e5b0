package tpm

import (
	"crypto"
	"fmt"
	"testing"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/keystoretest"
)

// BenchmarkSign measures ES256 signing on swtpm: "resident" signs with one
// key, which stays loaded (one TPM2_Sign per signature); "reload" alternates
// two keys, so each signature costs TPM2_FlushContext + TPM2_Load +
// TPM2_Sign, as a load-sign-flush design would for every request.
func BenchmarkSign(b *testing.B) {
	for _, mode := range []string{"resident", "reload"} {
		b.Run(mode, func(b *testing.B) {
			s := startSWTPM(b)
			be, err := New(b.Context(), Config{Address: s.addr(), StateDir: b.TempDir()})
			if err != nil {
				b.Fatal(err)
			}
			defer be.Close()
			ids := []string{"a", "b"}
			for _, id := range ids {
				if _, err := be.Generate(b.Context(), id, keystore.KeySpec{Algorithm: keystore.ES256}); err != nil {
					b.Fatal(err)
				}
			}
			d := keystoretest.Digest(keystore.ES256, []byte("bench"))
			i := 0
			for b.Loop() {
				id := ids[0]
				if mode == "reload" {
					id = ids[i%2]
				}
				i++
				if _, err := be.Sign(b.Context(), id, d, crypto.SHA256); err != nil {
					b.Fatal(fmt.Errorf("sign %d: %w", i, err))
				}
			}
		})
	}
}
