package rotation

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/keyd-dev/keyd/keystore"
	"github.com/keyd-dev/keyd/keystore/soft"
)

// A save whose rename happened but whose directory sync failed has
// written the new state: later Loads read it. Treating it as failed made a
// rotation destroy the key it had just recorded active, so the next start
// found the active key gone (DATA_LOSS). It counts as saved, and the key
// stays.
func TestUnsyncedSaveKeepsTheKey(t *testing.T) {
	dir := t.TempDir()
	b, err := soft.New(soft.Config{Dir: filepath.Join(dir, "keys")})
	if err != nil {
		t.Fatal(err)
	}
	store, err := OpenStore(filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	m, err := New(context.Background(), Config{Backend: b, Store: store,
		KeySets: []KeySet{{Name: "d", Purpose: "dpop", Spec: keystore.KeySpec{Algorithm: keystore.ES256}}}})
	if err != nil {
		t.Fatal(err)
	}
	store.syncDir = func(string) error { return errors.New("EIO") }
	res, err := m.Rotate(context.Background(), "d", true)
	if err != nil {
		t.Fatalf("rotate with a directory that cannot be synced: %v", err)
	}
	if _, err := b.Public(context.Background(), res.Active.ID); err != nil {
		t.Errorf("the new active key is not in the backend: %v", err)
	}
	vs, err := store.Load()
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		if v.State == Active && v.Kid != res.Active.Kid {
			t.Errorf("the file's active key is %s, the rotation's %s", v.Kid, res.Active.Kid)
		}
	}
}
