package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"testing"
	"time"
)

// tpmMessage is a TPM message of n bytes: tag, size, code, then filler.
func tpmMessage(code uint32, n int) []byte {
	m := make([]byte, n)
	binary.BigEndian.PutUint16(m, 0x8001)
	binary.BigEndian.PutUint32(m[2:], uint32(n))
	binary.BigEndian.PutUint32(m[6:], code)
	for i := 10; i < n; i++ {
		m[i] = byte(i)
	}
	return m
}

func TestReadTPMMessage(t *testing.T) {
	buf := make([]byte, tpmMaxMessage)
	m := tpmMessage(7, 300)
	got, err := readTPMMessage(bytes.NewReader(append(m, 1, 2, 3)), buf)
	if err != nil || !bytes.Equal(got, m) {
		t.Fatalf("readTPMMessage = %x, %v", got, err)
	}
	for _, n := range []uint32{0, 9, tpmMaxMessage + 1} {
		bad := tpmMessage(7, 10)
		binary.BigEndian.PutUint32(bad[2:], n)
		if _, err := readTPMMessage(bytes.NewReader(bad), buf); err == nil {
			t.Errorf("size %d accepted", n)
		}
	}
	if _, err := readTPMMessage(bytes.NewReader(m[:100]), buf); err == nil {
		t.Error("short message accepted")
	}
}

// TestRelayConn relays commands of several sizes to a stand-in TPM on
// loopback that answers each with a response derived from it, and checks
// that each response comes back whole and in order.
func TestRelayConn(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		c, err := lis.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, tpmMaxMessage)
		for {
			m, err := readTPMMessage(c, buf)
			if err != nil {
				return
			}
			// The response is the command with code+1 and twice its length.
			code := binary.BigEndian.Uint32(m[6:])
			if _, err := c.Write(tpmMessage(code+1, 2*len(m))); err != nil {
				return
			}
		}
	}()
	caller, relayEnd := net.Pipe()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- relayConn(ctx, relayEnd, lis.Addr().String()) }()
	buf := make([]byte, tpmMaxMessage)
	for i, n := range []int{10, 11, 4000, 20000} {
		if _, err := caller.Write(tpmMessage(uint32(i), n)); err != nil {
			t.Fatal(err)
		}
		got, err := readTPMMessage(caller, buf)
		if err != nil {
			t.Fatal(err)
		}
		if want := tpmMessage(uint32(i)+1, 2*n); !bytes.Equal(got, want) {
			t.Fatalf("response %d: %d bytes, want %d", i, len(got), len(want))
		}
	}
	caller.Close()
	if err := <-done; err != nil {
		t.Fatalf("relayConn after the caller hung up: %v", err)
	}
}
