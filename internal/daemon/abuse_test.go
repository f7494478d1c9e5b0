package daemon

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/keyd-dev/keyd/client"
	"github.com/keyd-dev/keyd/internal/config"
	keydv1 "github.com/keyd-dev/keyd/proto/keyd/v1"
)

// daemonConfig is a configuration on the soft keystore in a fresh short
// directory (socket paths have a length limit), with one dpop key set "d"
// this test's uid may use. extra is appended, "{dir}" in it replaced by
// the directory: top-level lines, or the key set's own indented by four
// spaces.
func daemonConfig(t *testing.T, extra string) *config.Config {
	t.Helper()
	dir, err := os.MkdirTemp("", "ka")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	yaml := fmt.Sprintf(`socket: %[1]s/k.sock
state_dir: %[1]s/state
backend: {soft: {}}
keysets:
  - name: d
    purpose: dpop
    alg: ES256
    allow: {uids: [%[2]d]}
`, dir, os.Geteuid()) + strings.ReplaceAll(extra, "{dir}", dir)
	cfg, err := config.Parse([]byte(yaml), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// startDaemon runs a daemon in this process on the soft keystore.
func startDaemon(t *testing.T, extra string) (socket string, stop func()) {
	t.Helper()
	cfg := daemonConfig(t, extra)
	_, stop = serve(t, cfg)
	return cfg.Socket, stop
}

// serve runs a daemon with cfg in this process. stop stops it and checks
// that Serve returned nil; it runs once, at the latest at cleanup.
func serve(t *testing.T, cfg *config.Config) (d *Daemon, stop func()) {
	t.Helper()
	return serveWith(t, cfg, Options{}, nil)
}

// serveWith is serve with opts, and before (if not nil) called between
// New and Serve.
func serveWith(t *testing.T, cfg *config.Config, opts Options, before func(*Daemon)) (d *Daemon, stop func()) {
	t.Helper()
	d, cancel, done := run(t, cfg, opts, before)
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("serve: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return d, stop
}

// run makes a daemon with cfg and opts in this process, calls before (if
// not nil), and starts Serve: cancel ends it, and done gives what Serve
// returned, for a test that watches how Serve ends (serveWith checks it).
func run(t *testing.T, cfg *config.Config, opts Options, before func(*Daemon)) (d *Daemon, cancel context.CancelFunc, done <-chan error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	d, err := New(ctx, cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	if before != nil {
		before(d)
	}
	served := make(chan error, 1)
	go func() { served <- d.Serve(ctx) }()
	return d, cancel, served
}

// probe signs n proofs over an established connection and returns the
// latencies; every one must succeed.
func probe(t *testing.T, cl *client.Client, n int) []time.Duration {
	t.Helper()
	var lat []time.Duration
	for range n {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		start := time.Now()
		_, err := cl.DPoP("d").Proof(ctx, "GET", "https://a.example/")
		cancel()
		if err != nil {
			t.Errorf("allowed caller refused during the abuse: %v", err)
			return lat
		}
		lat = append(lat, time.Since(start))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return lat
}

func p50(l []time.Duration) time.Duration {
	if len(l) == 0 {
		return 0
	}
	return l[len(l)/2]
}

// settle waits for the goroutine count to come back near baseline.
func settle(t *testing.T, baseline int, within time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(within)
	n := runtime.NumGoroutine()
	for time.Now().Before(deadline) && n > baseline+5 {
		time.Sleep(100 * time.Millisecond)
		n = runtime.NumGoroutine()
	}
	return n
}

// A11, A12: a flood of 10 000 connections (idle, garbage and half-open),
// a flood of streams, oversized and malformed messages: the allowed caller
// keeps being served, and goroutines come back to baseline. The flood comes
// from the test's own uid, like the caller, so the limit per uid is set to
// the listener's: this is the flood max_connections must absorb (the limit
// per uid has TestConnectionsPerUID).
func TestAbuse(t *testing.T) {
	if testing.Short() {
		t.Skip("takes several seconds")
	}
	socket, stop := startDaemon(t, "limits: {max_connections: 256, max_connections_per_uid: 256}\n")
	cl, err := client.Dial(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	probe(t, cl, 20) // warm up
	runtime.GC()
	baseline := runtime.NumGoroutine()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	heapBefore := ms.HeapInuse
	before := probe(t, cl, 200)

	// 10 000 connections in waves of 500: each sends nothing, or garbage,
	// or half an HTTP/2 preface, and is left open until its wave ends.
	var connected, refused atomic.Int64
	stopProbe := make(chan struct{})
	probeDone := make(chan []time.Duration)
	go func() {
		var all []time.Duration
		for {
			select {
			case <-stopProbe:
				sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
				probeDone <- all
				return
			default:
				all = append(all, probe(t, cl, 10)...)
			}
		}
	}()
	for wave := range 20 {
		var conns []net.Conn
		var mu sync.Mutex
		var wg sync.WaitGroup
		for w := range 10 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 50 {
					c, err := net.DialTimeout("unix", socket, 200*time.Millisecond)
					if err != nil {
						refused.Add(1)
						continue
					}
					connected.Add(1)
					switch (wave + w + i) % 3 {
					case 1:
						c.Write([]byte("\x00\x01garbage that is not HTTP/2\r\n\r\n"))
					case 2:
						c.Write([]byte("PRI * HTTP/2.0\r\n"))
					}
					mu.Lock()
					conns = append(conns, c)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		for _, c := range conns {
			c.Close()
		}
	}
	close(stopProbe)
	during := <-probeDone
	t.Logf("10000 connection attempts: %d connected, %d refused by the kernel's backlog", connected.Load(), refused.Load())

	// A flood of streams on one connection: far more than
	// MaxConcurrentStreams, none sending anything.
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	sctx, scancel := context.WithCancel(context.Background())
	var streams sync.WaitGroup
	for range 500 {
		streams.Add(1)
		go func() {
			defer streams.Done()
			if st, err := keydv1.NewKeyServiceClient(conn).SignStream(sctx); err == nil {
				st.Recv() // until the flood is called off
			}
		}()
	}
	floodLat := probe(t, cl, 100)

	scancel()
	streams.Wait()
	conn.Close()

	// Oversized and malformed messages are refused before any handler.
	conn2, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close()
	octx, ocancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer ocancel()
	big := make([]byte, 5<<20)
	_, err = keydv1.NewKeyServiceClient(conn2).Sign(octx, &keydv1.SignRequest{Keyset: "d", Claims: big})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("5 MiB request: %v, want ResourceExhausted", err)
	}
	var out rawMsg
	err = conn2.Invoke(octx, "/keyd.v1.KeyService/Sign", &rawMsg{b: []byte("\xff\xff\xff\xff not protobuf")}, &out, grpc.ForceCodec(rawCodec{}))
	if c := status.Code(err); c != codes.Internal && c != codes.InvalidArgument {
		t.Errorf("malformed protobuf: %v", err)
	}
	conn2.Close()

	t.Logf("allowed caller p50: %v before, %v during the connection flood (%d signs), %v during the stream flood",
		p50(before), p50(during), len(during), p50(floodLat))

	// Half-open connections are closed by the server's handshake timeout
	// (5 s); then goroutines and memory are back to baseline.
	n := settle(t, baseline, 15*time.Second)
	runtime.GC()
	runtime.ReadMemStats(&ms)
	t.Logf("goroutines %d → %d; heap in use %d KiB → %d KiB", baseline, n, heapBefore>>10, ms.HeapInuse>>10)
	if n > baseline+5 {
		buf := make([]byte, 1<<20)
		t.Errorf("goroutines did not come back: %d, baseline %d\n%s", n, baseline, buf[:runtime.Stack(buf, true)])
	}
	if ms.HeapInuse > heapBefore+32<<20 {
		t.Errorf("heap in use grew from %d KiB to %d KiB", heapBefore>>10, ms.HeapInuse>>10)
	}
	stop()
}

// rawMsg and rawCodec send bytes as they are.
type rawMsg struct{ b []byte }

type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return v.(*rawMsg).b, nil }
func (rawCodec) Unmarshal(b []byte, v any) error {
	v.(*rawMsg).b = append([]byte(nil), b...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// A3: a child process connects, sends a Sign request and exits before it
// is answered. The daemon serves the next caller and keeps no goroutine of
// the dead one.
func TestCallerGoneMidRequest(t *testing.T) {
	if sock := os.Getenv("KEYD_TEST_CHILD_SOCKET"); sock != "" {
		// The child: start a request on a raw connection, then exit.
		c, err := net.Dial("unix", sock)
		if err != nil {
			os.Exit(3)
		}
		c.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
		cl, err := client.Dial(sock)
		if err == nil {
			go cl.DPoP("d").Proof(context.Background(), "GET", "https://a.example/")
			time.Sleep(time.Millisecond)
		}
		os.Exit(0)
	}
	socket, _ := startDaemon(t, "")
	cl, err := client.Dial(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	probe(t, cl, 5)
	runtime.GC()
	baseline := runtime.NumGoroutine()
	for range 5 {
		child := exec.Command(os.Args[0], "-test.run=^TestCallerGoneMidRequest$")
		child.Env = append(os.Environ(), "KEYD_TEST_CHILD_SOCKET="+socket)
		if out, err := child.CombinedOutput(); err != nil {
			t.Fatalf("child: %v\n%s", err, out)
		}
	}
	probe(t, cl, 5)
	if n := settle(t, baseline, 10*time.Second); n > baseline+5 {
		t.Errorf("goroutines %d after 5 callers died mid-request, baseline %d", n, baseline)
	}
}
