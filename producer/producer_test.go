package producer_test

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func newProducer(t *testing.T, b testredis.Backend, opts ...producer.Option) *producer.Producer {
	t.Helper()
	p, err := producer.New(b.Client, append([]producer.Option{producer.WithPrefix(b.Prefix)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func get(t *testing.T, b testredis.Backend, queue, key string) (string, bool) {
	t.Helper()
	ik := keys.For(b.Prefix, queue, 0).Items(key)
	v, err := b.Client.Do(context.Background(), b.Client.B().Get().Key(ik).Build()).ToString()
	if err != nil {
		if strings.Contains(err.Error(), "nil") {
			return "", false
		}
		t.Fatalf("GET %s: %v", ik, err)
	}
	return v, true
}

// Awkward JSON is stored byte for byte: the key holds exactly "[" + the
// items joined by commas + "]", a valid JSON array.
func TestStoredValueIsExactlyTheAppendedBytes(t *testing.T) {
	items := []string{
		`9007199254740993`,          // past 2^53
		`-123456789012345678901234`, // past int64
		`1.5e300`,
		`"héllo wörld ✓ 日本 😀"`,
		`"\u00e9\ud83d\ude00"`,
		`"a\/b"`,
		`"<tag> & 'q'"`,
		`[]`,
		`{}`,
		`[[],{},[{}]]`,
		`null`,
		`{"z":1,"a":[null,true,false],"m":{"n":{"o":[1,2,{"p":null}]}}}`,
		`{"id":"x", "spaced" : [ 1 , 2 ] }`,
		`""`,
		`0`,
	}
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		// One by one, then several in one call.
		for _, it := range items[:5] {
			if err := p.AddRaw(ctx, "q", "k", json.RawMessage(it)); err != nil {
				t.Fatalf("AddRaw %s: %v", it, err)
			}
		}
		raws := make([]json.RawMessage, 0, len(items)-5)
		for _, it := range items[5:] {
			raws = append(raws, json.RawMessage(it))
		}
		if err := p.AddRaw(ctx, "q", "k", raws...); err != nil {
			t.Fatal(err)
		}
		got, ok := get(t, b, "q", "k")
		if !ok {
			t.Fatal("key not stored")
		}
		want := "[" + strings.Join(items, ",") + "]"
		if got != want {
			t.Fatalf("stored value\n got %s\nwant %s", got, want)
		}
		var back []json.RawMessage
		if err := json.Unmarshal([]byte(got), &back); err != nil {
			t.Fatalf("stored value is not a JSON array: %v", err)
		}
		if len(back) != len(items) {
			t.Fatalf("stored %d items, want %d", len(back), len(items))
		}
		for i := range items {
			if string(back[i]) != items[i] {
				t.Errorf("item %d: got %s want %s", i, back[i], items[i])
			}
		}
	})
}

func TestAddEncodesValuesWithoutEscapingHTML(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		type email struct {
			To   string `json:"to"`
			Body string `json:"body"`
		}
		if err := p.Add(ctx, "q", "k", email{"a@example.com", "<b>hi</b> & bye"}, 42, json.RawMessage(`{"raw":true}`)); err != nil {
			t.Fatal(err)
		}
		if err := producer.NewQueue[email](p, "q").Add(ctx, "k", email{To: "b"}); err != nil {
			t.Fatal(err)
		}
		got, _ := get(t, b, "q", "k")
		want := `[{"to":"a@example.com","body":"<b>hi</b> & bye"},42,{"raw":true},{"to":"b","body":""}]`
		if got != want {
			t.Fatalf("got %s want %s", got, want)
		}
	})
}

// Bad input gets a clear error and stores nothing, not even the valid items
// of the same call.
func TestBadInputStoresNothing(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithMaxItemBytes(64))
		deep := newProducer(t, b) // items of any size but 1 MiB
		cases := []struct {
			name string
			add  func() error
			want error
		}{
			{"invalid JSON", func() error {
				return p.AddRaw(ctx, "q", "k", json.RawMessage(`1`), json.RawMessage(`{"a":`))
			}, producer.ErrInvalidJSON},
			{"two values", func() error { return p.AddRaw(ctx, "q", "k", json.RawMessage(`1 2`)) }, producer.ErrInvalidJSON},
			{"empty raw", func() error { return p.AddRaw(ctx, "q", "k", json.RawMessage(``)) }, producer.ErrInvalidJSON},
			{"raw in Add", func() error { return p.Add(ctx, "q", "k", 1, json.RawMessage(`[`)) }, producer.ErrInvalidJSON},
			{"channel", func() error { return p.Add(ctx, "q", "k", 1, make(chan int)) }, producer.ErrMarshal},
			{"NaN", func() error { return p.Add(ctx, "q", "k", math.NaN()) }, producer.ErrMarshal},
			{"too large", func() error { return p.Add(ctx, "q", "k", 1, strings.Repeat("x", 100)) }, producer.ErrItemTooLarge},
			{"too large raw", func() error {
				return p.AddRaw(ctx, "q", "k", json.RawMessage(`"`+strings.Repeat("x", 100)+`"`))
			}, producer.ErrItemTooLarge},
			{"bad queue", func() error { return p.Add(ctx, "a{b}", "k", 1) }, producer.ErrQueueName},
			{"queue with colon", func() error { return p.Add(ctx, "a:b", "k", 1) }, producer.ErrQueueName},
			{"empty key", func() error { return p.Add(ctx, "q", "", 1) }, producer.ErrKeyName},
			{"too deep raw", func() error {
				return deep.AddRaw(ctx, "q", "k", json.RawMessage(`1`), json.RawMessage(nestedArray(producer.MaxItemDepth+1)))
			}, producer.ErrTooDeep},
			{"too deep value", func() error {
				var v any = 1
				for range producer.MaxItemDepth + 1 {
					v = []any{v}
				}
				return deep.Add(ctx, "q", "k", v)
			}, producer.ErrTooDeep},
			{"deeper than encoding/json allows inside an array", func() error {
				return deep.AddRaw(ctx, "q", "k", json.RawMessage(nestedArray(10_000)))
			}, producer.ErrTooDeep},
		}
		for _, c := range cases {
			err := c.add()
			if !errors.Is(err, c.want) {
				t.Errorf("%s: got error %v, want %v", c.name, err, c.want)
			}
		}
		if v, ok := get(t, b, "q", "k"); ok {
			t.Fatalf("bad input stored %s", v)
		}
		if ks := testredis.Keys(t, b, b.Prefix+":*"); len(ks) != 0 {
			t.Fatalf("bad input left keys %v", ks)
		}
	})
}

// nestedArray returns a JSON array nested n levels deep: [[...[]...]].
func nestedArray(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }

// Items up to MaxItemDepth levels deep are stored, and come back whole.
func TestItemAtMaxDepthIsStored(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		deep := nestedArray(producer.MaxItemDepth)
		if err := p.AddRaw(context.Background(), "q", "k", json.RawMessage(deep)); err != nil {
			t.Fatal(err)
		}
		if got, _ := get(t, b, "q", "k"); got != "["+deep+"]" {
			t.Errorf("stored %.40s..., want the item", got)
		}
	})
}

// Appending onto a key that holds something batchq did not write fails
// with ErrNotArray and changes nothing, however much the value looks like
// an array: batchq knows its own keys by their item count, which only it
// writes.
func TestAppendToCorruptKey(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		sp := keys.For(b.Prefix, "q", 0)
		c := b.Client
		set := func(v string) func(k string) error {
			return func(k string) error { return c.Do(ctx, c.B().Set().Key(k).Value(v).Build()).Error() }
		}
		cases := []struct {
			key string
			set func(k string) error
		}{
			{"str", set(`{"a":1}`)},
			{"short", set(`x`)},
			{"empty string", set(``)},
			{"empty array", set(`[]`)},
			{"blank array", set(`[ ]`)},
			{"newline array", set("[\n]")},
			{"extra bracket", set(`[1,2]]`)},
			{"trailing comma", set(`[1,2,]`)},
			{"valid array", set(`[1,2]`)},
			{"hash", func(k string) error {
				return c.Do(ctx, c.B().Hset().Key(k).FieldValue().FieldValue("f", "v").Build()).Error()
			}},
		}
		for _, cmd := range cases {
			if err := cmd.set(sp.Items(cmd.key)); err != nil {
				t.Fatal(err)
			}
			for range 2 { // refused again before a worker has looked at it
				err := p.Add(ctx, "q", cmd.key, 1)
				if !errors.Is(err, producer.ErrNotArray) {
					t.Fatalf("%s: got %v, want ErrNotArray", cmd.key, err)
				}
			}
			// It is made ready so that a worker dead-letters the value.
			if _, err := c.Do(ctx, c.B().Zscore().Key(sp.Ready()).Member(cmd.key).Build()).AsFloat64(); err != nil {
				t.Fatalf("%s: corrupt key not made ready: %v", cmd.key, err)
			}
			// And no count is left behind for it.
			if n, err := c.Do(ctx, c.B().Exists().Key(sp.Count(cmd.key)).Build()).AsInt64(); err != nil || n != 0 {
				t.Fatalf("%s: count key exists (%d, %v)", cmd.key, n, err)
			}
		}
		for _, v := range []struct{ key, want string }{{"str", `{"a":1}`}, {"blank array", `[ ]`}, {"extra bracket", `[1,2]]`}, {"valid array", `[1,2]`}} {
			if got, _ := get(t, b, "q", v.key); got != v.want {
				t.Errorf("%s: corrupt value changed to %s", v.key, got)
			}
		}
	})
}

// Many goroutines appending to a few keys: every item is stored once.
func TestConcurrentAppends(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		const goroutines, per = 16, 50
		errs := make(chan error, goroutines)
		for g := range goroutines {
			go func() {
				for i := range per {
					errs <- p.Add(ctx, "q", []string{"a", "b", "c"}[i%3], g*per+i)
				}
			}()
		}
		for range goroutines * per {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		seen := make(map[int]int)
		for _, k := range []string{"a", "b", "c"} {
			v, _ := get(t, b, "q", k)
			var ns []int
			if err := json.Unmarshal([]byte(v), &ns); err != nil {
				t.Fatalf("key %s: %v", k, err)
			}
			for _, n := range ns {
				seen[n]++
			}
		}
		for n := range goroutines * per {
			if seen[n] != 1 {
				t.Fatalf("item %d stored %d times", n, seen[n])
			}
		}
	})
}
