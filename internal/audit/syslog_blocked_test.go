package audit

import (
	"bytes"
	"testing"
	"time"
)

// A14: a syslog daemon that stops reading (hung, or stopped with SIGSTOP)
// fills its socket's queue. The audit trail must then fall over to the
// file within a bounded time, not block every signature for good behind
// the syslog sink.
func TestSyslogBlockedFallsOver(t *testing.T) {
	pc, sl := syslogPair(t) // pc is not read until the end
	var file bytes.Buffer
	both := Either(nil, New(&file), sl)

	// The kernel queues at most net.unix.max_dgram_qlen datagrams (10 by
	// default, a few hundred at most on tuned hosts) and the socket's send
	// buffer: 2000 records are far past either.
	const n = 2000
	done := make(chan error, 1)
	go func() {
		for range n {
			if err := both.Record(sample()); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the file sink works, yet Record failed: %v", err)
		}
	case <-time.After(30 * time.Second):
		// Closing the syslog end releases the blocked send.
		pc.Close()
		<-done
		t.Fatal("Record still blocked after 30 s behind a syslog socket nobody reads; the file sink works")
	}
	if got := bytes.Count(file.Bytes(), []byte("\n")); got != n {
		t.Errorf("the file has %d records, want %d", got, n)
	}
	// Once the syslog daemon reads again, records reach it again.
	buf := make([]byte, 4096)
	for {
		pc.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, _, err := pc.ReadFrom(buf); err != nil {
			break
		}
	}
	if err := sl.Record(sample()); err != nil {
		t.Fatalf("syslog reading again: %v", err)
	}
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	m, _, err := pc.ReadFrom(buf)
	if err != nil || !bytes.Contains(buf[:m], []byte(`"keyset":"billing-dpop"`)) {
		t.Errorf("after the stall: %q, %v", buf[:m], err)
	}
}
