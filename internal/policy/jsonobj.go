package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/keyd-dev/keyd/internal/jsonstr"
)

// MaxJSONSize is the largest header or claims set, in bytes, that keyd
// accepts (and produces).
const MaxJSONSize = 16 << 10

// maxDepth bounds the nesting of arrays and objects inside a claim value.
const maxDepth = 32

// object is one strictly parsed JSON object.
type object struct {
	members []member // in input order
	// index maps the member names to their position in members once there
	// are more than maxLinear of them, to keep finding one cheap.
	index map[string]int
}

// member is one member of an object. Its value is what encoding/json
// decodes into an any with UseNumber: map[string]any, []any, string,
// json.Number, bool or nil.
type member struct {
	name string
	val  any
}

// maxLinear is the number of members up to which an object is searched
// linearly: comparing the few names of a typical header or claims set is
// faster than a map, which keeps the search cheap for a large object.
const maxLinear = 16

// find returns the position of the member name, or -1.
func (o *object) find(name string) int {
	if o.index != nil {
		if i, ok := o.index[name]; ok {
			return i
		}
		return -1
	}
	for i := range o.members {
		if o.members[i].name == name {
			return i
		}
	}
	return -1
}

func (o *object) get(name string) (any, bool) {
	if i := o.find(name); i >= 0 {
		return o.members[i].val, true
	}
	return nil, false
}

func (o *object) set(name string, v any) {
	if i := o.find(name); i >= 0 {
		o.members[i].val = v
		return
	}
	o.add(name, v)
}

// add appends the member name, which o does not have.
func (o *object) add(name string, v any) {
	if o.members == nil {
		// Room for a typical claims set and what keyd adds to it.
		o.members = make([]member, 0, 8)
	}
	o.members = append(o.members, member{name, v})
	switch n := len(o.members); {
	case o.index != nil:
		o.index[name] = n - 1
	case n > maxLinear:
		o.index = make(map[string]int, 2*n)
		for i, m := range o.members {
			o.index[m.name] = i
		}
	}
}

// foldCollision returns a violation for the first member whose name equals
// an earlier member's without regard to case (strings.EqualFold: ASCII case
// and Unicode simple folding, so "iſſ" and "ISS" equal "iss"), or nil.
func (o *object) foldCollision() *Violation { return o.foldCollisionFrom(0) }

// foldCollisionFrom is foldCollision for the members from index from on,
// each against all before it: for members added to an object already
// checked.
func (o *object) foldCollisionFrom(from int) *Violation {
	ms := o.members
	clash := func(earlier, name string) *Violation {
		return violation(name, "is the member %s in another letter case; verifiers that match names without regard to case would read one as the other: send each member once, in one spelling", quoteName(earlier))
	}
	if len(ms) <= maxLinear {
		for i := max(from, 1); i < len(ms); i++ {
			for j := range i {
				if strings.EqualFold(ms[i].name, ms[j].name) {
					return clash(ms[j].name, ms[i].name)
				}
			}
		}
		return nil
	}
	seen := make(map[string]string, len(ms))
	for i, m := range ms {
		k := foldKey(m.name)
		earlier, ok := seen[k]
		switch {
		case !ok:
			seen[k] = m.name
		case i >= from:
			return clash(earlier, m.name)
		}
	}
	return nil
}

// foldKey maps s to a key that two strings share exactly when
// strings.EqualFold reports them equal: each rune replaced by the smallest
// rune of its simple case-folding orbit (as encoding/json's foldName does).
func foldKey(s string) string {
	b := make([]byte, 0, len(s))
	for _, r := range s {
		for {
			f := unicode.SimpleFold(r)
			if f <= r {
				r = f
				break
			}
			r = f
		}
		b = utf8.AppendRune(b, r)
	}
	return string(b)
}

// asMap returns o's members as the value of a nested object.
func (o *object) asMap() map[string]any {
	m := make(map[string]any, len(o.members))
	for _, mem := range o.members {
		m[mem.name] = mem.val
	}
	return m
}

// appendJSON appends o encoded as marshal encodes the map of its members,
// which it leaves sorted by name.
func (o *object) appendJSON(b []byte) ([]byte, error) {
	b, err := appendMembers(b, o.members)
	if o.index != nil {
		for i, m := range o.members {
			o.index[m.name] = i
		}
	}
	return b, err
}

// parseObject parses data, which must be empty (meaning {}) or exactly one
// JSON object of at most MaxJSONSize bytes in valid UTF-8 whose objects, at
// every depth, have no duplicate member names. what is "header" or "claims";
// violations name the member ("header.typ" or "iss") where there is one.
//
// It accepts exactly what keyd accepted when it walked the input with
// encoding/json's Decoder.Token, and its syntax errors have the same text
// (jsonobj_ref_test.go keeps that implementation, and
// FuzzParseObjectDifferential compares the two).
func parseObject(data []byte, what string) (*object, *Violation) {
	if len(data) > MaxJSONSize {
		return nil, violation(what, "is %d bytes; at most %d are allowed", len(data), MaxJSONSize)
	}
	o := &object{}
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
	// One copy of the input, which the strings parsed from it share.
	p := &parser{src: string(data)}
	switch c, _ := p.peek(); c {
	case '{':
		p.pos++
	case '[':
		return nil, violation(what, "must be a JSON object ({...})")
	default:
		// Decoder.Token read the whole value to return it: whether it is
		// one decides the message.
		if _, err := p.value(1); err != nil {
			return nil, violation(what, "is not valid JSON: %s", err)
		}
		return nil, violation(what, "must be a JSON object ({...})")
	}
	for first := true; ; first = false {
		more, err := p.next(objectSyntax, first)
		if err != nil {
			return nil, violation(what, "is not valid JSON: %s", err)
		}
		if !more {
			break
		}
		name, err := p.name(first)
		if err != nil {
			return nil, violation(what, "is not valid JSON: %s", err)
		}
		if o.find(name) >= 0 {
			return nil, violation(memberName(name), "appears more than once; send each member once")
		}
		v, err := p.memberValue(1)
		if err != nil {
			var dupErr *duplicateError
			switch {
			case errors.As(err, &dupErr):
				return nil, violation(memberName(name), "contains an object with member %s more than once", quoteName(dupErr.name))
			case errors.Is(err, errTooDeep):
				return nil, violation(memberName(name), "is nested more than %d levels deep", maxDepth)
			}
			return nil, violation(what, "is not valid JSON: %s", err)
		}
		o.add(name, v)
	}
	if _, ok := p.peek(); ok {
		return nil, violation(what, "has data after the JSON object; send exactly one object")
	}
	return o, nil
}

type duplicateError struct{ name string }

func (e *duplicateError) Error() string { return "duplicate member " + e.name }

var errTooDeep = errors.New("nested too deep")

// syntaxError is invalid JSON, in the words of encoding/json's
// SyntaxError.
type syntaxError string

func (e syntaxError) Error() string { return string(e) }

// errEOF is input that ends before the JSON value does.
const errEOF = syntaxError("unexpected end of input")

// invalidChar reports the unexpected byte c, in context if there is one.
func invalidChar(c byte, context string) error {
	if context == "" {
		return syntaxError("invalid character " + quoteChar(c))
	}
	return syntaxError("invalid character " + quoteChar(c) + " " + context)
}

// quoteChar formats c as encoding/json's errors do: a byte of 0x80 or more
// is shown as the character U+0080 to U+00FF.
func quoteChar(c byte) string {
	switch c {
	case '\'':
		return `'\''`
	case '"':
		return `'"'`
	}
	s := strconv.Quote(string(rune(c)))
	return "'" + s[1:len(s)-1] + "'"
}

// parser reads JSON, known to be valid UTF-8, from its start. It follows
// the grammar of RFC 8259 as encoding/json's scanner does, in the order
// encoding/json's Decoder.Token reads tokens, so that the first error it
// meets, and the message, are those of Token.
type parser struct {
	src string
	pos int // the next byte to read
}

// peek skips white space and returns the next byte, without consuming it;
// false at the end of the input.
func (p *parser) peek() (byte, bool) {
	for ; p.pos < len(p.src); p.pos++ {
		switch c := p.src[p.pos]; c {
		case ' ', '\t', '\n', '\r':
		default:
			return c, true
		}
	}
	return 0, false
}

// at returns the byte at p.pos, without skipping white space; false at the
// end of the input.
func (p *parser) at() (byte, bool) {
	if p.pos < len(p.src) {
		return p.src[p.pos], true
	}
	return 0, false
}

// syntax is what differs between the punctuation of objects and arrays.
type syntax struct {
	close byte
	// first is the context of an unexpected byte where the first member or
	// element may begin (Decoder.Token gives none after '{'), after that of
	// one after a member or element.
	first, after string
}

var (
	objectSyntax = syntax{'}', "", "after object key:value pair"}
	arraySyntax  = syntax{']', "looking for beginning of value", "after array element"}
)

// next reads what follows the opening bracket of an object or array (first)
// or one of its members or elements: false after the closing bracket, true
// after the comma (if !first) before another member or element.
func (p *parser) next(s syntax, first bool) (bool, error) {
	c, ok := p.peek()
	switch {
	case !ok:
		return false, errEOF
	case c == '}' || c == ']':
		if c == s.close {
			p.pos++
			return false, nil
		}
		if first {
			return false, invalidChar(c, s.first)
		}
		return false, invalidChar(c, s.after)
	case first:
		return true, nil
	case c != ',':
		return false, invalidChar(c, s.after)
	}
	p.pos++
	return true, nil
}

// name reads a member name: the first of its object, or one after a comma.
func (p *parser) name(first bool) (string, error) {
	c, ok := p.peek()
	switch {
	case !ok:
		return "", errEOF
	case c == '"':
		return p.str()
	case first:
		return "", invalidChar(c, objectSyntax.first)
	}
	return "", invalidChar(c, "looking for beginning of object key string")
}

// memberValue reads the colon after a member name and the member's value, at
// depth.
func (p *parser) memberValue(depth int) (any, error) {
	c, ok := p.peek()
	if !ok {
		return nil, errEOF
	}
	if c != ':' {
		return nil, invalidChar(c, "after object key")
	}
	p.pos++
	return p.value(depth)
}

// value reads one value at depth: top-level members are at depth 1.
func (p *parser) value(depth int) (any, error) {
	c, ok := p.peek()
	if !ok {
		return nil, errEOF
	}
	if c != '{' && c != '[' {
		return p.scalar()
	}
	if depth >= maxDepth {
		return nil, errTooDeep
	}
	p.pos++
	if c == '[' {
		a := []any{}
		for first := true; ; first = false {
			more, err := p.next(arraySyntax, first)
			if err != nil {
				return nil, err
			}
			if !more {
				return a, nil
			}
			v, err := p.value(depth + 1)
			if err != nil {
				return nil, err
			}
			a = append(a, v)
		}
	}
	m := map[string]any{}
	for first := true; ; first = false {
		more, err := p.next(objectSyntax, first)
		if err != nil {
			return nil, err
		}
		if !more {
			return m, nil
		}
		name, err := p.name(first)
		if err != nil {
			return nil, err
		}
		if _, dup := m[name]; dup {
			return nil, &duplicateError{name}
		}
		v, err := p.memberValue(depth + 1)
		if err != nil {
			return nil, err
		}
		m[name] = v
	}
}

// scalar reads a string, number, true, false or null at p.pos, which is not
// white space.
func (p *parser) scalar() (any, error) {
	switch c := p.src[p.pos]; {
	case c == '"':
		return p.str()
	case c == '-' || '0' <= c && c <= '9':
		return p.number()
	case c == 't':
		return true, p.literal("true")
	case c == 'f':
		return false, p.literal("false")
	case c == 'n':
		return nil, p.literal("null")
	default:
		return nil, invalidChar(c, "looking for beginning of value")
	}
}

// literal reads word, whose first byte is at p.pos.
func (p *parser) literal(word string) error {
	for i := 1; i < len(word); i++ {
		if p.pos+i >= len(p.src) {
			return errEOF
		}
		if c := p.src[p.pos+i]; c != word[i] {
			return invalidChar(c, "in literal "+word+" (expecting '"+word[i:i+1]+"')")
		}
	}
	p.pos += len(word)
	return nil
}

// number reads a number, whose first byte ('-' or a digit) is at p.pos. Like
// encoding/json it stops at the first byte that cannot continue the number,
// which is the caller's to judge.
func (p *parser) number() (json.Number, error) {
	start := p.pos
	if p.src[p.pos] == '-' {
		p.pos++
	}
	switch c, ok := p.at(); {
	case !ok:
		return "", errEOF
	case c == '0':
		p.pos++
	case '1' <= c && c <= '9':
		p.digits()
	default:
		return "", invalidChar(c, "in numeric literal")
	}
	if c, _ := p.at(); c == '.' {
		p.pos++
		if err := p.someDigits("after decimal point in numeric literal"); err != nil {
			return "", err
		}
	}
	if c, _ := p.at(); c == 'e' || c == 'E' {
		p.pos++
		if c, _ := p.at(); c == '+' || c == '-' {
			p.pos++
		}
		if err := p.someDigits("in exponent of numeric literal"); err != nil {
			return "", err
		}
	}
	return json.Number(p.src[start:p.pos]), nil
}

// someDigits reads one or more digits, failing with context if there are
// none.
func (p *parser) someDigits(context string) error {
	switch c, ok := p.at(); {
	case !ok:
		return errEOF
	case c < '0' || c > '9':
		return invalidChar(c, context)
	}
	p.digits()
	return nil
}

// digits reads zero or more digits.
func (p *parser) digits() {
	for p.pos < len(p.src) && '0' <= p.src[p.pos] && p.src[p.pos] <= '9' {
		p.pos++
	}
}

// str reads a string, whose opening quote is at p.pos.
func (p *parser) str() (string, error) {
	p.pos++
	start, escaped := p.pos, false
	for p.pos < len(p.src) {
		switch c := p.src[p.pos]; {
		case c == '"':
			s := p.src[start:p.pos]
			p.pos++
			if escaped {
				s = unquote(s)
			}
			return s, nil
		case c == '\\':
			escaped = true
			p.pos++
			if err := p.escape(); err != nil {
				return "", err
			}
		case c < 0x20:
			return "", invalidChar(c, "in string literal")
		default:
			p.pos++
		}
	}
	return "", errEOF
}

// escape reads the rest of an escape sequence after its backslash.
func (p *parser) escape() error {
	c, ok := p.at()
	switch {
	case !ok:
		return errEOF
	case c == 'u':
		p.pos++
		for range 4 {
			switch c, ok := p.at(); {
			case !ok:
				return errEOF
			case hexValue(c) < 0:
				return invalidChar(c, `in \u hexadecimal character escape`)
			}
			p.pos++
		}
		return nil
	case strings.IndexByte(`"\/bfnrt`, c) >= 0:
		p.pos++
		return nil
	}
	return invalidChar(c, "in string escape code")
}

func hexValue(c byte) rune {
	switch {
	case '0' <= c && c <= '9':
		return rune(c - '0')
	case 'a' <= c && c <= 'f':
		return rune(c - 'a' + 10)
	case 'A' <= c && c <= 'F':
		return rune(c - 'A' + 10)
	}
	return -1
}

// unquote decodes the escape sequences of s, the inside of a string str has
// checked. Like encoding/json it turns a \u escape of a UTF-16 surrogate that
// is not half of a pair into U+FFFD.
func unquote(s string) string {
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); {
		if s[i] != '\\' {
			b = append(b, s[i])
			i++
			continue
		}
		c := s[i+1]
		i += 2
		switch c {
		case 'b':
			b = append(b, '\b')
		case 'f':
			b = append(b, '\f')
		case 'n':
			b = append(b, '\n')
		case 'r':
			b = append(b, '\r')
		case 't':
			b = append(b, '\t')
		case 'u':
			r := u4(s[i:])
			i += 4
			if utf16.IsSurrogate(r) {
				if strings.HasPrefix(s[i:], `\u`) {
					if pair := utf16.DecodeRune(r, u4(s[i+2:])); pair != utf8.RuneError {
						b = utf8.AppendRune(b, pair)
						i += 6
						continue
					}
				}
				r = utf8.RuneError
			}
			b = utf8.AppendRune(b, r)
		default: // '"', '\\' or '/'
			b = append(b, c)
		}
	}
	return string(b)
}

// u4 decodes the four hex digits that start s.
func u4(s string) rune {
	var r rune
	for i := range 4 {
		r = r<<4 | hexValue(s[i])
	}
	return r
}

// equalJSON reports whether a and b, values as parseObject makes them, are
// equal: what reflect.DeepEqual reports, faster.
func equalJSON(a, b any) bool {
	switch a := a.(type) {
	case nil, bool, string, json.Number:
		return a == b
	case []any:
		b, ok := b.([]any)
		return ok && (a == nil) == (b == nil) && slices.EqualFunc(a, b, equalJSON)
	case map[string]any:
		b, ok := b.(map[string]any)
		if !ok || (a == nil) != (b == nil) || len(a) != len(b) {
			return false
		}
		for name, av := range a {
			if bv, ok := b[name]; !ok || !equalJSON(av, bv) {
				return false
			}
		}
		return true
	}
	return reflect.DeepEqual(a, b)
}

// marshal encodes v, a value as parseObject makes them, as compact JSON:
// the bytes encoding/json's Encoder writes with SetEscapeHTML(false), but
// for its newline.
func marshal(v any) ([]byte, error) {
	return appendJSON(nil, v)
}

// appendJSON appends v encoded by marshal to b.
func appendJSON(b []byte, v any) ([]byte, error) {
	switch v := v.(type) {
	case nil:
		return append(b, "null"...), nil
	case bool:
		return strconv.AppendBool(b, v), nil
	case string:
		return appendString(b, v), nil
	case json.Number:
		n := string(v)
		if n == "" {
			n = "0" // encoding/json's encoding of the zero Number
		}
		if !isNumber(n) {
			return nil, fmt.Errorf("invalid number literal %q", n)
		}
		return append(b, n...), nil
	case []any:
		b = append(b, '[')
		for i, e := range v {
			if i > 0 {
				b = append(b, ',')
			}
			var err error
			if b, err = appendJSON(b, e); err != nil {
				return nil, err
			}
		}
		return append(b, ']'), nil
	case map[string]any:
		members := make([]member, 0, len(v))
		for name, val := range v {
			members = append(members, member{name, val})
		}
		return appendMembers(b, members)
	}
	return nil, fmt.Errorf("cannot encode a %T as JSON", v)
}

// appendMembers appends the object of members, which it sorts by name as
// encoding/json sorts the keys of a map.
func appendMembers(b []byte, members []member) ([]byte, error) {
	slices.SortFunc(members, func(x, y member) int { return strings.Compare(x.name, y.name) })
	b = append(b, '{')
	for i, m := range members {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendString(b, m.name)
		b = append(b, ':')
		var err error
		if b, err = appendJSON(b, m.val); err != nil {
			return nil, err
		}
	}
	return append(b, '}'), nil
}

// isNumber reports whether s is a JSON number, all of it.
func isNumber(s string) bool {
	if s == "" || s[0] != '-' && (s[0] < '0' || s[0] > '9') {
		return false
	}
	p := parser{src: s}
	_, err := p.number()
	return err == nil && p.pos == len(s)
}

// appendString appends s as a JSON string the way encoding/json's Encoder
// with SetEscapeHTML(false) does.
func appendString(b []byte, s string) []byte { return jsonstr.Append(b, s, false) }

// jsonString encodes s as a JSON string.
func jsonString(s string) []byte {
	return appendString(nil, s)
}
