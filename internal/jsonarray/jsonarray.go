// Package jsonarray reads the JSON arrays batchq stores without decoding
// them whole: Split cuts an array into its elements, so that one bad
// element cannot take its siblings down with it, and Depth measures how
// deeply an item nests, so that producers can refuse items the consumer's
// decoder would refuse.
package jsonarray

import (
	"encoding/json"
	"errors"
	"fmt"
)

// MaxDepth is how deeply an item may nest arrays and objects: producers
// refuse deeper items, and consumers send deeper ones that reach them
// another way to dead letters. It leaves encoding/json's own limit (10,000)
// far behind, for the array around the items and for handlers that decode
// them recursively.
const MaxDepth = 512

// ErrNotArray reports a value whose first non-blank byte is not '['.
var ErrNotArray = errors.New("not a JSON array")

// Part is one element of an array, as Split found it.
type Part struct {
	// Raw is the element's bytes, blanks around it left out. It is a
	// subslice of the data given to Split.
	Raw []byte
	// Err is nil for an element that is one valid JSON value, and says what
	// is wrong with it otherwise.
	Err error
	// Depth is how deeply the element nests arrays and objects (see Depth).
	Depth int
	// Start and End are the offsets of Raw in the data given to Split.
	Start, End int
}

// Split returns the elements of the JSON array in data, in order, each
// checked on its own: an element that is not valid JSON is returned with
// its error, and its siblings are not affected. The array itself has no
// nesting limit; each element has encoding/json's (10,000 levels).
//
// Elements are found by a scan that follows strings and counts brackets.
// An element whose brackets do not balance runs on to the end of the
// array, taking the elements after it into its one bad part: only data
// that batchq did not write can hold such an element.
//
// Split returns ErrNotArray when data does not start, past blanks, with
// '['. Data after the array's closing bracket, other than blanks, is
// returned as a last, bad part.
func Split(data []byte) ([]Part, error) {
	i := skipBlanks(data, 0)
	if i == len(data) || data[i] != '[' {
		return nil, ErrNotArray
	}
	i = skipBlanks(data, i+1)
	var parts []Part
	if i < len(data) && data[i] == ']' {
		return appendTrailing(parts, data, i+1), nil
	}
	for {
		end, depth, closed, ok := scanElement(data, i)
		p := partOf(data, i, end)
		p.Depth = depth
		switch {
		case !ok:
			p.Err = errors.New("the array is not terminated")
			return append(parts, p), nil
		case len(p.Raw) == 0:
			p.Err = errors.New("missing value")
		default:
			p.Err = valid(p.Raw)
		}
		parts = append(parts, p)
		if closed {
			return appendTrailing(parts, data, end+1), nil
		}
		i = end + 1 // past the comma
	}
}

// scanElement finds the end of the element starting at i: the index of the
// comma (closed false) or bracket (closed true) that ends it at the array's
// own level, and how deeply the element nests. ok is false when data ends
// first.
func scanElement(data []byte, i int) (end, deepest int, closed, ok bool) {
	depth := 0
	inString := false
	for j := i; j < len(data); j++ {
		c := data[j]
		if inString {
			switch c {
			case '\\':
				j++ // the escaped byte cannot end the string
			case '"':
				inString = false
			}
			continue
		}
		switch c {
		case '"':
			inString = true
		case '[', '{':
			depth++
			deepest = max(deepest, depth)
		case ']', '}':
			switch {
			case depth > 0:
				depth--
			case c == ']':
				return j, deepest, true, true
			} // a stray '}' stays in the (bad) element
		case ',':
			if depth == 0 {
				return j, deepest, false, true
			}
		}
	}
	return len(data), deepest, false, false
}

// partOf returns the part of data[start:end], blanks around it left out.
func partOf(data []byte, start, end int) Part {
	for start < end && isBlank(data[start]) {
		start++
	}
	for end > start && isBlank(data[end-1]) {
		end--
	}
	return Part{Raw: data[start:end], Start: start, End: end}
}

// appendTrailing returns parts with what follows the array's closing
// bracket at data[i:] as a bad part, unless it is blank.
func appendTrailing(parts []Part, data []byte, i int) []Part {
	if p := partOf(data, i, len(data)); len(p.Raw) > 0 {
		p.Err = errors.New("data after the end of the array")
		parts = append(parts, p)
	}
	return parts
}

// valid returns nil when raw is one valid JSON value, and the decoder's
// complaint otherwise.
func valid(raw []byte) error {
	if json.Valid(raw) {
		return nil
	}
	var v json.RawMessage
	if err := json.Unmarshal(raw, &v); err != nil {
		return err
	}
	return errors.New("invalid JSON") // not reached: Unmarshal fails where Valid does
}

// Depth returns how deeply the JSON value in data nests arrays and
// objects: 0 for a scalar, 1 for [1] or {}, 2 for [[1]]. Brackets inside
// strings do not count. It expects one valid JSON value: it does not
// validate data.
func Depth(data []byte) int {
	_, deepest, _, _ := scanElement(data, 0)
	return deepest
}

// CheckDepth returns an error when the value in data nests deeper than
// limit.
func CheckDepth(data []byte, limit int) error {
	if d := Depth(data); d > limit {
		return fmt.Errorf("nested %d levels deep, more than %d", d, limit)
	}
	return nil
}

func isBlank(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

func skipBlanks(data []byte, i int) int {
	for i < len(data) && isBlank(data[i]) {
		i++
	}
	return i
}
