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
)

// A Call is one call of a queue's handler, as middleware sees it: one item
// for Handle and HandleRaw, the items of one key (or a WithMaxBatch chunk
// of them) for HandleBatch.
type Call struct {
	Queue string
	Key   string
	// Attempt counts the failed attempts before this one; for a batch, the
	// most of any of its items.
	Attempt int
	// Items holds the JSON of the call's items, in append order: one for
	// Handle and HandleRaw. Middleware may replace an item (to unwrap an
	// envelope, say) by passing on a Call with a new slice, but must keep
	// their number and order: a *BatchError names items by their index
	// here, and the handler fails a call whose number of items changed.
	// The bytes are the stored item's, to be read only; neither they nor
	// the slice may be kept after the call returns.
	Items []json.RawMessage
	// Batch is set for a HandleBatch handler.
	Batch bool

	// state is the worker's own record of the call; middleware passes it
	// on with the Call (a Call built anew has none).
	state *callState
}

// callState is what the handler's own wrapper (see Handle) tells the worker
// about a call, beside its error.
type callState struct {
	// n is the number of the call's items, which middleware must keep.
	n int
	// undecodable holds the errors of the items that did not decode, by
	// index, once all were decoded: those go to dead letters whatever
	// becomes of the call (its handler may panic or time out). The watchdog
	// may read it while the handler runs.
	undecodable atomic.Pointer[map[int]error]
}

// checkItems returns an error when middleware changed the number of c's
// items: the outcomes of the wrong items would be recorded.
func checkItems(c Call) error {
	if c.state != nil && len(c.Items) != c.state.n {
		return fmt.Errorf("batchq: middleware passed on %d items of a call of %d; it may replace items, not add or drop them", len(c.Items), c.state.n)
	}
	return nil
}

// undecodable records the items of c that did not decode.
func (c Call) undecodable(failed map[int]error) {
	if c.state != nil {
		c.state.undecodable.Store(&failed)
	}
}

// timeoutCause is the cause of the context of a call that its queue's
// timeout ends (WithTimeout).
type timeoutCause struct{ d time.Duration }

func (c *timeoutCause) Error() string {
	return fmt.Sprintf("batchq: the queue's timeout (%v) ended the call", c.d)
}

// timedOut returns err, a handler's error under ctx, as a *TimeoutError
// when it is the deadline of ctx that the queue's timeout set.
func timedOut(ctx context.Context, err error) error {
	var tc *timeoutCause
	if err != nil && errors.Is(err, context.DeadlineExceeded) && errors.As(context.Cause(ctx), &tc) {
		return &TimeoutError{Timeout: tc.d, Err: err}
	}
	return err
}

// HandlerFunc handles a Call: the handler registered with Handle, HandleRaw
// or HandleBatch, as the worker wraps it (it decodes Items and calls the
// function), or that wrapped in middleware. Its error decides for the
// call's items as a handler's does: nil for done; NoRetry, RetryAfter or
// any error for all of them; a *BatchError for those it names.
type HandlerFunc func(ctx context.Context, call Call) error

// Middleware wraps a HandlerFunc, as func(http.Handler) http.Handler does,
// for tracing, logging or authorization around every call: it gets the
// Call, and next's error (a *PanicError when next panicked, a *TimeoutError
// when the queue's timeout ended it). ctx carries the call's timeout
// (WithTimeout) and ItemInfo. A middleware that panics fails the call's
// items with a *PanicError, as a handler does. A call the worker abandons
// (see WithTimeout) does not return through its middleware until its
// handler does, if ever.
//
// The worker's Observer is not middleware: it also counts the calls the
// worker abandons (see WithTimeout), which never return through it.
type Middleware func(next HandlerFunc) HandlerFunc

// Use adds middleware around the handler of every queue of w, registered
// before or after Use, outside the queue's own (WithMiddleware): the first
// given is the outermost. Use panics given a nil middleware, or once Run
// has been called.
func (w *Worker) Use(mw ...Middleware) {
	for _, m := range mw {
		if m == nil {
			panic("batchq: nil middleware")
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.running {
		panic("batchq: Use called after Run")
	}
	w.middleware = append(w.middleware, mw...)
}

// WithMiddleware adds middleware around the queue's handler, inside the
// worker's (Use): the first given is the outermost.
func WithMiddleware(mw ...Middleware) QueueOption {
	return func(q *queue) error {
		for _, m := range mw {
			if m == nil {
				return errors.New("nil middleware")
			}
		}
		q.middleware = append(q.middleware, mw...)
		return nil
	}
}

// chain returns h wrapped in mw, the first outermost, and in panic recovery
// on both sides: middleware sees a handler's panic as a *PanicError, and a
// middleware's own panic fails the call the same way. It returns an error
// when a middleware returns a nil HandlerFunc.
func (r *runner) chain(h HandlerFunc, mw ...Middleware) (HandlerFunc, error) {
	h = r.recoverPanics(h)
	if len(mw) == 0 {
		return h, nil
	}
	for i := len(mw) - 1; i >= 0; i-- {
		if h = mw[i](h); h == nil {
			return nil, fmt.Errorf("batchq: middleware %d of %d returned a nil HandlerFunc", i+1, len(mw))
		}
	}
	return r.recoverPanics(h), nil
}

// recoverPanics returns next with its panics turned into a *PanicError.
// The panic's value and stack are logged at debug level only: the value
// may hold an item (the batch's line says that the handler panicked).
func (r *runner) recoverPanics(next HandlerFunc) HandlerFunc {
	return func(ctx context.Context, c Call) (err error) {
		defer func() {
			if v := recover(); v != nil {
				pe := &PanicError{Value: v, Stack: debug.Stack()}
				r.w.log.Debug("handler panicked", zap.String("queue", c.Queue), zap.String("key", keys.Short(c.Key)),
					zap.Any("panic", v), zap.ByteString("stack", pe.Stack))
				err = pe
			}
		}()
		return next(ctx, c)
	}
}

// ItemInfo describes the item (or batch) a handler is called for.
type ItemInfo struct {
	Queue   string
	Key     string
	Attempt int // failed attempts before this one; for a batch handler, the most of any item
}

type infoKey struct{}

// Info returns the description of the item or batch the handler that got
// ctx was called for.
func Info(ctx context.Context) (ItemInfo, bool) {
	i, ok := ctx.Value(infoKey{}).(ItemInfo)
	return i, ok
}
