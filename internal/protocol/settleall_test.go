package protocol_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
)

// SettleAll settles batches of several keys in one call, each as Settle
// would: done items dropped, unfinished ones put back, a batch whose lease
// was reaped refused with ErrLeaseLost and left alone. It works after the
// server forgot its scripts (NOSCRIPT) too.
func TestSettleAll(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b, protocol.WithLeaseTTL(100*time.Millisecond))
		clk := withFakeClock(c)

		addRaw(t, p, "lost", `0`)
		lost := fetchOne(t, c)
		clk.Advance(time.Second)
		if n := reap(t, c); n != 1 {
			t.Fatalf("Reap returned %d, want 1", n)
		}
		for _, k := range []string{"a", "b", "c"} {
			addRaw(t, p, k, `"`+k+`1"`, `"`+k+`2"`)
		}
		f := fetch(t, c, 10)
		if len(f.Batches) != 4 {
			t.Fatalf("fetched %s, want 4 batches", describe(f))
		}
		byKey := map[string]*protocol.Batch{}
		for _, bt := range f.Batches {
			byKey[bt.Key] = bt
		}
		settle(t, c, byKey["lost"], done) // the redelivered batch of "lost"

		if b.Real() {
			if err := b.Client.Do(ctx, b.Client.B().ScriptFlush().Build()).Error(); err != nil {
				t.Fatal(err)
			}
		}
		boom := errors.New("boom")
		errs := c.SettleAll(ctx,
			[]*protocol.Batch{byKey["a"], lost, byKey["b"], byKey["c"]},
			[][]protocol.Outcome{
				{done, done},
				{done},
				{done, {Kind: protocol.Unfinished}},
				{{Kind: protocol.Dead, Err: boom}, done},
			})
		if errs[0] != nil || errs[2] != nil || errs[3] != nil || !errors.Is(errs[1], protocol.ErrLeaseLost) {
			t.Fatalf("SettleAll: %v; want nil, ErrLeaseLost, nil, nil", errs)
		}
		if v, ok := stored(t, b, "a"); ok && v != "[]" {
			t.Fatalf("key a holds %s", v)
		}
		if v, _ := stored(t, b, "b"); v != `["b2"]` {
			t.Fatalf("key b holds %s, want the unfinished item back", v)
		}
		if d := deadLetters(t, c); len(d) != 1 || string(d[0].Item) != `"c1"` {
			t.Fatalf("dead letters %+v, want c1", d)
		}
		noLeases(t, b)
		if got := c.SettleAll(ctx, nil, nil); len(got) != 0 {
			t.Fatalf("SettleAll of nothing: %v", got)
		}
	})
}
