package batchq_test

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// I2: with no crash every item is handled exactly once, with many producers
// and many workers racing on the same keys.
func TestExactlyOnce(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		if b.Real() {
			testExactlyOnce(t, b, 100_000, 1000, 1)
		} else {
			testExactlyOnce(t, b, 2000, 50, 1) // miniredis runs a few thousand scripts a second
		}
	})
}

// The same on a Redis Cluster of three masters, the queue split into 12
// shards (hash tags) spread over them.
func TestExactlyOnceOnCluster(t *testing.T) {
	testExactlyOnce(t, testredis.Cluster(t), 20_000, 500, 12)
}

func testExactlyOnce(t *testing.T, b testredis.Backend, n, nkeys, shards int) {
	const producers, workers = 8, 8
	counts := make([]atomic.Int32, n)
	var handled atomic.Int64
	var stops []func()
	for range workers {
		w := newWorker(t, b, batchq.WithConcurrency(8), batchq.WithDefaultShards(shards))
		batchq.Handle(w, "exact", func(ctx context.Context, it item) error {
			counts[it.ID].Add(1)
			handled.Add(1)
			return nil
		})
		stops = append(stops, runWorker(t, w))
	}
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(shards))
	must(t, err)
	ctx := context.Background()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, producers)
	for g := range producers {
		wg.Go(func() {
			for i := g; i < n; i += producers {
				if err := p.Add(ctx, "exact", "key"+strconv.Itoa(i%nkeys), item{ID: i}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	produced := time.Since(start)
	eventually(t, 3*time.Minute, "every item handled", func() bool { return handled.Load() >= int64(n) })
	for _, stop := range stops {
		stop()
	}
	t.Logf("%s: %d items over %d keys in %d shards: produced in %v, all handled after %v", b.Name, n, nkeys, shards,
		produced.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	for i := range counts {
		if c := counts[i].Load(); c != 1 {
			t.Errorf("item %d handled %d times", i, c)
		}
	}
	if ks := leftKeys(t, b); len(ks) != 0 {
		t.Errorf("keys left after every item was handled: %v", ks)
	}
}

// Graceful shutdown under load: cancel while producers and handlers run;
// every item is handled or back in Redis, none lost, none doubled, and no
// lease is left to wait for.
func TestGracefulShutdownUnderLoad(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		const nkeys = 50
		keyNames := make([]string, nkeys)
		for i := range keyNames {
			keyNames[i] = "key" + strconv.Itoa(i)
		}
		var mu sync.Mutex
		handled := make(map[int]int)
		w := newWorker(t, b, batchq.WithConcurrency(8), batchq.WithLeaseTTL(time.Minute))
		batchq.Handle(w, "grace", func(ctx context.Context, it item) error {
			time.Sleep(time.Millisecond)
			mu.Lock()
			handled[it.ID]++
			mu.Unlock()
			return nil
		})
		stop := runWorker(t, w)

		p := newProducer(t, b)
		var next atomic.Int64
		var producedMu sync.Mutex
		var produced []int
		pctx, pcancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for pctx.Err() == nil {
					id := int(next.Add(1))
					if err := p.Add(context.Background(), "grace", keyNames[id%nkeys], item{ID: id}); err != nil {
						t.Errorf("Add: %v", err)
						return
					}
					producedMu.Lock()
					produced = append(produced, id)
					producedMu.Unlock()
				}
			})
		}
		eventually(t, 30*time.Second, "some items handled", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(handled) >= 300
		})
		stop() // while producers still run
		time.Sleep(20 * time.Millisecond)
		pcancel()
		wg.Wait()

		left := pending(t, b, "grace", keyNames)
		inRedis := make(map[int]int)
		for _, id := range left {
			inRedis[id]++
		}
		lost, doubled := 0, 0
		for _, id := range produced {
			h, r := handled[id], inRedis[id]
			switch {
			case h+r == 0:
				lost++
			case h+r > 1:
				doubled++
			}
		}
		t.Logf("produced %d, handled %d, back in Redis %d", len(produced), len(handled), len(left))
		if lost > 0 || doubled > 0 {
			t.Fatalf("%d items lost, %d handled twice or both handled and pending", lost, doubled)
		}
		if len(handled)+len(left) != len(produced) {
			t.Fatalf("handled %d + pending %d != produced %d", len(handled), len(left), len(produced))
		}
		if ks := testredis.Keys(t, b, b.Prefix+":*lease*"); len(ks) != 0 {
			t.Fatalf("leases left after shutdown: %v", ks)
		}
	})
}

// Handlers that outlive the shutdown timeout are cancelled, and their items
// go back to their keys at once, not after the lease TTL.
func TestShutdownTimeoutReturnsUnfinishedItems(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		started := make(chan struct{}, 100)
		w := newWorker(t, b, batchq.WithConcurrency(4), batchq.WithShutdownTimeout(100*time.Millisecond), batchq.WithLeaseTTL(time.Minute))
		batchq.Handle(w, "slow", func(ctx context.Context, it item) error {
			started <- struct{}{}
			<-ctx.Done() // a handler that only stops when told to
			return ctx.Err()
		})
		p := newProducer(t, b)
		keyNames := []string{"a", "b", "c"}
		for i := range 30 {
			if err := p.Add(context.Background(), "slow", keyNames[i%3], item{ID: i}); err != nil {
				t.Fatal(err)
			}
		}
		// Appended before Run: each key is drained once, whole, so its
		// batch is the only one of that key and its order can be checked.
		stop := runWorker(t, w)
		for range 3 {
			select {
			case <-started:
			case <-time.After(10 * time.Second):
				t.Fatal("handlers did not start")
			}
		}
		begin := time.Now()
		stop()
		took := time.Since(begin)
		if took > 10*time.Second {
			t.Errorf("shutdown took %v with a 100ms shutdown timeout", took)
		}
		left := pending(t, b, "slow", keyNames)
		if len(left) != 30 {
			t.Fatalf("after shutdown %d of 30 items are back in Redis", len(left))
		}
		// Order within each key survives: unfinished items go back in front.
		for _, k := range keyNames {
			ids := pending(t, b, "slow", []string{k})
			for i := 1; i < len(ids); i++ {
				if ids[i] < ids[i-1] {
					t.Fatalf("key %s holds %v: out of append order", k, ids)
				}
			}
		}
	})
}

// Bad values in Redis and failing handlers never wedge a worker: each ends
// in dead letters with a reason while the other items are handled.
func TestBadItemsGoToDeadLetters(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		var mu sync.Mutex
		calls := make(map[int]int)
		record := func(id int) int {
			mu.Lock()
			defer mu.Unlock()
			calls[id]++
			return calls[id]
		}
		w := newWorker(t, b)
		batchq.Handle(w, "bad", func(ctx context.Context, it item) error {
			n := record(it.ID)
			switch it.ID {
			case 100:
				panic("boom")
			case 101:
				return batchq.NoRetry(errors.New("permanent"))
			case 102:
				if n == 1 {
					return batchq.RetryAfter(time.Millisecond, errors.New("later"))
				}
			}
			return nil
		}, batchq.WithMaxAttempts(3), batchq.WithBackoff(batchq.Constant(10*time.Millisecond)))
		runWorker(t, w)

		p := newProducer(t, b)
		sp := keys.For(b.Prefix, "bad", 0)
		c := b.Client
		// A key holding a string that is not an array, and one holding a hash.
		must(t, c.Do(ctx, c.B().Set().Key(sp.Items("notarray")).Value(`{"id":1}`).Build()).Error())
		must(t, c.Do(ctx, c.B().Hset().Key(sp.Items("hash")).FieldValue().FieldValue("f", "v").Build()).Error())
		must(t, c.Do(ctx, c.B().Zadd().Key(sp.Ready()).ScoreMember().ScoreMember(0, "notarray").ScoreMember(0, "hash").Build()).Error())
		// An item that does not decode into the handler's type, among good ones.
		must(t, p.Add(ctx, "bad", "mixed", item{ID: 1}, "not an object", item{ID: 2}))
		must(t, p.Add(ctx, "bad", "poison", item{ID: 100}, item{ID: 101}, item{ID: 102}, item{ID: 3}))

		cons := newDeadLetters(t, b)
		eventually(t, 20*time.Second, "5 dead letters and good items handled", func() bool {
			n, err := cons.Count(ctx, "bad")
			mu.Lock()
			defer mu.Unlock()
			return err == nil && n == 5 && calls[1] == 1 && calls[2] == 1 && calls[3] == 1 && calls[102] == 2
		})
		dead, err := cons.List(ctx, "bad", 10)
		must(t, err)
		byKey := make(map[string]deadletter.Letter)
		for _, d := range dead {
			k := d.Key
			if d.Key == "poison" {
				k += string(d.Item)
			}
			byKey[k] = d
		}
		check := func(k, wantErr string, wantAttempts int, corrupt bool) {
			t.Helper()
			d, ok := byKey[k]
			if !ok {
				t.Errorf("no dead letter for %s; have %v", k, dead)
				return
			}
			if !strings.Contains(d.Error, wantErr) || d.Attempts != wantAttempts || d.Corrupt != corrupt {
				t.Errorf("dead letter %s: error %q attempts %d corrupt %v; want error containing %q, %d attempts, corrupt %v",
					k, d.Error, d.Attempts, d.Corrupt, wantErr, wantAttempts, corrupt)
			}
		}
		check("notarray", "not a JSON array", 0, true)
		check("hash", "hash", 0, true)
		check("mixed", "does not decode", 1, false)
		check(`poison{"id":100}`, "panicked: boom", 3, false)
		check(`poison{"id":101}`, "permanent", 1, false)
		mu.Lock()
		defer mu.Unlock()
		if calls[100] != 3 || calls[101] != 1 {
			t.Errorf("panicking item ran %d times (want 3), NoRetry item %d times (want 1)", calls[100], calls[101])
		}
		if string(byKey["mixed"].Item) != `"not an object"` {
			t.Errorf("undecodable item stored as %s", byKey["mixed"].Item)
		}
	})
}

// I5: in a batch handler, only the items a BatchError names are run again.
func TestBatchHandlerRetriesOnlyFailedItems(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		var mu sync.Mutex
		calls := make(map[int]int)
		var batches [][]int
		w := newWorker(t, b)
		batchq.HandleBatch(w, "batch", func(ctx context.Context, key string, items []item) error {
			mu.Lock()
			defer mu.Unlock()
			info, _ := batchq.Info(ctx)
			if info.Key != key || key != "k" {
				t.Errorf("batch for key %q, info %+v", key, info)
			}
			failed := make(map[int]error)
			var ids []int
			for i, it := range items {
				calls[it.ID]++
				ids = append(ids, it.ID)
				if it.ID%3 == 0 && calls[it.ID] == 1 {
					failed[i] = errors.New("first try fails")
				}
			}
			batches = append(batches, ids)
			if len(failed) > 0 {
				return &batchq.BatchError{Failed: failed}
			}
			return nil
		}, batchq.WithBackoff(batchq.Constant(10*time.Millisecond)))
		p := newProducer(t, b)
		all := make([]any, 12)
		for i := range all {
			all[i] = item{ID: i}
		}
		must(t, p.Add(ctx, "batch", "k", all...)) // before Run: one batch of 12
		runWorker(t, w)
		eventually(t, 10*time.Second, "failed items retried", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return calls[0] == 2 && calls[3] == 2 && calls[6] == 2 && calls[9] == 2
		})
		time.Sleep(100 * time.Millisecond) // room for a wrong extra delivery
		mu.Lock()
		defer mu.Unlock()
		for id := range 12 {
			want := 1
			if id%3 == 0 {
				want = 2
			}
			if calls[id] != want {
				t.Errorf("item %d handled %d times, want %d (batches %v)", id, calls[id], want, batches)
			}
		}
		if len(batches[0]) != 12 {
			t.Errorf("first batch held %v, want all 12 items of the key", batches[0])
		}
	})
}

// A handler that ignores its context is abandoned after its timeout plus a
// grace period; its item fails with ErrHandlerTimeout, and the rest of its
// batch is handled all the same.
func TestHungHandlerIsAbandoned(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) { testHungHandler(t, b) })
}

func testHungHandler(t *testing.T, b testredis.Backend) {
	ctx := context.Background()
	release := make(chan struct{})
	returned := make(chan struct{})
	var mu sync.Mutex
	var handled []int
	w := newWorker(t, b, batchq.WithConcurrency(1))
	batchq.Handle(w, "hang", func(ctx context.Context, it item) error {
		if it.ID == 1 {
			defer close(returned)
			<-release // ignores ctx
		}
		mu.Lock()
		handled = append(handled, it.ID)
		mu.Unlock()
		return nil
	}, batchq.WithTimeout(50*time.Millisecond), batchq.WithMaxAttempts(1))
	// One batch of three items, the second of which hangs.
	must(t, newProducer(t, b).Add(ctx, "hang", "k", item{ID: 0}, item{ID: 1}, item{ID: 2}))
	runWorker(t, w)
	cons := newDeadLetters(t, b)
	eventually(t, 10*time.Second, "hung item dead-lettered", func() bool {
		n, _ := cons.Count(ctx, "hang")
		return n == 1
	})
	dead, err := cons.List(ctx, "hang", 1)
	must(t, err)
	if !strings.Contains(dead[0].Error, batchq.ErrHandlerTimeout.Error()) || string(dead[0].Item) != `{"id":1}` {
		t.Errorf("dead letter %s: %q", dead[0].Item, dead[0].Error)
	}
	eventually(t, 5*time.Second, "the rest of the batch handled", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return slices.Equal(handled, []int{0, 2})
	})
	// The worker, its one executor stuck, still handles new items.
	must(t, newProducer(t, b).Add(ctx, "hang", "k2", item{ID: 3}))
	eventually(t, 5*time.Second, "a later item handled", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return slices.Equal(handled, []int{0, 2, 3})
	})
	close(release)
	<-returned
	// The abandoned goroutine, back from the handler, must touch nothing:
	// no other item, no outcome, no lease.
	time.Sleep(200 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(handled, []int{0, 2, 3, 1}) {
		t.Errorf("handled %v: the abandoned call may return, but nothing else", handled)
	}
	if n, err := cons.Count(ctx, "hang"); err != nil || n != 1 {
		t.Errorf("%d dead letters (%v) after the abandoned call returned, want 1", n, err)
	}
	leases := keys.For(b.Prefix, "hang", 0).Leases()
	if n, err := b.Client.Do(ctx, b.Client.B().Zcard().Key(leases).Build()).AsInt64(); err != nil || n != 0 {
		t.Errorf("%d leases (%v) after the abandoned call returned, want none", n, err)
	}
}

func TestRegistrationMistakesPanic(t *testing.T) {
	b := testredis.Mini(t)
	w := newWorker(t, b)
	batchq.Handle(w, "q", func(context.Context, item) error { return nil })
	ok := func(context.Context, item) error { return nil }
	once := newWorker(t, b, batchq.WithAtMostOnce())
	for name, c := range map[string]struct {
		f    func()
		want string // the panic's value
	}{
		"duplicate":    {func() { batchq.Handle(w, "q", ok) }, "batchq: second handler for queue q"},
		"bad name":     {func() { batchq.Handle(w, "a:b", ok) }, `batchq: invalid queue name "a:b"`},
		"nil handler":  {func() { batchq.Handle[item](w, "r", nil) }, "batchq: nil handler for queue r"},
		"max attempts": {func() { batchq.Handle(w, "s", ok, batchq.WithMaxAttempts(0)) }, "batchq: queue s: max attempts must be at least 1, got 0"},
		"nil backoff":  {func() { batchq.Handle(w, "s", ok, batchq.WithBackoff(nil)) }, "batchq: queue s: nil backoff"},
		"timeout":      {func() { batchq.Handle(w, "s", ok, batchq.WithTimeout(-time.Second)) }, "batchq: queue s: negative timeout -1s"},
		"middleware":   {func() { batchq.Handle(w, "s", ok, batchq.WithMiddleware(nil)) }, "batchq: queue s: nil middleware"},
		"use nil":      {func() { w.Use(nil) }, "batchq: nil middleware"},
		"ordered at most once": {func() { batchq.Handle(once, "s", ok, batchq.WithOrderedKeys()) },
			"batchq: queue s: WithOrderedKeys needs leases, and the worker has WithAtMostOnce"},
	} {
		func() {
			defer func() {
				v := recover()
				if s, _ := v.(string); !strings.HasPrefix(s, c.want) {
					t.Errorf("%s: panicked with %v, want %q", name, v, c.want)
				}
			}()
			c.f()
		}()
	}
	for name, c := range map[string]struct {
		opt  batchq.Option
		want string
	}{
		"concurrency": {batchq.WithConcurrency(0), "batchq: concurrency must be at least 1, got 0"},
		"logger":      {batchq.WithLogger(nil), "batchq: nil logger"},
		"observer":    {batchq.WithObserver(nil), "batchq: nil observer"},
		"shutdown":    {batchq.WithShutdownTimeout(-time.Second), "batchq: negative shutdown timeout -1s"},
	} {
		if _, err := batchq.NewWorker(b.Client, c.opt); err == nil || err.Error() != c.want {
			t.Errorf("%s: NewWorker returned %v, want %q", name, err, c.want)
		}
	}
	if _, err := batchq.NewWorker(nil); err == nil || err.Error() != "batchq: nil client" {
		t.Errorf("NewWorker(nil) returned %v", err)
	}
	for _, name := range []string{"", "a:b", "a{b", "a\nb", "a\x1b[31m", "\xff", strings.Repeat("x", 129)} {
		if _, err := batchq.NewWorker(b.Client, batchq.WithName(name)); err == nil {
			t.Errorf("WithName(%q) accepted", name)
		} else if len(err.Error()) > 200 || !strings.HasPrefix(err.Error(), "batchq: ") || strings.Count(err.Error(), "batchq:") != 1 {
			t.Errorf("WithName's error: %q", err)
		}
	}
	empty := newWorker(t, b)
	if err := empty.Run(context.Background()); !errors.Is(err, batchq.ErrNoHandlers) {
		t.Errorf("Run without handlers: %v", err)
	}
}

func TestRegistrationAfterRunPanics(t *testing.T) {
	b := testredis.Mini(t)
	w := newWorker(t, b)
	batchq.Handle(w, "q", func(context.Context, item) error { return nil })
	runWorker(t, w)
	panics := func(f func()) (v any) {
		defer func() { v = recover() }()
		f()
		return nil
	}
	nop := func(next batchq.HandlerFunc) batchq.HandlerFunc { return next }
	// Run marks the worker running on its goroutine: Use succeeds (adding
	// a middleware that does nothing) until then.
	eventually(t, 5*time.Second, "Use to panic", func() bool { return panics(func() { w.Use(nop) }) != nil })
	if v := panics(func() { w.Use(nop) }); v != "batchq: Use called after Run" {
		t.Errorf("Use after Run panicked with %v", v)
	}
	if v := panics(func() { batchq.Handle(w, "r", func(context.Context, item) error { return nil }) }); v != "batchq: handler registered after Run" {
		t.Errorf("Handle after Run panicked with %v", v)
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
