package batchq

import (
	"context"
	"errors"
	"runtime/debug"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/batchq/batchq/internal/protocol"
)

// A job is a batch to handle, and the fetcher that drained it.
type job struct {
	f *fetcher
	b *protocol.Batch
}

// An executor handles batches, one at a time, calling their handlers on its
// own goroutine. A worker keeps one per unit of concurrency, long-lived, so
// that a batch costs no goroutine and no stack growth. A handler that
// outlives its context by abandonGrace is abandoned by the watchdog: its
// call counts as failed with ErrHandlerTimeout, a new executor carries on
// with the rest of the batch, and the stuck goroutine is left behind; when
// the handler returns at last, that goroutine ends without touching the
// batch.
type executor struct {
	r      *runner
	ctx    context.Context // parent of its handlers' contexts (a child of r.hctx of its own, so that they do not contend)
	cancel context.CancelFunc
	cur    atomic.Pointer[handlerCall] // the call under way; nil between calls
}

// A handlerCall is one call of a handler, as the watchdog sees it.
type handlerCall struct {
	ctx   context.Context
	state atomic.Int32 // callRunning, callReturned or callAbandoned
	j     job
	out   []protocol.Outcome
	q     *queue
	info  ItemInfo
	step  int         // the handler's step (see queue.handle): an abandoned batch resumes after it
	apply func(error) // records the call's outcome
	start time.Time

	doneSince time.Time // the watchdog's own: when it first saw ctx done
}

const (
	callRunning int32 = iota
	callReturned
	callAbandoned
)

// newExecutor registers a new executor with r; its goroutine is the
// caller's to start, with loop.
func (r *runner) newExecutor() *executor {
	ctx, cancel := context.WithCancel(r.hctx)
	x := &executor{r: r, ctx: ctx, cancel: cancel}
	r.mu.Lock()
	r.executors[x] = struct{}{}
	r.mu.Unlock()
	return x
}

// loop carries on with the batch of abandoned, if not nil, then handles the
// jobs of r.work until it is closed. It returns early, without counting
// itself out of r.executing, when the watchdog abandons it: its replacement
// counts for it.
func (x *executor) loop(abandoned *handlerCall) {
	if abandoned != nil && !x.resume(abandoned) {
		return
	}
	for j := range x.r.work {
		if !x.run(j, nil, 0, nil) {
			return
		}
	}
	x.r.mu.Lock()
	delete(x.r.executors, x)
	x.r.mu.Unlock()
	x.cancel()
	x.r.executing.Done()
}

// resume records that the handler call hc was abandoned, and carries on with
// its batch after it.
func (x *executor) resume(hc *handlerCall) bool {
	return x.run(hc.j, hc.out, hc.step+1, func() {
		x.r.w.obs.Handled(hc.q.name, time.Since(hc.start), ErrHandlerTimeout)
		hc.apply(ErrHandlerTimeout)
	})
}

// run handles j from the handler's step from (out holds the outcomes of
// the steps before it; nil: none yet), after calling before if not nil,
// and settles it. It reports false when the watchdog abandoned the executor
// meanwhile.
func (x *executor) run(j job, out []protocol.Outcome, from int, before func()) bool {
	if out == nil {
		out = make([]protocol.Outcome, len(j.b.Items))
	}
	if !x.handle(j, out, from, before) {
		return false
	}
	x.r.finish(j.f, j.b, out)
	return true
}

// handle runs the queue's handler over j.b from step from, after calling
// before. A panic outside the user's handler (in a Backoff, or an Observer,
// say) is recovered rather than taking the process down: the items without
// an outcome yet count as failed.
func (x *executor) handle(j job, out []protocol.Outcome, from int, before func()) (ok bool) {
	q, b := j.f.q, j.b
	defer func() {
		v := recover()
		if v == nil {
			return
		}
		ok = true
		x.r.w.log.Error("panic while handling a batch", zap.String("queue", q.name), zap.String("key", b.Key), zap.Any("panic", v))
		// The items without an outcome count as failed, with a fixed delay
		// (the queue's backoff may be what panicked), so that a panic that
		// always comes back ends in dead letters, not in a hot loop.
		err := &PanicError{Value: v, Stack: debug.Stack()}
		for i := range out {
			if out[i].Kind != protocol.Unfinished {
				continue
			}
			if b.Items[i].Attempt+1 >= q.maxAttempts {
				out[i] = protocol.Outcome{Kind: protocol.Dead, Err: err}
			} else {
				out[i] = protocol.Outcome{Kind: protocol.Retry, Err: err, Delay: panicRetryDelay}
			}
		}
	}()
	if before != nil {
		before()
	}
	return q.handle(x, j, out, from)
}

// call runs fn, one call of q's handler, with the queue's timeout,
// recovering panics; apply records its outcome (it gets fn's error). step
// is the handler's step the call is: should the call be abandoned, the
// batch resumes after it. call reports false when the watchdog abandoned
// the call: another executor records ErrHandlerTimeout for it and carries
// on with the batch, and the caller must return at once.
func (x *executor) call(j job, out []protocol.Outcome, info ItemInfo, step int, fn func(context.Context) error, apply func(error)) bool {
	q := j.f.q
	ctx := context.WithValue(x.ctx, infoKey{}, info)
	cancel := func() {}
	if q.timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, q.timeout)
	}
	hc := &handlerCall{ctx: ctx, j: j, out: out, q: q, info: info, step: step, apply: apply, start: time.Now()}
	x.cur.Store(hc)
	err := x.r.safe(ctx, info, fn)
	cancel()
	if !hc.state.CompareAndSwap(callRunning, callReturned) {
		return false
	}
	x.cur.Store(nil)
	x.r.w.obs.Handled(q.name, time.Since(hc.start), err)
	apply(err)
	return true
}

func (r *runner) safe(ctx context.Context, info ItemInfo, fn func(context.Context) error) (err error) {
	defer func() {
		if v := recover(); v != nil {
			pe := &PanicError{Value: v, Stack: debug.Stack()}
			r.w.log.Warn("handler panicked", zap.String("queue", info.Queue), zap.String("key", info.Key), zap.Any("panic", v))
			r.w.log.Debug("handler panic stack", zap.ByteString("stack", pe.Stack))
			err = pe
		}
	}()
	return fn(ctx)
}

// watchdogEvery is how often the watchdog looks for handlers to abandon: an
// abandonment comes between abandonGrace and abandonGrace plus twice this
// after the handler's context is done.
const watchdogEvery = 100 * time.Millisecond

// watchdog abandons the handler calls that outlive their context by
// abandonGrace, until stop is closed.
func (r *runner) watchdog(stop <-chan struct{}) {
	t := time.NewTicker(watchdogEvery)
	defer t.Stop()
	var xs []*executor
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		xs = xs[:0]
		r.mu.Lock()
		for x := range r.executors {
			xs = append(xs, x)
		}
		r.mu.Unlock()
		now := time.Now()
		for _, x := range xs {
			hc := x.cur.Load()
			switch {
			case hc == nil || hc.ctx.Err() == nil:
			case hc.doneSince.IsZero():
				hc.doneSince = now
			case now.Sub(hc.doneSince) >= abandonGrace && hc.state.CompareAndSwap(callRunning, callAbandoned):
				r.abandon(x, hc)
			}
		}
	}
}

// abandon gives up on the executor x, stuck in the handler call hc: a new
// executor takes x's place, records that the call failed with
// ErrHandlerTimeout and carries on with the batch after it.
func (r *runner) abandon(x *executor, hc *handlerCall) {
	r.abandoned.Add(1)
	r.w.log.Error("handler ignored its context; abandoned", zap.String("queue", hc.info.Queue), zap.String("key", hc.info.Key))
	r.mu.Lock()
	delete(r.executors, x)
	r.mu.Unlock()
	x.cancel()
	go r.newExecutor().loop(hc)
}

// outcome turns a handler's error into what happens to its item.
func (r *runner) outcome(q *queue, info ItemInfo, attempt int, err error) protocol.Outcome {
	if err == nil {
		return protocol.Outcome{Kind: protocol.Done}
	}
	if r.hctx.Err() != nil {
		// The shutdown timeout cancelled the handler: the item was not
		// handled, not failed.
		return protocol.Outcome{Kind: protocol.Unfinished}
	}
	failed := attempt + 1
	var nr *noRetryError
	if errors.As(err, &nr) || failed >= q.maxAttempts {
		r.w.log.Warn("item failed for good; moved to dead letters", zap.String("queue", q.name), zap.String("key", info.Key), zap.Int("attempts", failed), zap.Error(err))
		return protocol.Outcome{Kind: protocol.Dead, Err: err}
	}
	delay := q.backoff.Delay(failed)
	var ra *retryAfterError
	if errors.As(err, &ra) {
		delay = ra.d
	}
	r.w.log.Info("item failed; will retry", zap.String("queue", q.name), zap.String("key", info.Key), zap.Int("attempts", failed), zap.Duration("delay", delay), zap.Error(err))
	return protocol.Outcome{Kind: protocol.Retry, Err: err, Delay: delay}
}
