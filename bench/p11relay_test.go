package main

import (
	"bytes"
	"errors"
	"net"
	"strings"
	"testing"
)

// TestRelaySigns drives relaySigns with the relay client over a pipe: the
// signature of the chosen key comes back whole, and a signer's error or an
// unknown key index comes back as an error.
func TestRelaySigns(t *testing.T) {
	sign := func(id string, data []byte) ([]byte, error) {
		if id == "bad" {
			return nil, errors.New("CKR_FUNCTION_FAILED")
		}
		return append([]byte(id+":"), bytes.Repeat(data, 2)...), nil
	}
	a, b := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		relaySigns(b, sign, []string{"k0", "bad"})
	}()
	c := &relayConnBuf{Conn: a, buf: make([]byte, 1<<16)}
	for _, n := range []int{0, 32, 300, 20000} {
		data := bytes.Repeat([]byte{byte(n)}, n)
		got, err := c.roundTrip(0, data)
		want := append([]byte("k0:"), bytes.Repeat(data, 2)...)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%d bytes: %d bytes back, %v", n, len(got), err)
		}
	}
	if _, err := c.roundTrip(1, []byte("x")); err == nil || !strings.Contains(err.Error(), "CKR_FUNCTION_FAILED") {
		t.Errorf("failing signer: %v", err)
	}
	if _, err := c.roundTrip(7, []byte("x")); err == nil || !strings.Contains(err.Error(), "no key #7") {
		t.Errorf("unknown key: %v", err)
	}
	if _, err := c.roundTrip(0, make([]byte, 1<<16)); err == nil {
		t.Error("64 KiB request accepted")
	}
	a.Close()
	<-done
}
