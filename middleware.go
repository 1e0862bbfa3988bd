package batchq

import (
	"context"
	"encoding/json"
	"errors"
	"runtime/debug"

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
	// envelope, say) but must keep their number and order: a *BatchError
	// names items by their index here. The slice and its items must not be
	// kept after the call returns.
	Items []json.RawMessage
	// Batch is set for a HandleBatch handler.
	Batch bool
}

// HandlerFunc handles a Call: the handler registered with Handle, HandleRaw
// or HandleBatch, as the worker wraps it (it decodes Items and calls the
// function), or that wrapped in middleware. Its error decides for the
// call's items as a handler's does: nil for done; NoRetry, RetryAfter or
// any error for all of them; a *BatchError for those it names.
type HandlerFunc func(ctx context.Context, call Call) error

// Middleware wraps a HandlerFunc, as func(http.Handler) http.Handler does,
// for tracing, logging or authorization around every call: it gets the
// Call, and next's error (a *PanicError when next panicked). ctx carries
// the call's timeout (WithTimeout) and ItemInfo. A middleware that panics
// fails the call's items with a *PanicError, as a handler does.
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
// middleware's own panic fails the call the same way.
func (r *runner) chain(h HandlerFunc, mw ...Middleware) HandlerFunc {
	h = r.recoverPanics(h)
	if len(mw) == 0 {
		return h
	}
	for i := len(mw) - 1; i >= 0; i-- {
		h = mw[i](h)
	}
	return r.recoverPanics(h)
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
