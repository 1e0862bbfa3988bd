package batchq_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/testredis"
)

// Tests of how a worker cuts batches into handler calls (WithMaxBatch), and
// runs the items of one busy key at once.

// calls records the calls of a batch handler.
type calls struct {
	mu   sync.Mutex
	got  [][]int
	seen map[int]int
}

func (c *calls) add(items []item) {
	ids := make([]int, len(items))
	for i, it := range items {
		ids[i] = it.ID
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.got = append(c.got, ids)
	if c.seen == nil {
		c.seen = make(map[int]int)
	}
	for _, id := range ids {
		c.seen[id]++
	}
}

// handle is a per-item handler that records its item as a call of one.
func (c *calls) handle(_ context.Context, it item) error {
	c.add([]item{it})
	return nil
}

func (c *calls) handled() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.seen)
}

// checkOnce checks that no item was handled more than once.
func (c *calls) checkOnce(t *testing.T) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	for id, k := range c.seen {
		if k != 1 {
			t.Errorf("item %d handled %d times", id, k)
		}
	}
}

// addItems appends items with the ids [from, to) to key, in one call.
func addItems(t *testing.T, b testredis.Backend, queue, key string, from, to int) {
	t.Helper()
	its := make([]any, 0, to-from)
	for id := from; id < to; id++ {
		its = append(its, item{ID: id})
	}
	if err := newProducer(t, b).Add(context.Background(), queue, key, its...); err != nil {
		t.Fatal(err)
	}
}

// checkChunks checks that the calls handled the ids 0 to n-1 once each,
// each call a run of consecutive ids (append order), and returns the calls
// sorted by their first id.
func checkChunks(t *testing.T, c *calls, n int) [][]int {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	got := slices.Clone(c.got)
	slices.SortFunc(got, func(a, b []int) int { return a[0] - b[0] })
	next := 0
	for _, call := range got {
		for _, id := range call {
			if id != next {
				t.Fatalf("calls %v: want ids 0 to %d once each, in append order within a call", got, n-1)
			}
			next++
		}
	}
	if next != n {
		t.Fatalf("handled %d items, want %d", next, n)
	}
	return got
}

func TestMaxBatchBoundsItems(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		addItems(t, b, "q", "k", 0, 250) // drained at once: one batch of 250
		w := newWorker(t, b)
		var c calls
		batchq.HandleBatch(w, "q", func(ctx context.Context, key string, items []item) error {
			c.add(items)
			return nil
		}, batchq.WithMaxBatch(100, 0))
		runWorker(t, w)
		eventually(t, 10*time.Second, "all handled", func() bool { return c.handled() == 250 })
		got := checkChunks(t, &c, 250)
		c.checkOnce(t)
		var sizes []int
		for _, call := range got {
			sizes = append(sizes, len(call))
		}
		if !slices.Equal(sizes, []int{100, 100, 50}) {
			t.Fatalf("call sizes %v, want [100 100 50]", sizes)
		}
	})
}

func TestMaxBatchBoundsBytes(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		// {"id":10} to {"id":99} are 9 bytes each; a padded item is big.
		p := newProducer(t, b)
		for id := 10; id < 40; id++ {
			if err := p.Add(context.Background(), "q", "k", item{ID: id}); err != nil {
				t.Fatal(err)
			}
		}
		big := map[string]any{"id": 40, "pad": strings.Repeat("x", 100)}
		if err := p.Add(context.Background(), "q", "k", big, item{ID: 41}); err != nil {
			t.Fatal(err)
		}
		w := newWorker(t, b)
		var c calls
		batchq.HandleBatch(w, "q", func(ctx context.Context, key string, items []item) error {
			c.add(items)
			return nil
		}, batchq.WithMaxBatch(0, 30))
		runWorker(t, w)
		eventually(t, 10*time.Second, "all handled", func() bool { return c.handled() == 32 })
		c.mu.Lock()
		got := slices.Clone(c.got)
		c.mu.Unlock()
		slices.SortFunc(got, func(a, b []int) int { return a[0] - b[0] })
		var want [][]int
		for id := 10; id < 40; id += 3 {
			want = append(want, []int{id, id + 1, id + 2}) // 3 of 9 bytes fit in 30
		}
		want = append(want, []int{40}, []int{41}) // the 100-byte item alone
		if !slices.EqualFunc(got, want, slices.Equal) {
			t.Fatalf("calls %v, want %v", got, want)
		}
	})
}

// Each call of a cut batch has its own outcome: a *BatchError's indexes
// are those of the call's items.
func TestMaxBatchCallsFailAlone(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		addItems(t, b, "q", "k", 0, 30)
		w := newWorker(t, b)
		var c calls
		batchq.HandleBatch(w, "q", func(ctx context.Context, key string, items []item) error {
			c.add(items)
			if items[0].ID == 10 {
				return &batchq.BatchError{Failed: map[int]error{2: batchq.NoRetry(errors.New("bad twelve"))}}
			}
			if items[0].ID == 20 {
				return batchq.NoRetry(errors.New("bad call"))
			}
			return nil
		}, batchq.WithMaxBatch(10, 0))
		runWorker(t, w)
		dl := newDeadLetters(t, b)
		eventually(t, 10*time.Second, "dead letters", func() bool {
			n, err := dl.Count(context.Background(), "q")
			return err == nil && n == 11
		})
		letters, err := dl.List(context.Background(), "q", 100)
		if err != nil {
			t.Fatal(err)
		}
		var ids []int
		for _, l := range letters {
			var it item
			if err := json.Unmarshal(l.Item, &it); err != nil {
				t.Fatal(err)
			}
			ids = append(ids, it.ID)
		}
		slices.Sort(ids)
		want := []int{12, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29}
		if !slices.Equal(ids, want) {
			t.Fatalf("dead letters %v, want %v", ids, want)
		}
		if got := checkChunks(t, &c, 30); len(got) != 3 {
			t.Fatalf("%d calls, want 3", len(got))
		}
	})
}

func TestMaxBatchMisuse(t *testing.T) {
	b := testredis.Mini(t)
	for name, register := range map[string]func(w *batchq.Worker){
		"Handle": func(w *batchq.Worker) {
			batchq.Handle(w, "q", func(context.Context, item) error { return nil }, batchq.WithMaxBatch(10, 0))
		},
		"negative items": func(w *batchq.Worker) {
			batchq.HandleBatch(w, "q", func(context.Context, string, []item) error { return nil }, batchq.WithMaxBatch(-1, 0))
		},
		"negative bytes": func(w *batchq.Worker) {
			batchq.HandleBatch(w, "q", func(context.Context, string, []item) error { return nil }, batchq.WithMaxBatch(0, -1))
		},
	} {
		t.Run(name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatal("no panic")
				}
			}()
			register(newWorker(t, b))
		})
	}
}

// peak tracks how many handler calls run at once.
type peak struct {
	now, max atomic.Int32
}

func (p *peak) enter() {
	n := p.now.Add(1)
	for m := p.max.Load(); n > m && !p.max.CompareAndSwap(m, n); m = p.max.Load() {
	}
}

func (p *peak) leave() { p.now.Add(-1) }

// The items of one busy key run at once, within the worker's concurrency.
func TestBusyKeyItemsRunAtOnce(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		const n, concurrency = 200, 16
		addItems(t, b, "q", "hot", 0, n)
		w := newWorker(t, b, batchq.WithConcurrency(concurrency))
		var p peak
		var c calls
		batchq.Handle(w, "q", func(ctx context.Context, it item) error {
			p.enter()
			defer p.leave()
			time.Sleep(5 * time.Millisecond)
			c.add([]item{it})
			return nil
		})
		runWorker(t, w)
		eventually(t, 20*time.Second, "all handled", func() bool { return c.handled() == n })
		c.checkOnce(t)
		if m := p.max.Load(); m < concurrency/2 || m > concurrency {
			t.Fatalf("at most %d calls ran at once, want between %d and %d", m, concurrency/2, concurrency)
		}
		t.Logf("peak %d calls at once", p.max.Load())
	})
}

// A cut batch's calls run at once too.
func TestMaxBatchCallsRunAtOnce(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		addItems(t, b, "q", "hot", 0, 400)
		w := newWorker(t, b, batchq.WithConcurrency(8))
		var p peak
		var c calls
		batchq.HandleBatch(w, "q", func(ctx context.Context, key string, items []item) error {
			p.enter()
			defer p.leave()
			time.Sleep(10 * time.Millisecond)
			c.add(items)
			return nil
		}, batchq.WithMaxBatch(10, 0))
		runWorker(t, w)
		eventually(t, 20*time.Second, "all handled", func() bool { return c.handled() == 400 })
		checkChunks(t, &c, 400)
		if m := p.max.Load(); m < 4 || m > 8 {
			t.Fatalf("at most %d calls ran at once, want between 4 and 8", m)
		}
	})
}

// A busy key's batch does not hold every slot while other keys wait: a
// key that comes while it runs is handled long before it ends.
func TestBusyKeyLeavesRoomForOthers(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		const n = 400
		addItems(t, b, "q", "hot", 0, n)
		w := newWorker(t, b, batchq.WithConcurrency(4))
		var hot atomic.Int32
		coldAt := make(chan int32, 1)
		batchq.Handle(w, "q", func(ctx context.Context, it item) error {
			if it.ID < 0 {
				select {
				case coldAt <- hot.Load():
				default:
					t.Error("the cold key was handled twice")
				}
				return nil
			}
			time.Sleep(5 * time.Millisecond)
			hot.Add(1)
			return nil
		})
		runWorker(t, w)
		eventually(t, 10*time.Second, "the hot key under way", func() bool { return hot.Load() >= 20 })
		if err := newProducer(t, b).Add(context.Background(), "q", "cold", item{ID: -1}); err != nil {
			t.Fatal(err)
		}
		select {
		case at := <-coldAt:
			if at > n/2 {
				t.Fatalf("the cold key was handled after %d of the hot key's %d items", at, n)
			}
			t.Logf("the cold key was handled after %d of the hot key's %d items", at, n)
		case <-time.After(20 * time.Second):
			t.Fatal("the cold key was not handled")
		}
		eventually(t, 20*time.Second, "the hot key handled", func() bool { return hot.Load() == n })
	})
}

// A shutdown in the middle of a busy key's batch puts back what its calls
// had not started: every item is handled once, across two workers.
func TestBusyKeyShutdownLosesNothing(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		const n = 300
		addItems(t, b, "q", "hot", 0, n)
		var c calls
		count := c.handled
		handler := func(ctx context.Context, it item) error {
			time.Sleep(10 * time.Millisecond)
			c.add([]item{it})
			return nil
		}
		w1 := newWorker(t, b, batchq.WithConcurrency(8))
		batchq.Handle(w1, "q", handler)
		stop := runWorker(t, w1)
		eventually(t, 10*time.Second, "some handled", func() bool { return count() >= 50 })
		stop()
		if c := count(); c >= n {
			t.Fatalf("all %d items were handled before the shutdown", c)
		}
		w2 := newWorker(t, b, batchq.WithConcurrency(8))
		batchq.Handle(w2, "q", handler)
		runWorker(t, w2)
		eventually(t, 20*time.Second, "all handled", func() bool { return count() == n })
		time.Sleep(50 * time.Millisecond)
		c.checkOnce(t)
	})
}
