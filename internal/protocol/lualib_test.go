package protocol

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// Each script is loaded with the helpers it uses, through other helpers
// too, and no others.
func TestWithLib(t *testing.T) {
	lib := `-- lib header

-- a doubles.
local function a(x)
  return 2 * x
end

-- k is a constant.
local k = 3

-- b uses a and k.
local function b(x)
  return a(x) + k
end

-- c is unused.
local function c() end
`
	for _, tt := range []struct {
		script string
		want   []string // helpers, in lib order
	}{
		{"return b(1)", []string{"a", "k", "b"}},
		{"return a(k)", []string{"a", "k"}},
		{"return 1 -- abc", nil},
		{"-- not b(1), nor a\nreturn 1", nil},
	} {
		got := withLib(lib, tt.script)
		var defs []string
		for line := range strings.Lines(got) {
			if m := libDef.FindStringSubmatch(line); m != nil {
				defs = append(defs, m[1])
			}
		}
		if strings.Join(defs, " ") != strings.Join(tt.want, " ") || !strings.HasSuffix(got, tt.script) ||
			strings.Contains(got, "lib header") || strings.Contains(got, "c is unused") {
			t.Errorf("withLib(%q) defines %q, want %q:\n%s", tt.script, defs, tt.want, got)
		}
		if len(tt.want) > 0 && !strings.Contains(got, "-- "+tt.want[0]) {
			t.Errorf("withLib(%q) drops the helpers' comments:\n%s", tt.script, got)
		}
	}
	// The hot path defines no function at all.
	if got := withLib(libLua, mergeLua); got != mergeLua || strings.Contains(got, "local function") {
		t.Errorf("merge.lua is loaded with helpers, or defines a function")
	}
}

// lib.lua's held_due is HeldDue: the drain parks a held key at the one, and
// release_hold looks for the other.
func TestHeldDueAgrees(t *testing.T) {
	if want := "local held_due = " + strconv.Itoa(HeldDue) + "\n"; !strings.Contains(libLua, want) {
		t.Fatalf("lib.lua does not hold %q", want)
	}
}

// Each script's header says where docs/PROTOCOL.md describes its step, by
// the titles of sections the document has.
func TestScriptHeadersPointToTheProtocol(t *testing.T) {
	doc, err := os.ReadFile("../../docs/PROTOCOL.md")
	if err != nil {
		t.Fatal(err)
	}
	titles := make(map[string]bool)
	for line := range strings.Lines(string(doc)) {
		if title, ok := strings.CutPrefix(line, "#"); ok {
			titles[strings.TrimSpace(strings.TrimLeft(title, "#"))] = true
		}
	}
	files, err := filepath.Glob("lua/*.lua")
	if err != nil || len(files) == 0 {
		t.Fatalf("no scripts under lua/: %v", err)
	}
	quoted := regexp.MustCompile(`"([^"]+)"`)
	for _, f := range files {
		if filepath.Base(f) == "lib.lua" {
			continue // helpers, not a step: its header names the document
		}
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var header strings.Builder
		for line := range strings.Lines(string(src)) {
			text, ok := strings.CutPrefix(line, "--")
			if !ok {
				break
			}
			header.WriteString(strings.TrimSpace(text) + " ")
		}
		_, ref, ok := strings.Cut(header.String(), "(docs/PROTOCOL.md, ")
		ref, _, closed := strings.Cut(ref, ")")
		if !ok || !closed {
			t.Errorf("%s: its header does not point to a section of docs/PROTOCOL.md", f)
			continue
		}
		sections := quoted.FindAllStringSubmatch(ref, -1)
		if len(sections) == 0 {
			t.Errorf("%s: its header names no section of docs/PROTOCOL.md: %q", f, ref)
		}
		for _, s := range sections {
			if !titles[s[1]] {
				t.Errorf("%s: docs/PROTOCOL.md has no section %q", f, s[1])
			}
		}
	}
}
