package main

import (
	"bytes"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// P8 (RELIABILITY.md): a process forked after C_Initialize inherits a
// module it must not use (PKCS#11 is not fork-safe), so keyd never forks:
// no package linked into the keyd binary imports os/exec, and none of
// keyd's own packages starts a process by any other way (os.StartProcess,
// syscall.ForkExec, exec(2), a raw fork or clone). Third-party packages are
// held to the first rule only: none of them imports os/exec today.
func TestKeydNeverForks(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	out, err := exec.Command("go", "list", "-deps", "-json", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	const ours = "github.com/keyd-dev/keyd"
	spawn := regexp.MustCompile(`\b(os\.StartProcess|syscall\.ForkExec|syscall\.StartProcess|syscall\.Exec|unix\.Exec|SYS_FORK|SYS_VFORK|SYS_CLONE3?)\b`)
	dec := json.NewDecoder(bytes.NewReader(out))
	seen := 0
	for {
		var p struct {
			ImportPath string
			Dir        string
			Standard   bool
			Imports    []string
			GoFiles    []string
			CgoFiles   []string
		}
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		seen++
		if slices.Contains(p.Imports, "os/exec") {
			t.Errorf("%s imports os/exec: keyd must not fork (PKCS#11 modules are not fork-safe)", p.ImportPath)
		}
		if p.ImportPath != ours && !strings.HasPrefix(p.ImportPath, ours+"/") {
			continue
		}
		for _, f := range append(p.GoFiles, p.CgoFiles...) {
			src, err := os.ReadFile(filepath.Join(p.Dir, f))
			if err != nil {
				t.Fatal(err)
			}
			if m := spawn.Find(src); m != nil {
				t.Errorf("%s/%s uses %s: keyd must not fork", p.ImportPath, f, m)
			}
		}
	}
	if seen < 20 {
		t.Fatalf("go list listed %d packages; want keyd's whole dependency graph", seen)
	}
}
