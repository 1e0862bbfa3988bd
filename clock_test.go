package batchq_test

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
)

func skewed(d time.Duration) func() time.Time {
	return func() time.Time { return time.Now().Add(d) }
}

// Workers whose clocks are 20s apart neither steal each other's live
// leases nor leave a dead consumer's lease behind: deadlines are on the
// Redis server's clock.
func TestClockSkew(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		const ttl = time.Second
		// Before the workers start, a consumer with a clock 20s behind takes a
		// batch and dies.
		dead, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix), protocol.WithLeaseTTL(ttl),
			protocol.WithClock(skewed(-20*time.Second)))
		must(t, err)
		must(t, dead.Sync(ctx))
		p := newProducer(t, b)
		must(t, p.Add(ctx, "skew", "orphan", item{ID: 100}))
		f, err := dead.Fetch(ctx, "skew", 0, 1)
		must(t, err)
		if len(f.Batches) != 1 {
			t.Fatalf("the dead consumer fetched %d batches", len(f.Batches))
		}
		var mu sync.Mutex
		calls := make(map[int]int)
		byWorker := make([]int, 2)
		for i, skew := range []time.Duration{20 * time.Second, -20 * time.Second} {
			w := newWorker(t, b, batchq.WithLeaseTTL(ttl), batchq.WithConcurrency(4),
				batchq.WithName("skew"+strconv.Itoa(i)), batchq.WithConsumerOption(protocol.WithClock(skewed(skew))))
			batchq.Handle(w, "skew", func(ctx context.Context, it item) error {
				mu.Lock()
				calls[it.ID]++
				byWorker[i]++
				mu.Unlock()
				if it.ID < 8 {
					time.Sleep(1500 * time.Millisecond) // longer than the lease: heartbeats keep it
				}
				return nil
			})
			runWorker(t, w)
		}
		died := time.Now()
		for i := range 16 {
			must(t, p.Add(ctx, "skew", "key"+strconv.Itoa(i), item{ID: i}))
		}
		eventually(t, 30*time.Second, "every item handled", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(calls) == 17
		})
		mu.Lock()
		redelivered := time.Since(died)
		mu.Unlock()
		time.Sleep(2 * ttl) // room for a stolen lease to run an item again
		mu.Lock()
		defer mu.Unlock()
		for id, n := range calls {
			if n != 1 {
				t.Errorf("item %d handled %d times with skewed clocks", id, n)
			}
		}
		if byWorker[0] == 0 || byWorker[1] == 0 {
			t.Errorf("items handled per worker: %v; both must take work whatever their clocks", byWorker)
		}
		if redelivered > 5*time.Second {
			t.Errorf("the dead consumer's batch came back after %v with a %v lease", redelivered, ttl)
		}
		t.Logf("clocks 40s apart: %d items once each (%v per worker); a dead consumer's batch redelivered within %v",
			len(calls), byWorker, redelivered.Round(time.Millisecond))
	})
}

// An idle worker whose clock runs ahead of the server's waits for the next
// due retry on the server's clock; it does not spin on Redis meanwhile.
func TestIdleWorkerAheadOfServerDoesNotSpin(t *testing.T) {
	b := testredis.Mini(t)
	b.Mini.SetTime(time.Now().Add(-40 * time.Second)) // the server is 40s behind
	ctx := context.Background()
	var calls atomic.Int64
	w := newWorker(t, b)
	batchq.Handle(w, "spin", func(ctx context.Context, it item) error {
		if calls.Add(1) == 1 {
			return batchq.RetryAfter(20*time.Second, context.DeadlineExceeded)
		}
		return nil
	})
	runWorker(t, w)
	must(t, newProducer(t, b).Add(ctx, "spin", "k", item{ID: 1}))
	eventually(t, 5*time.Second, "the first attempt", func() bool { return calls.Load() == 1 })
	before := b.Mini.CommandCount()
	time.Sleep(2 * time.Second)
	if n := b.Mini.CommandCount() - before; n > 100 {
		t.Fatalf("an idle worker sent %d commands in 2s while a retry was 20s away", n)
	}
}
