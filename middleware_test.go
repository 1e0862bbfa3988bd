package batchq_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/batchqtest"
	"github.com/batchq/batchq/internal/testredis"
)

// Tests of handler middleware (Worker.Use, WithMiddleware).

// trace records what middleware and handlers saw, in order.
type trace struct {
	mu     sync.Mutex
	events []string
	calls  []batchq.Call
	errs   []error
}

func (tr *trace) add(e string) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.events = append(tr.events, e)
}

// record returns middleware that logs name> and <name around each call,
// and, for "outer", the Call and its error.
func (tr *trace) record(name string) batchq.Middleware {
	return func(next batchq.HandlerFunc) batchq.HandlerFunc {
		return func(ctx context.Context, c batchq.Call) error {
			tr.add(name + ">")
			err := next(ctx, c)
			tr.add("<" + name)
			if name == "outer" {
				tr.mu.Lock()
				c.Items = slices.Clone(c.Items)
				tr.calls = append(tr.calls, c)
				tr.errs = append(tr.errs, err)
				tr.mu.Unlock()
			}
			return err
		}
	}
}

func runIdle(t *testing.T, w *batchq.Worker, opts ...batchqtest.Option) batchqtest.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := batchqtest.RunUntilIdle(ctx, w, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func TestMiddlewareOrderAndCall(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		var tr trace
		w := newWorker(t, b, batchq.WithConcurrency(1))
		batchq.Handle(w, "one", func(_ context.Context, it item) error {
			tr.add("handle")
			return nil
		}, batchq.WithMiddleware(tr.record("queue")))
		batchq.HandleBatch(w, "many", func(_ context.Context, key string, its []item) error {
			tr.add("batch")
			return nil
		})
		// Use after Handle still wraps every queue, outside WithMiddleware.
		w.Use(tr.record("outer"), tr.record("inner"))
		addItems(t, b, "one", "k1", 1, 2)
		runIdle(t, w)
		addItems(t, b, "many", "k2", 2, 4)

		tr.mu.Lock()
		want := []string{"outer>", "inner>", "queue>", "handle", "<queue", "<inner", "<outer"}
		if !slices.Equal(tr.events, want) {
			t.Errorf("events %v, want %v", tr.events, want)
		}
		tr.events = nil
		tr.mu.Unlock()

		// A second worker: Run may be called once.
		w2 := newWorker(t, b)
		batchq.HandleBatch(w2, "many", func(_ context.Context, key string, its []item) error {
			tr.add("batch")
			return nil
		})
		w2.Use(tr.record("outer"))
		runIdle(t, w2)

		tr.mu.Lock()
		defer tr.mu.Unlock()
		if want := []string{"outer>", "batch", "<outer"}; !slices.Equal(tr.events, want) {
			t.Errorf("batch events %v, want %v", tr.events, want)
		}
		if len(tr.calls) != 2 {
			t.Fatalf("%d calls seen, want 2", len(tr.calls))
		}
		one, many := tr.calls[0], tr.calls[1]
		if one.Queue != "one" || one.Key != "k1" || one.Attempt != 0 || one.Batch || len(one.Items) != 1 || string(one.Items[0]) != `{"id":1}` {
			t.Errorf("item call %+v (items %q)", one, one.Items)
		}
		if many.Queue != "many" || many.Key != "k2" || !many.Batch || len(many.Items) != 2 ||
			string(many.Items[0]) != `{"id":2}` || string(many.Items[1]) != `{"id":3}` {
			t.Errorf("batch call %+v (items %q)", many, many.Items)
		}
		for i, err := range tr.errs {
			if err != nil {
				t.Errorf("call %d: %v", i, err)
			}
		}
	})
}

func TestMiddlewareSeesAttemptsAndErrors(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		var tr trace
		w := newWorker(t, b)
		w.Use(tr.record("outer"))
		fail := errors.New("boom")
		tries := 0
		batchq.Handle(w, "q", func(_ context.Context, it item) error {
			tries++ // one item: calls do not overlap
			switch tries {
			case 1:
				return batchq.RetryAfter(time.Millisecond, fail)
			case 2:
				panic("kaput")
			}
			return nil
		}, batchq.WithBackoff(batchq.Constant(time.Millisecond)))
		addItems(t, b, "q", "k", 1, 2)
		res := runIdle(t, w, batchqtest.WithRetriesWithin(5*time.Second))
		if res.Retries != 0 || res.DeadLetters != 0 {
			t.Errorf("left %+v", res.State)
		}
		tr.mu.Lock()
		defer tr.mu.Unlock()
		if len(tr.calls) != 3 {
			t.Fatalf("%d calls, want 3", len(tr.calls))
		}
		for i, c := range tr.calls {
			if c.Attempt != i {
				t.Errorf("call %d: attempt %d", i, c.Attempt)
			}
		}
		var ra *batchq.RetryAfterError
		if !errors.As(tr.errs[0], &ra) || ra.Delay != time.Millisecond || !errors.Is(tr.errs[0], fail) {
			t.Errorf("first call's error %v, want a RetryAfterError of 1ms wrapping %v", tr.errs[0], fail)
		}
		var pe *batchq.PanicError
		if !errors.As(tr.errs[1], &pe) || pe.Value != "kaput" || len(pe.Stack) == 0 {
			t.Errorf("second call's error %#v, want the handler's panic", tr.errs[1])
		}
		if tr.errs[2] != nil {
			t.Errorf("third call's error %v", tr.errs[2])
		}
	})
}

// TestMiddlewareRewritesItems unwraps an envelope around each item, as a
// tracing middleware does, for an item handler and a batch handler whose
// batch has an item that does not decode.
func TestMiddlewareRewritesItems(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		var tr trace
		var mu sync.Mutex
		var got []int
		var batches [][]int
		unwrap := envelopeMiddleware()
		w := newWorker(t, b)
		w.Use(tr.record("outer"))
		batchq.Handle(w, "one", func(_ context.Context, it item) error {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, it.ID)
			return nil
		}, batchq.WithMiddleware(unwrap))
		failOdd := errors.New("odd")
		batchq.HandleBatch(w, "many", func(_ context.Context, key string, its []item) error {
			ids := make([]int, len(its))
			failed := map[int]error{}
			for i, it := range its {
				ids[i] = it.ID
				if it.ID%2 == 1 {
					failed[i] = batchq.NoRetry(failOdd)
				}
			}
			mu.Lock()
			batches = append(batches, ids)
			mu.Unlock()
			return &batchq.BatchError{Failed: failed}
		}, batchq.WithMiddleware(unwrap))
		p := newProducer(t, b)
		ctx := context.Background()
		if err := p.Add(ctx, "one", "k", envelope{item{7}}, envelope{item{8}}); err != nil {
			t.Fatal(err)
		}
		// Items 10 and 11 decode; "x" does not decode into an item.
		if err := p.Add(ctx, "many", "k", envelope{item{10}}, map[string]string{"Wrapped": "x"}, envelope{item{11}}); err != nil {
			t.Fatal(err)
		}
		res := runIdle(t, w)

		mu.Lock()
		defer mu.Unlock()
		slices.Sort(got)
		if !slices.Equal(got, []int{7, 8}) {
			t.Errorf("item handler got %v, want [7 8]", got)
		}
		if len(batches) != 1 || !slices.Equal(batches[0], []int{10, 11}) {
			t.Errorf("batch handler got %v, want [[10 11]]", batches)
		}
		if res.Queues["many"].DeadLetters != 2 || res.Queues["one"].DeadLetters != 0 {
			t.Errorf("dead letters %+v, want 2 of many", res.Queues)
		}
		// The outer middleware sees the batch's outcome by the call's
		// positions: index 1 did not decode, index 2 (item 11) failed.
		tr.mu.Lock()
		defer tr.mu.Unlock()
		var be *batchq.BatchError
		for i, c := range tr.calls {
			if c.Queue != "many" {
				continue
			}
			if !errors.As(tr.errs[i], &be) || len(be.Failed) != 2 {
				t.Fatalf("batch call's error %v, want a BatchError of 2 items", tr.errs[i])
			}
			if !errors.Is(be.Failed[1], batchq.ErrDecode) || !errors.Is(be.Failed[2], failOdd) || be.Failed[0] != nil {
				t.Errorf("batch call's failures %v", be.Failed)
			}
			var nr *batchq.NoRetryError
			if !errors.As(be.Failed[1], &nr) {
				t.Errorf("a decoding failure is %T, want a NoRetryError", be.Failed[1])
			}
		}
		letters, err := newDeadLetters(t, b).List(ctx, "many", 10)
		if err != nil {
			t.Fatal(err)
		}
		var errs []string
		for _, l := range letters {
			errs = append(errs, l.Error)
		}
		slices.Sort(errs)
		if len(errs) != 2 || !strings.Contains(errs[0], "does not decode") || errs[1] != "odd" {
			t.Errorf("dead letters' errors %q", errs)
		}
	})
}

// envelope wraps an item, as a producer that adds trace context would.
type envelope struct {
	Wrapped item
}

// envelopeMiddleware unwraps envelopes: each item {"Wrapped": x} becomes x.
func envelopeMiddleware() batchq.Middleware {
	return func(next batchq.HandlerFunc) batchq.HandlerFunc {
		return func(ctx context.Context, c batchq.Call) error {
			items := make([]json.RawMessage, len(c.Items))
			for i, raw := range c.Items {
				var env struct{ Wrapped json.RawMessage }
				if err := json.Unmarshal(raw, &env); err != nil || env.Wrapped == nil {
					return batchq.NoRetry(errors.New("no envelope"))
				}
				items[i] = env.Wrapped
			}
			c.Items = items
			return next(ctx, c)
		}
	}
}

// TestMiddlewarePanicFailsCall: a middleware that panics fails its call's
// items with a *PanicError, as a handler's panic does, and the other keys
// are handled.
func TestMiddlewarePanicFailsCall(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		var mu sync.Mutex
		var got []int
		w := newWorker(t, b)
		w.Use(func(next batchq.HandlerFunc) batchq.HandlerFunc {
			return func(ctx context.Context, c batchq.Call) error {
				if c.Key == "bad" {
					panic("middleware kaput")
				}
				return next(ctx, c)
			}
		})
		batchq.Handle(w, "q", func(_ context.Context, it item) error {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, it.ID)
			return nil
		}, batchq.WithMaxAttempts(1))
		addItems(t, b, "q", "bad", 1, 2)
		addItems(t, b, "q", "good", 2, 3)
		res := runIdle(t, w)
		if res.DeadLetters != 1 {
			t.Errorf("%d dead letters, want 1", res.DeadLetters)
		}
		mu.Lock()
		defer mu.Unlock()
		if !slices.Equal(got, []int{2}) {
			t.Errorf("handled %v, want [2]", got)
		}
		letters, err := newDeadLetters(t, b).List(context.Background(), "q", 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(letters) != 1 || letters[0].Key != "bad" || letters[0].Error != "batchq: handler panicked: middleware kaput" {
			t.Errorf("dead letters %+v", letters)
		}
	})
}

// letterErrors returns the dead letters of queue, by the id of their item
// (-1 for one that is not an item), as "attempts: error".
func letterErrors(t *testing.T, b testredis.Backend, queue string) map[int]string {
	t.Helper()
	letters, err := newDeadLetters(t, b).List(context.Background(), queue, 100)
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[int]string)
	for _, l := range letters {
		id := -1
		var it item
		if json.Unmarshal(l.Item, &it) == nil {
			id = it.ID
		}
		out[id] = fmt.Sprintf("%d: %s", l.Attempts, l.Error)
	}
	return out
}

// TestUndecodableItemsDieWhateverTheCall: items of a batch that do not
// decode go to dead letters at once with their decoding error, even when
// the handler's call then panics or times out; middleware sees the timeout
// as a *TimeoutError.
func TestUndecodableItemsDieWhateverTheCall(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		var tr trace
		w := newWorker(t, b)
		w.Use(tr.record("outer"))
		batchq.HandleBatch(w, "panics", func(context.Context, string, []item) error { panic("kaput") },
			batchq.WithMaxAttempts(2), batchq.WithBackoff(batchq.Constant(time.Millisecond)))
		batchq.HandleBatch(w, "slow", func(ctx context.Context, _ string, _ []item) error {
			<-ctx.Done()
			return ctx.Err()
		}, batchq.WithMaxAttempts(1), batchq.WithTimeout(50*time.Millisecond))
		p := newProducer(t, b)
		for _, q := range []string{"panics", "slow"} {
			if err := p.Add(context.Background(), q, "k", item{1}, "x", item{2}); err != nil {
				t.Fatal(err)
			}
		}
		res := runIdle(t, w, batchqtest.WithRetriesWithin(5*time.Second))
		if res.DeadLetters != 6 || res.Retries != 0 {
			t.Errorf("left %+v, want 6 dead letters", res.State)
		}
		undecodable := "1: batchq: item does not decode into the handler's type: json: cannot unmarshal string into Go value of type batchq_test.item"
		for q, want := range map[string]map[int]string{
			"panics": {-1: undecodable, 1: "2: batchq: handler panicked: kaput", 2: "2: batchq: handler panicked: kaput"},
			"slow":   {-1: undecodable, 1: "1: batchq: handler timed out after 50ms (WithTimeout): context deadline exceeded", 2: "1: batchq: handler timed out after 50ms (WithTimeout): context deadline exceeded"},
		} {
			if got := letterErrors(t, b, q); !maps.Equal(got, want) {
				t.Errorf("%s: dead letters %v, want %v", q, got, want)
			}
		}
		tr.mu.Lock()
		defer tr.mu.Unlock()
		for i, c := range tr.calls {
			var be *batchq.BatchError
			var te *batchq.TimeoutError
			if c.Queue == "slow" && (!errors.As(tr.errs[i], &be) || !errors.As(be.Failed[0], &te) || te.Timeout != 50*time.Millisecond) {
				t.Errorf("middleware saw %v for the slow call, want a *TimeoutError for item 0", tr.errs[i])
			}
		}
	})
}

// TestMiddlewareMustKeepItems: a middleware that drops an item fails the
// whole call, rather than the outcomes landing on the wrong items.
func TestMiddlewareMustKeepItems(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		called := false
		w := newWorker(t, b)
		batchq.HandleBatch(w, "q", func(context.Context, string, []item) error {
			called = true
			return nil
		}, batchq.WithMaxAttempts(1), batchq.WithMiddleware(func(next batchq.HandlerFunc) batchq.HandlerFunc {
			return func(ctx context.Context, c batchq.Call) error {
				c.Items = c.Items[1:]
				return next(ctx, c)
			}
		}))
		addItems(t, b, "q", "k", 0, 3)
		runIdle(t, w)
		if called {
			t.Error("the handler was called with the items a middleware left")
		}
		msg := "1: batchq: middleware passed on 2 items of a call of 3; it may replace items, not add or drop them"
		if got, want := letterErrors(t, b, "q"), map[int]string{0: msg, 1: msg, 2: msg}; !maps.Equal(got, want) {
			t.Errorf("dead letters %v, want %v", got, want)
		}
	})
}

// brokenErr is an error type whose Error method does not expect a nil
// pointer, as many do not.
type brokenErr struct{ msg string }

func (e *brokenErr) Error() string { return e.msg }

// TestOddErrorsDoNotCrash: errors whose text cannot be read, or that
// middleware built with nothing inside, are recorded rather than crashing
// the worker's settle goroutine.
func TestOddErrorsDoNotCrash(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		w := newWorker(t, b)
		batchq.Handle(w, "q", func(_ context.Context, it item) error {
			switch it.ID {
			case 0:
				return &batchq.RetryAfterError{Delay: time.Millisecond}
			case 1:
				return &batchq.NoRetryError{}
			}
			var e *brokenErr // a typed nil: not a nil error
			return e
		}, batchq.WithMaxAttempts(1))
		addItems(t, b, "q", "k", 0, 3)
		runIdle(t, w)
		want := map[int]string{
			0: "1: batchq: retry after 1ms",
			1: "1: batchq: no retry",
			2: "1: batchq: the handler's error, a *batchq_test.brokenErr, panicked in its Error method: runtime error: invalid memory address or nil pointer dereference",
		}
		if got := letterErrors(t, b, "q"); !maps.Equal(got, want) {
			t.Errorf("dead letters %v, want %v", got, want)
		}
	})
}

func TestNilHandlerFuncFailsRun(t *testing.T) {
	b := testredis.Mini(t)
	w := newWorker(t, b)
	batchq.Handle(w, "q", func(context.Context, item) error { return nil })
	w.Use(func(batchq.HandlerFunc) batchq.HandlerFunc { return nil })
	if err := w.Run(context.Background()); err == nil || err.Error() != "batchq: middleware 1 of 1 returned a nil HandlerFunc (queue q)" {
		t.Errorf("Run returned %v", err)
	}
}
