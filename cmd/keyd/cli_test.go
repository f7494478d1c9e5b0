package main

import (
	"errors"
	"flag"
	"io"
	"slices"
	"testing"
)

// A kid is base64url and may start with '-': it must still be taken as the
// positional argument, wherever the flags stand.
func TestParsePositionalDash(t *testing.T) {
	cases := []struct {
		args    []string
		pos     []string
		keyset  string
		json    bool
		wantErr bool
	}{
		{args: []string{"-Abc_9", "--keyset", "x"}, pos: []string{"-Abc_9"}, keyset: "x"},
		{args: []string{"--keyset=x", "-Abc_9"}, pos: []string{"-Abc_9"}, keyset: "x"},
		{args: []string{"--json", "--", "--keyset"}, pos: []string{"--keyset"}, json: true},
		{args: []string{"kid", "-json"}, pos: []string{"kid"}, json: true},
		{args: []string{"a", "b"}, wantErr: true},
		{args: []string{"--keyset"}, wantErr: true},
	}
	for _, tc := range cases {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		keyset := fs.String("keyset", "", "")
		asJSON := fs.Bool("json", false, "")
		pos, err := parse(fs, tc.args, 1)
		if tc.wantErr {
			if !errors.Is(err, errUsage) {
				t.Errorf("%q: err = %v, want a usage error", tc.args, err)
			}
			continue
		}
		if err != nil || !slices.Equal(pos, tc.pos) || *keyset != tc.keyset || *asJSON != tc.json {
			t.Errorf("%q: pos %q keyset %q json %v err %v", tc.args, pos, *keyset, *asJSON, err)
		}
	}
}
