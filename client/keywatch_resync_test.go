package client_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/keyd-dev/keyd/client"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// staleThenUnpublished serves WatchKeys: a lost key with its JWK (stale:
// still in the JWK Set) on the first stream, which then ends; the same
// lost key without a JWK (it left the JWK Set meanwhile) on the next.
type staleThenUnpublished struct {
	keydv1.UnimplementedKeyServiceServer
	streams atomic.Int32
}

func (s *staleThenUnpublished) WatchKeys(_ *keydv1.WatchKeysRequest, stream grpc.ServerStreamingServer[keydv1.WatchKeysResponse]) error {
	k := &keydv1.KeyVersion{Keyset: "d", Kid: "k1", State: keydv1.KeyState_KEY_STATE_LOST}
	first := s.streams.Add(1) == 1
	if first {
		k.Jwk = []byte(`{"kty":"EC"}`)
	}
	for _, r := range []*keydv1.WatchKeysResponse{
		{Type: keydv1.WatchKeysResponse_TYPE_SNAPSHOT, Key: k},
		{Type: keydv1.WatchKeysResponse_TYPE_SYNCED},
	} {
		if err := stream.Send(r); err != nil {
			return err
		}
	}
	if first {
		return nil // the stream breaks; the watcher resubscribes
	}
	<-stream.Context().Done()
	return nil
}

// A key that left the JWK Set while the watcher was reconnecting (a stale
// lost key replaced: its state stays lost, its JWK goes) is reported as a
// change after the fresh snapshot, as it is when the watcher is connected.
func TestKeyWatcherResyncReportsUnpublished(t *testing.T) {
	kc, err := client.Dial(serveKeys(t, &staleThenUnpublished{}))
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	events := make(chan client.KeyEvent, 10)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	kc.WatchKeys(ctx, []string{"d"}, client.OnKeyChange(func(ev client.KeyEvent) { events <- ev }))
	select {
	case ev := <-events:
		if ev.Key.Kid != "k1" || len(ev.Key.JWK) != 0 {
			t.Errorf("event %+v, want k1 without its JWK", ev)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no event for the key that left the JWK Set while the watcher reconnected")
	}
}
