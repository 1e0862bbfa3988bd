package main

import (
	"bytes"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The demo runs end to end and its last line gives the real counts.
func TestQuickstart(t *testing.T) {
	var out bytes.Buffer
	if err := quickstart(&out); err != nil {
		t.Fatalf("quickstart: %v\n%s", err, out.String())
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if last := lines[len(lines)-1]; last != "quickstart: produced 200 items, handled 200 items" {
		t.Fatalf("last line %q\n%s", last, out.String())
	}
	if !strings.Contains(out.String(), "20 orders failed their first attempt") {
		t.Errorf("no retries shown:\n%s", out.String())
	}
}
