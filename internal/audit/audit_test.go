package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func sample() Record {
	return Record{
		Time: time.Date(2026, 11, 22, 12, 0, 0, 123456789, time.UTC), Event: "sign",
		UID: 1001, GID: 1002, PID: 4242, Identity: "spiffe://example.org/billing/api", KeySet: "billing-dpop", Kid: "k1", Purpose: "dpop",
		Htm: "POST", Htu: "https://as.example.com/token", Ath: "abc", Iss: "i", Sub: "s",
		Aud: []string{"a1", "a2"}, Jti: "j", Exp: 1795000000, Outcome: "ok", Reason: "r",
	}
}

// The hand-written encoder writes what encoding/json would.
func TestEncoderMatchesEncodingJSON(t *testing.T) {
	for _, r := range []Record{sample(), {Time: time.Unix(0, 0).UTC(), Event: "sign", Outcome: "PermissionDenied"}} {
		want, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		if got := appendJSON(nil, &r); !bytes.Equal(got, want) {
			t.Errorf("got  %s\nwant %s", got, want)
		}
	}
}

func TestRecordLines(t *testing.T) {
	p := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	r := sample()
	if err := l.Record(r); err != nil {
		t.Fatal(err)
	}
	r.Reason = "line\nbreak"
	if err := l.Record(r); err != nil {
		t.Fatal(err)
	}
	l.Close()
	fi, _ := os.Stat(p)
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", fi.Mode().Perm())
	}
	b, _ := os.ReadFile(p)
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines: %q", len(lines), b)
	}
	var back Record
	if err := json.Unmarshal([]byte(lines[1]), &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, r) {
		t.Errorf("round trip: %+v", back)
	}
}

func TestWriteFailureIsReported(t *testing.T) {
	l, err := Open("/dev/full")
	if err != nil {
		t.Skip("no /dev/full")
	}
	defer l.Close()
	if err := l.Record(sample()); !errors.Is(err, ErrWrite) {
		t.Fatalf("err = %v, want ErrWrite", err)
	}
}

// A record reaches syslog, and with two sinks a failing one does not stop
// the record (fall over); only when both fail is the record refused.
func TestSyslogAndFallOver(t *testing.T) {
	pc, sl := syslogPair(t)
	full, err := Open("/dev/full")
	if err != nil {
		t.Skip("no /dev/full")
	}
	defer full.Close()

	both := Either(nil, full, sl)
	if err := both.Record(sample()); err != nil {
		t.Fatalf("one sink working: %v", err)
	}
	buf := make([]byte, 4096)
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, err := pc.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	if msg := string(buf[:n]); !strings.Contains(msg, "keyd-audit") || !strings.Contains(msg, `"keyset":"billing-dpop"`) || !strings.HasPrefix(msg, "<86>") {
		t.Errorf("syslog message %q (want authpriv.info, the tag and the JSON record)", msg)
	}
	if err := Either(nil, full, full).Record(sample()); !errors.Is(err, ErrWrite) {
		t.Errorf("both sinks failing: %v", err)
	}
}

// syslogPair returns a datagram socket standing for syslog (read only if
// the test reads it) and a Syslog sink writing to it, both closed at
// cleanup.
func syslogPair(t *testing.T) (net.PacketConn, *Syslog) {
	t.Helper()
	dir, err := os.MkdirTemp("", "kl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	addr := filepath.Join(dir, "log")
	pc, err := net.ListenPacket("unixgram", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	sl, err := OpenSyslog(addr, "keyd-audit")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sl.Close() })
	return pc, sl
}
