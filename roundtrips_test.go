package batchq_test

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/rtcount"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// At low load every batch is one item, and it takes four client round
// trips, producer included: the merge, the pop that hands the key to the
// worker, the round that drains it, and the release of its lease. The test
// counts what the clients send, by kind; the periodic work of a worker
// (claims, reaps, clock syncs, pops that time out), which comes about once a
// second whatever the load, must not come per batch.
func TestOneItemBatchTakesFourRoundTrips(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		testOneItemTrips(t, b, nil, []string{"producer merge", "worker pop", "worker round", "worker release"})
	})
}

// On a queue with ordered keys, five: the drain reads the key's hold under
// WATCH first, and the batch is settled by script, which ends the hold.
func TestOrderedOneItemBatchTakesFiveRoundTrips(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		testOneItemTrips(t, b, []batchq.QueueOption{batchq.WithOrderedKeys()},
			[]string{"producer merge", "worker pop", "worker holds", "worker round", "worker script settle"})
	})
}

// testOneItemTrips appends n one-item batches, one at a time, to a queue
// registered with opts, and checks that each took one round trip of each
// kind of perBatch ("who kind", as tripKind names them), and nothing else
// but the worker's periodic work.
func testOneItemTrips(t *testing.T, b testredis.Backend, opts []batchq.QueueOption, perBatch []string) {
	ctx := context.Background()
	var mu sync.Mutex
	trips := map[string]int{} // "who kind" -> round trips
	count := func(who string) func([][]string, []rueidis.RedisResult) {
		return func(cmds [][]string, res []rueidis.RedisResult) {
			kind := tripKind(cmds, res)
			mu.Lock()
			trips[who+" "+kind]++
			mu.Unlock()
		}
	}
	p, err := producer.New(rtcount.Wrap(b.Client, count("producer")), producer.WithPrefix(b.Prefix))
	must(t, err)
	// A long lease: no heartbeat comes during the test.
	w, err := batchq.NewWorker(rtcount.Wrap(b.Client, count("worker")), batchq.WithPrefix(b.Prefix), batchq.WithLeaseTTL(time.Minute))
	must(t, err)
	handled := make(chan int, 1)
	batchq.Handle(w, "rt", func(_ context.Context, it item) error {
		handled <- it.ID
		return nil
	}, opts...)
	runWorker(t, w)
	leases := keys.For(b.Prefix, "rt", 0).Leases()
	settled := func() bool {
		n, err := b.Client.Do(ctx, b.Client.B().Zcard().Key(leases).Build()).AsInt64()
		return err == nil && n == 0
	}
	one := func(id int) {
		t.Helper()
		must(t, p.Add(ctx, "rt", fmt.Sprint("k", id), item{ID: id}))
		select {
		case got := <-handled:
			if got != id {
				t.Fatalf("handled %d, want %d", got, id)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("item %d not handled in 10s", id)
		}
		eventually(t, 5*time.Second, "lease released", settled)
		time.Sleep(5 * time.Millisecond) // no item comes while the release waits for a round
	}
	one(0) // loads the scripts and syncs the clocks
	mu.Lock()
	clear(trips)
	mu.Unlock()
	const n = 10
	start := time.Now()
	for id := 1; id <= n; id++ {
		one(id)
	}
	periodic := int(time.Since(start)/time.Second) + 2 // of each kind
	mu.Lock()
	defer mu.Unlock()
	want := make(map[string]int)
	for _, k := range perBatch {
		want[k] = n
	}
	total := 0
	for k, v := range trips {
		switch {
		case want[k] > 0:
			total += v
		case !strings.HasPrefix(k, "worker periodic "):
			t.Errorf("%d unexpected round trips: %s", v, k)
		case v > periodic:
			t.Errorf("%d round trips of %s for %d batches in %v: periodic work came per batch", v, k, n, time.Since(start))
		}
	}
	for k, v := range want {
		if trips[k] != v {
			t.Errorf("%s: %d round trips for %d one-item batches, want %d", k, trips[k], n, v)
		}
	}
	t.Logf("%d round trips per one-item batch (%v)", total/n, fmtTrips(trips))
}

// tripKind names what a round trip did.
func tripKind(cmds [][]string, res []rueidis.RedisResult) string {
	name := func(i int) string { return strings.ToUpper(cmds[i][0]) }
	switch name(0) {
	case "EVALSHA", "EVAL":
		switch s := protocol.ScriptName(cmds[0][1]); s {
		case "merge", "mergemany":
			return "merge"
		case "claim", "reap", "register":
			return "periodic " + s
		default:
			return "script " + s
		}
	case "BLMPOP", "BLPOP":
		if rueidis.IsRedisNil(res[0].Error()) {
			return "periodic pop" // timed out: an idle worker's poll
		}
		return "pop"
	case "WATCH":
		return "holds" // an ordered drain reads its keys' holds
	case "TIME", "CONFIG":
		return "periodic " + strings.ToLower(name(0)) // clock sync, server settings
	case "HMGET":
		if len(cmds) == 1 && strings.HasSuffix(cmds[0][1], ":queues") {
			return "periodic shards" // the shard counts of the queues
		}
	case "ZRANGEBYSCORE":
		if len(cmds) == 1 && strings.HasSuffix(cmds[0][1], ":leases") {
			return "periodic reap" // looking for expired leases
		}
	}
	var names []string
	for i := range cmds {
		names = append(names, name(i))
	}
	switch {
	case slices.Contains(names, "MULTI"):
		return "round"
	case names[0] == "DEL" && slices.Contains(names, "ZREM"):
		return "release"
	}
	return strings.Join(names, " ")
}

func fmtTrips(m map[string]int) string {
	var s []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		s = append(s, fmt.Sprintf("%s: %d", k, m[k]))
	}
	return strings.Join(s, ", ")
}

// An idle worker on one queue shard costs Redis about seven commands a
// second: a claim script (three reads), a blocking pop that times out, and a
// reap that finds no expired lease (one read); and a read of its queues'
// shard counts every 2s, a clock sync every 30s.
func TestIdleWorkerCost(t *testing.T) {
	b := testredis.Real(t)
	var mu sync.Mutex
	trips := map[string]int{}
	w, err := batchq.NewWorker(rtcount.Wrap(b.Client, func(cmds [][]string, res []rueidis.RedisResult) {
		mu.Lock()
		trips[tripKind(cmds, res)]++
		mu.Unlock()
	}), batchq.WithPrefix(b.Prefix))
	must(t, err)
	batchq.Handle(w, "idle", func(context.Context, item) error { return nil })
	runWorker(t, w)
	time.Sleep(time.Second) // start-up: registry, clock sync, server settings
	mu.Lock()
	clear(trips)
	mu.Unlock()
	const window = 3 * time.Second
	time.Sleep(window)
	mu.Lock()
	defer mu.Unlock()
	for _, kind := range []string{"periodic claim", "periodic pop", "periodic reap"} {
		if n := trips[kind]; n < int(window/time.Second)-1 {
			t.Errorf("%d round trips of %s in %v, want about one a second", n, kind, window)
		}
	}
	for kind, n := range trips {
		switch kind {
		case "periodic claim", "periodic pop", "periodic reap":
			if n > int(window/time.Second)+1 {
				t.Errorf("%d round trips of %s in %v, want at most one a second", n, kind, window)
			}
		case "periodic shards": // every 2s
			if n > int(window/protocol.ShardsEvery)+1 {
				t.Errorf("%d reads of the shard counts in %v, want one every %v", n, window, protocol.ShardsEvery)
			}
		case "periodic time", "periodic register": // every 30s
		default:
			t.Errorf("%d unexpected round trips of an idle worker: %s", n, kind)
		}
	}
	t.Logf("in %v: %s", window, fmtTrips(trips))
}
