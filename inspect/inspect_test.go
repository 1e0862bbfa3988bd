package inspect_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// The inspector reads a queue's real state: registered queues, depth, lag,
// in-flight batches, retries and dead letters, the keys in each order, and
// a key's items, on miniredis, a real redis-server and a Redis Cluster.
func TestInspector(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) { testInspector(t, b, 1) })
	t.Run("cluster", func(t *testing.T) { testInspector(t, testredis.Cluster(t), 4) })
}

func testInspector(t *testing.T, b testredis.Backend, shards int) {
	ctx := context.Background()
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(shards))
	must(t, err)
	in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
	must(t, err)

	if qs, err := in.Queues(ctx); err != nil || len(qs) != 0 {
		t.Fatalf("Queues before any append: %v, %v", qs, err)
	}
	if _, err := in.Stats(ctx, "orders"); !errors.Is(err, inspect.ErrNoQueue) {
		t.Fatalf("Stats of an unknown queue: %v, want ErrNoQueue", err)
	}

	// orders: key a 3 items, key b 1 long item, key c 2 items.
	must(t, p.AddRaw(ctx, "orders", "a", []byte(`1`), []byte(`2`), []byte(`3`)))
	must(t, p.AddRaw(ctx, "orders", "b", []byte(`"`+strings.Repeat("x", 100)+`"`)))
	must(t, p.AddRaw(ctx, "orders", "c", []byte(`4`), []byte(`5`)))
	must(t, p.Add(ctx, "emails", "u", map[string]int{"id": 1}))

	qs, err := in.Queues(ctx)
	must(t, err)
	if len(qs) != 2 || qs[0] != (inspect.Queue{Name: "emails", Shards: shards}) || qs[1] != (inspect.Queue{Name: "orders", Shards: shards}) {
		t.Fatalf("Queues: %+v", qs)
	}

	// Some lag to see. Due times are the producer's reckoning of the
	// server's clock, which may be off by a few milliseconds: sleep well
	// past the lag the test asks for.
	time.Sleep(50 * time.Millisecond)
	st, err := in.Stats(ctx, "orders")
	must(t, err)
	if st.ReadyKeys != 3 || st.PendingItems != 6 || st.InFlightBatches != 0 || st.Retries != 0 || st.DeadLetters != 0 || st.Partial {
		t.Fatalf("Stats after appends: %+v", st)
	}
	if st.Lag < 20*time.Millisecond || st.Lag > time.Minute || st.OldestDue.IsZero() {
		t.Fatalf("lag %v, oldest due %v", st.Lag, st.OldestDue)
	}

	byItems, err := in.Keys(ctx, "orders", inspect.ByItems, 2)
	must(t, err)
	if len(byItems) != 2 || byItems[0].Key != "a" || byItems[0].Items != 3 || byItems[1].Key != "c" || byItems[1].Items != 2 {
		t.Fatalf("Keys by items: %+v", byItems)
	}
	byBytes, err := in.Keys(ctx, "orders", inspect.ByBytes, 10)
	must(t, err)
	if len(byBytes) != 3 || byBytes[0].Key != "b" || byBytes[0].Bytes != 104 || byBytes[0].Shard != keys.Shard("b", shards) {
		t.Fatalf("Keys by bytes: %+v", byBytes)
	}
	byAge, err := in.Keys(ctx, "orders", inspect.ByAge, 10)
	must(t, err)
	if len(byAge) != 3 || byAge[0].Key != "a" || byAge[2].Key != "c" || byAge[0].Lag < byAge[2].Lag {
		t.Fatalf("Keys by age: %+v", byAge)
	}
	if _, err := in.Keys(ctx, "orders", "size", 10); err == nil {
		t.Fatal("Keys by an unknown order: no error")
	}

	pk, err := in.Peek(ctx, "orders", "a")
	must(t, err)
	if string(pk.Array) != "[1,2,3]" || pk.Items != 3 || pk.Bytes != 7 || pk.Due.IsZero() {
		t.Fatalf("Peek a: %+v (%s)", pk, pk.Array)
	}
	if pk, err := in.Peek(ctx, "orders", "nothing"); err != nil || pk.Array != nil || pk.Items != 0 {
		t.Fatalf("Peek of an empty key: %+v, %v", pk, err)
	}

	// A worker takes every key; one item fails for good, one for retry;
	// key a's batch stays in flight.
	c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix), protocol.WithDefaultShards(shards))
	must(t, err)
	must(t, c.Sync(ctx))
	var inflight int
	var held []*protocol.Batch
	for shard := range shards {
		f, err := c.Fetch(ctx, "orders", shard, 10)
		must(t, err)
		for _, bt := range f.Batches {
			out := make([]protocol.Outcome, len(bt.Items))
			for i := range out {
				out[i] = protocol.Outcome{Kind: protocol.Done}
			}
			switch bt.Key {
			case "a":
				held = append(held, bt)
				inflight += len(bt.Items)
				continue
			case "b":
				out[0] = protocol.Outcome{Kind: protocol.Dead, Err: errors.New("poison")}
			case "c":
				out[1] = protocol.Outcome{Kind: protocol.Retry, Err: errors.New("later"), Delay: time.Hour}
			}
			must(t, c.Settle(ctx, bt, out))
		}
	}
	if len(held) != 1 {
		t.Fatalf("key a fetched %d times", len(held))
	}
	st, err = in.Stats(ctx, "orders")
	must(t, err)
	if st.ReadyKeys != 0 || st.PendingItems != 0 || st.InFlightBatches != 1 || st.InFlightItems != 3 ||
		st.Retries != 1 || st.DeadLetters != 1 || st.Lag != 0 {
		t.Fatalf("Stats with a batch in flight: %+v", st)
	}
	all, err := in.AllStats(ctx)
	must(t, err)
	if len(all) != 2 || all[0].Queue != "emails" || all[0].PendingItems != 1 || all[1].DeadLetters != 1 {
		t.Fatalf("AllStats: %+v", all)
	}
	must(t, c.Settle(ctx, held[0], []protocol.Outcome{{Kind: protocol.Done}, {Kind: protocol.Done}, {Kind: protocol.Done}}))

	// A key holding another Redis type is reported, not misread.
	sp := keys.For(b.Prefix, "orders", keys.Shard("h", shards))
	must(t, b.Client.Do(ctx, b.Client.B().Hset().Key(sp.Items("h")).FieldValue().FieldValue("f", "v").Build()).Error())
	if _, err := in.Peek(ctx, "orders", "h"); err == nil || !strings.Contains(err.Error(), "hash") {
		t.Fatalf("Peek of a hash: %v", err)
	}
}

// Many keys over several shards: the counts add up.
func TestInspectorCountsManyKeys(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		const shards, nkeys = 3, 300
		p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(shards), producer.WithLinger(0, 500))
		must(t, err)
		for i := range nkeys {
			raws := make([]json.RawMessage, i%5+1)
			for j := range raws {
				raws[j] = json.RawMessage(strconv.Itoa(j))
			}
			must(t, p.AddRaw(ctx, "q", "k"+strconv.Itoa(i), raws...))
		}
		in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
		must(t, err)
		st, err := in.Stats(ctx, "q")
		must(t, err)
		want := int64(0)
		for i := range nkeys {
			want += int64(i%5 + 1)
		}
		if st.ReadyKeys != nkeys || st.PendingItems != want || st.Shards != shards {
			t.Fatalf("Stats: %+v, want %d keys %d items", st, nkeys, want)
		}
		top, err := in.Keys(ctx, "q", inspect.ByItems, 5)
		must(t, err)
		for _, k := range top {
			if k.Items != 5 {
				t.Fatalf("top keys by items: %+v", top)
			}
		}
	})
}

// A queue's shard count is its first writer's: producers and workers
// given other defaults route and drain by the recorded count, and the
// inspector reads every shard. A caller that already routes by more shards
// (the queue was forgotten and recorded anew) raises the count.
func TestFirstWriterRecordsShards(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		// Each producer appends to a key whose shard under 3 is not its
		// shard under the producer's own default.
		key := map[int]string{}
		for _, n := range []int{3, 1, 2} {
			for i := 0; key[n] == ""; i++ {
				if k := "k" + strconv.Itoa(n) + "-" + strconv.Itoa(i); n == 3 || keys.Shard(k, 3) != keys.Shard(k, n) {
					key[n] = k
				}
			}
			p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(n))
			must(t, err)
			must(t, p.Add(ctx, "q", key[n], n))
		}
		// Each key sits in its shard under 3, whatever its producer's default.
		for _, n := range []int{3, 1, 2} {
			k := key[n]
			if got := testredis.Keys(t, b, keys.For(b.Prefix, "q", keys.Shard(k, 3)).Items(k)); len(got) != 1 {
				t.Errorf("key %s is not in its shard of 3: %v", k, got)
			}
		}
		d := protocol.Defaults{Fixed: 2}
		got, err := protocol.RegisterNew(ctx, b.Client, b.Prefix, &d, protocol.Known{Queue: "q"}, protocol.Known{Queue: "other"}, protocol.Known{Queue: "wide", Shards: 5})
		must(t, err)
		if !slices.Equal(got, []int{3, 2, 5}) {
			t.Fatalf("Register returned %v, want [3 2 5]", got)
		}
		if got, err = protocol.RegisterNew(ctx, b.Client, b.Prefix, &d, protocol.Known{Queue: "q", Shards: 4}, protocol.Known{Queue: "other", Shards: 1}); err != nil || !slices.Equal(got, []int{4, 2}) {
			t.Fatalf("Register with known counts returned %v, %v; want [4 2]: a count is raised, never lowered", got, err)
		}
		in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
		must(t, err)
		q, err := in.Queue(ctx, "q")
		must(t, err)
		if q.Shards != 4 {
			t.Fatalf("queue q has %d shards in the registry, want 4", q.Shards)
		}
		st, err := in.Stats(ctx, "q")
		must(t, err)
		if st.PendingItems != 3 {
			t.Fatalf("pending items %d, want 3 over every shard", st.PendingItems)
		}
	})
}

// CreateQueue records a count before any writer; SetShards raises it and
// refuses to lower it.
func TestCreateQueueAndSetShards(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
		must(t, err)
		if _, err := in.SetShards(ctx, "q", 4); !errors.Is(err, inspect.ErrNoQueue) {
			t.Fatalf("SetShards of an unknown queue: %v, want ErrNoQueue", err)
		}
		must(t, in.CreateQueue(ctx, "q", 2))
		must(t, in.CreateQueue(ctx, "q", 2)) // the same count: nothing to do
		if err := in.CreateQueue(ctx, "q", 3); !errors.Is(err, inspect.ErrQueueExists) ||
			err.Error() != `inspect: create queue "q": the queue exists with 2 shards` {
			t.Fatalf("CreateQueue of a queue with another count: %v", err)
		}
		for _, n := range []int{0, 1025} {
			if err := in.CreateQueue(ctx, "r", n); err == nil || err.Error() != "inspect: shards must be 1-1024, got "+strconv.Itoa(n) {
				t.Errorf("CreateQueue with %d shards: %v", n, err)
			}
		}
		// A producer with another default routes by the created count.
		p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(7))
		must(t, err)
		must(t, p.Add(ctx, "q", "k", 1))
		if got := testredis.Keys(t, b, keys.For(b.Prefix, "q", keys.Shard("k", 2)).Items("k")); len(got) != 1 {
			t.Fatalf("the producer did not route by the created count: %v", got)
		}

		old, err := in.SetShards(ctx, "q", 8)
		if err != nil || old != 2 {
			t.Fatalf("SetShards 8: %d, %v; want it to replace 2", old, err)
		}
		if old, err = in.SetShards(ctx, "q", 8); err != nil || old != 8 {
			t.Fatalf("SetShards 8 again: %d, %v", old, err)
		}
		_, err = in.SetShards(ctx, "q", 4)
		if !errors.Is(err, inspect.ErrShrink) ||
			err.Error() != `inspect: queue "q": a queue's shards cannot shrink: it has 8, and 4 would strand the items in the others` {
			t.Fatalf("SetShards 4: %v, want ErrShrink", err)
		}
		if q, err := in.Queue(ctx, "q"); err != nil || q.Shards != 8 {
			t.Fatalf("queue q: %+v, %v; want 8 shards", q, err)
		}
		st, err := in.Stats(ctx, "q")
		must(t, err)
		if st.Shards != 8 || st.PendingItems != 1 {
			t.Fatalf("stats %+v, want 8 shards and the item", st)
		}
	})
}

// New reads the default prefix unless WithPrefix says otherwise, and
// returns an error, not an inspector, for a nil client or a bad prefix.
func TestNew(t *testing.T) {
	b := testredis.Mini(t)
	in, err := inspect.New(b.Client)
	if err != nil || in.Prefix() != "batchq" {
		t.Fatalf("New without options: prefix %v, %v; want batchq", in, err)
	}
	if in, err = inspect.New(b.Client, inspect.WithPrefix("a"), inspect.WithPrefix("b")); err != nil || in.Prefix() != "b" {
		t.Fatalf("two WithPrefix: %v, %v; want the last", in, err)
	}
	for _, tt := range []struct {
		name string
		new  func() (*inspect.Inspector, error)
		want string
		is   error
	}{
		{"nil client", func() (*inspect.Inspector, error) { return inspect.New(nil) }, "inspect: nil client", nil},
		{"braces", func() (*inspect.Inspector, error) { return inspect.New(b.Client, inspect.WithPrefix("bad{prefix}")) },
			`inspect: invalid prefix "bad{prefix}": must be 1-512 bytes without braces`, keys.ErrPrefix},
		{"empty", func() (*inspect.Inspector, error) { return inspect.New(b.Client, inspect.WithPrefix("")) },
			`inspect: invalid prefix "": must be 1-512 bytes without braces`, keys.ErrPrefix},
	} {
		in, err := tt.new()
		if in != nil || err == nil || err.Error() != tt.want || (tt.is != nil && !errors.Is(err, tt.is)) {
			t.Errorf("%s: %v, %v; want %q", tt.name, in, err, tt.want)
		}
	}
}

// Every error the inspector returns says it is the inspector's, once, and
// wraps its cause.
func TestErrorsSayInspect(t *testing.T) {
	b := testredis.Mini(t)
	ctx := context.Background()
	in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
	must(t, err)
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix))
	must(t, err)
	must(t, p.AddRaw(ctx, "q", "k", []byte(`1`)))
	for _, tt := range []struct {
		name string
		err  error
		want string
		is   error
	}{
		{"no queue", func() error { _, err := in.Stats(ctx, "nope"); return err }(),
			`inspect: no such queue "nope" under prefix "` + b.Prefix + `"`, inspect.ErrNoQueue},
		{"bad queue name", func() error { _, err := in.Queue(ctx, "a:b"); return err }(),
			`inspect: invalid queue name "a:b": must be 1-512 bytes of UTF-8 without braces, colons or control characters, and not . or ..`, keys.ErrQueueName},
		{"not empty", in.Forget(ctx, "q"),
			`inspect: the queue holds items: queue "q" has 1 pending keys, 0 batches in flight, 0 retries and 0 dead letters`, inspect.ErrNotEmpty},
		{"bad order", func() error { _, err := in.Keys(ctx, "q", "size", 1); return err }(),
			`inspect: unknown order "size": want age, items or bytes`, nil},
		{"bad limit", func() error { _, err := in.Retries(ctx, "q", 0); return err }(),
			`inspect: limit must be at least 1, got 0`, nil},
	} {
		if tt.err == nil || tt.err.Error() != tt.want || (tt.is != nil && !errors.Is(tt.err, tt.is)) {
			t.Errorf("%s: %v, want %q", tt.name, tt.err, tt.want)
		}
	}

	// A registry another program wrote: a shard count out of range.
	must(t, b.Client.Do(ctx, b.Client.B().Hset().Key(keys.Registry(b.Prefix)).FieldValue().FieldValue("big", "2000").Build()).Error())
	want := `inspect: queue registry: queue "big": the registry holds no shard count: "2000" is not a count of 1-1024`
	if _, err := in.Queues(ctx); err == nil || err.Error() != want || !errors.Is(err, inspect.ErrBadCount) {
		t.Errorf("Queues with a shard count of 2000: %v, want %q", err, want)
	}
	if _, err := in.DeadLetters(ctx, "big"); err == nil || err.Error() != want {
		t.Errorf("DeadLetters of a queue of 2000 shards: %v, want %q", err, want)
	}

	// A failed read: the cause is wrapped.
	done, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := in.AllStats(done); !errors.Is(err, context.Canceled) || err.Error() != "inspect: read the queue registry: context canceled" {
		t.Errorf("AllStats with a canceled context: %v", err)
	}
}

// Forget takes an empty queue out of the registry, and refuses one that
// holds anything: pending items, a batch in flight, a retry or a dead
// letter.
func TestForget(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix))
		must(t, err)
		c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix))
		must(t, err)
		in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
		must(t, err)
		notEmpty := func(what string) {
			t.Helper()
			if err := in.Forget(ctx, "q"); !errors.Is(err, inspect.ErrNotEmpty) {
				t.Fatalf("Forget with %s: %v, want ErrNotEmpty", what, err)
			}
			if _, err := in.Queue(ctx, "q"); err != nil {
				t.Fatalf("the queue left the registry with %s: %v", what, err)
			}
		}
		if err := in.Forget(ctx, "q"); !errors.Is(err, inspect.ErrNoQueue) {
			t.Fatalf("Forget of an unknown queue: %v, want ErrNoQueue", err)
		}
		must(t, p.AddRaw(ctx, "q", "k", []byte(`1`)))
		notEmpty("a pending item")
		var f protocol.Fetched
		for deadline := time.Now().Add(5 * time.Second); len(f.Batches) == 0; {
			if f, err = c.Fetch(ctx, "q", 0, 1); err != nil || time.Now().After(deadline) {
				t.Fatalf("fetch: %+v %v", f, err)
			}
		}
		notEmpty("a batch in flight")
		must(t, c.Settle(ctx, f.Batches[0], []protocol.Outcome{{Kind: protocol.Dead, Err: errors.New("boom")}}))
		notEmpty("a dead letter")
		dl, err := in.DeadLetters(ctx, "q")
		must(t, err)
		_, err = dl.Purge(ctx, "q")
		must(t, err)
		must(t, in.Forget(ctx, "q"))
		if _, err := in.Queue(ctx, "q"); !errors.Is(err, inspect.ErrNoQueue) {
			t.Fatalf("after Forget: %v, want ErrNoQueue", err)
		}
	})
}
