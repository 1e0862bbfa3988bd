package batchq

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
)

// A job is a batch run for an executor to take part in: as its owner,
// which settles the batch once every step is done, or as a helper.
type job struct {
	br     *batchRun
	helper bool
}

// An executor handles batches, one at a time, calling their handlers on its
// own goroutine. A worker keeps one per unit of concurrency, long-lived, so
// that a batch costs no goroutine and no stack growth. A handler that
// outlives its context by abandonGrace is abandoned by the watchdog: its
// call counts as failed with a *TimeoutError, a new executor carries on
// with the batch, and the stuck goroutine is left behind; when the handler
// returns at last, that goroutine ends without touching the batch.
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
	info  ItemInfo
	step  int         // the batch's step the call is
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

// loop carries on with the batch of abandoned, if not nil, then takes the
// batches of r.work, and helps with those of r.help, until r.work is
// closed. It returns early, without counting itself out of r.executing,
// when the watchdog abandons it: its replacement counts for it.
func (x *executor) loop(abandoned *handlerCall) {
	if abandoned != nil && !x.resume(abandoned) {
		return
	}
	for {
		var j job
		select {
		case w, ok := <-x.r.work:
			if !ok {
				x.r.mu.Lock()
				delete(x.r.executors, x)
				x.r.mu.Unlock()
				x.cancel()
				x.r.executing.Done()
				return
			}
			j = w
		case j = <-x.r.help:
		}
		if !x.run(j) {
			return
		}
	}
}

// resume records that the handler call hc was abandoned, and carries on
// with its batch.
func (x *executor) resume(hc *handlerCall) bool {
	var err error = ErrHandlerTimeout // the shutdown timeout, with no queue timeout
	if d := hc.j.br.f.q.timeout; d > 0 {
		err = &TimeoutError{Timeout: d, Err: ErrHandlerTimeout}
	}
	x.guard(hc.j, hc.step, func() bool {
		x.r.w.obs.Handled(hc.info.Queue, time.Since(hc.start), err)
		hc.apply(err)
		return true
	})
	return x.run(hc.j)
}

// run takes part in j's batch: it claims steps and handles them until none
// is left (or shutdown begins, or, for a helper, a fetcher waits for a
// slot, or the batch's lease is found lost: the batch is delivered again).
// Of an ordered batch it claims a key's steps at a time (see runKey). The
// owner then waits for its helpers and settles the batch; a helper gives
// its slot back. run reports false when the watchdog abandoned the
// executor meanwhile.
func (x *executor) run(j job) bool {
	br, r := j.br, x.r
	for !r.stopping() && !(j.helper && r.waiting.Load() > 0) && !br.b.LeaseLost() {
		n := int(br.next.Add(1) - 1)
		if n >= br.claims() {
			break
		}
		if n+1 < br.claims() {
			x.recruit(br)
		}
		if br.keys != nil {
			if !x.runKey(j, br.keys[n]) {
				return false
			}
			continue
		}
		if !x.guard(j, n, func() bool { return x.step(j, n) }) {
			return false
		}
	}
	if j.helper {
		r.helping.Add(-br.givesBack())
		br.helpers.Done()
		r.release(1)
		return true
	}
	br.helpers.Wait()
	r.finish(br.f, br.b, br.out)
	return true
}

// runKey handles steps, those of one key of an ordered batch, one after
// another, in order. A step whose items failed, or were not handled, holds
// back the steps after it: they stay unfinished, and are settled behind
// it. runKey reports false when the watchdog abandoned the executor
// meanwhile: the executor that carries on with the batch takes the next
// key, and the rest of this one is held back behind the abandoned call.
func (x *executor) runKey(j job, steps []int) bool {
	br := j.br
	for _, s := range steps {
		if x.r.stopping() || br.b.LeaseLost() {
			return true
		}
		if !x.guard(j, s, func() bool { return x.step(j, s) }) {
			return false
		}
		for _, i := range br.items(s) {
			if k := br.out[i].Kind; k == protocol.Retry || k == protocol.Unfinished {
				return true
			}
		}
	}
	return true
}

// recruit asks an idle executor, in a slot of its own, to help with br,
// if a slot is free, no fetcher waits for one, and an executor is idle.
func (x *executor) recruit(br *batchRun) {
	r := x.r
	if r.waiting.Load() > 0 || !r.tryAcquire() {
		return
	}
	br.helpers.Add(1)
	r.helping.Add(br.givesBack())
	select {
	case r.help <- job{br: br, helper: true}:
	default:
		r.helping.Add(-br.givesBack())
		br.helpers.Done()
		r.release(1)
	}
}

// step handles step s of j's batch, one call of its queue's handler, and
// records the outcomes of its items. It reports false, at once, when the
// watchdog abandoned the call (see call).
func (x *executor) step(j job, s int) bool {
	br := j.br
	q, b := br.f.q, br.b
	idx := br.items(s)
	st := &callState{n: len(idx)}
	c := Call{Queue: q.name, Key: b.Items[idx[0]].Key, Items: make([]json.RawMessage, len(idx)), Batch: q.batch, state: st}
	for k, i := range idx {
		c.Items[k] = b.Items[i].Data
		c.Attempt = max(c.Attempt, b.Items[i].Attempt)
	}
	return x.call(j, c, s, func(err error) {
		errs, ok := itemErrors(err, len(idx))
		var undecodable map[int]error
		if p := st.undecodable.Load(); p != nil {
			undecodable = *p
		}
		for k, i := range idx {
			if e, bad := undecodable[k]; bad {
				// Dead at once, whatever became of the call: a handler
				// that panicked or timed out never had the item.
				br.out[i] = protocol.Outcome{Kind: protocol.Dead, Err: e}
				continue
			}
			e := err
			if ok {
				e = errs[k]
			}
			br.out[i] = x.r.outcome(q, b.Items[i].Attempt, e)
		}
	})
}

// guard runs fn, which handles step s of j's batch, and reports what fn
// does. A panic outside the handler chain (in a Backoff or an Observer,
// say) is recovered rather than taking the process down: the step's items
// without an outcome yet count as failed, with a fixed delay (the queue's
// backoff may be what panicked), so that a panic that always comes back
// ends in dead letters, not in a hot loop.
func (x *executor) guard(j job, s int, fn func() bool) (ok bool) {
	defer func() {
		v := recover()
		if v == nil {
			return
		}
		ok = true
		br, q := j.br, j.br.f.q
		x.r.w.log.Error("panic while handling a batch", zap.String("queue", q.name), zap.String("key", keys.Short(br.b.Key)), zap.Any("panic", v))
		err := RetryAfter(panicRetryDelay, &PanicError{Value: v, Stack: debug.Stack()})
		for _, i := range br.items(s) {
			if br.out[i].Kind == protocol.Unfinished {
				br.out[i] = x.r.outcome(q, br.b.Items[i].Attempt, err)
			}
		}
	}()
	return fn()
}

// call runs c through its queue's handler chain, with the queue's timeout,
// as step s of j's batch; apply records its outcome (it gets the chain's
// error). call reports false when the watchdog abandoned the call: another
// executor records a *TimeoutError for it and carries on with the batch,
// and the caller must return at once.
func (x *executor) call(j job, c Call, s int, apply func(error)) bool {
	q := j.br.f.q
	info := ItemInfo{Queue: c.Queue, Key: c.Key, Attempt: c.Attempt}
	ctx := context.WithValue(x.ctx, infoKey{}, info)
	cancel := func() {}
	if q.timeout > 0 {
		ctx, cancel = context.WithTimeoutCause(ctx, q.timeout, q.timeoutCause)
	}
	hc := &handlerCall{ctx: ctx, j: j, info: info, step: s, apply: apply, start: time.Now()}
	x.cur.Store(hc)
	err := q.chain(ctx, c)
	cancel()
	if !hc.state.CompareAndSwap(callRunning, callReturned) {
		return false
	}
	x.cur.Store(nil)
	x.r.w.obs.Handled(q.name, time.Since(hc.start), err)
	apply(err)
	return true
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
// executor takes x's place, records that the call failed with a
// *TimeoutError and carries on with the batch.
func (r *runner) abandon(x *executor, hc *handlerCall) {
	r.abandoned.Add(1)
	r.w.log.Error("handler ignored its context; abandoned", zap.String("queue", hc.info.Queue), zap.String("key", keys.Short(hc.info.Key)))
	r.mu.Lock()
	delete(r.executors, x)
	r.mu.Unlock()
	x.cancel()
	go r.newExecutor().loop(hc)
}

// outcome turns a handler's error into what happens to an item that had
// failed attempt times before. Failures are logged once per batch, when it
// is settled (settleEnded).
func (r *runner) outcome(q *queue, attempt int, err error) protocol.Outcome {
	if err == nil {
		return protocol.Outcome{Kind: protocol.Done}
	}
	if r.hctx.Err() != nil {
		// The shutdown timeout cancelled the handler: the item was not
		// handled, not failed.
		return protocol.Outcome{Kind: protocol.Unfinished}
	}
	var nr *NoRetryError
	if errors.As(err, &nr) || attempt+1 >= q.maxAttempts {
		return protocol.Outcome{Kind: protocol.Dead, Err: printable(err)}
	}
	var ra *RetryAfterError
	if errors.As(err, &ra) {
		return protocol.Outcome{Kind: protocol.Retry, Err: printable(err), Delay: ra.Delay}
	}
	return protocol.Outcome{Kind: protocol.Retry, Err: printable(err), Delay: q.backoff.Delay(attempt + 1)}
}

// printable returns err, or, when its Error method panics (a nil pointer of
// an error type whose method does not expect one, say), an error that says
// so: the worker records the text of every failure, on goroutines where a
// panic would end the process.
func printable(err error) (out error) {
	defer func() {
		if v := recover(); v != nil {
			out = fmt.Errorf("batchq: the handler's error, a %T, panicked in its Error method: %v", err, v)
		}
	}()
	_ = err.Error()
	return err
}
