package protocol_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
)

func reap(t *testing.T, c *protocol.Consumer) int {
	t.Helper()
	n, err := c.Reap(context.Background(), queue, 0)
	if err != nil {
		t.Fatalf("Reap: %v", err)
	}
	return n
}

// An expired lease is reaped: its items go back in front of the key, and a
// late Settle of the old batch is refused and changes nothing.
func TestLeaseFencing(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b, protocol.WithLeaseTTL(100*time.Millisecond))
		clk := withFakeClock(c)
		addRaw(t, p, "k", `1`, `2`)
		old := fetchOne(t, c)
		if n := reap(t, c); n != 0 {
			t.Fatalf("Reap of a fresh lease returned %d", n)
		}
		addRaw(t, p, "k", `3`)
		clk.Advance(99 * time.Millisecond)
		if n := reap(t, c); n != 0 {
			t.Fatalf("Reap 1ms before the deadline returned %d", n)
		}
		clk.Advance(2 * time.Millisecond)
		if n := reap(t, c); n != 1 {
			t.Fatalf("Reap after the deadline returned %d, want 1", n)
		}
		if v, _ := stored(t, b, "k"); v != `[1,2,3]` {
			t.Fatalf("after reap the key holds %s, want [1,2,3]", v)
		}
		if !ready(t, b, "k") {
			t.Fatal("key not ready after reap")
		}
		noLeases(t, b)
		if n := reap(t, c); n != 0 {
			t.Fatalf("second Reap returned %d", n)
		}

		// The old holder's settlement is refused, whatever it says.
		boom := errors.New("boom")
		for _, out := range [][]protocol.Outcome{
			{done, done},
			{{Kind: protocol.Dead, Err: boom}, {Kind: protocol.Retry, Err: boom}},
			{{Kind: protocol.Unfinished}, {Kind: protocol.Unfinished}},
		} {
			if err := c.Settle(ctx, old, out); !errors.Is(err, protocol.ErrLeaseLost) {
				t.Fatalf("late Settle %v: got %v, want ErrLeaseLost", out, err)
			}
		}
		if v, _ := stored(t, b, "k"); v != `[1,2,3]` {
			t.Fatalf("late Settle changed the key to %s", v)
		}
		if n := countDead(t, c); n != 0 {
			t.Fatalf("late Settle stored %d dead letters", n)
		}
		if ks := testredis.Keys(t, b, b.Prefix+":*retry*"); len(ks) != 0 {
			t.Fatalf("late Settle stored retries: %v", ks)
		}
		nb := fetchOne(t, c)
		checkItems(t, nb, `1`, `2`, `3`)
		for _, it := range nb.Items {
			if it.Attempt != 0 {
				t.Fatalf("redelivered item %s has attempt %d", it.Data, it.Attempt)
			}
		}
		settle(t, c, nb, all(3, done)...)
		noLeases(t, b)
	})
}

// Extend keeps a lease past its first deadline, until the extended one.
func TestExtendKeepsLease(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b, protocol.WithLeaseTTL(100*time.Millisecond))
		clk := withFakeClock(c)
		addRaw(t, p, "a", `"a"`)
		addRaw(t, p, "b", `"b"`)
		f := fetch(t, c, 10)
		if len(f.Batches) != 2 {
			t.Fatalf("got %s, want two batches", describe(f))
		}
		clk.Advance(60 * time.Millisecond)
		if err := c.Extend(ctx, f.Batches...); err != nil {
			t.Fatalf("Extend: %v", err)
		}
		clk.Advance(60 * time.Millisecond) // 120ms since the fetch, 60ms since the extension
		if n := reap(t, c); n != 0 {
			t.Fatalf("Reap of extended leases returned %d", n)
		}
		settle(t, c, f.Batches[0], done)
		clk.Advance(41 * time.Millisecond) // past the extended deadline
		if n := reap(t, c); n != 1 {
			t.Fatalf("Reap past the extended deadline returned %d, want 1", n)
		}
		if err := c.Settle(ctx, f.Batches[1], []protocol.Outcome{done}); !errors.Is(err, protocol.ErrLeaseLost) {
			t.Fatalf("Settle after reap: got %v, want ErrLeaseLost", err)
		}
		// Extending a reaped lease does not bring it back.
		if err := c.Extend(ctx, f.Batches[1]); err != nil {
			t.Fatalf("Extend of a reaped lease: %v", err)
		}
		noLeases(t, b)
		nb := fetchOne(t, c)
		if nb.Key != f.Batches[1].Key {
			t.Fatalf("redelivered key %q, want %q", nb.Key, f.Batches[1].Key)
		}
		settle(t, c, nb, done)
		noLeases(t, b)
	})
}

// A retry batch whose lease expires goes back to the retry index with its
// attempt counts.
func TestExpiredRetryLease(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b, protocol.WithLeaseTTL(100*time.Millisecond))
		clk := withFakeClock(c)
		addRaw(t, p, "k", `"x"`, `"y"`)
		bt := fetchOne(t, c)
		settle(t, c, bt, all(2, protocol.Outcome{Kind: protocol.Retry, Err: errors.New("e1")})...)
		rb := fetchOne(t, c)
		if !rb.Retry() {
			t.Fatal("want a retry batch")
		}
		fetchNone(t, c)
		clk.Advance(100 * time.Millisecond)
		if n := reap(t, c); n != 1 {
			t.Fatalf("Reap returned %d, want 1", n)
		}
		if err := c.Settle(ctx, rb, all(2, done)); !errors.Is(err, protocol.ErrLeaseLost) {
			t.Fatalf("late Settle of a retry batch: got %v, want ErrLeaseLost", err)
		}
		rb = fetchOne(t, c)
		if !rb.Retry() || len(rb.Items) != 2 {
			t.Fatalf("got retry=%v with %d items", rb.Retry(), len(rb.Items))
		}
		seen := map[string]bool{}
		for _, it := range rb.Items {
			seen[string(it.Data)] = true
			if it.Attempt != 1 || it.LastError != "e1" || it.Key != "k" {
				t.Fatalf("reaped retry %s: attempt %d error %q key %q", it.Data, it.Attempt, it.LastError, it.Key)
			}
		}
		if !seen[`"x"`] || !seen[`"y"`] {
			t.Fatalf("reaped retries %v", seen)
		}
		settle(t, c, rb, all(2, done)...)
		noLeases(t, b)
	})
}

// With the real clock: a lease is never reaped before its TTL, and is
// reaped soon after.
func TestLeaseExpiresInRealTime(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		const ttl = 100 * time.Millisecond
		c := newConsumer(t, b, protocol.WithLeaseTTL(ttl))
		addRaw(t, p, "k", `1`)
		start := time.Now()
		bt := fetchOne(t, c)
		eventually(t, 5*time.Second, "the lease to be reaped", func() bool {
			n := reap(t, c)
			// Deadlines are whole milliseconds, so up to 1ms early.
			if n > 0 && time.Since(start) < ttl-time.Millisecond {
				t.Fatalf("lease reaped %v after the fetch, before its %v TTL", time.Since(start), ttl)
			}
			return n == 1
		})
		if err := c.Settle(context.Background(), bt, []protocol.Outcome{done}); !errors.Is(err, protocol.ErrLeaseLost) {
			t.Fatalf("Settle after reap: got %v, want ErrLeaseLost", err)
		}
		nb := fetchOne(t, c)
		checkItems(t, nb, `1`)
		settle(t, c, nb, done)
	})
}

// With WithAtMostOnce a drain writes no lease; outcomes are still recorded.
func TestAtMostOnce(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		c := newConsumer(t, b, protocol.WithAtMostOnce())
		addRaw(t, p, "k", awkward...)
		bt := fetchOne(t, c)
		if bt.Key != "k" || bt.Retry() {
			t.Fatalf("batch key %q", bt.Key)
		}
		checkItems(t, bt, awkward...)
		noLeases(t, b)
		if v, ok := stored(t, b, "k"); ok {
			t.Fatalf("items key still holds %s", v)
		}
		if ready(t, b, "k") {
			t.Fatal("key still ready after the drain")
		}
		fetchNone(t, c)
		settle(t, c, bt, all(len(bt.Items), done)...)
		noLeases(t, b)
		fetchNone(t, c)

		// Retry, Dead and Unfinished outcomes are recorded as with leases.
		addRaw(t, p, "k", `1`, `2`, `3`)
		bt = fetchOne(t, c)
		noLeases(t, b)
		addRaw(t, p, "k", `4`)
		settle(t, c, bt,
			protocol.Outcome{Kind: protocol.Retry, Err: errors.New("r")},
			protocol.Outcome{Kind: protocol.Dead, Err: errors.New("d")},
			protocol.Outcome{Kind: protocol.Unfinished})
		if v, _ := stored(t, b, "k"); v != `[3,4]` {
			t.Fatalf("key holds %s, want [3,4]", v)
		}
		ds := deadLetters(t, c)
		if len(ds) != 1 || string(ds[0].Item) != `2` || ds[0].Error != "d" || ds[0].Attempts != 1 {
			t.Fatalf("dead letters %+v", ds)
		}
		// One Fetch takes the key and, room being left, the due retry.
		f := fetch(t, c, 10)
		if len(f.Batches) != 2 || f.Batches[0].Retry() == f.Batches[1].Retry() {
			t.Fatalf("got %s, want key k and a retry batch", describe(f))
		}
		kb, rb := f.Batches[0], f.Batches[1]
		if kb.Retry() {
			kb, rb = rb, kb
		}
		if kb.Key != "k" {
			t.Fatalf("got %s, want key k and a retry batch", describe(f))
		}
		checkItems(t, kb, `3`, `4`)
		settle(t, c, kb, done, done)
		checkItems(t, rb, `1`)
		if it := rb.Items[0]; it.Attempt != 1 || it.LastError != "r" || it.Key != "k" {
			t.Fatalf("retry: attempt %d error %q key %q", it.Attempt, it.LastError, it.Key)
		}
		settle(t, c, rb, done)
		noLeases(t, b)
		fetchNone(t, c)
	})
}

// A batch whose key turns corrupt while it is held never wedges. Settled,
// its unfinished items wait on the retry index instead of going back in
// front of the key. Abandoned, its lease is kept by the reaper until a fetch
// has moved the bad value to dead letters, then its items are returned.
func TestCorruptKeyWhileBatchIsHeld(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b, protocol.WithLeaseTTL(100*time.Millisecond))
		clk := withFakeClock(c)
		corrupt := func() {
			t.Helper()
			if err := b.Client.Do(ctx, b.Client.B().Set().Key(space(b).Items("k")).Value("oops").Build()).Error(); err != nil {
				t.Fatal(err)
			}
		}

		// Settled: the unfinished item goes to the retry index, due now,
		// attempts unchanged; the dead letter is stored; the bad value stays.
		addRaw(t, p, "k", `1`, `2`)
		bt := fetchOne(t, c)
		corrupt()
		if err := c.Settle(ctx, bt, []protocol.Outcome{{Kind: protocol.Unfinished}, {Kind: protocol.Dead, Err: errors.New("d")}}); err != nil {
			t.Fatalf("Settle onto a corrupt key: %v", err)
		}
		if n := countDead(t, c); n != 1 {
			t.Fatalf("%d dead letters, want 1", n)
		}
		if v, _ := stored(t, b, "k"); v != "oops" {
			t.Fatalf("Settle changed the corrupt key to %s", v)
		}
		f := fetch(t, c, 10)
		if len(f.Batches) != 1 || !f.Batches[0].Retry() || len(f.Dead) != 1 || string(f.Dead[0].Item) != `"oops"` {
			t.Fatalf("got %s, want the unfinished item as a retry and the bad value in dead letters", describe(f))
		}
		checkItems(t, f.Batches[0], `1`)
		if it := f.Batches[0].Items[0]; it.Attempt != 0 || it.Key != "k" {
			t.Fatalf("unfinished item came back with attempt %d key %q", it.Attempt, it.Key)
		}
		settle(t, c, f.Batches[0], done)
		noLeases(t, b)

		// Abandoned: the reaper keeps the lease while the key is corrupt.
		addRaw(t, p, "k", `3`, `4`)
		bt = fetchOne(t, c)
		checkItems(t, bt, `3`, `4`)
		corrupt()
		clk.Advance(100 * time.Millisecond)
		if n := reap(t, c); n != 0 {
			t.Fatalf("Reap onto a corrupt key returned %d, want 0", n)
		}
		if v, _ := stored(t, b, "k"); v != "oops" {
			t.Fatalf("reap changed the corrupt key to %s", v)
		}
		f = fetch(t, c, 10)
		if len(f.Batches) != 0 || len(f.Dead) != 1 || f.Dead[0].Key != "k" {
			t.Fatalf("got %s, want the corrupt value of k in dead letters", describe(f))
		}
		if n := reap(t, c); n != 0 {
			t.Fatalf("Reap before the pushed deadline returned %d", n)
		}
		clk.Advance(100 * time.Millisecond)
		if n := reap(t, c); n != 1 {
			t.Fatalf("Reap after the bad value was dead-lettered returned %d, want 1", n)
		}
		nb := fetchOne(t, c)
		checkItems(t, nb, `3`, `4`)
		settle(t, c, nb, done, done)
		noLeases(t, b)
	})
}
