package protocol

import (
	"regexp"
	"strings"
)

// withLib returns the source of a script with the helpers of lib it uses
// in front of it, directly or through other helpers, in lib's order, and no
// others: each call of a script runs its whole text, and pays for every
// function that text defines. A helper is a top-level "local function NAME"
// or "local NAME =" line of lib, with the comment lines right above it.
func withLib(lib, script string) string {
	type helper struct{ name, text string }
	var helpers []helper
	var comment []string
	for line := range strings.Lines(lib) {
		switch m := libDef.FindStringSubmatch(line); {
		case m != nil:
			helpers = append(helpers, helper{name: m[1], text: strings.Join(comment, "") + line})
			comment = nil
		case strings.HasPrefix(line, "--"):
			comment = append(comment, line)
		case strings.TrimSpace(line) == "":
			comment = nil
		case len(helpers) > 0:
			helpers[len(helpers)-1].text += line // the body of the last helper
		}
	}
	need := map[string]bool{}
	uses := func(text string) {
		code := luaComment.ReplaceAllString(text, "") // a helper named in a comment is not used
		for _, h := range helpers {
			if regexp.MustCompile(`\b` + h.name + `\b`).MatchString(code) {
				need[h.name] = true
			}
		}
	}
	uses(script)
	for changed := true; changed; { // helpers that needed helpers use
		changed = false
		n := len(need)
		for _, h := range helpers {
			if need[h.name] {
				uses(h.text)
			}
		}
		changed = len(need) != n
	}
	var b strings.Builder
	for _, h := range helpers {
		if need[h.name] {
			b.WriteString(h.text)
			b.WriteString("\n")
		}
	}
	b.WriteString(script)
	return b.String()
}

var (
	libDef     = regexp.MustCompile(`^local (?:function )?([a-z_]+)\b`)
	luaComment = regexp.MustCompile(`--.*`)
)
