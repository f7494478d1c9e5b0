package jsonstr

import (
	"bytes"
	"encoding/json"
	"testing"
)

// reference is encoding/json's encoding of s, with or without HTML escapes.
func reference(t *testing.T, s string, html bool) []byte {
	t.Helper()
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(html)
	if err := enc.Encode(s); err != nil {
		t.Fatal(err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}

var seeds = []string{"", "plain", "quote\"back\\slash", "\x00\x1f\n\t\r\b\f\x7f", "<>&", "\u2028\u2029", "\xff\xfe", "é日本", "a\xc3", "\xed\xa0\x80", "😀"}

func TestAppend(t *testing.T) {
	for _, s := range seeds {
		for _, html := range []bool{false, true} {
			if got, want := Append(nil, s, html), reference(t, s, html); !bytes.Equal(got, want) {
				t.Errorf("Append(%q, html=%v) = %s, want %s", s, html, got, want)
			}
		}
	}
	if got := Append([]byte("x:"), "y", true); string(got) != `x:"y"` {
		t.Errorf("Append does not append: %s", got)
	}
}

func FuzzAppend(f *testing.F) {
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, html := range []bool{false, true} {
			if got, want := Append(nil, s, html), reference(t, s, html); !bytes.Equal(got, want) {
				t.Fatalf("Append(%q, html=%v) = %s, want %s", s, html, got, want)
			}
		}
	})
}
