package batchq_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// The SIGKILL test of ordered keys (WithOrderedKeys): after a SIGKILL, the
// batch a worker leased is redelivered before anything newer of its key.
// The worker processes are the fault harness's (workerMain with
// procConfig.Ordered), which record the order they handle each key's items
// in.

// TestOrderedCrashRedeliversFirst kills workers of an ordered queue with
// SIGKILL mid-batch, twice, while a producer keeps appending to every key,
// and checks that nothing is lost, that the only items handled twice are
// those of the batches the killed workers held, and that each key's items
// are handled in sequence, but for each batch held at a kill, handled
// again from its start before anything newer of its key (checkKeyOrder).
func TestOrderedCrashRedeliversFirst(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		if b.Real() {
			testOrderedCrash(t, b, 100, 80, 1)
		} else {
			testOrderedCrash(t, b, 40, 60, 1)
		}
	})
}

// The same on a Redis Cluster of three masters, the queue in 12 shards.
func TestOrderedCrashRedeliversFirstOnCluster(t *testing.T) {
	testOrderedCrash(t, testredis.Cluster(t), 100, 80, 12)
}

// heldBatch is the batch of an ordered key that a lease held when its
// worker was killed.
type heldBatch struct {
	key   string
	shard int
	seqs  []int // its items' seqs, in the lease's order
}

// orderedHeld returns the batches held by the leases of crashQueue's
// shards, by lease token. Each must be a run of consecutive items of its
// key, in order. No worker may run meanwhile.
func orderedHeld(t *testing.T, b testredis.Backend, shards int) map[string]heldBatch {
	t.Helper()
	ctx, c := context.Background(), b.Client
	held := make(map[string]heldBatch)
	for shard := range shards {
		sp := keys.For(b.Prefix, crashQueue, shard)
		members, err := c.Do(ctx, c.B().Zrange().Key(sp.Leases()).Min("0").Max("-1").Build()).AsStrSlice()
		must(t, err)
		for _, m := range members {
			l := protocol.ParseLease(m)
			if l.Key == "" {
				t.Errorf("lease %s holds retries, but no item of this test fails", m)
				continue
			}
			v, err := c.Do(ctx, c.B().Get().Key(sp.Lease(l.Token)).Build()).AsBytes()
			if rueidis.IsRedisNil(err) {
				continue // a drain that found no key
			}
			must(t, err)
			var items []seqItem
			must(t, json.Unmarshal(v, &items))
			hb := heldBatch{key: l.Key, shard: shard}
			for i, it := range items {
				if it.Key != l.Key || (i > 0 && it.Seq != items[i-1].Seq+1) {
					t.Errorf("the lease of %s holds %s: not a run of its items in order", l.Key, v)
				}
				hb.seqs = append(hb.seqs, it.Seq)
			}
			held[l.Token] = hb
		}
	}
	return held
}

// checkKeyOrder checks seqs, the order a key's items 0 to n-1 were handled
// in: each is the next item in sequence, or the first item of a batch held
// at a kill (starts counts the batches held of the key by their first
// item), which starts the sequence again from there: the redelivery of the
// batch. It returns how many times the sequence started again.
//
// This is "non-decreasing but for the redelivered batch", stated exactly:
// drop the items handled again and what is left is 0, 1, 2 and so on, and
// the first item handled after a kill is the first of the batch killed (or,
// when none of it had been handled, the next in sequence, which is the
// same). It fails if a redelivered batch came after anything newer of its
// key, as it would had the reaper put it behind the items appended while it
// was out: the first item handled after the kill would then be a newer one,
// past the next in sequence (the rest of the killed batch) and the first of
// no held batch. Two batches of a key out at once would interleave, and
// fail it the same way; a hold never ended leaves the key short of n.
func checkKeyOrder(seqs []int, n int, starts map[int]int) (restarts int, err error) {
	next := 0
	for i, s := range seqs {
		switch {
		case s == next:
			next++
		case s < next && starts[s] > 0:
			starts[s]--
			restarts++
			next = s + 1
		default:
			return restarts, fmt.Errorf("item %d handled after %v, want %d (the next) or the first item of a batch held at a kill (%v left)",
				s, seqs[max(0, i-8):i], next, starts)
		}
	}
	if next != n {
		return restarts, fmt.Errorf("handled up to item %d of %d", next, n)
	}
	return restarts, nil
}

// orderedKey is the name of key k of testOrderedCrash.
func orderedKey(k int) string { return fmt.Sprintf("key%03d", k) }

// orderedFeed appends perKey items (seqItems) to each of nkeys keys of
// crashQueue, from a goroutine of its own, in rounds: one to three items to
// every key in turn. It starts a round once the handlers are at most eight
// items a key behind, unless it is paused; and, whatever the pace and
// paused or not, when asked for one (appendRound).
type orderedFeed struct {
	rounds atomic.Int64  // rounds appended
	paused atomic.Bool   // no round, but those asked for
	asked  atomic.Int64  // rounds asked for, not started yet
	done   chan struct{} // closed once every item is appended
}

// startOrderedFeed starts an orderedFeed on b, for a queue of shards
// shards; it stops when the test ends.
func startOrderedFeed(t *testing.T, b testredis.Backend, nkeys, perKey, shards int) *orderedFeed {
	t.Helper()
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(shards))
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	f := &orderedFeed{done: make(chan struct{})}
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	wg.Go(func() {
		for seq := 0; seq < perKey; {
			m := min(1+rand.IntN(3), perKey-seq)
			for k := range nkeys {
				its := make([]any, m)
				for i := range its {
					its[i] = seqItem{Key: orderedKey(k), Seq: seq + i}
				}
				if err := p.Add(ctx, crashQueue, orderedKey(k), its...); err != nil {
					if ctx.Err() == nil {
						t.Errorf("append: %v", err)
					}
					return
				}
			}
			seq += m
			f.rounds.Add(1)
			for (f.paused.Load() || handledLen(b) < int64(nkeys*(seq-8))) && seq < perKey {
				if a := f.asked.Load(); a > 0 && f.asked.CompareAndSwap(a, a-1) {
					break
				}
				if ctx.Err() != nil {
					return
				}
				time.Sleep(2 * time.Millisecond)
			}
		}
		close(f.done)
	})
	return f
}

// appendRound asks for a round and waits until one that started after the
// call is appended (the round under way may have passed a key already).
func (f *orderedFeed) appendRound(t *testing.T) {
	t.Helper()
	r := f.rounds.Load()
	f.asked.Add(2)
	eventually(t, time.Minute, "the producer to append a round", func() bool {
		select {
		case <-f.done:
			if f.rounds.Load() < r+2 {
				t.Fatal("the producer appended every item before it was asked for a round: the test needs more items a key")
			}
		default:
		}
		return f.rounds.Load() >= r+2
	})
	f.asked.Store(0) // the second round, when the first was under way
}

// testOrderedCrash appends perKey items to each of nkeys keys of an
// ordered queue in shards shards (orderedFeed), while worker processes
// handle them: two are killed with SIGKILL mid-batch, each once it has
// handled a fifth of the items, and a third finishes. After each kill the
// producer appends one round, and then nothing, until the batches the
// killed worker held are redelivered: so items newer than each of them
// wait behind it in Redis, from before it could be redelivered until after.
func testOrderedCrash(t *testing.T, b testredis.Backend, nkeys, perKey, shards int) {
	ctx, c := context.Background(), b.Client
	n := nkeys * perKey
	feed := startOrderedFeed(t, b, nkeys, perKey, shards)
	handledKey := b.Prefix + ":test:handled"
	// counts returns the handled counts of the given fields ("<key>:<seq>").
	counts := func(fields []string) []int64 {
		vs, err := c.Do(ctx, c.B().Hmget().Key(handledKey).Field(fields...).Build()).ToArray()
		must(t, err)
		out := make([]int64, len(vs))
		for i, v := range vs {
			out[i], _ = v.AsInt64() // nil: 0
		}
		return out
	}
	startWorker := func() *proc {
		return startProc(t, b, procConfig{Concurrency: 8, LeaseTTL: time.Second, Work: 500 * time.Microsecond, Shards: shards, Ordered: true})
	}
	// A kill's batches are redelivered once the first item of each is
	// handled once more than when the worker was killed.
	type kill struct {
		at     time.Time
		held   map[string]heldBatch
		fields []string // the held batches' first items
		counts []int64  // their counts at the kill
	}
	awaitRedelivery := func(round int, k kill) {
		t.Helper()
		var took []time.Duration
		seen := make([]bool, len(k.fields))
		eventually(t, time.Minute, fmt.Sprintf("the batches held at kill %d to be redelivered", round), func() bool {
			for i, v := range counts(k.fields) {
				if !seen[i] && v > k.counts[i] {
					seen[i] = true
					took = append(took, time.Since(k.at))
				}
			}
			return len(took) == len(seen)
		})
		med, most := stats(took)
		t.Logf("the %d batches held at kill %d were redelivered %s (median) to %s after it (1s lease TTL, a worker started meanwhile)", len(took), round, ms(med), ms(most))
	}

	killed := make(map[string]heldBatch) // every batch held at a kill, by lease token
	var prev kill
	for round := range 2 {
		worker := startWorker()
		if round > 0 {
			awaitRedelivery(round, prev)
			feed.paused.Store(false)
		}
		from := handledLen(b)
		eventually(t, time.Minute, fmt.Sprintf("worker %d to handle a fifth of the items", round+1), func() bool {
			return handledLen(b) >= from+int64(n/5)
		})
		worker.signal(t, syscall.SIGKILL)
		worker.wait(t, 10*time.Second)
		k := kill{at: time.Now(), held: orderedHeld(t, b, shards)}
		if len(k.held) == 0 {
			t.Fatalf("worker %d held no batch when killed: the test did not crash it mid-batch", round+1)
		}
		// Items newer than each held batch: no worker runs to drain them
		// before the next starts, and then the batch's hold stops it.
		feed.paused.Store(true)
		feed.appendRound(t)
		items, handled, behind := 0, 0, 0
		for tok, hb := range k.held {
			killed[tok] = hb
			fields := make([]string, len(hb.seqs))
			for i, s := range hb.seqs {
				fields[i] = hb.key + ":" + strconv.Itoa(s)
			}
			cs := counts(fields)
			k.fields, k.counts = append(k.fields, fields[0]), append(k.counts, cs[0])
			items += len(hb.seqs)
			for _, v := range cs {
				if v > 0 {
					handled++
				}
			}
			sp := keys.For(b.Prefix, crashQueue, hb.shard)
			if ex, err := c.Do(ctx, c.B().Exists().Key(sp.Items(hb.key)).Build()).AsInt64(); err == nil && ex == 1 {
				behind++
			}
		}
		prev = k
		t.Logf("killed worker %d after %d items handled; it held %d batches of %d items (%d of them handled), %d with newer items of their key behind them",
			round+1, handledLen(b), len(k.held), items, handled, behind)
		if behind != len(k.held) {
			// Nothing newer to overtake a redelivered batch: the test would
			// prove nothing about its order.
			t.Fatalf("%d of the %d batches held at kill %d had no newer items behind them", len(k.held)-behind, len(k.held), round+1)
		}
	}
	last := startWorker()
	awaitRedelivery(2, prev)
	feed.paused.Store(false)
	begin := time.Now()
	eventually(t, 2*time.Minute, "every item appended and handled", func() bool {
		select {
		case <-feed.done:
			return handledLen(b) >= int64(n)
		default:
			return false
		}
	})
	t.Logf("the last worker finished in %v", time.Since(begin).Round(time.Millisecond))
	last.signal(t, syscall.SIGTERM)
	if err := last.wait(t, time.Minute); err != nil {
		t.Fatalf("worker after SIGTERM: %v", err)
	}

	all, err := c.Do(ctx, c.B().Hgetall().Key(handledKey).Build()).AsStrMap()
	must(t, err)
	inKilled := make(map[string]bool)
	starts := make(map[string]map[int]int) // per key, the held batches by first item
	held := 0
	for _, hb := range killed {
		for _, s := range hb.seqs {
			inKilled[hb.key+":"+strconv.Itoa(s)] = true
		}
		if starts[hb.key] == nil {
			starts[hb.key] = make(map[int]int)
		}
		starts[hb.key][hb.seqs[0]]++
		held += len(hb.seqs)
	}
	lost, dups, restarts, disordered := 0, 0, 0, 0
	for k := range nkeys {
		key := orderedKey(k)
		for s := range perKey {
			f := key + ":" + strconv.Itoa(s)
			switch got, _ := strconv.Atoi(all[f]); {
			case got == 0:
				lost++
				t.Errorf("item %s lost", f)
			case got > 1:
				dups++
				if !inKilled[f] {
					t.Errorf("item %s handled %d times but was not in a batch held at a kill", f, got)
				}
			}
		}
		order, err := c.Do(ctx, c.B().Lrange().Key(b.Prefix+":test:order:"+key).Start(0).Stop(-1).Build()).AsIntSlice()
		must(t, err)
		seqs := make([]int, len(order))
		for i, v := range order {
			seqs[i] = int(v)
		}
		r, err := checkKeyOrder(seqs, perKey, starts[key])
		restarts += r
		if err != nil {
			disordered++
			t.Errorf("%s: %v", key, err)
		}
	}
	t.Logf("%s, %d shards: %d keys of %d items, 2 kills: %d lost, %d handled twice (the %d batches held at the kills had %d items); %d times a key's sequence started again at a held batch's first item, %d keys out of order",
		b.Name, shards, nkeys, perKey, lost, dups, len(killed), held, restarts, disordered)
	if ks := leftKeys(t, b); len(ks) != 0 {
		t.Errorf("keys left: %v", ks)
	}
}
