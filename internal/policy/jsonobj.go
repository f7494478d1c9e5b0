package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"unicode/utf8"
)

// MaxJSONSize is the largest header or claims set, in bytes, that keyd
// accepts (and produces).
const MaxJSONSize = 16 << 10

// maxDepth bounds the nesting of arrays and objects inside a claim value.
const maxDepth = 32

// object is one strictly parsed JSON object: member names in input order and
// their values as decoded with json.Decoder.UseNumber (map[string]any, []any,
// string, json.Number, bool or nil).
type object struct {
	names []string
	vals  map[string]any
}

func (o *object) get(name string) (any, bool) {
	v, ok := o.vals[name]
	return v, ok
}

func (o *object) set(name string, v any) {
	if _, ok := o.vals[name]; !ok {
		o.names = append(o.names, name)
	}
	o.vals[name] = v
}

// parseObject parses data, which must be empty (meaning {}) or exactly one
// JSON object of at most MaxJSONSize bytes in valid UTF-8 whose objects, at
// every depth, have no duplicate member names. what is "header" or "claims";
// violations name the member ("header.typ" or "iss") where there is one.
func parseObject(data []byte, what string) (*object, *Violation) {
	if len(data) > MaxJSONSize {
		return nil, violation(what, "is %d bytes; at most %d are allowed", len(data), MaxJSONSize)
	}
	o := &object{vals: map[string]any{}}
	if len(bytes.TrimSpace(data)) == 0 {
		return o, nil
	}
	if !utf8.Valid(data) {
		return nil, violation(what, "is not valid UTF-8")
	}
	memberName := func(name string) string {
		if what == "header" {
			return "header." + name
		}
		return name
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, violation(what, "is not valid JSON: %s", jsonErr(err))
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, violation(what, "must be a JSON object ({...})")
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, violation(what, "is not valid JSON: %s", jsonErr(err))
		}
		name, ok := tok.(string)
		if !ok { // unreachable: the decoder only returns strings as keys
			return nil, violation(what, "is not valid JSON: member name is not a string")
		}
		if _, dup := o.vals[name]; dup {
			return nil, violation(memberName(name), "appears more than once; send each member once")
		}
		v, err := parseValue(dec, 1)
		if err != nil {
			var dupErr *duplicateError
			if errors.As(err, &dupErr) {
				return nil, violation(memberName(name), "contains an object with member %q more than once", dupErr.name)
			}
			if errors.Is(err, errTooDeep) {
				return nil, violation(memberName(name), "is nested more than %d levels deep", maxDepth)
			}
			return nil, violation(what, "is not valid JSON: %s", jsonErr(err))
		}
		o.names = append(o.names, name)
		o.vals[name] = v
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return nil, violation(what, "is not valid JSON: %s", jsonErr(err))
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, violation(what, "has data after the JSON object; send exactly one object")
	}
	return o, nil
}

type duplicateError struct{ name string }

func (e *duplicateError) Error() string { return "duplicate member " + e.name }

var errTooDeep = errors.New("nested too deep")

// parseValue reads one JSON value from dec.
func parseValue(dec *json.Decoder, depth int) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	d, ok := tok.(json.Delim)
	if !ok {
		return tok, nil // string, json.Number, bool or nil
	}
	if depth >= maxDepth {
		return nil, errTooDeep
	}
	switch d {
	case '{':
		m := map[string]any{}
		for dec.More() {
			tok, err := dec.Token()
			if err != nil {
				return nil, err
			}
			name, _ := tok.(string)
			if _, dup := m[name]; dup {
				return nil, &duplicateError{name}
			}
			v, err := parseValue(dec, depth+1)
			if err != nil {
				return nil, err
			}
			m[name] = v
		}
		if _, err := dec.Token(); err != nil {
			return nil, err
		}
		return m, nil
	case '[':
		a := []any{}
		for dec.More() {
			v, err := parseValue(dec, depth+1)
			if err != nil {
				return nil, err
			}
			a = append(a, v)
		}
		if _, err := dec.Token(); err != nil {
			return nil, err
		}
		return a, nil
	}
	return nil, errors.New("unexpected " + d.String()) // unreachable: Token checks nesting
}

// jsonErr shortens a decoder error for a message.
func jsonErr(err error) string {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return "unexpected end of input"
	}
	return strings.TrimPrefix(err.Error(), "json: ")
}

// marshal encodes v as compact JSON without HTML escaping. Values come from
// parseObject or are strings and json.Numbers keyd made, so it cannot fail
// in practice.
func marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

// jsonString encodes s as a JSON string.
func jsonString(s string) []byte {
	b, _ := marshal(s) // a string always encodes
	return b
}
