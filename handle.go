package batchq

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"sync/atomic"
	"time"

	"github.com/batchq/batchq/internal/keys"
)

// Handle registers fn as the handler of queue's items, each decoded from
// JSON into a T. An item that does not decode goes to dead letters at once,
// with an error wrapping ErrDecode. A nil error from fn means the item is
// done; any other error fails this attempt (see NoRetry and RetryAfter).
// The items of one key's batch start in append order, and run at once
// while the worker has free slots. Handle panics when queue already has a
// handler, when its name or an option is invalid, or once Run has been
// called.
func Handle[T any](w *Worker, queueName string, fn func(ctx context.Context, item T) error, opts ...QueueOption) {
	if fn == nil {
		panic("batchq: nil handler for queue " + queueName)
	}
	w.register(queueName, opts, false, func(ctx context.Context, c Call) error {
		if err := checkItems(c); err != nil {
			return err
		}
		v, err := decode[T](c.Items[0])
		if err != nil {
			err = NoRetry(err)
			c.undecodable(map[int]error{0: err})
			return err
		}
		return timedOut(ctx, fn(ctx, v))
	})
}

// HandleRaw registers fn as the handler of queue's items, each passed as the
// JSON bytes that were appended. See Handle.
func HandleRaw(w *Worker, queueName string, fn func(ctx context.Context, item json.RawMessage) error, opts ...QueueOption) {
	Handle(w, queueName, fn, opts...)
}

// HandleBatch registers fn as the handler of queue's batches: fn gets the
// items drained from one key, in append order, each decoded into a T
// (items that do not decode go to dead letters and are left out), at most
// as many as WithMaxBatch allows per call. A batch of retries may hold the
// items of several keys: fn gets one call per key. A nil error means every
// item of the call is done; a *BatchError fails only the items it names, by
// their index in items (wrapped in NoRetry or RetryAfter, it applies that to
// each); any other error, or a *BatchError with an index out of items'
// range, fails them all. See Handle.
func HandleBatch[T any](w *Worker, queueName string, fn func(ctx context.Context, key string, items []T) error, opts ...QueueOption) {
	if fn == nil {
		panic("batchq: nil handler for queue " + queueName)
	}
	w.register(queueName, opts, true, func(ctx context.Context, c Call) error {
		if err := checkItems(c); err != nil {
			return err
		}
		vals := make([]T, 0, len(c.Items))
		var undecodable map[int]error // by index in c.Items
		var idx []int                 // once an item did not decode: vals[k] is c.Items[idx[k]]
		for i, data := range c.Items {
			v, err := decode[T](data)
			if err != nil {
				if undecodable == nil {
					undecodable = make(map[int]error)
					idx = make([]int, len(vals), len(c.Items))
					for k := range idx {
						idx[k] = k
					}
				}
				undecodable[i] = NoRetry(err)
				continue
			}
			vals = append(vals, v)
			if undecodable != nil {
				idx = append(idx, i)
			}
		}
		if undecodable == nil {
			return timedOut(ctx, fn(ctx, c.Key, vals))
		}
		c.undecodable(undecodable)
		// The call's error names items by their index in c.Items,
		// undecodable ones included, so that middleware sees one outcome.
		failed := maps.Clone(undecodable)
		if len(vals) == 0 {
			return &BatchError{Failed: failed}
		}
		err := timedOut(ctx, fn(ctx, c.Key, vals))
		if err == nil {
			return &BatchError{Failed: failed}
		}
		errs, ok := itemErrors(err, len(vals))
		for k, i := range idx {
			switch {
			case !ok:
				failed[i] = err
			case errs[k] != nil:
				failed[i] = errs[k]
			}
		}
		return &BatchError{Failed: failed}
	})
}

func decode[T any](data json.RawMessage) (T, error) {
	var v T
	if raw, ok := any(&v).(*json.RawMessage); ok {
		*raw = data
		return v, nil
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return v, fmt.Errorf("%w: %w", ErrDecode, err)
	}
	return v, nil
}

// queue is a registered queue: its handler and settings.
type queue struct {
	name        string
	backoff     Backoff
	maxAttempts int
	timeout     time.Duration
	// maxItems and maxBytes bound a batch handler's calls (WithMaxBatch).
	maxItems, maxBytes int
	// batch is set for a batch handler, whose steps are planned by plan;
	// a per-item handler's step i is item i.
	batch bool
	// ordered is set by WithOrderedKeys.
	ordered bool
	// handler decodes a call's items and calls the registered function;
	// middleware wraps it (WithMiddleware), and Run wraps that in the
	// worker's middleware (Use) and panic recovery, into chain.
	handler    HandlerFunc
	middleware []Middleware
	chain      HandlerFunc
	// timeoutCause is the cause of a context the timeout ends.
	timeoutCause *timeoutCause
	// shards is how many of the queue's shards the worker drains (its
	// fetch loops); recorded, the registry's count as the worker last read
	// it. Only Run's goroutine and shardsLoop start loops (runner.grow).
	shards, recorded atomic.Int32
}

// register adds the queue name, handled by h, or panics with what is wrong.
func (w *Worker) register(name string, opts []QueueOption, batch bool, h HandlerFunc) {
	if err := keys.CheckQueue(name); err != nil {
		panic("batchq: " + err.Error())
	}
	q := &queue{name: name, backoff: DefaultBackoff, maxAttempts: DefaultMaxAttempts, timeout: DefaultTimeout, batch: batch, handler: h}
	for _, o := range opts {
		if o == nil {
			panic(fmt.Sprintf("batchq: queue %s: nil option", name))
		}
		if err := o(q); err != nil {
			panic(fmt.Sprintf("batchq: queue %s: %v", name, err))
		}
	}
	if q.ordered && w.cons.AtMostOnce() {
		panic(fmt.Sprintf("batchq: queue %s: WithOrderedKeys needs leases, and the worker has WithAtMostOnce", name))
	}
	q.timeoutCause = &timeoutCause{q.timeout}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.running {
		panic("batchq: handler registered after Run")
	}
	if _, dup := w.queues[name]; dup {
		panic("batchq: second handler for queue " + name)
	}
	w.queues[name] = q
}
