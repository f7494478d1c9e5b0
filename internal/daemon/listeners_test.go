package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/client"
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

// One local user cannot take every connection: past
// limits.max_connections_per_uid its connections are closed at once, and
// its place comes back when one of its connections closes.
func TestConnectionsPerUID(t *testing.T) {
	socket, _ := startDaemon(t, "limits: {max_connections: 16, max_connections_per_uid: 2}\n")
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("unix", socket)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
		// The server's settings frame says it took the connection.
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(make([]byte, 9)); err != nil {
			t.Fatalf("connection %d of the uid: %v", len(held), err)
		}
	}
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	sign := func() error {
		cl, err := client.Dial(socket)
		if err != nil {
			return err
		}
		defer cl.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err = cl.DPoP("d").Proof(ctx, "GET", "https://a.example/")
		return err
	}
	if err := sign(); err == nil {
		t.Fatal("a third connection of the same uid was served with max_connections_per_uid 2")
	}
	held[0].Close()
	held = held[1:]
	var err error
	for range 50 { // the daemon sees the close when it reads: up to 5 s
		if err = sign(); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Errorf("after one of the uid's connections closed: %v", err)
	}
}

// The HTTP listener (the JWK Set, served to verifiers, often on a network
// address) takes at most limits.max_connections connections, like the
// other listeners: connections held open by anyone who can reach it must
// not use up keyd's file descriptors, which the socket and the audit log
// need.
func TestHTTPConnectionsLimited(t *testing.T) {
	cfg := daemonConfig(t, "http: {listen: \"127.0.0.1:0\"}\nlimits: {max_connections: 2}\n")
	d, _ := serve(t, cfg)
	addr := d.httpLis.Addr().String()
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	get := func(timeout time.Duration) error {
		hc := &http.Client{Timeout: timeout}
		resp, err := hc.Get("http://" + addr + "/jwks/d.json")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("HTTP %s", resp.Status)
		}
		return nil
	}
	if err := get(time.Second); err == nil {
		t.Fatal("a third connection was served with max_connections 2")
	}
	held[0].Close()
	held = held[1:]
	if err := get(10 * time.Second); err != nil {
		t.Errorf("after one of the connections closed: %v", err)
	}
}

// With admin_socket, the main socket takes no rotate or revoke, and the
// error says where they go instead of only "unknown service".
func TestAdminCallOnMainSocketSaysWhere(t *testing.T) {
	cfg := daemonConfig(t, "admin_socket: {dir}/admin.sock\n")
	serve(t, cfg)
	cl, err := client.Dial(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, rerr := cl.Rotate(ctx, "d", true)
	_, verr := cl.Revoke(ctx, "kid", "")
	for _, err := range []error{rerr, verr} {
		if status.Code(err) != codes.Unimplemented || !strings.Contains(err.Error(), "admin_socket") {
			t.Errorf("admin call on the main socket: %v, want Unimplemented naming admin_socket", err)
		}
	}
}

// http.metrics: false keeps /metrics off a listener that serves the JWK
// Set to those who should not see keyd's metrics; by default it is served.
func TestHTTPMetricsCanBeOff(t *testing.T) {
	for extra, want := range map[string]int{
		"http: {listen: \"127.0.0.1:0\"}\n":                 http.StatusOK,
		"http: {listen: \"127.0.0.1:0\", metrics: false}\n": http.StatusNotFound,
	} {
		cfg := daemonConfig(t, extra)
		d, stop := serve(t, cfg)
		base := "http://" + d.httpLis.Addr().String()
		for path, code := range map[string]int{"/metrics": want, "/jwks/d.json": http.StatusOK} {
			resp, err := http.Get(base + path)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != code {
				t.Errorf("%q: GET %s: HTTP %d, want %d", extra, path, resp.StatusCode, code)
			}
		}
		stop()
	}
}
