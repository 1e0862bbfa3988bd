package producer_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// appendSeeds are awkward items, valid and not.
var appendSeeds = []string{
	`9007199254740993`, `-123456789012345678901234`, `1.5e300`, `-0`, `0.0e-0`, `1E+2`,
	`"héllo wörld ✓ 日本 😀"`, `"\u00e9\ud83d\ude00"`, `"\ud800"`, `"a\/b\\\"\n\t\u0000"`, `"<tag> & 'q'"`,
	`[]`, `{}`, `[[],{},[{}]]`, `null`, `true`, `""`, `0`,
	`{"z":1,"a":[null,true,false],"m":{"n":{"o":[1,2,{"p":null}]}}}`,
	`{"id":"x", "spaced" : [ 1 , 2 ] }`, " \t\r\n1\n ", `{"a":1,"a":2}`,
	strings.Repeat("[", 200) + strings.Repeat("]", 200),
	`"` + strings.Repeat("x", 100) + `"`,
	"\"\xff\xfe\"", // invalid UTF-8 in a string: valid JSON to encoding/json, stored as is
	// Invalid.
	``, ` `, `[`, `]`, `1 2`, `1,2`, `"\x`, `"\u12"`, `NaN`, `Infinity`, `-`, `01`, `1.`, `.5`, `+1`,
	`{"a"}`, `{"a":1,}`, `[1,]`, `'s'`, `tru`, `nul`, `"unterminated`, "\"ctl\x01\"", `1]`, `[1]]`, `{}{}`,
	"\x00", `// c`, `[1] `, "\ufeff1",
}

// FuzzAppendRaw appends one raw item to an empty key and to a key that
// holds items, on one miniredis shared by the inputs (flushed before each).
// A valid item within the size limit is spliced on byte for byte: the key
// then holds exactly the items joined, and decodes to them. Anything else is
// refused with ErrInvalidJSON or ErrItemTooLarge and the key is unchanged.
func FuzzAppendRaw(f *testing.F) {
	for _, s := range appendSeeds {
		f.Add([]byte(s))
	}
	b := testredis.Mini(f)
	f.Fuzz(func(t *testing.T, item []byte) {
		b.Mini.FlushAll()
		checkAppendRaw(t, b, item)
	})
}

// TestAppendRawSeedsOnRealRedis runs the seeds of FuzzAppendRaw on a real
// redis-server.
func TestAppendRawSeedsOnRealRedis(t *testing.T) {
	b := testredis.Real(t)
	for i, s := range appendSeeds {
		bi := b
		bi.Prefix = b.Prefix + "_" + strconv.Itoa(i)
		checkAppendRaw(t, bi, []byte(s))
	}
}

const fuzzMaxItem = 64

func checkAppendRaw(t *testing.T, b testredis.Backend, item []byte) {
	t.Helper()
	ctx := context.Background()
	p := newProducer(t, b)
	small := newProducer(t, b, producer.WithMaxItemBytes(fuzzMaxItem))
	valid := json.Valid(item)
	before := []string{`1`, `{"a":"é"}`, `"x\"]"`}
	if err := p.AddRaw(ctx, "q", "full", json.RawMessage(before[0]), json.RawMessage(before[1])); err != nil {
		t.Fatal(err)
	}
	if err := p.AddRaw(ctx, "q", "full", json.RawMessage(before[2])); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		p      *producer.Producer
		tooBig bool
		key    string
		stored []string // what the key holds before
		items  int      // how many times the call passes item
	}{
		{p, false, "empty", nil, 1},
		{p, false, "full", before, 1},
		{p, false, "twice", nil, 2},
		{small, len(item) > fuzzMaxItem, "small", nil, 1},
	} {
		raws := make([]json.RawMessage, c.items)
		for i := range raws {
			raws[i] = item
		}
		err := c.p.AddRaw(ctx, "q", c.key, raws...)
		stored, ok := storedItems(t, b, c.key)
		want := slices.Clone(c.stored)
		switch {
		case c.tooBig:
			if !errors.Is(err, producer.ErrItemTooLarge) {
				t.Fatalf("AddRaw(%q) of %d bytes to %s with a limit of %d: got %v, want ErrItemTooLarge", item, len(item), c.key, fuzzMaxItem, err)
			}
		case !valid:
			if !errors.Is(err, producer.ErrInvalidJSON) {
				t.Fatalf("AddRaw(%q) to %s: got %v, want ErrInvalidJSON", item, c.key, err)
			}
		default:
			if err != nil {
				t.Fatalf("AddRaw(%q) to %s: %v", item, c.key, err)
			}
			for range c.items {
				want = append(want, string(item))
			}
		}
		wantStored := "[" + strings.Join(want, ",") + "]"
		if len(want) == 0 {
			if ok {
				t.Fatalf("AddRaw(%q) to %s failed (%v) but stored %q", item, c.key, err, stored)
			}
			continue
		}
		if stored != wantStored {
			t.Fatalf("AddRaw(%q) to %s (err %v): key holds %q, want %q", item, c.key, err, stored, wantStored)
		}
		if !json.Valid([]byte(stored)) {
			t.Fatalf("key %s holds invalid JSON %q", c.key, stored)
		}
		var got []json.RawMessage
		if err := json.Unmarshal([]byte(stored), &got); err != nil {
			t.Fatalf("key %s holds %q: %v", c.key, stored, err)
		}
		if len(got) != len(want) {
			t.Fatalf("key %s holds %q: %d items, want %d", c.key, stored, len(got), len(want))
		}
		for i := range want {
			// Whitespace around a value is not part of it.
			if w := strings.Trim(want[i], " \t\r\n"); string(got[i]) != w {
				t.Fatalf("key %s: item %d decodes to %q, want %q", c.key, i, got[i], w)
			}
		}
		count := keyCount(t, b, c.key)
		if wantCount := protocol.PackCount(int64(len(want)), int64(len(stored))); count != strconv.FormatInt(wantCount, 10) {
			t.Fatalf("key %s: count %q, want %d (%d items, %d bytes)", c.key, count, wantCount, len(want), len(stored))
		}
	}
}

// storedItems returns the raw value of key's items key in queue q.
func storedItems(t *testing.T, b testredis.Backend, key string) (string, bool) {
	t.Helper()
	return getString(t, b, keys.For(b.Prefix, "q", 0).Items(key))
}

func keyCount(t *testing.T, b testredis.Backend, key string) string {
	t.Helper()
	n, _ := getString(t, b, keys.For(b.Prefix, "q", 0).Count(key))
	return n
}

func getString(t *testing.T, b testredis.Backend, k string) (string, bool) {
	t.Helper()
	v, err := b.Client.Do(context.Background(), b.Client.B().Get().Key(k).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return "", false
	}
	if err != nil {
		t.Fatalf("GET %s: %v", k, err)
	}
	return v, true
}
