package producer_test

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// With linger, concurrent appends to a key go in one merge call once
// maxItems are waiting, and every caller learns its own outcome.
func TestLingerGathersAppends(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		// A linger far longer than the test: only maxItems sends a call.
		p := newProducer(t, b, producer.WithLinger(time.Second, 8))
		const callers, nkeys = 32, 4
		calls0 := mergeCalls(t, b)
		var wg sync.WaitGroup
		errs := make(chan error, callers)
		for c := range callers {
			wg.Go(func() { errs <- p.Add(ctx, "q", "k"+strconv.Itoa(c%nkeys), c) })
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		// Counted on redis-server (INFO commandstats); miniredis counts every
		// command of the client's connections, not script calls.
		if calls := mergeCalls(t, b) - calls0; b.Real() && calls != nkeys {
			t.Fatalf("%d appends to %d keys with maxItems 8 took %d merge calls, want %d", callers, nkeys, calls, nkeys)
		}
		seen := make(map[int]int)
		for k := range nkeys {
			v, _ := get(t, b, "q", "k"+strconv.Itoa(k))
			var ids []int
			if err := json.Unmarshal([]byte(v), &ids); err != nil {
				t.Fatalf("key k%d: %v", k, err)
			}
			for _, id := range ids {
				seen[id]++
			}
		}
		for id := range callers {
			if seen[id] != 1 {
				t.Fatalf("item %d stored %d times", id, seen[id])
			}
		}
	})
}

// With linger, each caller's items keep their order, and every item is
// stored once, however the calls gather them.
func TestLingerKeepsEachCallersOrder(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithLinger(2*time.Millisecond, 64))
		const callers, per, nkeys = 16, 20, 4
		var wg sync.WaitGroup
		errs := make(chan error, callers*per)
		for c := range callers {
			wg.Go(func() {
				for i := range per {
					id := c*per + i
					errs <- p.Add(ctx, "q", "k"+strconv.Itoa(id%nkeys), id)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		seen := make(map[int]int)
		for k := range nkeys {
			v, _ := get(t, b, "q", "k"+strconv.Itoa(k))
			var ids []int
			if err := json.Unmarshal([]byte(v), &ids); err != nil {
				t.Fatalf("key k%d: %v", k, err)
			}
			last := make(map[int]int) // caller -> last id seen
			for _, id := range ids {
				seen[id]++
				c := id / per
				if prev, ok := last[c]; ok && id < prev {
					t.Fatalf("key k%d: caller %d's items out of order: %v", k, c, ids)
				}
				last[c] = id
			}
		}
		for id := range callers * per {
			if seen[id] != 1 {
				t.Fatalf("item %d stored %d times", id, seen[id])
			}
		}
	})
}

// A caller whose context ends while its items wait gets the context's
// error; the others are not held up.
func TestLingerRespectsContext(t *testing.T) {
	b := testredis.Mini(t)
	p := newProducer(t, b, producer.WithLinger(time.Second, 1000))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := p.Add(ctx, "q", "k", 1)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 500*time.Millisecond {
		t.Fatalf("got %v after %v, want the context's deadline", err, time.Since(start))
	}
	// The gathered call still goes out after the linger: the outcome of a
	// call whose context ended is unknown, not lost.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if v, ok := get(t, b, "q", "k"); ok && v == "[1]" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the gathered item was never stored")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := producer.New(b.Client, producer.WithLinger(0, 1)); err == nil {
		t.Fatal("WithLinger(0, 1) accepted")
	}
}

// mergeCalls counts the script calls (EVALSHA, including those answered
// NOSCRIPT) redis-server has run; 0 on miniredis.
func mergeCalls(t *testing.T, b testredis.Backend) int {
	t.Helper()
	if !b.Real() {
		return 0
	}
	calls, _ := evalshaStats(t, b)
	return int(calls)
}
