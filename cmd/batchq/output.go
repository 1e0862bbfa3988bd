package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/batchq/batchq/inspect"
)

// writeJSON writes v as one line of JSON, without escaping <, > and &.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

// nonNil returns s, or an empty slice when s is nil, so that it encodes as
// [] rather than null.
func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// writePeekJSON writes what a key holds as one JSON object: the key's
// stats and queue, and its array byte for byte ("array", null when the key
// holds nothing), or, when the key holds a string that is not JSON, that
// string ("array_text", with "array" null).
func writePeekJSON(w io.Writer, queue string, p inspect.Peeked) error {
	var b bytes.Buffer
	err := writeJSON(&b, struct {
		Queue string `json:"queue"`
		inspect.KeyStats
	}{queue, p.KeyStats})
	if err != nil {
		return err
	}
	head := bytes.TrimSuffix(bytes.TrimSuffix(b.Bytes(), []byte("\n")), []byte("}"))
	out := append(head, `,"array":`...)
	switch {
	case p.Array == nil:
		out = append(out, "null"...)
	case json.Valid(p.Array):
		// Spliced in rather than encoded: encoding/json would compact it.
		out = append(out, p.Array...)
	default:
		text, err := json.Marshal(string(p.Array))
		if err != nil {
			return err
		}
		out = append(append(out, `null,"array_text":`...), text...)
	}
	_, err = w.Write(append(out, "}\n"...))
	return err
}

// writeArray writes a key's array for people: indented when it is JSON,
// quoted when it is not.
func writeArray(w io.Writer, array []byte) error {
	var b bytes.Buffer
	if json.Indent(&b, array, "", "  ") != nil {
		_, err := fmt.Fprintf(w, "(not JSON, shown quoted)\n%s\n", strconv.Quote(string(array)))
		return err
	}
	b.WriteByte('\n')
	_, err := b.WriteTo(w)
	return err
}

// item returns a dead letter's item as one table cell: compact JSON.
func item(raw json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, raw) == nil {
		return cell(b.String())
	}
	return cell(string(raw))
}

// table writes aligned columns.
type table struct{ tw *tabwriter.Writer }

func newTable(w io.Writer, header ...string) *table {
	t := &table{tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)}
	t.row(header...)
	return t
}

// row writes one row; its cells must hold no tab or newline (see cell).
func (t *table) row(cells ...string) {
	fmt.Fprintln(t.tw, strings.Join(cells, "\t"))
}

func (t *table) flush() error { return t.tw.Flush() }

// cell returns s as it is when every rune of it is printable, and quoted
// (Go syntax) otherwise: keys, queue names and errors come from users, and
// a tab, a newline, a terminal escape sequence or a right-to-left override
// must not reach a table.
func cell(s string) string {
	for _, r := range s {
		if !unicode.IsPrint(r) || unicode.Is(unicode.Cf, r) {
			return strconv.Quote(s)
		}
	}
	if s == "" {
		return `""`
	}
	return s
}

// escapeControls returns s with its control and format characters (such as
// U+202E, which turns text right to left) and invalid UTF-8
// escaped as in Go strings (\n, \x1b, \xff), and the rest as it is: error
// messages may quote names that came from users, and none of them may reach
// a terminal raw.
func escapeControls(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case unicode.IsControl(r), unicode.Is(unicode.Cf, r):
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		default:
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	return b.String()
}

// Bounds of table cells and names in messages, in runes.
const (
	maxErrorCell  = 72 // an error, in dead list's and retries list's tables
	maxIDCell     = 64 // a dead letter's id in a message
	maxNameCell   = 40 // a worker's name or host
	maxQueuesCell = 60 // a worker's queues, joined by commas
)

// clip cuts s to n runes, marking the cut with "...".
func clip(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	return string([]rune(s)[:n-3]) + "..."
}

func num(n int64) string { return strconv.FormatInt(n, 10) }

// plural returns "1 item", "2 items".
func plural(n int64, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return strconv.FormatInt(n, 10) + " " + noun + "s"
}

// age formats a duration for people, to a precision fit for its size.
func age(d time.Duration) string {
	switch {
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(10 * time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}

// stamp formats a time for people: RFC 3339 in the local zone, to the
// millisecond; "-" for the zero time.
func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02T15:04:05.000Z07:00")
}
