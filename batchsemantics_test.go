package batchq_test

// The tests of the batch semantics the README states under "Batch handlers:
// what a batch is", one test per statement that no other test proves. The
// others are proved by TestBatchHandlerRetriesOnlyFailedItems (a
// BatchError fails only the items it names) and
// TestShutdownTimeoutReturnsUnfinishedItems (a shutdown puts unhandled
// items back in front of their key).

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/testredis"
)

// A BatchError's indexes refer to the slice the handler got: an item that
// does not decode is left out of it (it goes to dead letters on its own),
// so the indexes after it are shifted from the key's array.
func TestSemanticsBatchErrorIndexesTheDecodedSlice(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		var mu sync.Mutex
		var got [][]int
		w := newWorker(t, b)
		batchq.HandleBatch(w, "decoded", func(ctx context.Context, key string, items []item) error {
			mu.Lock()
			defer mu.Unlock()
			var ids []int
			for _, it := range items {
				ids = append(ids, it.ID)
			}
			got = append(got, ids)
			if len(got) > 1 {
				return nil
			}
			return &batchq.BatchError{Failed: map[int]error{1: batchq.NoRetry(errors.New("index 1 of items"))}}
		})
		// Before Run: the key is drained whole, as one batch of four.
		must(t, newProducer(t, b).Add(ctx, "decoded", "k", item{ID: 1}, "not an object", item{ID: 2}, item{ID: 3}))
		stop := runWorker(t, w)
		eventually(t, 10*time.Second, "the handler called", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(got) > 0
		})
		stop() // Run returns once the batch is settled

		letters, err := newDeadLetters(t, b).List(ctx, "decoded", 10)
		must(t, err)
		errByItem := make(map[string]string)
		for _, l := range letters {
			errByItem[string(l.Item)] = l.Error
		}
		t.Logf("handler calls %v; dead letters (item: error) %q", got, errByItem)
		if len(letters) != 2 {
			t.Errorf("%d dead letters, want 2: the undecodable item and item 2", len(letters))
		}
		if e := errByItem[`{"id":2}`]; e != "index 1 of items" {
			t.Errorf(`dead letter of {"id":2}: error %q, want "index 1 of items" (dead letters: %v)`, e, errByItem)
		}
		if e := errByItem[`"not an object"`]; !strings.Contains(e, "does not decode") {
			t.Errorf("dead letter of the undecodable item: error %q, want a decode error", e)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(got) != 1 || !slices.Equal(got[0], []int{1, 2, 3}) {
			t.Errorf("handler calls %v, want one call with the three items that decode, [1 2 3]", got)
		}
	})
}

// NoRetry and RetryAfter inside a BatchError's Failed apply to their item
// alone: the NoRetry item goes to dead letters at once, the RetryAfter item
// waits its own delay, and a plain error gets the queue's backoff.
func TestSemanticsPerItemNoRetryAndRetryAfterInBatchError(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		var mu sync.Mutex
		calls := make(map[int]int)
		w := newWorker(t, b)
		batchq.HandleBatch(w, "peritem", func(ctx context.Context, key string, items []item) error {
			mu.Lock()
			defer mu.Unlock()
			failed := make(map[int]error)
			for i, it := range items {
				calls[it.ID]++
				if calls[it.ID] > 1 {
					continue
				}
				switch it.ID {
				case 0:
					failed[i] = batchq.NoRetry(errors.New("no retry"))
				case 1:
					failed[i] = batchq.RetryAfter(time.Hour, errors.New("retry in an hour"))
				case 2:
					failed[i] = errors.New("plain")
				}
			}
			if len(failed) == 0 {
				return nil
			}
			return &batchq.BatchError{Failed: failed}
		}, batchq.WithBackoff(batchq.Constant(time.Millisecond)))
		must(t, newProducer(t, b).Add(ctx, "peritem", "k", item{ID: 0}, item{ID: 1}, item{ID: 2}, item{ID: 3}))
		start := time.Now()
		runWorker(t, w)

		dl := newDeadLetters(t, b)
		eventually(t, 10*time.Second, "item 2 retried, item 0 dead and item 1 waiting", func() bool {
			mu.Lock()
			retried := calls[2] == 2
			mu.Unlock()
			n, err := dl.Count(ctx, "peritem")
			return retried && err == nil && n == 1 && len(retries(t, b, "peritem")) == 1
		})
		time.Sleep(50 * time.Millisecond) // room for a wrong extra delivery
		letters, err := dl.List(ctx, "peritem", 10)
		must(t, err)
		if len(letters) != 1 || string(letters[0].Item) != `{"id":0}` || letters[0].Attempts != 1 || letters[0].Error != "no retry" {
			t.Errorf("dead letters %+v, want item 0 alone, after 1 attempt, with error %q", letters, "no retry")
		}
		rs := retries(t, b, "peritem")
		if len(rs) != 1 {
			t.Fatalf("retries %+v, want item 1 alone", rs)
		}
		r := rs[0]
		wait := time.UnixMilli(r.due).Sub(start)
		t.Logf("item 1 is due again in %v, with %d attempt(s) counted; calls per item %v", wait.Round(time.Second), r.env.Attempts, calls)
		if string(r.env.Item) != `{"id":1}` || r.env.Attempts != 1 || wait < 59*time.Minute || wait > 61*time.Minute {
			t.Errorf("retry %s with %d attempts due in %v, want item 1 with 1 attempt due in an hour", r.env.Item, r.env.Attempts, wait)
		}
		mu.Lock()
		defer mu.Unlock()
		if want := map[int]int{0: 1, 1: 1, 2: 2, 3: 1}; !maps.Equal(calls, want) {
			t.Errorf("calls per item %v, want %v", calls, want)
		}
	})
}

// Retries come back as one batch that may hold the items of several keys;
// a batch handler gets one call per key, with the key's items together, and
// batchq.Info gives the highest attempt among them. Each item still counts
// its own attempts: when the call fails, the item at its last attempt goes
// to dead letters and the other is retried.
func TestSemanticsRetriesComeGroupedPerKeyWithTheHighestAttempt(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		type call struct {
			key     string
			ids     []int
			attempt int
		}
		var mu sync.Mutex
		var calls []call
		var regrouped bool // set once the retries were made due together
		later := func(err string) error { return batchq.RetryAfter(time.Hour, errors.New(err)) }
		obs := &fetchRecorder{}
		w := newWorker(t, b, batchq.WithObserver(obs))
		batchq.HandleBatch(w, "grouped", func(ctx context.Context, key string, items []item) error {
			info, _ := batchq.Info(ctx)
			c := call{key: key, attempt: info.Attempt}
			for _, it := range items {
				c.ids = append(c.ids, it.ID)
			}
			slices.Sort(c.ids)
			mu.Lock()
			defer mu.Unlock()
			calls = append(calls, c)
			switch {
			case regrouped && key == "k": // item 1 at its third attempt, item 2 at its second
				return later("fails once more")
			case regrouped:
				return nil
			case key == "k" && info.Attempt == 0: // items 1 and 2: 1 comes back at once, 2 in an hour
				return &batchq.BatchError{Failed: map[int]error{0: batchq.RetryAfter(time.Millisecond, errors.New("1 fails")), 1: later("2 fails")}}
			default: // item 1 at its second attempt, and item 3 of key j
				return later("fails again")
			}
		}, batchq.WithMaxAttempts(3))
		p := newProducer(t, b)
		must(t, p.Add(ctx, "grouped", "k", item{ID: 1}, item{ID: 2}))
		must(t, p.Add(ctx, "grouped", "j", item{ID: 3}))
		runWorker(t, w)

		// Item 1 has failed twice, items 2 and 3 once: all three wait an hour.
		eventually(t, 10*time.Second, "three retries, item 1 at its second attempt", func() bool {
			mu.Lock()
			second := slices.ContainsFunc(calls, func(c call) bool { return c.attempt == 1 })
			mu.Unlock()
			return second && len(retries(t, b, "grouped")) == 3
		})
		// Make them due now, all at once (one ZADD): the next claim takes
		// them in one batch.
		sp := keys.For(b.Prefix, "grouped", 0)
		due := b.Client.B().Zadd().Key(sp.Retry()).Xx().ScoreMember()
		for _, r := range retries(t, b, "grouped") {
			due = due.ScoreMember(float64(time.Now().Add(-time.Second).UnixMilli()), r.id)
		}
		mu.Lock()
		regrouped = true
		before := len(calls)
		mu.Unlock()
		must(t, b.Client.Do(ctx, due.Build()).Error())
		eventually(t, 10*time.Second, "the retries handled", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(calls) == before+2
		})

		mu.Lock()
		defer mu.Unlock()
		t.Logf("handler calls (key, items, attempt): %v; batches fetched (items, retry): %v", calls, obs.fetched())
		got := calls[before:]
		slices.SortFunc(got, func(a, b call) int { return strings.Compare(a.key, b.key) })
		want := []call{{key: "j", ids: []int{3}, attempt: 1}, {key: "k", ids: []int{1, 2}, attempt: 2}}
		for i := range want {
			if got[i].key != want[i].key || !slices.Equal(got[i].ids, want[i].ids) || got[i].attempt != want[i].attempt {
				t.Errorf("retry calls %v, want %v", got, want)
				break
			}
		}
		if f := obs.fetched(); len(f) == 0 || f[len(f)-1] != (fetched{items: 3, retry: true}) {
			t.Errorf("batches fetched %v, want the last a batch of 3 retries", f)
		}

		// The failed call of key k: item 1 has used its 3 attempts, item 2
		// has one left.
		dl := newDeadLetters(t, b)
		eventually(t, 10*time.Second, "item 1 dead and item 2 waiting", func() bool {
			n, err := dl.Count(ctx, "grouped")
			return err == nil && n == 1 && len(retries(t, b, "grouped")) == 1
		})
		letters, err := dl.List(ctx, "grouped", 10)
		must(t, err)
		if len(letters) != 1 || string(letters[0].Item) != `{"id":1}` || letters[0].Attempts != 3 {
			t.Errorf("dead letters %+v, want item 1 after 3 attempts", letters)
		}
		if rs := retries(t, b, "grouped"); len(rs) != 1 || string(rs[0].env.Item) != `{"id":2}` || rs[0].env.Attempts != 2 {
			t.Errorf("retries %+v, want item 2 with 2 attempts", rs)
		}
	})
}

// An item whose handler the shutdown timeout cancels was not handled: it
// uses up no attempt. Fresh items go back in front of their key, retries
// back to the retry index with their attempts unchanged; so with
// WithMaxAttempts(2) neither ends in dead letters, and the next worker sees
// the same attempt numbers.
func TestSemanticsShutdownCancellationUsesNoAttempt(t *testing.T) {
	for _, kind := range []string{"Handle", "HandleBatch"} {
		t.Run(kind, func(t *testing.T) {
			testredis.Each(t, func(t *testing.T, b testredis.Backend) {
				testShutdownUsesNoAttempt(t, b, kind)
			})
		})
	}
}

func testShutdownUsesNoAttempt(t *testing.T, b testredis.Backend, kind string) {
	ctx := context.Background()
	// register registers fn, called with each item's key and attempt.
	register := func(w *batchq.Worker, fn func(ctx context.Context, key string, attempt int) error) {
		opts := []batchq.QueueOption{batchq.WithMaxAttempts(2), batchq.WithBackoff(batchq.Constant(time.Millisecond))}
		if kind == "Handle" {
			batchq.Handle(w, "cut", func(ctx context.Context, it item) error {
				info, _ := batchq.Info(ctx)
				return fn(ctx, info.Key, info.Attempt)
			}, opts...)
			return
		}
		batchq.HandleBatch(w, "cut", func(ctx context.Context, key string, items []item) error {
			info, _ := batchq.Info(ctx)
			return fn(ctx, key, info.Attempt)
		}, opts...)
	}

	// The first worker: key "fresh" blocks at its first attempt, key
	// "retried" fails once and blocks at its second; both until the
	// shutdown timeout cancels them.
	blocked := make(chan string, 2)
	w1 := newWorker(t, b, batchq.WithShutdownTimeout(100*time.Millisecond), batchq.WithLeaseTTL(time.Minute))
	register(w1, func(ctx context.Context, key string, attempt int) error {
		if key == "retried" && attempt == 0 {
			return errors.New("first attempt fails")
		}
		blocked <- key
		<-ctx.Done()
		return ctx.Err()
	})
	p := newProducer(t, b)
	must(t, p.Add(ctx, "cut", "fresh", item{ID: 1}))
	must(t, p.Add(ctx, "cut", "retried", item{ID: 2}))
	stop := runWorker(t, w1)
	for range 2 {
		select {
		case <-blocked:
		case <-time.After(10 * time.Second):
			t.Fatal("the handlers did not block")
		}
	}
	stop()

	dl := newDeadLetters(t, b)
	if n, err := dl.Count(ctx, "cut"); err != nil || n != 0 {
		t.Fatalf("after the shutdown: %d dead letters (%v), want none", n, err)
	}
	rs := retries(t, b, "cut")
	if len(rs) != 1 || string(rs[0].env.Item) != `{"id":2}` || rs[0].env.Attempts != 1 || rs[0].due > time.Now().UnixMilli() {
		t.Errorf("after the shutdown the retries are %+v, want item 2 with 1 attempt, due already", rs)
	}
	if left := pending(t, b, "cut", []string{"fresh"}); !slices.Equal(left, []int{1}) {
		t.Errorf("after the shutdown key fresh holds %v, want [1]", left)
	}

	// The next worker sees the attempts the first one left.
	var mu sync.Mutex
	attempts := make(map[string]int)
	w2 := newWorker(t, b)
	register(w2, func(ctx context.Context, key string, attempt int) error {
		mu.Lock()
		defer mu.Unlock()
		attempts[key] = attempt
		return nil
	})
	runWorker(t, w2)
	eventually(t, 10*time.Second, "both items handled", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(attempts) == 2
	})
	mu.Lock()
	defer mu.Unlock()
	t.Logf("attempt numbers after the shutdown: %v", attempts)
	if attempts["fresh"] != 0 || attempts["retried"] != 1 {
		t.Errorf("attempt numbers after the shutdown %v, want fresh 0 and retried 1", attempts)
	}
	if n, err := dl.Count(ctx, "cut"); err != nil || n != 0 {
		t.Errorf("%d dead letters (%v), want none", n, err)
	}
}

// retry is one entry of a queue's retry index (shard 0).
type retry struct {
	id  string
	due int64 // ms
	env struct {
		Key      string          `json:"k"`
		Attempts int             `json:"a"`
		Item     json.RawMessage `json:"i"`
	}
}

// retries returns the retry index of a queue's shard 0.
func retries(t testing.TB, b testredis.Backend, queue string) []retry {
	t.Helper()
	ctx := context.Background()
	c := b.Client
	sp := keys.For(b.Prefix, queue, 0)
	zs, err := c.Do(ctx, c.B().Zrange().Key(sp.Retry()).Min("0").Max("-1").Withscores().Build()).AsZScores()
	must(t, err)
	data, err := c.Do(ctx, c.B().Hgetall().Key(sp.RetryData()).Build()).AsStrMap()
	must(t, err)
	out := make([]retry, 0, len(zs))
	for _, z := range zs {
		r := retry{id: z.Member, due: int64(z.Score)}
		if env, ok := data[z.Member]; ok {
			must(t, json.Unmarshal([]byte(env), &r.env))
		}
		out = append(out, r)
	}
	return out
}

// fetched is a batch a worker took, as its Observer saw it.
type fetched struct {
	items int
	retry bool
}

// fetchRecorder is an Observer that records the batches fetched.
type fetchRecorder struct {
	mu      sync.Mutex
	batches []fetched
}

func (o *fetchRecorder) Fetched(queue string, items, bytes int, retry bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.batches = append(o.batches, fetched{items: items, retry: retry})
}
func (o *fetchRecorder) Handled(string, time.Duration, error) {}
func (o *fetchRecorder) Settled(string, int, int, int)        {}

func (o *fetchRecorder) fetched() []fetched {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.batches)
}

// A *BatchError wrapped in NoRetry sends the items it names to dead letters
// at once; one that names an index out of the handler's slice fails every
// item of the call, since the handler miscounted and no failure may be lost.
func TestSemanticsWrappedAndMiscountedBatchErrors(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		var mu sync.Mutex
		calls := make(map[string]int) // "queue/id"
		w := newWorker(t, b)
		count := func(queue string, items []item) bool {
			mu.Lock()
			defer mu.Unlock()
			first := true
			for _, it := range items {
				k := queue + "/" + strconv.Itoa(it.ID)
				calls[k]++
				first = first && calls[k] == 1
			}
			return first
		}
		batchq.HandleBatch(w, "wrapped", func(ctx context.Context, key string, items []item) error {
			count("wrapped", items)
			return batchq.NoRetry(&batchq.BatchError{Failed: map[int]error{1: errors.New("bad one")}})
		}, batchq.WithBackoff(batchq.Constant(time.Millisecond)))
		batchq.HandleBatch(w, "miscounted", func(ctx context.Context, key string, items []item) error {
			if count("miscounted", items) {
				return &batchq.BatchError{Failed: map[int]error{len(items): errors.New("off by one")}}
			}
			return nil
		}, batchq.WithBackoff(batchq.Constant(time.Millisecond)))
		p := newProducer(t, b)
		must(t, p.Add(ctx, "wrapped", "k", item{ID: 0}, item{ID: 1}, item{ID: 2}))
		must(t, p.Add(ctx, "miscounted", "k", item{ID: 0}, item{ID: 1}))
		runWorker(t, w)
		dl := newDeadLetters(t, b)
		eventually(t, 10*time.Second, "the wrapped failure dead, the miscounted call retried", func() bool {
			mu.Lock()
			retried := calls["miscounted/0"] == 2 && calls["miscounted/1"] == 2
			mu.Unlock()
			n, err := dl.Count(ctx, "wrapped")
			return retried && err == nil && n == 1
		})
		time.Sleep(50 * time.Millisecond) // room for a wrong extra delivery
		letters, err := dl.List(ctx, "wrapped", 10)
		must(t, err)
		if len(letters) != 1 || string(letters[0].Item) != `{"id":1}` || letters[0].Error != "bad one" {
			t.Errorf("dead letters %+v, want item 1 alone, with error %q", letters, "bad one")
		}
		mu.Lock()
		defer mu.Unlock()
		want := map[string]int{"wrapped/0": 1, "wrapped/1": 1, "wrapped/2": 1, "miscounted/0": 2, "miscounted/1": 2}
		if !maps.Equal(calls, want) {
			t.Errorf("calls per item %v, want %v", calls, want)
		}
	})
}
