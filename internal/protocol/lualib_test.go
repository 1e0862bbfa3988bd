package protocol

import (
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
