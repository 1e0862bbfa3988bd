package producer_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// Keys that a log line or a terminal cannot show as they are (NUL, newline,
// escapes, invalid UTF-8), and keys past MaxNameLen, are refused with
// ErrKeyName by every way of adding, and nothing is stored, not even the
// registry entry. The error names the key by its start, escaped: a 10 KB
// key makes an error of a couple of hundred bytes (it made a 10 KB one).
func TestHostileKeysAreRefused(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		plain := newProducer(t, b)
		lingering := newProducer(t, b, producer.WithLinger(time.Millisecond, 10))
		for name, key := range map[string]string{
			"10 KB":        strings.Repeat("k", 10<<10),
			"NUL":          "user\x0042",
			"newline":      "user:42\nlevel=error msg=forged",
			"CR":           "user:42\r",
			"escape":       "user\x1b[2J",
			"C1 control":   "user\u009b42",
			"invalid UTF8": "user\xff42",
			"cut rune":     "user\xc3",
		} {
			for how, add := range map[string]func() error{
				"Add":         func() error { return plain.Add(ctx, "q", key, map[string]int{"n": 1}) },
				"AddRaw":      func() error { return plain.AddRaw(ctx, "q", key, json.RawMessage(`1`)) },
				"Queue.Add":   func() error { return producer.NewQueue[int](plain, "q").Add(ctx, key, 1) },
				"linger":      func() error { return lingering.Add(ctx, "q", key, 1) },
				"bad item":    func() error { return plain.AddRaw(ctx, "q", key, json.RawMessage(`{`)) },
				"CheckKey":    func() error { return producer.CheckKey(key) },
				"10 KB queue": func() error { return plain.Add(ctx, strings.Repeat("q", 10<<10), key, 1) },
			} {
				err := add()
				want := producer.ErrKeyName
				if how == "10 KB queue" {
					want = producer.ErrQueueName // the queue is checked first
				}
				if !errors.Is(err, want) {
					t.Errorf("%s key, %s: got %v, want %v", name, how, err, want)
					continue
				}
				if msg := err.Error(); len(msg) > 256 || strings.ContainsFunc(msg, unicode.IsControl) {
					t.Errorf("%s key, %s: a %d-byte error, or one with control characters: %.300q", name, how, len(msg), msg)
				}
			}
		}
		if ks := testredis.Keys(t, b, b.Prefix+":*"); len(ks) != 0 {
			t.Fatalf("refused keys left %v", ks)
		}
	})
}

// Valid names may be 512 bytes long: every error that names them cuts
// them short.
func TestErrorsCutLongNames(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		queue, key := strings.Repeat("q", 512), strings.Repeat("日本", 85) // 510 bytes
		p := newProducer(t, b, producer.WithMaxKeyItems(1))
		if err := p.Add(ctx, queue, key, 1); err != nil {
			t.Fatal(err)
		}
		for what, err := range map[string]error{
			"bad item":  p.AddRaw(ctx, queue, key, json.RawMessage(`{`)),
			"too many":  p.Add(ctx, queue, key, 1, 2),
			"key full":  p.Add(ctx, queue, key, 2),
			"cancelled": p.Add(canceled(), queue, key+"x", 1),
		} {
			if err == nil {
				t.Errorf("%s: no error", what)
				continue
			}
			if msg := err.Error(); len(msg) > 300 || !strings.Contains(msg, "…(512 bytes)/日本") || !strings.Contains(msg, "…(511 bytes)") && !strings.Contains(msg, "…(510 bytes)") {
				t.Errorf("%s: %d bytes: %s", what, len(msg), msg)
			}
		}
	})
}

func canceled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}
