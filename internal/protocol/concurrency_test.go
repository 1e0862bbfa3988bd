package protocol_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// itemCount is how many items the concurrency tests append: miniredis runs
// scripts an order of magnitude slower than redis-server.
func itemCount(b testredis.Backend) int {
	if b.Real() {
		return 2000
	}
	return 300
}

var raceKeys = []string{"a", "b", "c", "d"}

// appendNumbered appends the items 0..n-1, one per call, round robin over
// raceKeys, in a goroutine; the returned channel yields its error (or nil)
// once it is done.
func appendNumbered(t *testing.T, b testredis.Backend, n int) <-chan error {
	t.Helper()
	p := newProducer(t, b)
	res := make(chan error, 1)
	go func() {
		for i := range n {
			if err := p.Add(context.Background(), queue, raceKeys[i%len(raceKeys)], i); err != nil {
				res <- fmt.Errorf("append %d: %w", i, err)
				return
			}
		}
		res <- nil
	}()
	return res
}

// tally counts the numbered items a consumer saw and checks that each key's
// items arrive in append order.
type tally struct {
	seen map[int]int
	last map[string]int
}

func newTally() *tally { return &tally{seen: map[int]int{}, last: map[string]int{}} }

func (tl *tally) add(bt *protocol.Batch) error {
	if bt.Retry() {
		return fmt.Errorf("unexpected retry batch")
	}
	for _, it := range bt.Items {
		var n int
		if err := json.Unmarshal(it.Data, &n); err != nil {
			return fmt.Errorf("item %s of %s: %w", it.Data, bt.Key, err)
		}
		if it.Key != bt.Key || raceKeys[n%len(raceKeys)] != bt.Key {
			return fmt.Errorf("item %d came from key %q (item key %q)", n, bt.Key, it.Key)
		}
		if l, ok := tl.last[bt.Key]; ok && n <= l {
			return fmt.Errorf("key %s: item %d after item %d", bt.Key, n, l)
		}
		tl.last[bt.Key] = n
		tl.seen[n]++
	}
	return nil
}

func checkExactlyOnce(t *testing.T, seen map[int]int, n int) {
	t.Helper()
	bad := 0
	for i := range n {
		if seen[i] != 1 {
			if bad < 10 {
				t.Errorf("item %d seen %d times", i, seen[i])
			}
			bad++
		}
	}
	if len(seen) != n {
		t.Errorf("saw %d distinct items, want %d", len(seen), n)
	}
	if bad > 0 {
		t.Fatalf("%d of %d items not seen exactly once", bad, n)
	}
}

// drainLoop fetches and settles (all Done) until appended reports the
// appender finished and the shard is empty. It runs in its own goroutine
// and reports on the returned channel.
func drainLoop(c *protocol.Consumer, appended <-chan struct{}, tl *tally, deadline time.Time) <-chan error {
	res := make(chan error, 1)
	go func() {
		res <- func() error {
			ctx := context.Background()
			for {
				finished := false
				select {
				case <-appended:
					finished = true
				default:
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("not drained by the deadline")
				}
				f, err := c.Fetch(ctx, queue, 0, 3)
				if err != nil {
					return err
				}
				if len(f.Dead) > 0 {
					return fmt.Errorf("dead letters from a fetch: %+v", f.Dead)
				}
				for _, bt := range f.Batches {
					if err := tl.add(bt); err != nil {
						return err
					}
					if err := c.Settle(ctx, bt, all(len(bt.Items), done)); err != nil {
						return err
					}
				}
				// Appends finished before this Fetch began, it found nothing
				// and nothing is pending: all drained.
				if finished && len(f.Batches) == 0 && f.NextKey.IsZero() && f.NextRetry.IsZero() {
					return nil
				}
			}
		}()
	}()
	return res
}

// Appends racing with drains: every item is delivered exactly once, in
// append order per key.
func TestAppendsRacingDrains(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		n := itemCount(b)
		c := newConsumer(t, b)
		appended := make(chan struct{})
		appendErr := appendNumbered(t, b, n)
		tl := newTally()
		drained := drainLoop(c, appended, tl, time.Now().Add(30*time.Second))
		if err := <-appendErr; err != nil {
			t.Fatal(err)
		}
		close(appended)
		if err := <-drained; err != nil {
			t.Fatal(err)
		}
		checkExactlyOnce(t, tl.seen, n)
		noLeases(t, b)
		if ks := testredis.Keys(t, b, b.Prefix+":*:k:*"); len(ks) != 0 {
			t.Fatalf("items keys left: %v", ks)
		}
	})
}

// Two consumers on the same shard, each with its own connections, never
// get the same items: a claimed key is drained by one of them only.
func TestConcurrentConsumersClaimExclusively(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		n := itemCount(b)
		appended := make(chan struct{})
		appendErr := appendNumbered(t, b, n)
		deadline := time.Now().Add(30 * time.Second)
		var tallies [2]*tally
		var results [2]<-chan error
		for i := range tallies {
			own := b
			own.Client = testredis.Client(t, b.Addr)
			tallies[i] = newTally()
			results[i] = drainLoop(newConsumer(t, own), appended, tallies[i], deadline)
		}
		if err := <-appendErr; err != nil {
			t.Fatal(err)
		}
		close(appended)
		for _, r := range results {
			if err := <-r; err != nil {
				t.Fatal(err)
			}
		}
		seen := map[int]int{}
		for i, tl := range tallies {
			if len(tl.seen) == 0 {
				t.Logf("consumer %d got no items", i)
			}
			for k, v := range tl.seen {
				seen[k] += v
			}
		}
		checkExactlyOnce(t, seen, n)
		noLeases(t, b)
	})
}

// Two consumers fetching the same due keys at the same moment split them:
// no key is drained by both.
func TestSimultaneousFetchesSplitKeys(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		const nkeys = 20
		var cs [2]*protocol.Consumer
		for i := range cs {
			own := b
			own.Client = testredis.Client(t, b.Addr)
			cs[i] = newConsumer(t, own)
		}
		for round := range 5 {
			for k := range nkeys {
				addRaw(t, p, fmt.Sprintf("k%d", k), fmt.Sprint(round*nkeys+k))
			}
			start := make(chan struct{})
			var wg sync.WaitGroup
			var fs [2]protocol.Fetched
			var errs [2]error
			for i := range cs {
				wg.Go(func() {
					<-start
					fs[i], errs[i] = cs[i].Fetch(context.Background(), queue, 0, nkeys)
				})
			}
			close(start)
			wg.Wait()
			got := map[string]int{}
			for i, f := range fs {
				if errs[i] != nil {
					t.Fatal(errs[i])
				}
				for _, bt := range f.Batches {
					got[bt.Key]++
					checkItems(t, bt, fmt.Sprint(round*nkeys+keyIndex(t, bt.Key)))
					settle(t, cs[i], bt, done)
				}
			}
			for k := range nkeys {
				if c := got[fmt.Sprintf("k%d", k)]; c != 1 {
					t.Fatalf("round %d: key k%d drained %d times", round, k, c)
				}
			}
			noLeases(t, b)
		}
	})
}

func keyIndex(t *testing.T, key string) int {
	t.Helper()
	var i int
	if _, err := fmt.Sscanf(key, "k%d", &i); err != nil {
		t.Fatalf("key %q: %v", key, err)
	}
	return i
}

// Pop returns nothing when its timeout passes with nothing due; a Pop
// blocked on an empty wake list returns the key a producer then appends
// to; and one Pop takes as many due keys as it asks for at once, on servers
// with BLMPOP, or one per call, on those without (miniredis, or a consumer
// told NoBLMPOP). A key a flush policy schedules comes with a hint.
func TestPop(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithFlushPolicy("later", producer.FlushPolicy{MaxAge: time.Hour}))
		c := newConsumer(t, b)
		must(t, c.Sync(ctx))

		if got, hint, err := c.Pop(ctx, queue, 0, 10, 50*time.Millisecond); err != nil || len(got) != 0 || hint {
			t.Fatalf("Pop with nothing due: %v %v %v", got, hint, err)
		}
		popped := make(chan []string, 1)
		go func() {
			got, _, err := c.Pop(ctx, queue, 0, 10, 10*time.Second)
			if err != nil {
				t.Errorf("blocked Pop: %v", err)
			}
			popped <- got
		}()
		time.Sleep(50 * time.Millisecond) // let it block
		addRaw(t, p, "k", `1`)
		select {
		case got := <-popped:
			if !slices.Equal(got, []string{"k"}) {
				t.Fatalf("blocked Pop got %q, want k", got)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a blocked Pop did not return within 5s of an append")
		}

		for _, k := range []string{"a", "b", "c"} {
			addRaw(t, p, k, `1`)
		}
		want := []string{"a", "b", "c"}
		if !b.Real() {
			want = want[:1] // miniredis has no BLMPOP: one key a Pop
		}
		if got, _, err := c.Pop(ctx, queue, 0, 10, time.Second); err != nil || !slices.Equal(got, want) {
			t.Fatalf("Pop(10) of 3 due keys: %q, %v; want %q", got, err, want)
		}
		if b.Real() {
			addRaw(t, p, "d", `1`)
			addRaw(t, p, "e", `1`)
			one := newConsumer(t, b)
			one.NoBLMPOP()
			if got, _, err := one.Pop(ctx, queue, 0, 10, time.Second); err != nil || !slices.Equal(got, []string{"d"}) {
				t.Fatalf("Pop without BLMPOP: %q, %v; want d", got, err)
			}
		}

		if err := p.AddRaw(ctx, "later", "x", json.RawMessage(`1`)); err != nil {
			t.Fatal(err)
		}
		if got, hint, err := c.Pop(ctx, "later", 0, 10, time.Second); err != nil || len(got) != 0 || !hint {
			t.Fatalf("Pop after a key was scheduled: %q, hint %v, %v; want only a hint", got, hint, err)
		}
	})
}
