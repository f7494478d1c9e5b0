package tpm

import (
	"bytes"
	"context"
	"errors"
	"os"
	"syscall"
	"testing"
	"time"
)

// seqpacketDevice returns a deviceConn over one end of a SOCK_SEQPACKET
// socket pair and the other end, which plays the TPM. Like the kernel's TPM
// device in non-blocking mode, a message of 0 bytes reads as 0 bytes — the
// answer of /dev/tpmrm0 to a read before the response is ready.
func seqpacketDevice(t *testing.T) (*deviceConn, *os.File) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_SEQPACKET|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Skipf("socketpair: %v", err)
	}
	if err := syscall.SetNonblock(fds[0], true); err != nil {
		t.Fatal(err)
	}
	d, err := newDeviceConn(os.NewFile(uintptr(fds[0]), "tpm-device"))
	if err != nil {
		t.Fatal(err)
	}
	tpm := os.NewFile(uintptr(fds[1]), "tpm")
	t.Cleanup(func() { d.close(); tpm.Close() })
	return d, tpm
}

// TestDeviceResponseNotReady: a read of 0 bytes before the response (the
// async TPM driver) is waited out, not taken for the end of the file. (A
// socket's 0-byte message is consumed by the read, unlike the driver's "not
// yet", so one such message is what this can model; the response then
// arrives later, with its own wake-up, as the driver's does.)
func TestDeviceResponseNotReady(t *testing.T) {
	for _, tc := range []struct {
		name  string
		empty int // 0-byte messages before the response
	}{
		{"no empty read", 0},
		{"one empty read", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, tpm := seqpacketDevice(t)
			cmd := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0}
			rsp := errorResponse(0)
			go func() {
				buf := make([]byte, 64)
				if _, err := tpm.Read(buf); err != nil {
					return
				}
				for range tc.empty {
					if _, err := tpm.Write(nil); err != nil {
						return
					}
				}
				time.Sleep(20 * time.Millisecond)
				tpm.Write(rsp)
			}()
			got, err := d.roundTrip(context.Background(), cmd, time.Now().Add(10*time.Second))
			if err != nil {
				t.Fatalf("roundTrip: %v", err)
			}
			if !bytes.Equal(got, rsp) {
				t.Errorf("response %x, want %x", got, rsp)
			}
		})
	}
}

// TestDeviceDeadline: a device that never answers fails at the deadline.
func TestDeviceDeadline(t *testing.T) {
	d, tpm := seqpacketDevice(t)
	go func() {
		buf := make([]byte, 64)
		tpm.Read(buf)
		tpm.Write(nil) // "not ready", then nothing
	}()
	start := time.Now()
	_, err := d.roundTrip(context.Background(), errorResponse(0), time.Now().Add(200*time.Millisecond))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("err = %v, want a deadline error", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("took %v", took)
	}
}
