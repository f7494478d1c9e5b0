package policy

// The implementation of parseObject and marshal that keyd used before
// jsonobj.go's own scanner and encoder: a walk over encoding/json's
// Decoder.Token and the encoding/json Encoder. It is kept, unchanged but for
// its names, as the reference FuzzParseObjectDifferential compares the
// current implementation with.

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"unicode/utf8"
)

// refObject is what refParseObject returns: the old object.
type refObject struct {
	names []string
	vals  map[string]any
}

// refParseObject parses data, which must be empty (meaning {}) or exactly one
// JSON object of at most MaxJSONSize bytes in valid UTF-8 whose objects, at
// every depth, have no duplicate member names. what is "header" or "claims";
// violations name the member ("header.typ" or "iss") where there is one.
func refParseObject(data []byte, what string) (*refObject, *Violation) {
	if len(data) > MaxJSONSize {
		return nil, violation(what, "is %d bytes; at most %d are allowed", len(data), MaxJSONSize)
	}
	o := &refObject{vals: map[string]any{}}
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
		return nil, violation(what, "is not valid JSON: %s", refJSONErr(err))
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, violation(what, "must be a JSON object ({...})")
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, violation(what, "is not valid JSON: %s", refJSONErr(err))
		}
		name, ok := tok.(string)
		if !ok { // unreachable: the decoder only returns strings as keys
			return nil, violation(what, "is not valid JSON: member name is not a string")
		}
		if _, dup := o.vals[name]; dup {
			return nil, violation(memberName(name), "appears more than once; send each member once")
		}
		v, err := refParseValue(dec, 1)
		if err != nil {
			var dupErr *refDuplicateError
			if errors.As(err, &dupErr) {
				return nil, violation(memberName(name), "contains an object with member %s more than once", quoteName(dupErr.name))
			}
			if errors.Is(err, errRefTooDeep) {
				return nil, violation(memberName(name), "is nested more than %d levels deep", maxDepth)
			}
			return nil, violation(what, "is not valid JSON: %s", refJSONErr(err))
		}
		o.names = append(o.names, name)
		o.vals[name] = v
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return nil, violation(what, "is not valid JSON: %s", refJSONErr(err))
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, violation(what, "has data after the JSON object; send exactly one object")
	}
	return o, nil
}

type refDuplicateError struct{ name string }

func (e *refDuplicateError) Error() string { return "duplicate member " + e.name }

var errRefTooDeep = errors.New("nested too deep")

// refParseValue reads one JSON value from dec.
func refParseValue(dec *json.Decoder, depth int) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	d, ok := tok.(json.Delim)
	if !ok {
		return tok, nil // string, json.Number, bool or nil
	}
	if depth >= maxDepth {
		return nil, errRefTooDeep
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
				return nil, &refDuplicateError{name}
			}
			v, err := refParseValue(dec, depth+1)
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
			v, err := refParseValue(dec, depth+1)
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

// refJSONErr shortens a decoder error for a message.
func refJSONErr(err error) string {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return "unexpected end of input"
	}
	return strings.TrimPrefix(err.Error(), "json: ")
}

// marshal encodes v as compact JSON without HTML escaping. Values come from
// refParseObject or are strings and json.Numbers keyd made, so it cannot fail
// in practice.
func refMarshal(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

// jsonString encodes s as a JSON string.
func refJSONString(s string) []byte {
	b, _ := refMarshal(s) // a string always encodes
	return b
}
