package client_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/client"
)

// A daemon address that accepts TCP connections but never completes the
// HTTP/2 handshake keeps the gRPC connection CONNECTING (for up to gRPC's
// 20s connect timeout). Sign must still give up when the caller's context
// ends, on the (default) SignStream path as on the unary one.
func TestSignHonoursContextWhileConnecting(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var conns []net.Conn
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c) // held open, never answered
		}
	}()
	defer func() {
		ln.Close()
		<-accepted
		for _, c := range conns {
			c.Close()
		}
	}()

	for _, tc := range []struct {
		name string
		opts []client.Option
	}{{"unary", []client.Option{client.WithUnarySign()}}, {"stream", nil}} {
		t.Run(tc.name, func(t *testing.T) {
			kc, err := client.Dial(ln.Addr().String(), tc.opts...)
			if err != nil {
				t.Fatal(err)
			}
			defer kc.Close()
			done := make(chan error, 1)
			start := time.Now()
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
				defer cancel()
				_, err := kc.Sign(ctx, client.SignRequest{KeySet: "dpop", Purpose: "dpop",
					Claims: map[string]any{"htm": "GET", "htu": "https://rs.example/"}})
				done <- err
			}()
			select {
			case err := <-done:
				if !errors.Is(err, client.ErrDeadlineExceeded) {
					t.Errorf("Sign: %v, want ErrDeadlineExceeded", err)
				}
				if took := time.Since(start); took > 2*time.Second {
					t.Errorf("Sign took %v with a 300ms deadline", took)
				}
			case <-time.After(3 * time.Second):
				t.Errorf("Sign with a 300ms deadline still blocked after 3s")
				kc.Close() // cancels the stream's context; lets the call return
				<-done
			}
		})
	}
}
