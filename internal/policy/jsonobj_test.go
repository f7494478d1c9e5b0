package policy

import (
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

// jsonSeeds are inputs for FuzzParseObjectDifferential: one of each kind of
// syntax error encoding/json reports, escapes, surrogates, duplicates and
// nesting.
var jsonSeeds = []string{
	``, ` `, "\v", "\u00a0", `{}`, ` { } `, "\t{\r\n}\n", `[]`, `[`, `[x`, `"s"`, `"s"x`, `"s`, `1`, `-`, `-x`, `01`,
	`1.`, `1.x`, `1e`, `1e+`, `1ex`, `1E-5`, `tru`, `trux`, `true`, `fals`, `nul`, `nulx`, `x`, `}`, `]`, `:`, `,`,
	"\xef\xbb\xbf{}", `{} `, `{}{}`, `{} x`, `{}]`, `{}"`, `{`, `{"`, `{"a`, `{"a"`, `{"a":`, `{"a":1`, `{"a":1,`,
	`{"a":1,}`, `{"a":1]`, `{]`, `{,}`, `{:}`, `{1:2}`, `{[]:1}`, `{{}:1}`, `{'a':1}`, `{"a"1}`, `{"a"}`, `{"a",}`,
	`{"a":}`, `{"a":]`, `{"a":,}`, `{"a"::1}`, `{"a":1 "b":2}`, `{"a":1:2}`, `{"a":1,,"b":2}`, `{"a":1,"b"}`,
	`{"a":[}`, `{"a":[1}`, `{"a":[1,]}`, `{"a":[,1]}`, `{"a":[1 2]}`, `{"a":[1:2]}`, `{"a":[1,"b":2]}`, `{"a":[[]]}`,
	`{"a":{]}`, `{"a":{"b":1]}`, `{"a":{"b"}}`, `{"a":{"b":1,}}`, `{"a":[{"b":1,"b":{}}]}`, `{"a":{"b":1,"b":`,
	`{"a":1,"a":`, `{"a":1,"a"`, `{"a":1,"a"x`, `{"a":1,"\u0061":2}`, `{"\ud800":1,"\udc00":2}`,
	`{"a":"\ud83d\ude00\ud83d\u0041\ude00\udbff\udfff\ud800\ud800\udc00"}`, `{"a":"\u00e9\u2028\u2029\u0000\u001f\u007f"}`,
	`{"a":"\"\\\/\b\f\n\r\t"}`, `{"a":"\x"}`, `{"a":"\u12"}`, `{"a":"\u12g4"}`, `{"a":"\`, `{"a":"\u`, "{\"a\":\"\n\"}",
	"{\"a\":\"\x7f\"}", "{\"a\":\"é😀\"}", "{\"é\":1}", "{\"a\":\xc3}", "{\"a\":1}\xc3\xa9", "{\"a\":\"\xff\"}",
	`{"n":[-0,0.5,-1.25e+10,1E5,12345678901234567890,1e400,-0.0e-0]}`, `{"l":[true,false,null]}`, `{"a":-01}`,
	`{"a":0x10}`, `{"a":.5}`, `{"a":+1}`, `{"a":1.5.5}`, `{"a":Infinity}`, `{"a":NaN}`, `{"a":truex}`, `{"a":t}`,
	`{"a":{},"b":[],"c":[{}],"d":{"e":{"f":[]}}}`, `{"":0}`, `{"":0,"":1}`, `{"z":1,"a":2,"m":{"y":1,"b":2}}`,
	`{"a":` + strings.Repeat(`[`, 31) + strings.Repeat(`]`, 31) + `}`,
	`{"a":` + strings.Repeat(`[`, 32) + strings.Repeat(`]`, 32) + `}`,
	`{"a":` + strings.Repeat(`{"b":`, 31) + `1` + strings.Repeat(`}`, 31) + `}`,
	`{"a":` + strings.Repeat(`{"b":`, 32) + `1` + strings.Repeat(`}`, 32) + `}`,
	`{"a":` + strings.Repeat(`[`, 40) + `x`,
	`{"htm":"POST","htu":"https://server.example.com/token","nonce":"eyJ7S_zG.eyJH0-Z.HX4w-7v"}`,
	`{"x":[1,"1",true,null,[],{}],"y":[1,"1",true,null,[],{}],"z":[1,"1",true,null,[],{"a":1}],"w":{},"v":[]}`,
	manyMembers(40, ""), manyMembers(40, `,"m3":0`), manyMembers(40, `,"m39":0`), manyMembers(16, `,"m0":0`),
	`{"typ":"dpop+jwt","alg":"ES256","jwk":{"kty":"EC","crv":"P-256","x":"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs","y":"9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"}}`,
}

// FuzzParseObjectDifferential checks parseObject and marshal against the
// encoding/json implementation keyd used before (jsonobj_ref_test.go): the
// same accept or reject, the same violation, the same values, the same
// encoding.
func FuzzParseObjectDifferential(f *testing.F) {
	for _, s := range jsonSeeds {
		f.Add(false, []byte(s))
		f.Add(true, []byte(s))
	}
	f.Fuzz(func(t *testing.T, header bool, data []byte) {
		what := "claims"
		if header {
			what = "header"
		}
		got, gotV := parseObject(data, what)
		want, wantV := refParseObject(data, what)
		if (gotV == nil) != (wantV == nil) || gotV != nil && *gotV != *wantV {
			t.Fatalf("parseObject(%q) violation\n got %#v\nwant %#v", data, gotV, wantV)
		}
		if gotV == nil {
			var names []string
			for _, m := range got.members {
				names = append(names, m.name)
				if v, ok := got.get(m.name); !ok || !reflect.DeepEqual(v, m.val) {
					t.Fatalf("parseObject(%q).get(%q) = %#v, %v; want %#v", data, m.name, v, ok, m.val)
				}
			}
			if !slices.Equal(names, want.names) {
				t.Fatalf("parseObject(%q) names %q, want %q", data, names, want.names)
			}
			vals := got.asMap()
			if !reflect.DeepEqual(vals, want.vals) {
				t.Fatalf("parseObject(%q) values %#v, want %#v", data, vals, want.vals)
			}
			out, err := got.appendJSON(nil)
			if ref, refErr := refMarshal(want.vals); (err == nil) != (refErr == nil) || string(out) != string(ref) {
				t.Fatalf("parseObject(%q).appendJSON = %q, %v; want %q, %v", data, out, err, ref, refErr)
			}
			checkMarshal(t, vals, want.vals)
			for _, m := range got.members {
				checkMarshal(t, m.val, m.val)
				for _, m2 := range got.members {
					if eq, deep := equalJSON(m.val, m2.val), reflect.DeepEqual(m.val, m2.val); eq != deep {
						t.Fatalf("equalJSON(%#v, %#v) = %v, reflect.DeepEqual %v", m.val, m2.val, eq, deep)
					}
				}
			}
		}
		// Strings and numbers of any bytes, as keyd makes them.
		checkMarshal(t, string(data), string(data))
		checkMarshal(t, json.Number(data), json.Number(data))
	})
}

// checkMarshal checks that marshal(got) encodes as refMarshal(want).
func checkMarshal(t *testing.T, got, want any) {
	t.Helper()
	g, gErr := marshal(got)
	w, wErr := refMarshal(want)
	if (gErr == nil) != (wErr == nil) || string(g) != string(w) {
		t.Fatalf("marshal(%#v) = %q, %v; want %q, %v", got, g, gErr, w, wErr)
	}
	if s, ok := got.(string); ok {
		if g, w := jsonString(s), refJSONString(s); string(g) != string(w) {
			t.Fatalf("jsonString(%q) = %q, want %q", s, g, w)
		}
	}
}

// manyMembers returns an object with n members m0, m1, … and then extra.
func manyMembers(n int, extra string) string {
	var b strings.Builder
	b.WriteString("{")
	for i := range n {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, `"m%d":%d`, i, i)
	}
	return b.String() + extra + "}"
}

// TestObjectIndex checks an object past maxLinear members, where it indexes
// them.
func TestObjectIndex(t *testing.T) {
	const n = 3 * maxLinear
	o, v := parseObject([]byte(manyMembers(n, "")), "claims")
	if v != nil {
		t.Fatal(v)
	}
	if o.index == nil {
		t.Fatal("no index")
	}
	check := func() {
		t.Helper()
		for i, m := range o.members {
			if got, ok := o.get(m.name); !ok || got != m.val {
				t.Fatalf("get(%q) = %v, %v; want %v", m.name, got, ok, m.val)
			}
			if o.find(m.name) != i {
				t.Fatalf("find(%q) = %d, want %d", m.name, o.find(m.name), i)
			}
		}
	}
	check()
	o.set("m7", "seven")
	o.set("new", "value")
	check()
	if got, _ := o.get("m7"); got != "seven" {
		t.Fatalf("m7 = %v after set", got)
	}
	if len(o.members) != n+1 || o.members[n].name != "new" {
		t.Fatalf("members after set: %v", o.members)
	}
	if _, ok := o.get("m99"); ok {
		t.Fatal("get of a missing member succeeded")
	}
	if _, err := o.appendJSON(nil); err != nil {
		t.Fatal(err)
	}
	if !slices.IsSortedFunc(o.members, func(a, b member) int { return strings.Compare(a.name, b.name) }) {
		t.Fatalf("members not sorted after appendJSON: %v", o.members)
	}
	check()
	// Filling in claims of a large claims set.
	claims := strings.TrimSuffix(manyMembers(n, ""), "}") + `,"iss":"https://op.example.com","exp":` + at(60) + `}`
	tok, err := jwtPolicy.Prepare(now, testKey, nil, []byte(claims), &seqReader{})
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(tok.Claims, &m); err != nil || len(m) != n+4 || m["jti"] != firstJTI {
		t.Fatalf("claims %s: %v", tok.Claims, err)
	}
}

// TestParseObjectEveryCharacter puts every ASCII character, and the
// characters whose UTF-8 starts with each other lead byte, in every position
// of the grammar, and compares parseObject with the reference.
func TestParseObjectEveryCharacter(t *testing.T) {
	templates := []string{
		`X`, `{X`, `{"a"X`, `{"a":X`, `{"a":1X`, `{"a":1,X`, `{"a":[X`, `{"a":[1X`, `{"a":[1,X`,
		`{"a":{X`, `{"a":{"b":1X`, `{"a":"X"}`, `{"a":"\X"}`, `{"a":"\uX"}`, `{"a":"\u0X"}`,
		`{"a":tX`, `{"a":trX`, `{"a":fX`, `{"a":nX`, `{"a":nuX`, `{"a":-X`, `{"a":0X`, `{"a":1.X`,
		`{"a":1.5X`, `{"a":1eX`, `{"a":1e+X`, `{"a":1e5X`, `{}X`, `{"a":1}X`,
	}
	var chars []rune
	for r := rune(0); r < 0x80; r++ {
		chars = append(chars, r)
	}
	seen := map[byte]bool{}
	for r := rune(0x80); r <= utf8.MaxRune; r++ {
		if lead := string(r)[0]; utf8.ValidRune(r) && !seen[lead] {
			seen[lead] = true
			chars = append(chars, r)
		}
	}
	chars = append(chars, '\u2028', '\ufeff')
	for _, tmpl := range templates {
		for _, r := range chars {
			for _, end := range []string{"", "}", "]}", `"}`} {
				data := []byte(strings.Replace(tmpl, "X", string(r), 1) + end)
				got, gotV := parseObject(data, "claims")
				want, wantV := refParseObject(data, "claims")
				if (gotV == nil) != (wantV == nil) || gotV != nil && *gotV != *wantV {
					t.Fatalf("parseObject(%q) violation\n got %#v\nwant %#v", data, gotV, wantV)
				}
				if gotV == nil && !reflect.DeepEqual(got.asMap(), want.vals) {
					t.Fatalf("parseObject(%q) = %#v, want %#v", data, got.asMap(), want.vals)
				}
			}
		}
	}
}
