package producer_test

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// With linger, concurrent appends to the keys of a shard go in one merge
// call once maxItems are waiting, and every caller learns its own outcome.
func TestLingerGathersAppends(t *testing.T) {
	eachPrivate(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		// A linger far longer than the test: only maxItems sends a call.
		p := newProducer(t, b, producer.WithLinger(time.Second, 8))
		const callers, nkeys = 32, 4
		// The first append to a queue records it in the registry (a script
		// call too): make it before counting.
		warm := make([]json.RawMessage, 8) // maxItems: sent at once
		for i := range warm {
			warm[i] = json.RawMessage("0")
		}
		if err := p.AddRaw(ctx, "q", "warm", warm...); err != nil {
			t.Fatal(err)
		}
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
		if calls := mergeCalls(t, b) - calls0; b.Real() && calls != callers/8 {
			t.Fatalf("%d appends to %d keys with maxItems 8 took %d merge calls, want %d", callers, nkeys, calls, callers/8)
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
// stored once, however the calls gather them: with a wait, and with group
// commit (wait 0), over several shards.
func TestLingerKeepsEachCallersOrder(t *testing.T) {
	for _, wait := range []time.Duration{2 * time.Millisecond, 0} {
		t.Run(wait.String(), func(t *testing.T) { testLingerOrder(t, wait) })
	}
}

func testLingerOrder(t *testing.T, wait time.Duration) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithLinger(wait, 64), producer.WithDefaultShards(3))
		const callers, per, nkeys = 16, 20, 7
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
			v, _ := getSharded(t, b, "q", "k"+strconv.Itoa(k), 3)
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
// error and takes its items back: they are not stored. The others are not
// held up.
func TestLingerRespectsContext(t *testing.T) {
	b := testredis.Mini(t)
	p := newProducer(t, b, producer.WithLinger(200*time.Millisecond, 1000))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := p.Add(ctx, "q", "k", 1)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 150*time.Millisecond {
		t.Fatalf("got %v after %v, want the context's deadline", err, time.Since(start))
	}
	if err := p.Add(context.Background(), "q", "k2", 2); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // past the linger of the first call
	if v, ok := get(t, b, "q", "k"); ok {
		t.Fatalf("the item of a caller that gave up was stored: %s", v)
	}
	if v, _ := get(t, b, "q", "k2"); v != "[2]" {
		t.Fatalf("k2 holds %q", v)
	}
	for _, bad := range []struct {
		wait time.Duration
		max  int
	}{{-time.Millisecond, 1}, {2 * time.Second, 1}, {time.Millisecond, 0}} {
		if _, err := producer.New(b.Client, producer.WithLinger(bad.wait, bad.max)); err == nil {
			t.Fatalf("WithLinger(%v, %d) accepted", bad.wait, bad.max)
		}
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

// With group commit (wait 0), appends that come while a call is in flight
// ride on the next: far fewer calls than appends under load. A key refused
// by its cap fails only its own callers; the other keys of the same call
// are stored.
func TestLingerGroupCommit(t *testing.T) {
	eachPrivate(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithLinger(0, 1000), producer.WithMaxKeyItems(100))
		const callers, per, nkeys = 32, 40, 64
		calls0 := mergeCalls(t, b)
		var wg sync.WaitGroup
		var mu sync.Mutex
		full := 0
		for c := range callers {
			wg.Go(func() {
				for i := range per {
					key := "k" + strconv.Itoa((c*per+i)%nkeys)
					if c == 0 && i == 0 {
						key = "full"
					}
					err := p.Add(ctx, "q", key, c*per+i)
					switch {
					case errors.Is(err, producer.ErrKeyFull):
						mu.Lock()
						full++
						mu.Unlock()
					case err != nil:
						t.Error(err)
					}
				}
			})
		}
		wg.Wait()
		if full != 0 {
			t.Fatalf("%d appends refused before the key filled up", full)
		}
		calls := mergeCalls(t, b) - calls0
		if b.Real() && calls >= callers*per/2 {
			t.Fatalf("%d appends took %d merge calls: group commit did not gather", callers*per, calls)
		}
		t.Logf("%d appends, %d merge calls", callers*per, calls)
		total := 0
		for k := range nkeys {
			v, _ := get(t, b, "q", "k"+strconv.Itoa(k))
			var ids []int
			if err := json.Unmarshal([]byte(v), &ids); err != nil {
				t.Fatalf("key k%d: %v", k, err)
			}
			total += len(ids)
		}
		if total != callers*per-1 {
			t.Fatalf("stored %d items, want %d", total, callers*per-1)
		}

		// Fill "full" to its cap of 100, then append to it and to 7 other
		// keys in one call (maxItems 8 with a long wait: the eighth append
		// sends it): only the full key's caller is refused.
		p = newProducer(t, b, producer.WithLinger(time.Second, 8), producer.WithMaxKeyItems(100))
		raws := make([]json.RawMessage, 99)
		for i := range raws {
			raws[i] = json.RawMessage("0")
		}
		if err := p.AddRaw(ctx, "q", "full", raws...); err != nil {
			t.Fatal(err)
		}
		errs := make([]error, 8)
		for i := range errs {
			wg.Go(func() {
				key := "other" + strconv.Itoa(i)
				if i == 3 {
					key = "full"
				}
				errs[i] = p.Add(ctx, "q", key, i)
			})
		}
		wg.Wait()
		for i, err := range errs {
			if i == 3 && !errors.Is(err, producer.ErrKeyFull) {
				t.Fatalf("append to the full key: %v, want ErrKeyFull", err)
			}
			if i != 3 && err != nil {
				t.Fatalf("append %d beside a full key: %v", i, err)
			}
		}
	})
}

// getSharded is get for a queue of n shards.
func getSharded(t *testing.T, b testredis.Backend, queue, key string, n int) (string, bool) {
	t.Helper()
	ik := keys.For(b.Prefix, queue, keys.Shard(key, n)).Items(key)
	v, err := b.Client.Do(context.Background(), b.Client.B().Get().Key(ik).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return "", false
	}
	if err != nil {
		t.Fatalf("GET %s: %v", ik, err)
	}
	return v, true
}

// eachPrivate is testredis.Each with a redis-server of the test's own, for
// tests that count the server's script calls: a shared server (CI's) counts
// those of the other packages' tests too.
func eachPrivate(t *testing.T, fn func(t *testing.T, b testredis.Backend)) {
	t.Helper()
	t.Run("miniredis", func(t *testing.T) { fn(t, testredis.Mini(t)) })
	t.Run("redis", func(t *testing.T) { fn(t, testredis.Start(t).Backend(t)) })
}

// When the gathered items of a key pass its cap together, each caller's
// items are tried on their own: those that fit are stored, only the others
// get ErrKeyFull.
func TestLingerFullKeyTriesEachCaller(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithLinger(time.Second, 2), producer.WithMaxKeyItems(2))
		if err := newProducer(t, b, producer.WithMaxKeyItems(2)).Add(ctx, "q", "k", 0); err != nil {
			t.Fatal(err)
		}
		errs := make(chan error, 2)
		for i := 1; i <= 2; i++ {
			go func() { errs <- p.Add(ctx, "q", "k", i) }()
		}
		var full, ok int
		for range 2 {
			switch err := <-errs; {
			case errors.Is(err, producer.ErrKeyFull):
				full++
				var kf *producer.KeyFullError
				if !errors.As(err, &kf) || kf.Adding != 1 || kf.Items != 2 {
					t.Fatalf("KeyFullError %+v, want one item refused by a key holding 2", kf)
				}
			case err == nil:
				ok++
			default:
				t.Fatal(err)
			}
		}
		if full != 1 || ok != 1 {
			t.Fatalf("%d refused, %d stored; want one each", full, ok)
		}
		if v, _ := get(t, b, "q", "k"); v != "[0,1]" && v != "[0,2]" {
			t.Fatalf("key holds %s", v)
		}
	})
}

// The first appends to a queue record it in the registry once, however
// many come at the same time: one script call more than the merges.
func TestRegistryWrittenOncePerQueue(t *testing.T) {
	eachPrivate(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		const callers = 32
		calls0 := mergeCalls(t, b)
		var wg sync.WaitGroup
		for i := range callers {
			wg.Go(func() {
				if err := p.Add(ctx, "q", "k"+strconv.Itoa(i), i); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		if calls := mergeCalls(t, b) - calls0; b.Real() && calls != callers+1 {
			t.Fatalf("%d first appends made %d script calls, want %d merges and 1 registry write", callers, calls, callers+1)
		}
		v, err := b.Client.Do(ctx, b.Client.B().Hget().Key(keys.Registry(b.Prefix)).Field("q").Build()).ToString()
		if err != nil || v != "1" {
			t.Fatalf("registry holds %q for q (%v), want 1 shard", v, err)
		}
	})
}
