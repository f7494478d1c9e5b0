package main

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// `keyd request -H 'Host: name'` reaches a virtual host through the URL's
// address, as curl does: the server gets that Host, and a proof for it.
func TestRequestHostHeader(t *testing.T) {
	f := newFakeServer(t)
	socket := startDaemon(t, f.srv.URL)
	rs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"host": r.Host, "htu": claimsOf(r.Header.Get("DPoP"))["htu"]})
	}))
	defer rs.Close()
	var stdout, stderr strings.Builder
	status := run([]string{"request", "-H", "Host: rs.example.test", "--socket", socket, "--issuer", f.srv.URL, "--client-id", "c1",
		"--dpop-keyset", "dpop", "--assertion-keyset", "assert", rs.URL + "/api"}, &stdout, &stderr)
	want := `{"host":"rs.example.test","htu":"http://rs.example.test/api"}` + "\n"
	if status != 0 || stdout.String() != want {
		t.Errorf("exit %d, stdout %q, stderr %q; want stdout %q", status, stdout.String(), stderr.String(), want)
	}
}

// `-d @-` refuses a body on stdin longer than it reads, rather than send
// the first 64 MiB of it as if that were the whole body.
func TestRequestDataFromStdinNotTruncated(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "body")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(64<<20 + 1); err != nil { // sparse: no disk used
		t.Fatal(err)
	}
	stdin := os.Stdin
	os.Stdin = f
	defer func() { os.Stdin = stdin }()
	b, err := readData("@-")
	if err == nil {
		t.Fatalf("read %d bytes of a %d-byte body without an error", len(b), 64<<20+1)
	}
}

// `-d @FILE` is bounded as `-d @-` is: a file (or a device that never ends)
// larger than a request body can be is refused, not read into memory.
func TestRequestDataFromFileBounded(t *testing.T) {
	p := filepath.Join(t.TempDir(), "body")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 64<<20+1); err != nil { // sparse: no disk used
		t.Fatal(err)
	}
	b, err := readData("@" + p)
	if !errors.Is(err, errUsage) || !strings.Contains(err.Error(), "64 MiB") {
		t.Fatalf("readData(@FILE of %d bytes) = %d bytes, %v; want a usage error naming the 64 MiB bound", 64<<20+1, len(b), err)
	}
}
