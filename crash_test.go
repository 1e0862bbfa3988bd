package batchq_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

const crashQueue = "crash"

// startCrashWorker starts a worker process (see workerMain) with a 1s lease
// TTL and 500µs per item.
func startCrashWorker(t *testing.T, b testredis.Backend, shards int) *proc {
	t.Helper()
	return startProc(t, b, procConfig{Concurrency: 8, LeaseTTL: time.Second, Work: 500 * time.Microsecond, Shards: shards})
}

// inFlight returns the ids of the items held by the leases of the queue's
// shards.
func inFlight(t *testing.T, b testredis.Backend, shards int) map[int]bool {
	t.Helper()
	ids := make(map[int]bool)
	for shard := range shards {
		inFlightShard(t, b, shard, ids)
	}
	return ids
}

func inFlightShard(t *testing.T, b testredis.Backend, shard int, ids map[int]bool) {
	t.Helper()
	ctx := context.Background()
	c := b.Client
	sp := keys.For(b.Prefix, crashQueue, shard)
	members, err := c.Do(ctx, c.B().Zrange().Key(sp.Leases()).Min("0").Max("-1").Build()).AsStrSlice()
	must(t, err)
	for _, m := range members {
		v, err := c.Do(ctx, c.B().Get().Key(sp.Lease(protocol.ParseLease(m).Token)).Build()).AsBytes()
		if err != nil {
			continue // released between the two reads
		}
		var items []item
		must(t, json.Unmarshal(v, &items))
		for _, it := range items {
			ids[it.ID] = true
		}
	}
}

// I1: workers killed with SIGKILL mid-batch lose nothing; the only items
// handled twice are those of the batches they held when killed.
func TestCrashedWorkersLoseNothing(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		if b.Real() {
			testCrashedWorkers(t, b, 20_000, 200, 1)
		} else {
			testCrashedWorkers(t, b, 3000, 50, 1)
		}
	})
}

// The same on a Redis Cluster of three masters, the queue in 12 shards.
func TestCrashedWorkersLoseNothingOnCluster(t *testing.T) {
	testCrashedWorkers(t, testredis.Cluster(t), 20_000, 200, 12)
}

func testCrashedWorkers(t *testing.T, b testredis.Backend, n, nkeys, shards int) {
	{
		ctx := context.Background()
		p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(shards))
		must(t, err)
		for k := range nkeys {
			batch := make([]any, 0, n/nkeys)
			for i := k; i < n; i += nkeys {
				batch = append(batch, item{ID: i})
			}
			must(t, p.Add(ctx, crashQueue, "key"+strconv.Itoa(k), batch[:len(batch)/2]...))
			must(t, p.Add(ctx, crashQueue, "key"+strconv.Itoa(k), batch[len(batch)/2:]...))
		}
		c := b.Client
		handledKey := b.Prefix + ":test:handled"
		handledCount := func() int64 {
			n, _ := c.Do(ctx, c.B().Hlen().Key(handledKey).Build()).AsInt64()
			return n
		}
		killedHeld := make(map[int]bool)
		for round, frac := range []float64{0.25, 0.5} {
			worker := startCrashWorker(t, b, shards)
			eventually(t, time.Minute, fmt.Sprintf("worker %d to handle %.0f%% of the items", round+1, frac*100), func() bool {
				return handledCount() >= int64(frac*float64(n))
			})
			worker.signal(t, syscall.SIGKILL)
			worker.wait(t, 10*time.Second)
			held := inFlight(t, b, shards)
			if len(held) == 0 {
				t.Fatalf("worker %d held no batch when killed: the test did not crash it mid-batch", round+1)
			}
			for id := range held {
				killedHeld[id] = true
			}
			t.Logf("killed worker %d after %d items handled; it held %d items in flight", round+1, handledCount(), len(held))
		}
		last := startCrashWorker(t, b, shards)
		start := time.Now()
		eventually(t, 2*time.Minute, "every item handled", func() bool { return handledCount() >= int64(n) })
		t.Logf("the last worker finished in %v", time.Since(start).Round(time.Millisecond))
		last.signal(t, syscall.SIGTERM)
		if err := last.wait(t, time.Minute); err != nil {
			t.Fatalf("worker after SIGTERM: %v", err)
		}

		counts, err := c.Do(ctx, c.B().Hgetall().Key(handledKey).Build()).AsStrMap()
		must(t, err)
		dups := 0
		for i := range n {
			got, _ := strconv.Atoi(counts[strconv.Itoa(i)])
			switch {
			case got == 0:
				t.Errorf("item %d lost", i)
			case got > 1:
				dups++
				if !killedHeld[i] {
					t.Errorf("item %d handled %d times but was not in flight at a kill", i, got)
				}
			}
		}
		t.Logf("%s, %d shards: %d items, 2 kills: 0 lost, %d handled twice (all from the %d items in flight at the kills)", b.Name, shards, n, dups, len(killedHeld))
		if ks := leftKeys(t, b); len(ks) != 0 {
			t.Errorf("keys left: %v", ks)
		}
	}
}
