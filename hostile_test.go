package batchq_test

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// nested returns a JSON object nested n levels deep: {"a":{"a":...1...}}.
func nested(n int) string {
	return strings.Repeat(`{"a":`, n) + "1" + strings.Repeat("}", n)
}

// A deeply nested item that reached a key without the producer's check (a
// raw SET of the whole array) must not take the other items of its batch
// down with it: they are handled, and the deep item goes to dead letters on
// its own. At 10,000 levels the item is valid JSON on its own but not inside
// the array; at 20,000 it is not valid for encoding/json at all.
func TestDeepItemIsIsolated(t *testing.T) {
	for _, depth := range []int{10_000, 20_000} {
		t.Run(strconv.Itoa(depth), func(t *testing.T) {
			testredis.Each(t, func(t *testing.T, b testredis.Backend) {
				ctx := context.Background()
				var mu sync.Mutex
				seen := make(map[string]int)
				w := newWorker(t, b)
				batchq.Handle(w, "deep", func(_ context.Context, it struct{ ID string }) error {
					mu.Lock()
					defer mu.Unlock()
					seen[it.ID]++
					return nil
				})
				sp := keys.For(b.Prefix, "deep", 0)
				c := b.Client
				array := `[{"ID":"good-1"},` + nested(depth) + `,{"ID":"good-3"}]`
				must(t, c.Do(ctx, c.B().Set().Key(sp.Items("k")).Value(array).Build()).Error())
				must(t, c.Do(ctx, c.B().Zadd().Key(sp.Ready()).ScoreMember().ScoreMember(0, "k").Build()).Error())
				runWorker(t, w)

				cons := newDeadLetters(t, b)
				eventually(t, 20*time.Second, "both good items handled and one dead letter", func() bool {
					n, err := cons.Count(ctx, "deep")
					mu.Lock()
					defer mu.Unlock()
					return err == nil && n == 1 && seen["good-1"] == 1 && seen["good-3"] == 1
				})
				dead, err := cons.List(ctx, "deep", 10)
				must(t, err)
				d := dead[0]
				if d.Key != "k" || !d.Corrupt || !strings.Contains(d.Error, "item 1 ") || !strings.Contains(d.Error, "levels deep") {
					t.Errorf("dead letter: key %q corrupt %v error %q; want key k, corrupt, an error about item 1's depth", d.Key, d.Corrupt, d.Error)
				}
				mu.Lock()
				defer mu.Unlock()
				if len(seen) != 2 {
					t.Errorf("handled %v, want good-1 and good-3 only", seen)
				}
			})
		})
	}
}

// A value another program left under a key, however much it looks like an
// array, never takes in an item whose append returned nil: the append is
// refused with ErrNotArray until a worker has moved the value out of the
// way, and the item appended then is handled, never dead-lettered with the
// foreign value. That holds for a key batchq was using too, whose array
// another program replaced ("live-").
func TestForeignValueNeverSwallowsAnAppend(t *testing.T) {
	foreign := map[string]string{"blank": `[ ]`, "newline": "[\n]", "bracket": `[1,2]]`, "comma": `[1,2,]`, "text": `hello`,
		"live-bracket": `[1,2]]`, "live-quote": `[1,"]`, "live-long": `["` + strings.Repeat("x", 100) + `"]`}
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		var mu sync.Mutex
		handled := make(map[string]int)
		w := newWorker(t, b)
		batchq.HandleRaw(w, "foreign", func(_ context.Context, it json.RawMessage) error {
			mu.Lock()
			defer mu.Unlock()
			handled[string(it)]++
			return nil
		})
		p := newProducer(t, b)
		sp := keys.For(b.Prefix, "foreign", 0)
		c := b.Client
		for k, v := range foreign {
			if strings.HasPrefix(k, "live-") {
				// A key batchq uses, whose array another program replaces.
				must(t, p.Add(ctx, "foreign", k, "first-"+k))
			}
			must(t, c.Do(ctx, c.B().Set().Key(sp.Items(k)).Value(v).Build()).Error())
			if err := p.Add(ctx, "foreign", k, "early-"+k); !errors.Is(err, producer.ErrNotArray) {
				t.Fatalf("%s: append onto %q: got %v, want ErrNotArray", k, v, err)
			}
		}
		runWorker(t, w)
		for k := range foreign {
			eventually(t, 10*time.Second, "the foreign value of "+k+" moved away", func() bool {
				n, err := c.Do(ctx, c.B().Exists().Key(sp.Items(k)).Build()).AsInt64()
				return err == nil && n == 0
			})
			must(t, p.Add(ctx, "foreign", k, "good-"+k))
		}
		eventually(t, 10*time.Second, "every good item handled", func() bool {
			mu.Lock()
			defer mu.Unlock()
			for k := range foreign {
				if handled[`"good-`+k+`"`] != 1 {
					return false
				}
			}
			return true
		})
		dead, err := newDeadLetters(t, b).List(ctx, "foreign", 100)
		must(t, err)
		for _, d := range dead {
			if strings.Contains(string(d.Item), "good-") || strings.Contains(string(d.Item), "early-") {
				t.Errorf("dead letter %s holds an appended item: %s", d.ID, d.Item)
			}
		}
		mu.Lock()
		defer mu.Unlock()
		for it, n := range handled {
			if strings.Contains(it, "early-") || strings.Contains(it, "good-") && n != 1 {
				t.Errorf("handled %s %d times", it, n)
			}
		}
	})
}
