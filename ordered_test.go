package batchq_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"go.uber.org/zap/zaptest"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/rtcount"
	"github.com/batchq/batchq/internal/testredis"
)

// Tests of ordered keys (WithOrderedKeys): one batch of a key out at a
// time, its items in append order, a failed item holding back those after
// it.

// seqItem is an item of an ordered test: its key's sequence number.
type seqItem struct {
	Key string `json:"k"`
	Seq int    `json:"s"`
}

// orderLog records, per key, the items handled successfully, in the order
// they were handled, and catches two handlers of one key running at once.
type orderLog struct {
	mu      sync.Mutex
	done    map[string][]int
	running map[string]int
	overlap int
}

func newOrderLog() *orderLog {
	return &orderLog{done: make(map[string][]int), running: make(map[string]int)}
}

// enter and leave bracket a handler call of key.
func (l *orderLog) enter(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.running[key]++
	if l.running[key] > 1 {
		l.overlap++
	}
}

func (l *orderLog) leave(key string, seq int, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.running[key]--
	if ok {
		l.done[key] = append(l.done[key], seq)
	}
}

func (l *orderLog) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, s := range l.done {
		n += len(s)
	}
	return n
}

// orderedFailures decides which items of TestOrderedKeys fail: every 7th
// item of a key fails on its first two attempts, and every 23rd for good.
func orderedFailures(it seqItem, attempt int) error {
	switch {
	case it.Seq%23 == 22:
		return batchq.NoRetry(errors.New("fails for good"))
	case it.Seq%7 == 3 && attempt < 2:
		return fmt.Errorf("fails on attempt %d", attempt)
	}
	return nil
}

func TestOrderedKeys(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) { testOrderedKeys(t, b, 100, 30) })
}

func TestOrderedKeysOnCluster(t *testing.T) {
	testOrderedKeys(t, testredis.Cluster(t), 100, 30)
}

// testOrderedKeys appends perKey items to each of n keys of an ordered
// queue, from several producers at once (each key's items from one
// goroutine, in sequence, one to three items a call), while 8 workers
// handle them with failures (orderedFailures). Each key's items must be
// handled exactly once each, but for those dead for good, in sequence,
// and never two of one key at once.
func testOrderedKeys(t *testing.T, b testredis.Backend, n, perKey int) {
	log := newOrderLog()
	handler := func(ctx context.Context, it seqItem) error {
		log.enter(it.Key)
		time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond)
		info, _ := batchq.Info(ctx)
		err := orderedFailures(it, info.Attempt)
		log.leave(it.Key, it.Seq, err == nil)
		return err
	}
	for range 8 {
		w := newWorker(t, b, batchq.WithConcurrency(4))
		batchq.Handle(w, "ord", handler, batchq.WithOrderedKeys(), batchq.WithBackoff(batchq.Constant(20*time.Millisecond)))
		runWorker(t, w)
	}

	var wg sync.WaitGroup
	want := 0
	for g := range 4 {
		p := newProducer(t, b)
		wg.Go(func() {
			for k := g; k < n; k += 4 {
				key := fmt.Sprintf("key-%03d", k)
				for seq := 0; seq < perKey; {
					var its []any
					for range 1 + rand.IntN(3) {
						if seq < perKey {
							its = append(its, seqItem{Key: key, Seq: seq})
							seq++
						}
					}
					if err := p.Add(context.Background(), "ord", key, its...); err != nil {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	for range n {
		for seq := range perKey {
			if seq%23 != 22 {
				want++
			}
		}
	}
	wg.Wait()
	eventually(t, 60*time.Second, "every item handled", func() bool { return log.count() >= want })
	time.Sleep(200 * time.Millisecond) // anything handled twice shows now

	log.mu.Lock()
	defer log.mu.Unlock()
	if log.overlap > 0 {
		t.Errorf("two handler calls of one key ran at once %d times", log.overlap)
	}
	for k := range n {
		key := fmt.Sprintf("key-%03d", k)
		var exp []int
		for seq := range perKey {
			if seq%23 != 22 {
				exp = append(exp, seq)
			}
		}
		if got := log.done[key]; fmt.Sprint(got) != fmt.Sprint(exp) {
			t.Errorf("%s handled %v, want %v", key, got, exp)
		}
	}
	t.Logf("%d keys, %d items handled in order on %s", n, want, b.Name)
}

// TestOrderedFailureHoldsKey checks that a failed item holds its key: the
// items after it, and those appended while it waits, are handled only
// after it succeeds, in order.
func TestOrderedFailureHoldsKey(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		log := newOrderLog()
		var mu sync.Mutex
		failing := true
		w := newWorker(t, b, batchq.WithConcurrency(8))
		batchq.Handle(w, "hold", func(ctx context.Context, it seqItem) error {
			log.enter(it.Key)
			mu.Lock()
			fail := it.Seq == 1 && failing
			mu.Unlock()
			log.leave(it.Key, it.Seq, !fail)
			if fail {
				return errors.New("not yet")
			}
			return nil
		}, batchq.WithOrderedKeys(), batchq.WithBackoff(batchq.Constant(50*time.Millisecond)), batchq.WithMaxAttempts(1000))
		runWorker(t, w)
		p := newProducer(t, b)
		add := func(from, to int) {
			for s := from; s < to; s++ {
				if err := p.Add(context.Background(), "hold", "k", seqItem{Key: "k", Seq: s}); err != nil {
					t.Fatal(err)
				}
			}
		}
		add(0, 5)
		eventually(t, 10*time.Second, "item 0 handled", func() bool { return log.count() == 1 })
		add(5, 10) // while item 1 holds the key
		time.Sleep(300 * time.Millisecond)
		if got := log.count(); got != 1 {
			log.mu.Lock()
			t.Fatalf("handled %v while item 1 kept failing, want only [0]", log.done["k"])
		}
		mu.Lock()
		failing = false
		mu.Unlock()
		eventually(t, 10*time.Second, "every item handled", func() bool { return log.count() == 10 })
		log.mu.Lock()
		defer log.mu.Unlock()
		if got := fmt.Sprint(log.done["k"]); got != fmt.Sprint([]int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}) {
			t.Errorf("handled %s, want 0 to 9 in order", got)
		}
	})
}

// Growing an ordered queue from 2 shards to 8 under load keeps each key's
// order: a key that moves waits until its items in the shard it left are
// done. Each key's items come from one goroutine, in sequence, so their
// append order is known.
func TestOrderedGrowShardsUnderLoad(t *testing.T) {
	testredis.Each(t, testOrderedGrow)
}

func TestOrderedGrowShardsOnCluster(t *testing.T) {
	testOrderedGrow(t, testredis.Cluster(t))
}

func testOrderedGrow(t *testing.T, b testredis.Backend) {
	ctx := context.Background()
	in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
	must(t, err)
	must(t, in.CreateQueue(ctx, "ordgrow", 2))
	log := newOrderLog()
	for range 4 {
		w := newWorker(t, b, batchq.WithConcurrency(4))
		batchq.Handle(w, "ordgrow", func(ctx context.Context, it seqItem) error {
			log.enter(it.Key)
			info, _ := batchq.Info(ctx)
			err := orderedFailures(it, info.Attempt)
			log.leave(it.Key, it.Seq, err == nil)
			return err
		}, batchq.WithOrderedKeys(), batchq.WithBackoff(batchq.Constant(20*time.Millisecond)))
		runWorker(t, w)
	}

	const nkeys = 40
	stop := make(chan struct{})
	var wg sync.WaitGroup
	sent := make([]int, nkeys) // items appended per key
	for g := range 4 {
		p := newProducer(t, b)
		wg.Go(func() {
			for seq := 0; ; seq++ {
				for k := g; k < nkeys; k += 4 {
					select {
					case <-stop:
						return
					default:
					}
					key := fmt.Sprintf("key-%02d", k)
					if err := p.Add(ctx, "ordgrow", key, seqItem{Key: key, Seq: seq}); err != nil {
						t.Error(err)
						return
					}
					sent[k] = seq + 1
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	time.Sleep(time.Second)
	if old, err := in.SetShards(ctx, "ordgrow", 8); err != nil || old != 2 {
		t.Fatalf("SetShards: %d, %v", old, err)
	}
	time.Sleep(3 * time.Second) // past the producers' and workers' next read of the count
	close(stop)
	wg.Wait()
	want := 0
	for _, n := range sent {
		for seq := range n {
			if seq%23 != 22 {
				want++
			}
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	for log.count() < want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)

	log.mu.Lock()
	defer log.mu.Unlock()
	if log.overlap > 0 {
		t.Errorf("two handler calls of one key ran at once %d times", log.overlap)
	}
	moved := 0
	for k := range nkeys {
		key := fmt.Sprintf("key-%02d", k)
		if keys.Shard(key, 2) != keys.Shard(key, 8) {
			moved++
		}
		var exp []int
		for seq := range sent[k] {
			if seq%23 != 22 {
				exp = append(exp, seq)
			}
		}
		if got := log.done[key]; fmt.Sprint(got) != fmt.Sprint(exp) {
			t.Errorf("%s handled %v, want %v", key, got, exp)
		}
	}
	t.Logf("%d items over %d keys (%d of them moved to another shard) handled in order across the growth, on %s", want, nkeys, moved, b.Name)
}

// A worker whose batch's lease was reaped under it (it was cut off from
// Redis for longer than the lease TTL) learns it at its next heartbeat, and
// handles no more of the batch: the batch is delivered again, and on an
// ordered queue the rest of it would run beside the batch redelivered.
func TestLostLeaseStopsTheBatch(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		checked := make(chan struct{}, 100) // an extend read the leases of a shard again
		c := rtcount.Wrap(b.Client, func(cmds [][]string, _ []rueidis.RedisResult) {
			if strings.EqualFold(cmds[0][0], "ZSCORE") && strings.HasSuffix(cmds[0][1], ":leases") {
				select {
				case checked <- struct{}{}:
				default:
				}
			}
		})
		w, err := batchq.NewWorker(c, batchq.WithPrefix(b.Prefix), batchq.WithLeaseTTL(300*time.Millisecond), batchq.WithLogger(zaptest.NewLogger(t)))
		must(t, err)
		started := make(chan int, 10)
		release := make(chan struct{})
		batchq.Handle(w, "lost", func(ctx context.Context, it item) error {
			started <- it.ID
			if it.ID == 0 {
				<-release
			}
			return nil
		}, batchq.WithOrderedKeys())
		runWorker(t, w)
		addItems(t, b, "lost", "k", 0, 3)
		if id := <-started; id != 0 {
			t.Fatalf("item %d handled first", id)
		}
		// The reaper takes the lease, as if the worker had been away.
		leases := keys.For(b.Prefix, "lost", 0).Leases()
		must(t, b.Client.Do(ctx, b.Client.B().Zremrangebyrank().Key(leases).Start(0).Stop(-1).Build()).Error())
		// Two heartbeats that look for the lease: the first has marked the
		// batch once the second looks (the hook runs before Extend marks).
		for range 2 {
			select {
			case <-checked:
			case <-time.After(10 * time.Second):
				t.Fatal("no heartbeat found the lease gone")
			}
		}
		close(release)
		select {
		case id := <-started:
			t.Fatalf("item %d handled after the batch's lease was found lost", id)
		case <-time.After(300 * time.Millisecond):
		}
	})
}

// The retries of several keys of an ordered queue come as one batch; its
// keys run at once, each key's items one after another.
func TestOrderedRetriesOfKeysRunAtOnce(t *testing.T) {
	testredis.Each(t, testOrderedRetriesRunAtOnce)
}

func testOrderedRetriesRunAtOnce(t *testing.T, b testredis.Backend) {
	ctx := context.Background()
	// Two keys fail once. Their retries, due 200 ms later, at the same
	// time (SettleAll reads the clock once), are settled in one round trip
	// after the worker has handled an item of a third key: the claim at
	// their due time takes both in one batch, whose keys must run at once.
	// (Settled before the worker starts, they would be claimed as it
	// starts; a key is handed to another executor only if that executor
	// already waits for work, and at start-up it may not yet. Due at once,
	// a claim could come between the two settle scripts: miniredis runs
	// another client's command between those of a pipeline.)
	c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix))
	must(t, err)
	c.Order("par")
	must(t, c.Sync(ctx))
	addItems(t, b, "par", "a", 0, 1)
	addItems(t, b, "par", "b", 1, 2)
	f, err := c.Fetch(ctx, "par", 0, 10)
	must(t, err)
	if len(f.Batches) != 2 {
		t.Fatalf("fetched %d batches, want one per key", len(f.Batches))
	}

	started := map[string]chan struct{}{"a": make(chan struct{}), "b": make(chan struct{})}
	once := map[string]*sync.Once{"a": {}, "b": {}}
	other := map[string]string{"a": "b", "b": "a"}
	overlapped := make(chan string, 2)
	warm, warmOnce := make(chan struct{}), sync.Once{}
	rec := &fetchRecorder{}
	w := newWorker(t, b, batchq.WithConcurrency(2), batchq.WithObserver(rec))
	batchq.Handle(w, "par", func(ctx context.Context, it item) error {
		key := "a"
		switch it.ID {
		case 1:
			key = "b"
		case 2: // key w's: the worker runs
			warmOnce.Do(func() { close(warm) })
			return nil
		}
		once[key].Do(func() { close(started[key]) }) // a redelivery starts it again
		select {
		case <-started[other[key]]:
			overlapped <- key
		case <-time.After(5 * time.Second):
		}
		return nil
	}, batchq.WithOrderedKeys())
	runWorker(t, w)
	addItems(t, b, "par", "w", 2, 3)
	select {
	case <-warm:
	case <-time.After(10 * time.Second):
		t.Fatal("the worker handled no item")
	}
	retry := []protocol.Outcome{{Kind: protocol.Retry, Err: errors.New("boom"), Delay: 200 * time.Millisecond}}
	for _, err := range c.SettleAll(ctx, f.Batches, [][]protocol.Outcome{retry, retry}) {
		must(t, err)
	}
	for range 2 {
		select {
		case <-overlapped:
		case <-time.After(10 * time.Second):
			t.Fatal("the retries of two keys did not run at once")
		}
	}
	var retries []fetched
	for _, x := range rec.fetched() {
		if x.retry {
			retries = append(retries, x)
		}
	}
	if len(retries) != 1 || retries[0].items != 2 {
		t.Errorf("fetched retry batches %+v, want one of both keys' items", retries)
	}
}
