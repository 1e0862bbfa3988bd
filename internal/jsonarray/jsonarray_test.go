package jsonarray

import (
	"bytes"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
)

// part is a Part as the tests write it: its raw text, and whether it is bad.
type part struct {
	raw string
	bad bool
}

func parts(ps []Part) []part {
	out := make([]part, len(ps))
	for i, p := range ps {
		out[i] = part{string(p.Raw), p.Err != nil}
	}
	return out
}

func deep(n int) string { return strings.Repeat(`{"a":`, n) + "1" + strings.Repeat("}", n) }

func TestSplit(t *testing.T) {
	tests := []struct {
		name string
		data string
		want []part
	}{
		{"empty", `[]`, []part{}},
		{"blank empty", " [ \n ] \t", []part{}},
		{"one", `[1]`, []part{{"1", false}}},
		{"as stored", `[{"id":1},"x",[1,[2]],null]`, []part{{`{"id":1}`, false}, {`"x"`, false}, {`[1,[2]]`, false}, {"null", false}}},
		{"blanks kept inside, trimmed outside", "[ {\"a\" : [ 1 , 2 ] } ,\n3 ]", []part{{`{"a" : [ 1 , 2 ] }`, false}, {"3", false}}},
		{"brackets and commas in strings", `["a,b]", "}{", "\"],[\"", "\\"]`, []part{{`"a,b]"`, false}, {`"}{"`, false}, {`"\"],[\""`, false}, {`"\\"`, false}}},
		{"bad element between good ones", `[{"id":1},{"id":,2},{"id":3}]`, []part{{`{"id":1}`, false}, {`{"id":,2}`, true}, {`{"id":3}`, false}}},
		{"bad scalar", `[1,tru,3]`, []part{{"1", false}, {"tru", true}, {"3", false}}},
		{"missing values", `[1,,2,]`, []part{{"1", false}, {"", true}, {"2", false}, {"", true}}},
		{"stray closing brace", `[1},2]`, []part{{"1}", true}, {"2", false}}},
		{"deep element is isolated", `[{"id":"good-1"},` + deep(20000) + `,{"id":"good-3"}]`, []part{{`{"id":"good-1"}`, false}, {deep(20000), true}, {`{"id":"good-3"}`, false}}},
		{"element at the decoder's limit is valid", `[1,` + deep(10000) + `]`, []part{{"1", false}, {deep(10000), false}}},
		{"unbalanced element runs to the end", `[1,{"a":[,2,3]`, []part{{"1", false}, {`{"a":[,2,3]`, true}}},
		{"unterminated string", `[1,"abc]`, []part{{"1", false}, {`"abc]`, true}}},
		{"no closing bracket", `[1,2`, []part{{"1", false}, {"2", true}}},
		{"trailing data", `[1,2]]`, []part{{"1", false}, {"2", false}, {"]", true}}},
		{"trailing value", `[1] [2]`, []part{{"1", false}, {"[2]", true}}},
		{"only an opening bracket", `[`, []part{{"", true}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Split([]byte(tt.data))
			if err != nil {
				t.Fatalf("Split: %v", err)
			}
			if g := parts(got); !equal(g, tt.want) {
				t.Errorf("Split(%.60q)\n got %.300v\nwant %.300v", tt.data, g, tt.want)
			}
		})
	}
}

func equal(a, b []part) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestSplitNotArray(t *testing.T) {
	for _, data := range []string{``, `   `, `{}`, `1`, `"[1]"`, `x[1]`, "\x00[1]"} {
		if _, err := Split([]byte(data)); !errors.Is(err, ErrNotArray) {
			t.Errorf("Split(%q): got %v, want ErrNotArray", data, err)
		}
	}
}

func TestDepth(t *testing.T) {
	tests := []struct {
		data string
		want int
	}{
		{`1`, 0},
		{`"[[{{"`, 0},
		{`[]`, 1},
		{`{}`, 1},
		{`[1,[2,{"a":[3]}]]`, 4},
		{`[[1],[2],[3]]`, 2},
		{`{"a\"[":[1]}`, 2},
		{deep(513), 513},
	}
	for _, tt := range tests {
		if got := Depth([]byte(tt.data)); got != tt.want {
			t.Errorf("Depth(%.40q) = %d, want %d", tt.data, got, tt.want)
		}
	}
	if err := CheckDepth([]byte(deep(512)), 512); err != nil {
		t.Errorf("CheckDepth at the limit: %v", err)
	}
	if err := CheckDepth([]byte(deep(513)), 512); err == nil {
		t.Error("CheckDepth past the limit: no error")
	}
}

// FuzzSplit checks Split against encoding/json: on any input it does not
// panic and returns parts of data; on a valid array it returns exactly the
// elements encoding/json finds, all good; and its good parts are valid JSON.
func FuzzSplit(f *testing.F) {
	for _, s := range []string{`[]`, `[1,"a,]",{"b":[2]}]`, `[1,,2]`, `[{"a":[}]`, `[1]]`, `["\\",1]`, ` [ 1 ] `, `[` + deep(50) + `]`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := Split(data)
		if err != nil {
			if !errors.Is(err, ErrNotArray) {
				t.Fatalf("unexpected error %v", err)
			}
			if trimmed := bytes.TrimLeft(data, " \t\r\n"); len(trimmed) > 0 && trimmed[0] == '[' {
				t.Fatalf("ErrNotArray for %q", data)
			}
			return
		}
		for _, p := range got {
			if len(p.Raw) > 0 && !bytes.Contains(data, p.Raw) {
				t.Fatalf("part %q is not from the data", p.Raw)
			}
			if p.Err == nil && !json.Valid(p.Raw) {
				t.Fatalf("good part %q is not valid JSON", p.Raw)
			}
		}
		var want []json.RawMessage
		if json.Unmarshal(data, &want) != nil || want == nil {
			return // not a valid array (or null): nothing more to compare
		}
		if len(got) != len(want) {
			t.Fatalf("Split found %d parts, encoding/json %d elements in %q", len(got), len(want), data)
		}
		for i := range want {
			if got[i].Err != nil || !bytes.Equal(got[i].Raw, want[i]) {
				t.Fatalf("part %d: got %q (%v), want %q", i, got[i].Raw, got[i].Err, want[i])
			}
		}
	})
}

func TestSplitDepth(t *testing.T) {
	got, err := Split([]byte(`[1,[2,{"a":[3]}],"[[[",` + deep(600) + `]`))
	if err != nil {
		t.Fatal(err)
	}
	var depths []int
	for _, p := range got {
		depths = append(depths, p.Depth)
	}
	if want := []int{0, 3, 0, 600}; !slices.Equal(depths, want) {
		t.Errorf("depths %v, want %v", depths, want)
	}
}

func TestSplitOffsets(t *testing.T) {
	data := []byte(" [ 1 , {\"a\":[2]} ,x ] 3")
	got, err := Split(data)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range got {
		if string(data[p.Start:p.End]) != string(p.Raw) {
			t.Errorf("part %q at %d:%d holds %q", p.Raw, p.Start, p.End, data[p.Start:p.End])
		}
	}
	if len(got) != 4 || string(got[3].Raw) != "3" || got[3].Err == nil {
		t.Errorf("parts %+v", got)
	}
}
