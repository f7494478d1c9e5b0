package main

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Started by systemd with Type=notify, keyd serve says READY=1 only once
// its socket answers, tells its state in STATUS=, and says STOPPING=1 when
// it is told to stop: units ordered after keyd.service (After=) start
// only once they can sign.
func TestServeNotifiesSystemd(t *testing.T) {
	bin, dir := binaryAndDir(t, "kn")
	notify := filepath.Join(dir, "notify")
	nc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	conf, sock := softConfig(t, dir)
	serve := exec.Command(bin, "serve", "--config", conf)
	serve.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify, "GORACE=atexit_sleep_ms=10")
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- serve.Wait() }()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			serve.Process.Kill()
			<-done
		}
	})

	// next returns the next notification, waiting up to 30 s.
	next := func() string {
		t.Helper()
		buf := make([]byte, 4096)
		nc.SetReadDeadline(time.Now().Add(30 * time.Second))
		n, err := nc.Read(buf)
		if err != nil {
			t.Fatalf("no notification: %v", err)
		}
		return string(buf[:n])
	}
	if got := next(); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	// Ready means serving: a client call succeeds at once.
	out, err := exec.Command(bin, "proof", "--socket", sock, "--keyset", "d", "--htm", "GET", "--htu", "https://rs.example/r").CombinedOutput()
	if err != nil {
		t.Fatalf("keyd proof after READY=1: %v\n%s", err, out)
	}
	if got, want := next(), "STATUS=serving on "+sock+"; backend soft healthy; 1 key set(s)"; got != want {
		t.Errorf("status %q, want %q", got, want)
	}

	if err := serve.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	var rest []string
	for len(rest) < 2 {
		rest = append(rest, next())
	}
	if !strings.Contains(strings.Join(rest, "\n"), "STOPPING=1") ||
		!strings.Contains(strings.Join(rest, "\n"), "STATUS=stopping: finishing the calls in flight") {
		t.Errorf("notifications at stop %q, want STOPPING=1 and a stopping status", rest)
	}
	if err := <-done; err != nil {
		t.Errorf("keyd serve: %v", err)
	}
	stopped = true
}
