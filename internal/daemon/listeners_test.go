package daemon

import (
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/keyd-dev/keyd/internal/config"
)

// A12: a raw connection that sends nothing, or only part of the HTTP/2
// preface, is closed by the server (ConnectionTimeout, 5 s), not held.
func TestSilentConnectionIsClosed(t *testing.T) {
	socket, _ := startDaemon(t, "")
	for _, send := range []string{"", "PRI * HTTP/2.0\r\n"} {
		c, err := net.Dial("unix", socket)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if send != "" {
			if _, err := c.Write([]byte(send)); err != nil {
				t.Fatal(err)
			}
		}
		// Far longer than the 5 s handshake timeout, so a loaded
		// machine cannot make this flaky; a server that never closes
		// still fails.
		c.SetReadDeadline(time.Now().Add(60 * time.Second))
		n, err := io.Copy(io.Discard, c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("a connection that sent %q was still open after 60 s (%d bytes read)", send, n)
		}
	}
}

// A13: the TCP listener cannot be configured without mutual TLS: a start
// with tcp.listen and no certificates is refused.
func TestTCPWithoutMutualTLSRefused(t *testing.T) {
	dir := t.TempDir()
	for _, tcp := range []string{
		"tcp: {listen: \"127.0.0.1:0\"}",
		"tcp: {listen: \"127.0.0.1:0\", cert_file: /c.pem, key_file: /k.pem}",
	} {
		_, err := config.Parse([]byte("socket: "+dir+"/k.sock\nstate_dir: "+dir+"/state\nbackend: {soft: {}}\n"+tcp+"\n"), "test.yaml")
		if err == nil || !strings.Contains(err.Error(), "mutual TLS") {
			t.Errorf("%s: %v, want refused: mutual TLS only", tcp, err)
		}
	}
}
