package protocol_test

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// Tests of the protocol of ordered queues (docs/PROTOCOL.md, "Ordered
// keys"), step by step.

// newOrdered returns a consumer that treats queue as ordered, on a fake
// clock.
func newOrdered(t *testing.T, b testredis.Backend, opts ...protocol.Option) (*protocol.Consumer, *fakeClock) {
	t.Helper()
	c := newConsumer(t, b, opts...)
	c.Order(queue)
	return c, withFakeClock(c)
}

// hold returns the hold of key, "" when there is none.
func hold(t *testing.T, b testredis.Backend, key string) string {
	t.Helper()
	v, err := b.Client.Do(context.Background(), b.Client.B().Get().Key(space(b).Hold(key)).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// A drained key is held until its batch is settled: items appended
// meanwhile wait, on the ready index at HeldDue, and the settle makes the
// key due.
func TestOrderedKeyIsHeldUntilSettled(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		c, _ := newOrdered(t, b)
		addRaw(t, p, "k", `1`, `2`)
		first := fetchOne(t, c)
		if !first.Ordered || hold(t, b, "k") == "" {
			t.Fatalf("batch ordered %v, hold %q: want an ordered batch holding its key", first.Ordered, hold(t, b, "k"))
		}
		addRaw(t, p, "k", `3`)
		fetchNone(t, c) // pops k, finds it held
		due, err := b.Client.Do(context.Background(), b.Client.B().Zscore().Key(space(b).Ready()).Member("k").Build()).AsFloat64()
		if err != nil || due != protocol.HeldDue {
			t.Fatalf("a held key is due at %v (%v), want HeldDue: it waits for its hold", due, err)
		}
		fetchNone(t, c) // nothing pops it meanwhile
		if v, _ := stored(t, b, "k"); v != `[3]` {
			t.Fatalf("the key holds %s, want [3]", v)
		}
		settle(t, c, first, done, done)
		if h := hold(t, b, "k"); h != "" {
			t.Fatalf("hold %q left after the settle", h)
		}
		if !ready(t, b, "k") {
			t.Fatal("the settle did not make the key due")
		}
		checkItems(t, fetchOne(t, c), `3`)
	})
}

// A failed item holds its key with the items after it; the retry brings
// them back in order, the failed one with its attempts; then the items
// appended meanwhile.
func TestOrderedRetryHoldsTheRest(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		c, clk := newOrdered(t, b)
		addRaw(t, p, "k", `1`, `2`, `3`, `4`)
		bt := fetchOne(t, c)
		boom := errors.New("boom")
		settle(t, c, bt, done, protocol.Outcome{Kind: protocol.Retry, Err: boom, Delay: time.Second})
		if hold(t, b, "k") == "" {
			t.Fatal("the key is not held while its failed item waits")
		}
		addRaw(t, p, "k", `5`)
		fetchNone(t, c)
		clk.Advance(time.Second)
		rt := fetchOne(t, c)
		if !rt.Retry() || !rt.Ordered {
			t.Fatalf("fetched %+v, want an ordered batch of retries", rt)
		}
		checkItems(t, rt, `2`, `3`, `4`)
		if rt.Items[0].Attempt != 1 || rt.Items[0].LastError != "boom" || rt.Items[1].Attempt != 0 {
			t.Fatalf("retry items %+v, want the failed one with 1 attempt, then fresh ones", rt.Items)
		}
		// Item 3 fails for good: the key moves on.
		settle(t, c, rt, done, protocol.Outcome{Kind: protocol.Dead, Err: boom}, done)
		if h := hold(t, b, "k"); h != "" {
			t.Fatalf("hold %q left after the retry was settled", h)
		}
		checkItems(t, fetchOne(t, c), `5`)
		if n := countDead(t, c); n != 1 {
			t.Fatalf("%d dead letters, want 1", n)
		}
	})
}

// A shutdown puts the unhandled items back in front of the key and ends
// the hold.
func TestOrderedUnfinishedGoBack(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		c, _ := newOrdered(t, b)
		addRaw(t, p, "k", `1`, `2`, `3`)
		bt := fetchOne(t, c)
		addRaw(t, p, "k", `4`)
		settle(t, c, bt, done)
		if h := hold(t, b, "k"); h != "" {
			t.Fatalf("hold %q left after the put-back", h)
		}
		checkItems(t, fetchOne(t, c), `2`, `3`, `4`)
	})
}

// A reaped batch goes back in front of its key, and its hold ends: it is
// drained next, before the items appended since.
func TestOrderedReapPutsBatchFirst(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		c, clk := newOrdered(t, b, protocol.WithLeaseTTL(100*time.Millisecond))
		addRaw(t, p, "k", `1`, `2`)
		old := fetchOne(t, c)
		addRaw(t, p, "k", `3`)
		fetchNone(t, c)
		clk.Advance(101 * time.Millisecond)
		if n := reap(t, c); n != 1 {
			t.Fatalf("reaped %d leases, want 1", n)
		}
		if h := hold(t, b, "k"); h != "" {
			t.Fatalf("hold %q left after the reap", h)
		}
		checkItems(t, fetchOne(t, c), `1`, `2`, `3`)
		if err := c.Settle(context.Background(), old, all(2, done)); !errors.Is(err, protocol.ErrLeaseLost) {
			t.Fatalf("late settle: %v, want ErrLeaseLost", err)
		}
		if h := hold(t, b, "k"); h == "" {
			t.Fatal("a late settle ended the hold of the batch redelivered")
		}
	})
}

// A key's name popped twice (a sweep racing a slow worker) is drained once:
// the second drain finds it gone, and ends the hold it set, making the key
// due for the items appended since.
func TestOrderedPhantomDrainEndsItsHold(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c, _ := newOrdered(t, b)
		addRaw(t, p, "k", `1`)
		bt := fetchOne(t, c)
		settle(t, c, bt, done)
		// The stale name of k, on the wake list again.
		if err := b.Client.Do(ctx, b.Client.B().Rpush().Key(space(b).Wake()).Element("k").Build()).Error(); err != nil {
			t.Fatal(err)
		}
		fetchNone(t, c)
		if h := hold(t, b, "k"); h != "" {
			t.Fatalf("hold %q left by a drain that found the key gone", h)
		}
		noLeases(t, b)
		addRaw(t, p, "k", `2`)
		checkItems(t, fetchOne(t, c), `2`)
	})
}

// A batch of retries of several ordered keys ends the hold of each key
// whose items succeeded, and keeps that of a key whose item failed again.
func TestOrderedRetriesOfSeveralKeys(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		c, clk := newOrdered(t, b)
		boom := errors.New("boom")
		addRaw(t, p, "a", `"a1"`, `"a2"`)
		addRaw(t, p, "b", `"b1"`)
		f := fetch(t, c, 10)
		if len(f.Batches) != 2 {
			t.Fatalf("fetched %s, want two batches", describe(f))
		}
		for _, bt := range f.Batches {
			settle(t, c, bt, protocol.Outcome{Kind: protocol.Retry, Err: boom})
		}
		clk.Advance(time.Millisecond)
		rt := fetchOne(t, c)
		if got := itemsOf(rt); got != `["a1","a2","b1"]` && got != `["b1","a1","a2"]` {
			t.Fatalf("retried %s, want a's items in order, and b's", got)
		}
		var out []protocol.Outcome
		for _, it := range rt.Items {
			if it.Key == "b" {
				out = append(out, protocol.Outcome{Kind: protocol.Retry, Err: boom, Delay: time.Hour})
			} else {
				out = append(out, done)
			}
		}
		settle(t, c, rt, out...)
		if hold(t, b, "a") != "" || hold(t, b, "b") == "" {
			t.Fatalf("holds a=%q b=%q: want a's ended and b's kept", hold(t, b, "a"), hold(t, b, "b"))
		}
	})
}

// A retry stored before its queue was ordered holds nothing: settling it
// leaves alone the hold of its key's batch that is out.
func TestRetryFromBeforeOrderedHoldsNothing(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		before := newConsumer(t, b)
		clk := withFakeClock(before)
		addRaw(t, p, "k", `1`)
		settle(t, before, fetchOne(t, before), protocol.Outcome{Kind: protocol.Retry, Err: errors.New("boom"), Delay: time.Second})

		c := newConsumer(t, b)
		c.Order(queue)
		protocol.SetClock(c, clk.Now)
		addRaw(t, p, "k", `2`)
		bt := fetchOne(t, c)
		checkItems(t, bt, `2`)
		clk.Advance(time.Second)
		rt := fetchOne(t, c)
		checkItems(t, rt, `1`)
		settle(t, c, rt, done)
		if hold(t, b, "k") == "" {
			t.Fatal("the old retry ended the hold of the batch out")
		}
		settle(t, c, bt, done)
		if h := hold(t, b, "k"); h != "" {
			t.Fatalf("hold %q left", h)
		}
	})
}

// When an ordered queue's shard count grows, a key that moves to another
// shard waits there until its items in the shard it left are settled:
// the items appended before the growth run first.
func TestOrderedKeyWaitsForItsEarlierShard(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		key := "k0"
		for keys.Shard(key, 2) == keys.Shard(key, 4) {
			key += "x"
		}
		from, to := keys.Shard(key, 2), keys.Shard(key, 4)
		before := newProducer(t, b, producer.WithDefaultShards(2))
		addRaw(t, before, key, `1`, `2`)
		c, clk := newOrdered(t, b)
		if _, err := c.ReadShards(ctx, queue); err != nil {
			t.Fatal(err)
		}
		fetchShard := func(shard int) protocol.Fetched {
			t.Helper()
			f, err := c.Fetch(ctx, queue, shard, 10)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
		f := fetchShard(from)
		if len(f.Batches) != 1 {
			t.Fatalf("fetched %s from shard %d, want the key's batch", describe(f), from)
		}
		settle(t, c, f.Batches[0], protocol.Outcome{Kind: protocol.Retry, Err: errors.New("boom"), Delay: time.Second})

		if _, err := protocol.SetShards(ctx, b.Client, b.Prefix, queue, 4); err != nil {
			t.Fatal(err)
		}
		after := newProducer(t, b) // routes by the new count
		addRaw(t, after, key, `3`)
		if _, err := c.ReadShards(ctx, queue); err != nil {
			t.Fatal(err)
		}
		if f := fetchShard(to); len(f.Batches) != 0 {
			t.Fatalf("fetched %s from shard %d while the key's items 1 and 2 wait in shard %d", describe(f), to, from)
		}
		clk.Advance(time.Second)
		if f := fetchShard(to); len(f.Batches) != 0 {
			t.Fatalf("fetched %s from shard %d while the key's retry waits in shard %d", describe(f), to, from)
		}
		rt := fetchShard(from)
		if len(rt.Batches) != 1 {
			t.Fatalf("fetched %s from shard %d, want the retry", describe(rt), from)
		}
		checkItems(t, rt.Batches[0], `1`, `2`)
		settle(t, c, rt.Batches[0], done, done)
		clk.Advance(protocol.EarlierWait)
		f = fetchShard(to)
		if len(f.Batches) != 1 {
			t.Fatalf("fetched %s from shard %d once the earlier items were done, want the key's batch", describe(f), to)
		}
		checkItems(t, f.Batches[0], `3`)
	})
}

// A key's name popped twice at once (a sweep pushed it again while a slow
// worker had it) is drained once, and its batch holds the key.
func TestOrderedNamePoppedTwice(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c, _ := newOrdered(t, b)
		addRaw(t, p, "k", `1`)
		must(t, b.Client.Do(ctx, b.Client.B().Rpush().Key(space(b).Wake()).Element("k").Build()).Error())
		bt := fetchOne(t, c)
		checkItems(t, bt, `1`)
		if h := hold(t, b, "k"); h == "" {
			t.Fatal("the batch of a name popped twice does not hold its key")
		}
		addRaw(t, p, "k", `2`)
		fetchNone(t, c)
		settle(t, c, bt, done)
		checkItems(t, fetchOne(t, c), `2`)
	})
}

// An empty array under an ordered key is a batch of no item, whose settle
// ends the key's hold.
func TestOrderedEmptyArrayEndsHold(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c, _ := newOrdered(t, b)
		sp := space(b)
		for _, cmd := range []rueidis.Completed{
			b.Client.B().Set().Key(sp.Items("k")).Value("[]").Build(),
			b.Client.B().Zadd().Key(sp.Ready()).ScoreMember().ScoreMember(0, "k").Build(),
			b.Client.B().Rpush().Key(sp.Wake()).Element("k").Build(),
		} {
			must(t, b.Client.Do(ctx, cmd).Error())
		}
		bt := fetchOne(t, c)
		if len(bt.Items) != 0 {
			t.Fatalf("fetched %s, want a batch of no item", itemsOf(bt))
		}
		settle(t, c, bt)
		if h := hold(t, b, "k"); h != "" {
			t.Fatalf("hold %q left by the batch of an empty array", h)
		}
		addRaw(t, p, "k", `1`)
		checkItems(t, fetchOne(t, c), `1`)
	})
}

// An ordered retry whose stored envelope no longer decodes goes to dead
// letters, and ends its key's hold: it names its key first, so that even a
// damaged one does.
func TestOrderedCorruptRetryEndsHold(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c, clk := newOrdered(t, b)
		addRaw(t, p, "k", `1`, `2`)
		settle(t, c, fetchOne(t, c), protocol.Outcome{Kind: protocol.Retry, Err: errors.New("boom")})
		sp := space(b)
		envs, err := b.Client.Do(ctx, b.Client.B().Hgetall().Key(sp.RetryData()).Build()).AsStrMap()
		must(t, err)
		if len(envs) != 1 {
			t.Fatalf("retries %v, want one", envs)
		}
		for id, env := range envs {
			must(t, b.Client.Do(ctx, b.Client.B().Hset().Key(sp.RetryData()).FieldValue().FieldValue(id, env[:len(env)-1]).Build()).Error())
		}
		addRaw(t, p, "k", `3`)
		clk.Advance(time.Millisecond)
		// The claim moves the damaged retry (items 1 and 2) to dead
		// letters and ends the hold, so that the same fetch drains the key.
		f := fetch(t, c, 10)
		if len(f.Dead) != 1 || len(f.Batches) != 1 {
			t.Fatalf("fetched %s, want the damaged retry as a dead letter and the key's batch", describe(f))
		}
		checkItems(t, f.Batches[0], `3`)
	})
}

// Where a key's earlier items may be after its queue grew: the key's shards
// under the counts before the first that put it in the shard drained, but
// for a shard it came back to (which would wait for this one in turn).
func TestEarlierShards(t *testing.T) {
	c := newConsumer(t, testredis.Mini(t))
	shardsOf := func(key string, counts []int) []int {
		out := make([]int, len(counts))
		for i, n := range counts {
			out[i] = keys.Shard(key, n)
		}
		return out
	}
	// Multiples: a key only moves to new shards. One in three shards (2,
	// 4, 8 shards: a, then b, then c) has its earlier items in those
	// before each.
	var key string
	var at []int
	for i := 0; key == ""; i++ {
		k := "m" + strconv.Itoa(i)
		if s := shardsOf(k, []int{2, 4, 8}); s[0] != s[1] && s[1] != s[2] {
			key, at = k, s
		}
	}
	for _, tc := range []struct {
		shard int
		want  []int
	}{{at[0], nil}, {at[1], at[:1]}, {at[2], at[:2]}} {
		if got := protocol.Earlier(c, queue, []int{2, 4, 8}, tc.shard, key); !slices.Equal(got, tc.want) {
			t.Errorf("a key in shards %v: shard %d waits for %v, want %v", at, tc.shard, got, tc.want)
		}
	}
	// Not multiples: a key in shard 1, then 0, then 1 again (counts 2, 3,
	// 4). Shard 0 waits for nothing: shard 1, which came before it, has the
	// key's newest items too, and while it gets them shard 0 would wait for
	// good; and shard 1 waits for nothing, being the first.
	key = ""
	for i := 0; key == ""; i++ {
		k := "x" + strconv.Itoa(i)
		if slices.Equal(shardsOf(k, []int{2, 3, 4}), []int{1, 0, 1}) {
			key = k
		}
	}
	for _, shard := range []int{0, 1} {
		if got := protocol.Earlier(c, queue, []int{2, 3, 4}, shard, key); len(got) != 0 {
			t.Errorf("a key in shards 1, 0, 1: shard %d waits for %v, want nothing (shard 0 would wait for good while k gets items)", shard, got)
		}
	}
	if got := protocol.Earlier(c, queue, []int{4}, 1, key); len(got) != 0 {
		t.Errorf("a queue that never grew: earlier %v", got)
	}
}

// A key found held with no items (a stale name of a key a flush policy had
// scheduled, promoted while its batch was out) leaves the ready index when
// its hold ends, so that its next append schedules it, and a promotion
// pushes it, as any key's.
func TestOrderedKeyParkedEmptyIsNotStranded(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithFlushPolicy(queue, producer.FlushPolicy{MaxAge: 2 * time.Hour}))
		c, clk := newOrdered(t, b)
		addRaw(t, p, "k", `1`)
		must(t, b.Client.Do(ctx, b.Client.B().Rpush().Key(space(b).Wake()).Element("k").Build()).Error()) // a stale name
		bt := fetchOne(t, c)
		checkItems(t, bt, `1`)
		clk.Advance(2 * time.Hour)
		fetchNone(t, c) // promotes k, pops it, finds it held: parks it, with no items
		settle(t, c, bt, done)
		if ready(t, b, "k") {
			t.Fatal("a key parked with no items stays on the ready index once its hold ends")
		}
		addRaw(t, p, "k", `2`)
		clk.Advance(3 * time.Hour)
		checkItems(t, fetchOne(t, c), `2`)
	})
}
