package producer_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"go.uber.org/goleak"

	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// waitFor waits until cond holds, checking every millisecond, and fails the
// test after 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up after 10s waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// gathered waits until p's lingering producer holds n items not sent yet.
func gathered(t *testing.T, p *producer.Producer, n int) {
	t.Helper()
	waitFor(t, strconv.Itoa(n)+" items gathered", func() bool { g, _ := producer.Lingering(p); return g == n })
}

// storedInts returns the items of a queue's key (one shard) as ints.
func storedInts(t *testing.T, b testredis.Backend, queue, key string) []int {
	t.Helper()
	v, ok := get(t, b, queue, key)
	if !ok {
		return nil
	}
	var ns []int
	if err := json.Unmarshal([]byte(v), &ns); err != nil {
		t.Fatalf("%s/%s holds %s: %v", queue, key, v, err)
	}
	return ns
}

// Close sends what the lingering producer has gathered at once, without
// waiting for the linger's timer, and returns once it is stored and every
// caller has its outcome. After it, every way of adding fails at once with
// ErrClosed and stores nothing; Close again returns nil.
func TestCloseSendsWhatIsGathered(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithLinger(time.Second, 1000)) // a timer far longer than Close may take
		const callers, nkeys = 30, 10
		errs := make(chan error, callers)
		for c := range callers {
			go func() { errs <- p.Add(ctx, "q", "k"+strconv.Itoa(c%nkeys), c) }()
		}
		gathered(t, p, callers)
		start := time.Now()
		if err := p.Close(ctx); err != nil {
			t.Fatal(err)
		}
		if took := time.Since(start); took > 500*time.Millisecond {
			t.Fatalf("Close took %v: it waited for the linger's timer (1s)", took)
		}
		for range callers {
			select {
			case err := <-errs:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("a caller has no outcome 5s after Close returned")
			}
		}
		for k := range nkeys {
			got := storedInts(t, b, "q", "k"+strconv.Itoa(k))
			slices.Sort(got)
			if want := []int{k, k + nkeys, k + 2*nkeys}; !slices.Equal(got, want) {
				t.Fatalf("k%d holds %v, want %v", k, got, want)
			}
		}

		for how, add := range map[string]func() error{
			"Add":       func() error { return p.Add(ctx, "q", "k0", 99) },
			"AddRaw":    func() error { return p.AddRaw(ctx, "q", "k0", json.RawMessage(`99`)) },
			"Queue.Add": func() error { return producer.NewQueue[int](p, "q").Add(ctx, "k0", 99) },
		} {
			err := add()
			if !errors.Is(err, producer.ErrClosed) || err.Error() != "producer: append to q/k0: producer closed" {
				t.Errorf("%s after Close: %v, want ErrClosed", how, err)
			}
		}
		if got := storedInts(t, b, "q", "k0"); len(got) != 3 {
			t.Fatalf("appends after Close stored something: k0 holds %v", got)
		}
		if err := p.Close(canceled()); err != nil {
			t.Fatalf("Close again: %v", err)
		}
		if g, running := producer.Lingering(p); g != 0 || running != 0 {
			t.Fatalf("after Close: %d items gathered, %d goroutines and timers running", g, running)
		}
	})
}

// A producer without linger has nothing to send: Close returns nil at
// once, even with a context that has ended, and appends fail after it. It
// does not close the client.
func TestCloseWithoutLinger(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		if err := p.Add(ctx, "q", "k", 1); err != nil {
			t.Fatal(err)
		}
		if err := p.Close(canceled()); err != nil {
			t.Fatal(err)
		}
		if err := p.Add(ctx, "q", "k", 2); !errors.Is(err, producer.ErrClosed) {
			t.Fatalf("Add after Close: %v, want ErrClosed", err)
		}
		if err := p.Close(ctx); err != nil {
			t.Fatal(err)
		}
		if got := storedInts(t, b, "q", "k"); !slices.Equal(got, []int{1}) {
			t.Fatalf("k holds %v, want [1]", got)
		}
		// The client is the caller's, still open.
		if err := b.Client.Do(ctx, b.Client.B().Ping().Build()).Error(); err != nil {
			t.Fatalf("the client after Close: %v", err)
		}
	})
}

// Appenders keep appending while Close runs (and three Closes at once):
// each append is stored exactly once or refused with ErrClosed and not
// stored, nothing else, and no goroutine of the producer is left after
// Close. Run with -race, over each way of lingering.
func TestCloseDuringAppendsLeavesNoGoroutine(t *testing.T) {
	for _, wait := range []time.Duration{0, 2 * time.Millisecond, time.Second} {
		t.Run(wait.String(), func(t *testing.T) {
			testredis.Each(t, func(t *testing.T, b testredis.Backend) {
				testCloseDuringAppends(t, b, wait)
			})
		})
	}
}

// runningNow returns a goleak option that ignores the goroutines running
// now, once b's client has started those it keeps for its connections (and
// miniredis those it runs for them): a rueidis client spreads keys over
// several connections by hash slot, each connected at its first call and
// given its goroutines at its first call whose context can end but has no
// deadline. Whatever goroutine is left after that is the producer's.
func runningNow(t *testing.T, b testredis.Backend) goleak.Option {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for i := range 256 { // keys in enough slots to reach every connection
		k := b.Prefix + ":warm" + strconv.Itoa(i)
		if err := b.Client.Do(ctx, b.Client.B().Get().Key(k).Build()).Error(); err != nil && !rueidis.IsRedisNil(err) {
			t.Fatal(err)
		}
	}
	return goleak.IgnoreCurrent()
}

func testCloseDuringAppends(t *testing.T, b testredis.Backend, wait time.Duration) {
	ctx := context.Background()
	before := runningNow(t, b)

	p := newProducer(t, b, producer.WithLinger(wait, 16), producer.WithDefaultShards(2))
	const appenders, nkeys = 8, 5
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		stored   = make(map[int]bool) // ids whose Add returned nil
		refused  = make(map[int]bool) // ids whose Add returned ErrClosed
		appended atomic.Int64
	)
	for a := range appenders {
		wg.Go(func() {
			for i := 0; ; i++ {
				id := a*1_000_000 + i
				err := p.Add(ctx, "q", "k"+strconv.Itoa(id%nkeys), id)
				mu.Lock()
				switch {
				case err == nil:
					stored[id] = true
					appended.Add(1)
				case errors.Is(err, producer.ErrClosed):
					refused[id] = true
				default:
					t.Errorf("appender %d: %v", a, err)
				}
				mu.Unlock()
				if err != nil {
					return // every later call would be refused too
				}
			}
		})
	}
	if wait == time.Second {
		// The appenders' calls all wait for the timer: Close sends them.
		gathered(t, p, appenders)
	} else {
		waitFor(t, "100 appends", func() bool { return appended.Load() >= 100 })
	}
	closeErrs := make(chan error, 3)
	for range 3 {
		go func() { closeErrs <- p.Close(ctx) }()
	}
	for range 3 {
		if err := <-closeErrs; err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	if _, running := producer.Lingering(p); running != 0 {
		t.Fatalf("%d goroutines and timers of the producer running after Close", running)
	}
	wg.Wait()
	goleak.VerifyNone(t, before)

	seen := make(map[int]int)
	for k := range nkeys {
		v, ok := getSharded(t, b, "q", "k"+strconv.Itoa(k), 2)
		if !ok {
			continue
		}
		var ids []int
		if err := json.Unmarshal([]byte(v), &ids); err != nil {
			t.Fatalf("k%d holds %q: %v", k, v, err)
		}
		for _, id := range ids {
			seen[id]++
		}
	}
	for id := range stored {
		if seen[id] != 1 {
			t.Errorf("item %d, whose Add returned nil, stored %d times", id, seen[id])
		}
	}
	for id := range refused {
		if seen[id] != 0 {
			t.Errorf("item %d, refused with ErrClosed, stored %d times", id, seen[id])
		}
	}
	if len(seen) != len(stored) {
		t.Errorf("%d items stored, %d appends returned nil", len(seen), len(stored))
	}
	t.Logf("wait %v: %d appends stored, %d refused (one per appender)", wait, len(stored), len(refused))
}

// A Close whose context has ended already sends nothing: it returns the
// context's error, and every caller waiting for its items to be sent gets
// ErrClosed at once; none hangs, and none of their items is stored. Later
// Closes say the same.
func TestCloseWithEndedContext(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithLinger(time.Second, 1000))
		const callers = 20
		errs := make([]chan error, callers)
		for c := range callers {
			errs[c] = make(chan error, 1)
			go func() { errs[c] <- p.Add(ctx, "q", "k"+strconv.Itoa(c), c) }()
		}
		gathered(t, p, callers)
		err := p.Close(canceled())
		if !errors.Is(err, context.Canceled) || err.Error() != "producer: close: context canceled" {
			t.Fatalf("Close with a cancelled context: %v", err)
		}
		for c := range callers {
			var err error
			select {
			case err = <-errs[c]:
			case <-time.After(5 * time.Second):
				t.Fatalf("caller %d has no outcome 5s after Close returned", c)
			}
			want := "producer: append to q/k" + strconv.Itoa(c) + ": not sent: producer closed"
			if !errors.Is(err, producer.ErrClosed) || err.Error() != want {
				t.Errorf("caller %d: %v, want %q", c, err, want)
			}
			if got := storedInts(t, b, "q", "k"+strconv.Itoa(c)); got != nil {
				t.Errorf("caller %d: %v, but k%d holds %v", c, err, c, got)
			}
		}
		if err2 := p.Close(ctx); err2 == nil || err2.Error() != err.Error() {
			t.Fatalf("Close again: %v, want %v", err2, err)
		}
	})
}

// On a Redis that stopped answering, Close returns its context's error in
// time: the call on its way is cut short (its caller gets
// context.Canceled; the items may be stored once Redis answers again), the
// gatherings waiting behind it are not sent (ErrClosed, never stored), and
// no goroutine of the producer is left.
func TestCloseOnStuckRedis(t *testing.T) {
	srv := testredis.Start(t)
	b := srv.Backend(t)
	ctx := context.Background()
	before := runningNow(t, b)
	p := newProducer(t, b, producer.WithLinger(0, 1000))
	// Every 2s one caller reads the queue's shard count again, in its own
	// call: on the stuck Redis it would wait there, before it gathers.
	producer.SetShardsRefresh(p, time.Hour)
	if err := p.Add(ctx, "q", "warm", 0); err != nil { // the registry and the clock
		t.Fatal(err)
	}
	srv.Pause(t)
	paused := true
	defer func() {
		if paused {
			srv.Resume(t)
		}
	}()
	errs := make([]chan error, 10)
	add := func(c int) {
		errs[c] = make(chan error, 1)
		go func() { errs[c] <- p.Add(ctx, "q", "k"+strconv.Itoa(c), c) }()
	}
	add(0)
	waitFor(t, "the first call on its way", func() bool { g, running := producer.Lingering(p); return g == 0 && running == 1 })
	for c := 1; c < len(errs); c++ {
		add(c)
	}
	gathered(t, p, len(errs)-1)

	cctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := p.Close(cctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close on a stuck Redis: %v, want the deadline", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("Close took %v with a 200ms deadline", took)
	}
	for c := range errs {
		var err error
		select {
		case err = <-errs[c]:
		case <-time.After(5 * time.Second):
			t.Fatalf("caller %d has no outcome 5s after Close returned", c)
		}
		if c == 0 && (!errors.Is(err, context.Canceled) || errors.Is(err, producer.ErrClosed)) {
			t.Errorf("the call on its way: %v, want context.Canceled", err)
		}
		if c > 0 && !errors.Is(err, producer.ErrClosed) {
			t.Errorf("caller %d, behind it: %v, want ErrClosed", c, err)
		}
		t.Logf("caller %d: %v", c, err)
	}
	if _, running := producer.Lingering(p); running != 0 {
		t.Fatalf("%d goroutines and timers of the producer running after Close", running)
	}
	srv.Resume(t) // the client's goroutine waiting for the cut call's reply ends
	paused = false
	goleak.VerifyNone(t, before)
	for c := 1; c < len(errs); c++ {
		if got := storedInts(t, b, "q", "k"+strconv.Itoa(c)); got != nil {
			t.Errorf("k%d, refused with ErrClosed, holds %v", c, got)
		}
	}
	t.Logf("k0, cut short, holds %v", storedInts(t, b, "q", "k0"))
}
