package batchq_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"go.uber.org/zap"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
)

// A Redis that stops answering for longer than the lease TTL while
// handlers run must not make live workers' batches run twice: heartbeats
// fail too, so reaping waits a lease TTL after Redis answers again.
func TestRedisStallLongerThanLeaseTTLDoublesNothing(t *testing.T) {
	srv := testredis.Start(t)
	b := srv.Backend(t)
	const ttl = 300 * time.Millisecond
	var mu sync.Mutex
	calls := make(map[int]int)
	started := make(chan struct{}, 100)
	for range 2 {
		w := newWorker(t, b, batchq.WithLeaseTTL(ttl), batchq.WithConcurrency(4))
		batchq.Handle(w, "stall", func(ctx context.Context, it item) error {
			mu.Lock()
			calls[it.ID]++
			mu.Unlock()
			started <- struct{}{}
			time.Sleep(800 * time.Millisecond)
			return nil
		})
		runWorker(t, w)
	}
	p := newProducer(t, b)
	for i := range 8 {
		must(t, p.Add(context.Background(), "stall", "key"+string(rune('a'+i)), item{ID: i}))
	}
	for range 4 {
		<-started
	}
	srv.Pause(t)
	time.Sleep(4 * ttl)
	srv.Resume(t)
	eventually(t, 30*time.Second, "all 8 items handled", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(calls) == 8
	})
	time.Sleep(3 * ttl) // room for a wrong redelivery
	mu.Lock()
	defer mu.Unlock()
	for id, n := range calls {
		if n != 1 {
			t.Errorf("item %d handled %d times after a Redis stall", id, n)
		}
	}
}

// The reaper takes no handler slot: a dead worker's batch goes back to its
// key within about a lease TTL even while every slot runs a long handler.
func TestReaperRunsWhileSlotsAreBusy(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		const ttl = 300 * time.Millisecond
		p := newProducer(t, b)
		// A consumer takes a batch and dies with it.
		dead, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix), protocol.WithLeaseTTL(ttl))
		must(t, err)
		must(t, p.Add(ctx, "busy", "orphan", item{ID: 1}))
		f, err := dead.Fetch(ctx, "busy", 0, 1)
		must(t, err)
		if len(f.Batches) != 1 {
			t.Fatalf("fetched %d batches", len(f.Batches))
		}
		release := make(chan struct{})
		defer close(release)
		running := make(chan struct{})
		w := newWorker(t, b, batchq.WithConcurrency(1), batchq.WithLeaseTTL(ttl))
		batchq.Handle(w, "busy", func(ctx context.Context, it item) error {
			if it.ID == 2 {
				close(running)
				<-release
			}
			return nil
		})
		must(t, p.Add(ctx, "busy", "long", item{ID: 2}))
		runWorker(t, w)
		<-running
		start := time.Now()
		sp := keys.For(b.Prefix, "busy", 0)
		eventually(t, 10*time.Second, "the orphan batch back in its key", func() bool {
			v, err := b.Client.Do(ctx, b.Client.B().Get().Key(sp.Items("orphan")).Build()).ToString()
			return err == nil && v == `{"id":1}` || v == `[{"id":1}]`
		})
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("orphan returned after %v with a %v lease", took, ttl)
		}
	})
}

// A batch handler that returns a nil *BatchError (a typed nil in the error
// interface) fails nothing, and does not crash the worker.
func TestTypedNilBatchError(t *testing.T) {
	b := testredis.Mini(t)
	var calls atomic.Int64
	w := newWorker(t, b)
	batchq.HandleBatch(w, "nil", func(ctx context.Context, key string, items []item) error {
		calls.Add(int64(len(items)))
		var be *batchq.BatchError
		return be
	}, batchq.WithBackoff(batchq.Constant(time.Millisecond)))
	runWorker(t, w)
	must(t, newProducer(t, b).Add(context.Background(), "nil", "k", item{ID: 1}, item{ID: 2}))
	eventually(t, 5*time.Second, "the batch handled", func() bool { return calls.Load() >= 2 })
	time.Sleep(50 * time.Millisecond) // room for a wrong retry
	if n := calls.Load(); n != 2 {
		t.Fatalf("items handled %d times, want 2", n)
	}
	if ks := leftKeys(t, b); len(ks) != 0 {
		t.Fatalf("keys left: %v", ks)
	}
}

// Retries are not starved by keys that are always due: with one slot and a
// steady stream of new keys, a failed item is retried soon after its delay.
func TestRetriesAreNotStarvedByBusyKeys(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		retried := make(chan struct{})
		var once sync.Once
		var attempts atomic.Int64
		w := newWorker(t, b, batchq.WithConcurrency(1))
		batchq.Handle(w, "starve", func(ctx context.Context, it item) error {
			if it.ID == 0 {
				if attempts.Add(1) == 1 {
					return batchq.RetryAfter(time.Millisecond, context.DeadlineExceeded)
				}
				once.Do(func() { close(retried) })
			}
			time.Sleep(2 * time.Millisecond)
			return nil
		})
		p := newProducer(t, b)
		// A backlog of due keys, and a producer that keeps adding more.
		for i := 1; i <= 50; i++ {
			must(t, p.Add(ctx, "starve", "key"+strconv.Itoa(i), item{ID: i}))
		}
		must(t, p.Add(ctx, "starve", "first", item{ID: 0}))
		pctx, stop := context.WithCancel(ctx)
		defer stop()
		var wg sync.WaitGroup
		defer wg.Wait()
		defer stop()
		wg.Go(func() {
			for i := 1000; pctx.Err() == nil; i++ {
				if err := p.Add(ctx, "starve", "more"+string(rune(i)), item{ID: i}); err != nil {
					return
				}
				time.Sleep(time.Millisecond)
			}
		})
		runWorker(t, w)
		select {
		case <-retried:
		case <-time.After(10 * time.Second):
			t.Fatal("the failed item was not retried within 10s while keys kept coming")
		}
	})
}

// failingDrains is a client whose MULTI blocks fail, as they do when Redis
// is out of memory (EXECABORT), while everything else goes through.
type failingDrains struct {
	rueidis.Client
	fail *atomic.Bool
}

func (f failingDrains) DoMulti(ctx context.Context, cmds ...rueidis.Completed) []rueidis.RedisResult {
	multi, exec := -1, -1
	for i, c := range cmds {
		switch c.Commands()[0] {
		case "MULTI":
			multi = i
		case "EXEC":
			exec = i
		}
	}
	if !f.fail.Load() || multi < 0 {
		return f.Client.DoMulti(ctx, cmds...)
	}
	res := make([]rueidis.RedisResult, len(cmds))
	var send []rueidis.Completed
	var at []int
	for i, c := range cmds {
		if i >= multi && i <= exec {
			res[i] = rueidis.NewErrorResult(errors.New("EXECABORT Transaction discarded (test: OOM)"))
			continue
		}
		send, at = append(send, c), append(at, i)
	}
	if len(send) > 0 {
		for j, r := range f.Client.DoMulti(ctx, send...) {
			res[at[j]] = r
		}
	}
	return res
}

// Drains that fail while the pops of the same round trips succeed (Redis
// refuses writes when out of memory, not LPOP) must not leave fetch loops
// holding slots for keys they cannot drain: once drains work again, every
// item is handled. With three queues, each fetch loop used to keep the keys
// of its failed rounds and add the ones popped since, until they held all
// the slots between them, waiting for each other.
func TestFailedDrainsDoNotWedgeTheWorker(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		var fail atomic.Bool
		fail.Store(true)
		p := newProducer(t, b)
		queues := []string{"qa", "qb", "qc"}
		for _, q := range queues {
			for i := range 200 {
				must(t, p.Add(ctx, q, fmt.Sprint("k", i), item{ID: i}))
			}
		}
		w, err := batchq.NewWorker(failingDrains{b.Client, &fail}, batchq.WithPrefix(b.Prefix), batchq.WithConcurrency(16),
			batchq.WithLogger(zap.NewNop()))
		must(t, err)
		var handled atomic.Int64
		for _, q := range queues {
			batchq.Handle(w, q, func(context.Context, item) error { handled.Add(1); return nil })
		}
		runWorker(t, w)
		time.Sleep(2 * time.Second)
		if n := handled.Load(); n != 0 {
			t.Fatalf("%d items handled while every drain failed", n)
		}
		fail.Store(false)
		eventually(t, 20*time.Second, "every item handled once drains work", func() bool { return handled.Load() == 600 })
	})
}
