package batchqtest_test

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/batchqtest"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

func TestMain(m *testing.M) {
	// A client closed after a failed connection leaves rueidis' delayed
	// topology refresh running for up to half a second.
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*call).DelayDo.func1"))
}

// slow bounds how long one RunUntilIdle of these tests may take: a retry
// is claimed up to a second after it is due.
const slow = 4 * time.Second

func newProducer(t *testing.T, b testredis.Backend, opts ...producer.Option) *producer.Producer {
	t.Helper()
	p, err := producer.New(b.Client, append([]producer.Option{producer.WithPrefix(b.Prefix)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func newWorker(t *testing.T, b testredis.Backend, opts ...batchq.Option) *batchq.Worker {
	t.Helper()
	opts = append([]batchq.Option{batchq.WithPrefix(b.Prefix), batchq.WithLogger(zaptest.NewLogger(t))}, opts...)
	w, err := batchq.NewWorker(b.Client, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// runUntilIdle runs RunUntilIdle with a timeout, checks that it returned
// within slow, and logs how long it took and what it returned.
func runUntilIdle(t *testing.T, w *batchq.Worker, opts ...batchqtest.Option) (batchqtest.Result, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	start := time.Now()
	res, err := batchqtest.RunUntilIdle(ctx, w, opts...)
	took := time.Since(start)
	t.Logf("RunUntilIdle took %v: %+v, %v", took.Round(time.Millisecond), res.State, err)
	if took > slow {
		t.Errorf("RunUntilIdle took %v", took)
	}
	return res, err
}

// noWorkerGoroutines fails the test if a goroutine runs code of the batchq
// package (a worker's loops, executors or handlers). Only a test that runs
// alone may call it: the other tests of the package run in parallel.
func noWorkerGoroutines(t *testing.T) {
	t.Helper()
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if strings.Contains(g, "github.com/batchq/batchq.") {
			t.Errorf("a goroutine of the worker outlived RunUntilIdle:\n%s", g)
		}
	}
}

// recorder records the items its handlers get, safe for concurrent use.
type recorder struct {
	mu   sync.Mutex
	seen map[string]int
}

func (r *recorder) add(s string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.seen == nil {
		r.seen = make(map[string]int)
	}
	r.seen[s]++
	return r.seen[s]
}

func (r *recorder) count(s string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.seen[s]
}

func (r *recorder) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.seen)
}

// Every item appended before the run is handled once before RunUntilIdle
// returns: several queues, shards, keys, per-item and batch handlers.
func TestEverythingIsHandledBeforeItReturns(t *testing.T) {
	t.Parallel()
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := t.Context()
		p := newProducer(t, b, producer.WithDefaultShards(4))
		const keysN, perKey = 50, 4
		for k := range keysN {
			for i := range perKey {
				item := fmt.Sprintf("k%d-%d", k, i)
				if err := p.Add(ctx, "single", fmt.Sprintf("k%d", k), item); err != nil {
					t.Fatal(err)
				}
				if err := p.Add(ctx, "batch", fmt.Sprintf("k%d", k), item); err != nil {
					t.Fatal(err)
				}
			}
		}
		w := newWorker(t, b, batchq.WithDefaultShards(4), batchq.WithConcurrency(4))
		var single, batch recorder
		batchq.Handle(w, "single", func(ctx context.Context, s string) error {
			single.add(s)
			return nil
		})
		batchq.HandleBatch(w, "batch", func(ctx context.Context, key string, items []string) error {
			for _, s := range items {
				batch.add(s)
			}
			return nil
		})
		res, err := runUntilIdle(t, w)
		if err != nil {
			t.Fatal(err)
		}
		for k := range keysN {
			for i := range perKey {
				item := fmt.Sprintf("k%d-%d", k, i)
				if single.count(item) != 1 || batch.count(item) != 1 {
					t.Fatalf("%s handled %d and %d times", item, single.count(item), batch.count(item))
				}
			}
		}
		if res.State != (batchqtest.State{}) || len(res.Queues) != 2 || res.Queues["single"] != (batchqtest.State{}) {
			t.Errorf("result %+v", res)
		}
	})
}

// On Redis Cluster each shard is its own hash slot, and RunUntilIdle reads
// them all in one round trip all the same.
func TestCluster(t *testing.T) {
	t.Parallel()
	b := testredis.Cluster(t)
	p := newProducer(t, b, producer.WithDefaultShards(8))
	for k := range 40 {
		if err := p.Add(t.Context(), "q", fmt.Sprint("k", k), k); err != nil {
			t.Fatal(err)
		}
	}
	w := newWorker(t, b, batchq.WithDefaultShards(8))
	var seen recorder
	batchq.Handle(w, "q", func(ctx context.Context, n int) error {
		seen.add(fmt.Sprint(n))
		if n < 40 {
			return p.Add(ctx, "q", fmt.Sprint("again", n), n+40)
		}
		return nil
	})
	res, err := runUntilIdle(t, w)
	if err != nil {
		t.Fatal(err)
	}
	if seen.len() != 80 || res.State != (batchqtest.State{}) {
		t.Fatalf("handled %d items of 80; result %+v", seen.len(), res)
	}
}

// Items that handlers append while the worker runs, to their own queue
// and key, or to another queue, are handled before RunUntilIdle returns:
// a chain of appends, each made by the handler of the item before.
func TestItemsAddedByHandlersAreHandled(t *testing.T) {
	t.Parallel()
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := t.Context()
		p := newProducer(t, b, producer.WithDefaultShards(2))
		const hops = 30
		var seen recorder
		w := newWorker(t, b, batchq.WithDefaultShards(2))
		for _, q := range []string{"ping", "pong"} {
			batchq.Handle(w, q, func(ctx context.Context, n int) error {
				seen.add(fmt.Sprintf("%s-%d", q, n))
				if n == hops {
					return nil
				}
				// Alternately to the other queue, and to the same key of
				// this one, whose batch is leased right now.
				next, key := q, "same"
				if n%2 == 0 {
					next = map[string]string{"ping": "pong", "pong": "ping"}[q]
					key = fmt.Sprintf("key%d", n)
				}
				return p.Add(ctx, next, key, n+1)
			})
		}
		if err := p.Add(ctx, "ping", "same", 0); err != nil {
			t.Fatal(err)
		}
		if _, err := runUntilIdle(t, w); err != nil {
			t.Fatal(err)
		}
		if seen.len() != hops+1 {
			t.Fatalf("handled %d items of the chain, want %d: %v", seen.len(), hops+1, seen.seen)
		}
	})
}

// A key a flush policy holds back is pending: RunUntilIdle waits until it
// falls due and is handled.
func TestScheduledKeysAreWaitedFor(t *testing.T) {
	t.Parallel()
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b, producer.WithFlushPolicy("q", producer.FlushPolicy{MaxAge: 300 * time.Millisecond}))
		if err := p.Add(t.Context(), "q", "k", 1); err != nil {
			t.Fatal(err)
		}
		w := newWorker(t, b)
		var seen recorder
		batchq.Handle(w, "q", func(ctx context.Context, n int) error {
			seen.add("k")
			return nil
		})
		if _, err := runUntilIdle(t, w); err != nil {
			t.Fatal(err)
		}
		if seen.count("k") != 1 {
			t.Fatalf("handled %d times", seen.count("k"))
		}
	})
}

// A retry due later does not keep RunUntilIdle running, unless it is due
// within WithRetriesWithin's horizon; either way the Result counts what is
// left.
func TestRetries(t *testing.T) {
	t.Parallel()
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		for _, c := range []struct {
			name         string
			backoff      time.Duration
			opts         []batchqtest.Option
			wantAttempts int
			wantRetries  int64
		}{
			// Not 10ms: a retry that falls due while RunUntilIdle confirms
			// that the queues are idle is waited for as well.
			{"not waited for by default", 300 * time.Millisecond, nil, 1, 1},
			{"waited for within the horizon", 10 * time.Millisecond, []batchqtest.Option{batchqtest.WithRetriesWithin(time.Second)}, 2, 0},
			{"not waited for past the horizon", time.Hour, []batchqtest.Option{batchqtest.WithRetriesWithin(time.Second)}, 1, 1},
		} {
			t.Run(c.name, func(t *testing.T) {
				b := b
				b.Prefix += strings.ReplaceAll(c.name, " ", "_")
				p := newProducer(t, b)
				if err := p.Add(t.Context(), "q", "k", 1); err != nil {
					t.Fatal(err)
				}
				w := newWorker(t, b)
				var seen recorder
				batchq.Handle(w, "q", func(ctx context.Context, n int) error {
					if seen.add("k") == 1 {
						return errors.New("first attempt fails")
					}
					return nil
				}, batchq.WithBackoff(batchq.Constant(c.backoff)))
				start := time.Now()
				res, err := runUntilIdle(t, w, c.opts...)
				if err != nil {
					t.Fatal(err)
				}
				if seen.count("k") != c.wantAttempts || res.Retries != c.wantRetries || res.Queues["q"].Retries != c.wantRetries {
					t.Fatalf("%d attempts, result %+v; want %d attempts, %d retries", seen.count("k"), res, c.wantAttempts, c.wantRetries)
				}
				if c.wantRetries > 0 && (res.NextRetry.Before(start) || res.NextRetry.After(time.Now().Add(c.backoff+time.Second))) {
					t.Errorf("next retry at %v, want about %v after %v", res.NextRetry, c.backoff, start)
				}
				if c.wantRetries == 0 && !res.NextRetry.IsZero() {
					t.Errorf("next retry at %v, want none", res.NextRetry)
				}
			})
		}
	})
}

// Dead letters are counted in the Result, by queue and in all.
func TestDeadLettersAreReported(t *testing.T) {
	t.Parallel()
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		for _, q := range []string{"ok", "bad"} {
			if err := p.Add(t.Context(), q, "k", 1, 2, 3); err != nil {
				t.Fatal(err)
			}
		}
		w := newWorker(t, b)
		batchq.Handle(w, "ok", func(ctx context.Context, n int) error { return nil })
		batchq.Handle(w, "bad", func(ctx context.Context, n int) error {
			if n == 2 {
				return batchq.NoRetry(errors.New("bad item"))
			}
			return nil
		})
		res, err := runUntilIdle(t, w)
		if err != nil {
			t.Fatal(err)
		}
		if res.DeadLetters != 1 || res.Queues["bad"].DeadLetters != 1 || res.Queues["ok"].DeadLetters != 0 {
			t.Fatalf("result %+v", res)
		}
	})
}

// When ctx ends first, RunUntilIdle stops the worker and returns an error
// that wraps ctx's and says what was left, promptly: a key held back for an
// hour, or a handler that waits for its context.
func TestContextEndsFirst(t *testing.T) {
	t.Parallel()
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		t.Run("key held back", func(t *testing.T) {
			p := newProducer(t, b, producer.WithFlushPolicy("later", producer.FlushPolicy{MaxAge: time.Hour}))
			if err := p.Add(t.Context(), "later", "k", 1); err != nil {
				t.Fatal(err)
			}
			w := newWorker(t, b)
			batchq.Handle(w, "later", func(ctx context.Context, n int) error { return nil })
			ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
			defer cancel()
			start := time.Now()
			res, err := batchqtest.RunUntilIdle(ctx, w)
			t.Logf("after %v: %v", time.Since(start).Round(time.Millisecond), err)
			if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), `they hold queue "later": 1 key pending`) {
				t.Fatalf("got %v, want DeadlineExceeded naming the pending key", err)
			}
			if res.PendingKeys != 1 || time.Since(start) > slow {
				t.Fatalf("result %+v after %v", res, time.Since(start))
			}
		})
		t.Run("handler waits for its context", func(t *testing.T) {
			b := b
			b.Prefix += "_blocked"
			p := newProducer(t, b)
			if err := p.Add(t.Context(), "q", "k", 1); err != nil {
				t.Fatal(err)
			}
			w := newWorker(t, b, batchq.WithShutdownTimeout(10*time.Millisecond))
			started := make(chan struct{})
			batchq.Handle(w, "q", func(ctx context.Context, n int) error {
				close(started)
				<-ctx.Done()
				return ctx.Err()
			})
			ctx, cancel := context.WithCancel(t.Context())
			go func() {
				<-started
				cancel()
			}()
			start := time.Now()
			res, err := batchqtest.RunUntilIdle(ctx, w)
			if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), `they hold queue "q": 1 key pending`) {
				t.Fatalf("got %v, want Canceled naming the key put back", err)
			}
			// Shutdown put the item back in its key.
			if res.PendingKeys != 1 || res.InFlight != 0 || time.Since(start) > slow {
				t.Fatalf("result %+v after %v", res, time.Since(start))
			}
		})
	})
}

// Run's own errors come back as they are (a second package name in front
// would say nothing more); a bad option is an error of its own.
func TestRunErrors(t *testing.T) {
	t.Parallel()
	b := testredis.Mini(t)
	w := newWorker(t, b)
	if _, err := batchqtest.RunUntilIdle(t.Context(), w); err != batchq.ErrNoHandlers {
		t.Fatalf("no handlers: got %v", err)
	}
	w = newWorker(t, b)
	batchq.Handle(w, "q", func(ctx context.Context, n int) error { return nil })
	if _, err := runUntilIdle(t, w); err != nil {
		t.Fatal(err)
	}
	if _, err := batchqtest.RunUntilIdle(t.Context(), w); err == nil || !strings.Contains(err.Error(), "Run called twice") {
		t.Fatalf("second run: got %v", err)
	}
	for _, tt := range []struct {
		o    batchqtest.Option
		want string
	}{
		{batchqtest.WithRetriesWithin(-time.Second), "batchqtest: negative retry horizon -1s"},
		{batchqtest.WithPollInterval(0), "batchqtest: poll interval must be positive, got 0s"},
	} {
		fresh := newWorker(t, b)
		batchq.Handle(fresh, "q", func(ctx context.Context, n int) error { return nil })
		if _, err := batchqtest.RunUntilIdle(t.Context(), fresh, tt.o); err == nil || err.Error() != tt.want {
			t.Errorf("a bad option: got %v, want the option's own error %q", err, tt.want)
		}
	}
}

// Redis gives a test a working Redis of its own.
func TestRedis(t *testing.T) {
	t.Parallel()
	rdb := batchqtest.Redis(t)
	p, err := producer.New(rdb)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Add(t.Context(), "q", "k", "x"); err != nil {
		t.Fatal(err)
	}
	w, err := batchq.NewWorker(rdb)
	if err != nil {
		t.Fatal(err)
	}
	var seen recorder
	batchq.Handle(w, "q", func(ctx context.Context, s string) error {
		seen.add(s)
		return nil
	})
	if _, err := runUntilIdle(t, w); err != nil {
		t.Fatal(err)
	}
	if seen.count("x") != 1 {
		t.Fatal("not handled")
	}
}

// A key that producers now refuse (a newline in it), stored by an earlier
// version, is drained like any other; its dead letter goes back to it with
// Requeue, Peek reads it, and a worker handles it again.
func TestKeysStoredBeforeCheckKeyStillWork(t *testing.T) {
	t.Parallel()
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := t.Context()
		const key = "user:42\nlevel=error"
		if producer.CheckKey(key) == nil {
			t.Fatal("producers take the key: nothing to test")
		}
		// As an earlier producer stored it: an array and its count (one
		// item of two bytes), the key due and on the wake list.
		sp := keys.For(b.Prefix, "q", 0)
		for _, cmd := range [][]string{
			{"SET", sp.Items(key), "[1]"},
			{"SET", sp.Count(key), fmt.Sprint(1<<30 + 2)},
			{"ZADD", sp.Ready(), "0", key},
			{"RPUSH", sp.Wake(), key},
		} {
			if err := b.Client.Do(ctx, b.Client.B().Arbitrary(cmd...).Build()).Error(); err != nil {
				t.Fatal(err)
			}
		}
		w := newWorker(t, b)
		batchq.Handle(w, "q", func(ctx context.Context, n int) error {
			return batchq.NoRetry(errors.New("fails for good"))
		})
		res, err := runUntilIdle(t, w)
		if err != nil {
			t.Fatal(err)
		}
		letters, err := w.DeadLetters().List(ctx, "q", 10)
		if err != nil || res.DeadLetters != 1 || len(letters) != 1 || letters[0].Key != key {
			t.Fatalf("dead letters %+v, %v; result %+v", letters, err, res)
		}
		if n, err := w.DeadLetters().Requeue(ctx, letters...); n != 1 || err != nil {
			t.Fatalf("requeued %d: %v", n, err)
		}
		in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
		if err != nil {
			t.Fatal(err)
		}
		if pk, err := in.Peek(ctx, "q", key); err != nil || string(pk.Array) != "[1]" {
			t.Fatalf("peek: %s, %v", pk.Array, err)
		}
		w = newWorker(t, b)
		var seen recorder
		batchq.Handle(w, "q", func(ctx context.Context, n int) error {
			info, _ := batchq.Info(ctx)
			seen.add(info.Key)
			return nil
		})
		if res, err := runUntilIdle(t, w); err != nil || res.DeadLetters != 0 {
			t.Fatalf("result %+v, %v", res, err)
		}
		if seen.count(key) != 1 {
			t.Fatalf("handled %v", seen.seen)
		}
	})
}

// No goroutine of the worker outlives RunUntilIdle, however it ends: idle,
// ctx ended (with a handler blocked on its context), or Run failed.
func TestNoGoroutineOutlivesIt(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		if err := p.Add(t.Context(), "q", "k", 1, 2); err != nil {
			t.Fatal(err)
		}
		w := newWorker(t, b)
		batchq.Handle(w, "q", func(ctx context.Context, n int) error { return nil })
		if _, err := runUntilIdle(t, w); err != nil {
			t.Fatal(err)
		}
		noWorkerGoroutines(t)

		if err := p.Add(t.Context(), "q", "k", 3); err != nil {
			t.Fatal(err)
		}
		w = newWorker(t, b, batchq.WithShutdownTimeout(0))
		batchq.Handle(w, "q", func(ctx context.Context, n int) error {
			<-ctx.Done()
			return ctx.Err()
		})
		ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
		defer cancel()
		if _, err := batchqtest.RunUntilIdle(ctx, w); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v", err)
		}
		noWorkerGoroutines(t)

		if _, err := batchqtest.RunUntilIdle(t.Context(), newWorker(t, b)); !errors.Is(err, batchq.ErrNoHandlers) {
			t.Fatalf("got %v", err)
		}
		noWorkerGoroutines(t)
	})
}

// On a queue with ordered keys, a failed item holds its key, and the items
// appended behind it wait with it: RunUntilIdle reports the retry, and does
// not wait for the held key, which moves only when the retry is due.
func TestHeldKeysAreNotWaitedFor(t *testing.T) {
	t.Parallel()
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		w := newWorker(t, b)
		var seen recorder
		var once sync.Once
		batchq.Handle(w, "q", func(ctx context.Context, n int) error {
			seen.add(fmt.Sprint(n))
			if n != 1 {
				return nil
			}
			// While item 1 fails, item 2 comes behind it, and a worker
			// finds its key held.
			once.Do(func() {
				if err := p.Add(ctx, "q", "k", 2); err != nil {
					t.Error(err)
				}
			})
			return errors.New("item 1 fails")
		}, batchq.WithOrderedKeys(), batchq.WithBackoff(batchq.Constant(time.Hour)))
		if err := p.Add(t.Context(), "q", "k", 1); err != nil {
			t.Fatal(err)
		}
		res, err := runUntilIdle(t, w)
		if err != nil {
			t.Fatal(err)
		}
		if seen.count("1") != 1 || seen.count("2") != 0 || res.Retries != 1 {
			t.Fatalf("handled 1 %d and 2 %d times, result %+v; want item 1 once, a retry holding the key, and item 2 waiting",
				seen.count("1"), seen.count("2"), res)
		}
	})
}
