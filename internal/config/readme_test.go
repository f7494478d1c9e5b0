package config

import (
	"os"
	"regexp"
	"testing"

	"go.yaml.in/yaml/v3"
)

// The configuration examples in the READMEs must be configurations keyd
// accepts: every ```yaml block, with what a fragment leaves out (a socket,
// a state directory, a backend, a key set) filled in.
func TestREADMEExamples(t *testing.T) {
	block := regexp.MustCompile("(?ms)^```yaml\n(.*?)^```")
	fill := map[string]any{
		"socket":    "/run/keyd/keyd.sock",
		"state_dir": "/var/lib/keyd",
		"backend":   map[string]any{"soft": map[string]any{}},
		"keysets": []any{map[string]any{"name": "d", "purpose": "dpop", "alg": "ES256",
			"allow": map[string]any{"uids": []any{0}}}},
	}
	n := 0
	for _, file := range []string{"../../README.md", "../../dist/systemd/README.md"} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for i, m := range block.FindAllSubmatch(b, -1) {
			var doc map[string]any
			if err := yaml.Unmarshal(m[1], &doc); err != nil {
				t.Errorf("%s, yaml block %d: %v\n%s", file, i+1, err, m[1])
				continue
			}
			for k, v := range fill {
				if _, ok := doc[k]; !ok {
					doc[k] = v
				}
			}
			out, err := yaml.Marshal(doc)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := Parse(out, file); err != nil {
				t.Errorf("%s, yaml block %d:\n%s\nis refused: %v", file, i+1, m[1], err)
			}
			n++
		}
	}
	if n < 5 {
		t.Errorf("found %d yaml blocks in the READMEs; want at least 5", n)
	}
}
