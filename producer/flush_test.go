package producer_test

import (
	"context"
	"encoding/json"
	"strconv"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// serverMs reads the Redis server's clock, which the producer's clock
// follows.
func serverMs(t *testing.T, b testredis.Backend) int64 {
	t.Helper()
	r, err := b.Client.Do(context.Background(), b.Client.B().Time().Build()).AsStrSlice()
	if err != nil {
		t.Fatal(err)
	}
	s, _ := strconv.ParseInt(r[0], 10, 64)
	us, _ := strconv.ParseInt(r[1], 10, 64)
	return s*1000 + us/1000
}

// dueAt returns the key's due time on the ready index (due) or the later
// index (scheduled by a flush policy), or -1 when it is on neither.
func dueAt(t *testing.T, b testredis.Backend, queue, key string) int64 {
	t.Helper()
	sp := keys.For(b.Prefix, queue, 0)
	for _, index := range []string{sp.Ready(), sp.Later()} {
		f, err := b.Client.Do(context.Background(), b.Client.B().Zscore().Key(index).Member(key).Build()).AsFloat64()
		if err == nil {
			return int64(f)
		}
	}
	return -1
}

// addAt appends one item and returns the server's clock just before and
// just after, which bound the time the merge script read.
func addAt(t *testing.T, b testredis.Backend, p *producer.Producer, queue, key string, item int) (before, after int64) {
	t.Helper()
	before = serverMs(t, b)
	if err := p.AddRaw(context.Background(), queue, key, json.RawMessage(strconv.Itoa(item))); err != nil {
		t.Fatal(err)
	}
	return before, serverMs(t, b)
}

// within checks that got is within [lo, hi], give or take clockSlack: the
// producer knows the server's clock to within a fraction of a round trip.
func within(t *testing.T, what string, got, lo, hi int64) {
	t.Helper()
	if got < lo-clockSlack || got > hi+clockSlack {
		t.Fatalf("%s: due at %d, want within [%d, %d] (±%dms)", what, got, lo, hi, clockSlack)
	}
}

const clockSlack = 2 // ms

// A key is due MaxAge after its first item, at once when it reaches
// MaxItems or MaxBytes, and a worker does not take it before it is due.
func TestFlushPolicyMaxAgeAndLimits(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b,
			producer.WithFlushPolicy("age", producer.FlushPolicy{MaxAge: 10 * time.Second, MaxItems: 3}),
			producer.WithFlushPolicy("bytes", producer.FlushPolicy{MaxAge: 10 * time.Second, MaxBytes: 12}))

		lo, hi := addAt(t, b, p, "age", "k", 1)
		within(t, "first item", dueAt(t, b, "age", "k"), lo+10000, hi+10000)
		first := dueAt(t, b, "age", "k")
		addAt(t, b, p, "age", "k", 2)
		if got := dueAt(t, b, "age", "k"); got != first {
			t.Fatalf("second item moved the due time: %d, want %d", got, first)
		}
		lo, hi = addAt(t, b, p, "age", "k", 3) // the third item: MaxItems
		within(t, "at MaxItems", dueAt(t, b, "age", "k"), lo, hi)

		// [1000,1001] is 11 bytes, [1000,1001,1002] is 16: due at the third.
		addAt(t, b, p, "bytes", "k", 1000)
		addAt(t, b, p, "bytes", "k", 1001)
		if got, lo := dueAt(t, b, "bytes", "k"), serverMs(t, b)+9000; got < lo {
			t.Fatalf("due at %d under MaxBytes, want after %d", got, lo)
		}
		lo, hi = addAt(t, b, p, "bytes", "k", 1002)
		within(t, "at MaxBytes", dueAt(t, b, "bytes", "k"), lo, hi)

		// A key that is not due yet stays where it is.
		c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix))
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		lo, hi = addAt(t, b, p, "age", "later", 7)
		f, err := c.Fetch(ctx, "age", 0, 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(f.Batches) != 1 || f.Batches[0].Key != "k" || len(f.Batches[0].Items) != 3 {
			t.Fatalf("fetched %+v, want the due key k with its 3 items only", f.Batches)
		}
		done := []protocol.Outcome{{Kind: protocol.Done}, {Kind: protocol.Done}, {Kind: protocol.Done}}
		if err := c.Settle(ctx, f.Batches[0], done); err != nil {
			t.Fatal(err)
		}
		if f, err = c.Fetch(ctx, "age", 0, 10); err != nil || len(f.Batches) != 0 {
			t.Fatalf("fetched %+v, %v; want nothing", f.Batches, err)
		}
		within(t, "next due", f.NextKey.UnixMilli(), lo+10000, hi+10000)
		if v, _ := get(t, b, "age", "later"); v != "[7]" {
			t.Fatalf("the key not due yet holds %q", v)
		}
	})
}

// With a quiet period each item pushes the due time back, but never past
// MaxAge after the first item: a steady trickle cannot starve the key.
func TestFlushPolicyQuietPeriodIsCapped(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b, producer.WithFlushPolicy("q", producer.FlushPolicy{MaxAge: 400 * time.Millisecond, Quiet: 250 * time.Millisecond}))
		lo, hi := addAt(t, b, p, "q", "k", 1)
		within(t, "first item", dueAt(t, b, "q", "k"), lo+250, hi+250)
		capLo, capHi := lo+400, hi+400

		time.Sleep(50 * time.Millisecond)
		lo2, hi2 := addAt(t, b, p, "q", "k", 2)
		within(t, "pushed back", dueAt(t, b, "q", "k"), max(lo2+250, lo+250), min(hi2+250, capHi))

		time.Sleep(200 * time.Millisecond) // now past first+200: first+250+200 > the cap
		addAt(t, b, p, "q", "k", 3)
		within(t, "capped", dueAt(t, b, "q", "k"), capLo, capHi)
		if v, _ := get(t, b, "q", "k"); v != "[1,2,3]" {
			t.Fatalf("key holds %q", v)
		}
	})
}

// An append refused by a cap, or by a key holding a non-array, makes the
// key due at once even under a flush policy, so a worker deals with it.
func TestFlushPolicyRefusedAppendMakesKeyDue(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithMaxKeyItems(3),
			producer.WithFlushPolicy("q", producer.FlushPolicy{MaxAge: time.Hour, Quiet: time.Minute}))
		addAt(t, b, p, "q", "k", 1)
		addAt(t, b, p, "q", "k", 2)
		lo := serverMs(t, b)
		if err := p.AddRaw(ctx, "q", "k", json.RawMessage("3"), json.RawMessage("4")); err == nil {
			t.Fatal("append past the cap succeeded")
		}
		hi := serverMs(t, b)
		within(t, "full key", dueAt(t, b, "q", "k"), lo, hi)
		// An item that still fits does not push the due key back by the
		// quiet period.
		addAt(t, b, p, "q", "k", 3)
		within(t, "full key after one more item", dueAt(t, b, "q", "k"), lo, hi)

		if err := b.Client.Do(ctx, b.Client.B().Set().Key(keys.For(b.Prefix, "q", 0).Items("bad")).Value("nope").Build()).Error(); err != nil {
			t.Fatal(err)
		}
		lo = serverMs(t, b)
		if err := p.AddRaw(ctx, "q", "bad", json.RawMessage("1")); err == nil {
			t.Fatal("append to a non-array succeeded")
		}
		within(t, "non-array key", dueAt(t, b, "q", "bad"), lo, serverMs(t, b))
	})
}

func TestFlushPolicyValidation(t *testing.T) {
	b := testredis.Mini(t)
	for _, f := range []producer.FlushPolicy{
		{Quiet: time.Second},
		{MaxItems: 10},
		{MaxAge: -time.Second},
		{MaxAge: time.Microsecond},
	} {
		if _, err := producer.New(b.Client, producer.WithFlushPolicy("q", f)); err == nil {
			t.Errorf("%+v: no error", f)
		}
	}
	if _, err := producer.New(b.Client, producer.WithFlushPolicy("bad:name", producer.FlushPolicy{MaxAge: time.Second})); err == nil {
		t.Error("a bad queue name: no error")
	}
}
