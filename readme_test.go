package batchq_test

// The README's Go snippets are checked here: each ```go block of README.md
// must appear, line for line, in an example_test.go file of this module,
// where it is compiled by go test and, in an Example with an // Output:
// comment (or a function one calls), run. To change a snippet, change its
// example and copy the lines to the README.

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestREADMESnippetsAreExamples fails for every ```go block of README.md
// that no example_test.go holds, and when the README has no such block at
// all (nothing would be checked).
func TestREADMESnippetsAreExamples(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks, err := goBlocks(string(readme))
	if err != nil {
		t.Fatalf("README.md: %v", err)
	}
	if len(blocks) == 0 {
		t.Fatal("README.md has no ```go block: nothing to check")
	}
	examples := exampleFiles(t)
	if len(examples) == 0 {
		t.Fatal("no example_test.go file found")
	}
	for _, b := range blocks {
		where := ""
		for _, ex := range examples {
			if line := findBlock(ex.lines, b.lines); line > 0 {
				where = fmt.Sprintf("%s:%d", ex.path, line)
				break
			}
		}
		if where == "" {
			t.Errorf("README.md:%d: this ```go block is in no example_test.go; copy it from the example it stands for (changing the example first, if need be):\n%s",
				b.line, strings.Join(b.lines, "\n"))
			continue
		}
		t.Logf("README.md:%d is %s", b.line, where)
	}
}

// A block is the content of a fenced ```go block, its lines stripped of
// the fence's indentation (a block in a list item is indented).
type block struct {
	line  int // of the opening fence, from 1
	lines []string
}

// goBlocks returns the ```go (or ```golang) blocks of a Markdown text. It
// fails on a fence left open and on an empty block, which would match
// anything.
func goBlocks(md string) ([]block, error) {
	var out []block
	var cur *block // the go block being read
	open := 0      // line of the open fence of any language; 0: none
	indent := ""
	for i, line := range strings.Split(md, "\n") {
		trimmed := strings.TrimSpace(line)
		if open == 0 {
			if !strings.HasPrefix(trimmed, "```") {
				continue
			}
			open = i + 1
			indent = line[:len(line)-len(strings.TrimLeft(line, " \t"))]
			if lang := strings.TrimSpace(strings.TrimPrefix(trimmed, "```")); lang == "go" || lang == "golang" {
				cur = &block{line: i + 1}
			}
			continue
		}
		if trimmed == "```" {
			if cur != nil {
				if strings.TrimSpace(strings.Join(cur.lines, "")) == "" {
					return nil, fmt.Errorf("line %d: empty ```go block", cur.line)
				}
				out = append(out, *cur)
			}
			open, cur = 0, nil
			continue
		}
		if cur == nil {
			continue
		}
		if trimmed != "" && !strings.HasPrefix(line, indent) {
			return nil, fmt.Errorf("line %d: indented less than the fence of its block (line %d)", i+1, cur.line)
		}
		cur.lines = append(cur.lines, strings.TrimPrefix(line, indent))
	}
	if open != 0 {
		return nil, fmt.Errorf("line %d: fence never closed", open)
	}
	return out, nil
}

// An exampleFile is the text of an example_test.go file.
type exampleFile struct {
	path  string
	lines []string
}

// exampleFiles returns the example_test.go files of this module (nested
// modules, such as bench, left out: go test ./... here does not compile
// them).
func exampleFiles(t *testing.T) []exampleFile {
	t.Helper()
	var out []exampleFile
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path == "." {
				return nil
			}
			if strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata" {
				return filepath.SkipDir
			}
			if _, err := os.Stat(filepath.Join(path, "go.mod")); err == nil {
				return filepath.SkipDir
			}
			return nil
		}
		if d.Name() != "example_test.go" {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		out = append(out, exampleFile{path: path, lines: strings.Split(string(b), "\n")})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// findBlock returns the line (from 1) where the lines of block start in
// text, or 0 if they are not there. Lines compare without trailing
// whitespace and with their indentation taken relative to the block's
// least indented line (a tab counts as four spaces), so that a snippet may
// be cut from the inside of a function.
func findBlock(text, block []string) int {
	want := dedent(block)
	for i := 0; i+len(block) <= len(text); i++ {
		if strings.TrimSpace(text[i]) != strings.TrimSpace(block[0]) {
			continue
		}
		if got := dedent(text[i : i+len(block)]); strings.Join(got, "\n") == strings.Join(want, "\n") {
			return i + 1
		}
	}
	return 0
}

// dedent returns lines without trailing whitespace, with their leading
// whitespace as spaces (a tab to the next multiple of four), less the
// indentation of the least indented non-blank line.
func dedent(lines []string) []string {
	out := make([]string, len(lines))
	least := -1
	for i, l := range lines {
		l = strings.TrimRight(l, " \t\r")
		col, n := 0, 0
		for ; n < len(l) && (l[n] == ' ' || l[n] == '\t'); n++ {
			if l[n] == '\t' {
				col += 4 - col%4
			} else {
				col++
			}
		}
		if n < len(l) && (least < 0 || col < least) {
			least = col
		}
		out[i] = strings.Repeat(" ", col) + l[n:]
	}
	for i, l := range out {
		if l != "" {
			out[i] = l[least:]
		}
	}
	return out
}

// The extraction and the matching the README check relies on, on a small
// sample.
func TestREADMECheckOnASample(t *testing.T) {
	md := "Intro\n" +
		"```go\nx := 1\n```\n" +
		"- A list item:\n\n" +
		"  ```go\n  p, err := f(\n  \tx)\n\n  return err\n  ```\n" +
		"```sh\n```go is no fence inside another block\n```\n" +
		"```\nplain\n```\n"
	blocks, err := goBlocks(md)
	if err != nil {
		t.Fatal(err)
	}
	want := []block{{line: 2, lines: []string{"x := 1"}}, {line: 7, lines: []string{"p, err := f(", "\tx)", "", "return err"}}}
	if fmt.Sprint(blocks) != fmt.Sprint(want) {
		t.Fatalf("goBlocks = %+v, want %+v", blocks, want)
	}
	for _, bad := range []string{"```go\nx := 1\n", "```go\n\n```\n", "  ```go\nx := 1\n  ```\n"} {
		if b, err := goBlocks(bad); err == nil {
			t.Errorf("goBlocks(%q) = %+v, want an error", bad, b)
		}
	}

	src := strings.Split("func Example() {\n\tif ok {\n\t\tp, err := f(\n\t\t\tx)\n\n\t\treturn err\n\t}\n}", "\n")
	if line := findBlock(src, blocks[1].lines); line != 3 {
		t.Errorf("findBlock of the list item's block = %d, want 3", line)
	}
	for _, miss := range [][]string{
		{"p, err := f(", "x)", "", "return err"},        // relative indentation lost
		{"p, err := g(", "\tx)", "", "return err"},      // a line changed
		{"p, err := f(", "\tx)", "return err"},          // a line left out
		{"p, err := f(", "\tx)", "", "return err", "}"}, // a line more than the source has there
	} {
		if line := findBlock(src, miss); line != 0 {
			t.Errorf("findBlock(%q) = %d, want 0", miss, line)
		}
	}
}
