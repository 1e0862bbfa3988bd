package inspect_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// Retries lists a queue's retries over every shard, soonest due first, with
// key, attempts, last error, due time and item, and counts them all.
func TestRetries(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) { testRetries(t, b, 1) })
	t.Run("cluster", func(t *testing.T) { testRetries(t, testredis.Cluster(t), 4) })
}

func testRetries(t *testing.T, b testredis.Backend, shards int) {
	ctx := context.Background()
	in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
	must(t, err)
	if _, err := in.Retries(ctx, "orders", 10); !errors.Is(err, inspect.ErrNoQueue) {
		t.Fatalf("Retries of an unknown queue: %v, want ErrNoQueue", err)
	}
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(shards))
	must(t, err)
	keysByDelay := map[string]time.Duration{"a": 3 * time.Hour, "b": time.Hour, "c": 2 * time.Hour, "d": 4 * time.Hour}
	for k := range keysByDelay {
		must(t, p.AddRaw(ctx, "orders", k, []byte(`{"k":"`+k+`"}`)))
	}
	fail(t, b, "orders", shards, keysByDelay)
	if rs, err := in.Retries(ctx, "orders", 0); err == nil {
		t.Errorf("Retries with limit 0: %+v, want an error", rs)
	}

	rs, err := in.Retries(ctx, "orders", 3)
	must(t, err)
	if rs.Queue != "orders" || rs.Total != 4 || len(rs.Retries) != 3 || rs.Now.IsZero() {
		t.Fatalf("Retries: %+v", rs)
	}
	for i, want := range []string{"b", "c", "a"} {
		r := rs.Retries[i]
		d := r.Due.Sub(rs.Now)
		if r.Key != want || r.Attempts != 1 || r.Error != "failed "+want || string(r.Item) != `{"k":"`+want+`"}` || r.Corrupt ||
			d < keysByDelay[want]-time.Minute || d > keysByDelay[want]+time.Minute {
			t.Errorf("retry %d: %+v (due in %v), want key %s", i, r, d, want)
		}
	}
	st, err := in.Stats(ctx, "orders")
	must(t, err)
	if st.Retries != rs.Total {
		t.Errorf("Stats counts %d retries, Retries %d", st.Retries, rs.Total)
	}
}

// fail fetches every due key of a queue and settles each item as a retry
// due after the delay of its key, with the error "failed <key>".
func fail(t *testing.T, b testredis.Backend, queue string, shards int, delays map[string]time.Duration) {
	t.Helper()
	ctx := context.Background()
	c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix), protocol.WithDefaultShards(shards))
	must(t, err)
	must(t, c.Sync(ctx))
	for shard := range shards {
		f, err := c.Fetch(ctx, queue, shard, 10)
		must(t, err)
		for _, bt := range f.Batches {
			out := make([]protocol.Outcome, len(bt.Items))
			for i := range out {
				out[i] = protocol.Outcome{Kind: protocol.Retry, Err: errors.New("failed " + bt.Key), Delay: delays[bt.Key]}
			}
			must(t, c.Settle(ctx, bt, out))
		}
	}
}

// On a queue with ordered keys, a failed item holds back the items after
// it: its retry says how many.
func TestRetriesOfOrderedKeys(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix))
		must(t, err)
		must(t, p.Add(ctx, "ord", "k", 1, 2, 3, 4))
		c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix))
		must(t, err)
		c.Order("ord")
		must(t, c.Sync(ctx))
		f, err := c.Fetch(ctx, "ord", 0, 10)
		must(t, err)
		if len(f.Batches) != 1 || len(f.Batches[0].Items) != 4 {
			t.Fatalf("fetched %+v, want one batch of 4 items", f.Batches)
		}
		// Item 2 fails; 3 and 4 never ran.
		out := []protocol.Outcome{{Kind: protocol.Done}, {Kind: protocol.Retry, Err: errors.New("failed"), Delay: time.Hour}}
		must(t, c.Settle(ctx, f.Batches[0], out))
		in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
		must(t, err)
		rs, err := in.Retries(ctx, "ord", 10)
		must(t, err)
		if rs.Total != 1 || len(rs.Retries) != 1 {
			t.Fatalf("Retries: %+v, want one", rs)
		}
		if r := rs.Retries[0]; r.Key != "k" || string(r.Item) != "2" || r.Attempts != 1 || r.Behind != 2 {
			t.Errorf("retry %+v, want item 2 of k, 1 attempt, 2 items behind", r)
		}

		// An item appended meanwhile waits for the hold, and counts as
		// pending: a worker that pops the key leaves it held.
		must(t, p.Add(ctx, "ord", "k", 5))
		if f, err := c.Fetch(ctx, "ord", 0, 10); err != nil || len(f.Batches) != 0 {
			t.Fatalf("fetched %+v, %v from a held key", f.Batches, err)
		}
		st, err := in.Stats(ctx, "ord")
		must(t, err)
		if st.ReadyKeys != 1 || st.PendingItems != 1 || !st.OldestDue.IsZero() || st.Lag != 0 {
			t.Errorf("Stats %+v, want the held key's item pending, with no lag", st)
		}
		ks, err := in.Keys(ctx, "ord", inspect.ByAge, 10)
		must(t, err)
		if len(ks) != 1 || !ks[0].Held || ks[0].Items != 1 || !ks[0].Due.IsZero() {
			t.Errorf("Keys %+v, want k held with 1 item", ks)
		}
		pk, err := in.Peek(ctx, "ord", "k")
		must(t, err)
		if !pk.Held || string(pk.Array) != "[5]" {
			t.Errorf("Peek %+v, want k held, holding [5]", pk)
		}
	})
}
