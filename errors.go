package batchq

import (
	"errors"
	"fmt"
	"time"
)

// NoRetry wraps err so that the item goes to dead letters at once, without
// further attempts. NoRetry(nil) returns nil.
func NoRetry(err error) error {
	if err == nil {
		return nil
	}
	return &NoRetryError{Err: err}
}

// NoRetryError is the error NoRetry returns: middleware can find it with
// errors.As. Its text is Err's.
type NoRetryError struct{ Err error }

func (e *NoRetryError) Error() string {
	if e.Err == nil {
		return "batchq: no retry"
	}
	return e.Err.Error()
}
func (e *NoRetryError) Unwrap() error { return e.Err }

// RetryAfter wraps err so that the item's next attempt comes after d
// instead of the queue's backoff delay. It still counts as an attempt: past
// the queue's max attempts the item goes to dead letters. RetryAfter(d, nil)
// returns nil.
func RetryAfter(d time.Duration, err error) error {
	if err == nil {
		return nil
	}
	return &RetryAfterError{Delay: d, Err: err}
}

// RetryAfterError is the error RetryAfter returns: middleware can find it
// with errors.As. Its text is Err's.
type RetryAfterError struct {
	Delay time.Duration
	Err   error
}

func (e *RetryAfterError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("batchq: retry after %v", e.Delay)
	}
	return e.Err.Error()
}
func (e *RetryAfterError) Unwrap() error { return e.Err }

// BatchError is returned by a batch handler whose batch partly failed: the
// items at the indexes of Failed (positions in the slice the handler got)
// failed with those errors; the others succeeded and are not run again.
// Each error decides for its item as a Handle handler's would (NoRetry,
// RetryAfter); NoRetry(batchErr) or RetryAfter(d, batchErr) applies to every
// failed item. A BatchError with an index out of the slice's range, and any
// other error from a batch handler, fails every item of the call.
type BatchError struct {
	Failed map[int]error
}

func (e *BatchError) Error() string {
	if e == nil {
		return "batchq: no item of the batch failed"
	}
	return fmt.Sprintf("batchq: %d items of the batch failed", len(e.Failed))
}

// PanicError is the error recorded for a handler that panicked.
type PanicError struct {
	Value any
	Stack []byte
}

func (e *PanicError) Error() string { return fmt.Sprintf("batchq: handler panicked: %v", e.Value) }

// ErrHandlerTimeout is the error of a *TimeoutError for a handler that did
// not return within its queue's timeout plus a grace period of about 2s,
// ignoring its context. The worker stops waiting for it and moves on; the
// goroutine is left running.
var ErrHandlerTimeout = errors.New("batchq: handler ignored its context and was abandoned")

// TimeoutError is recorded for a handler call that its queue's timeout
// (WithTimeout) ended: Err is what the handler returned (usually wrapping
// context.DeadlineExceeded), or ErrHandlerTimeout when it did not return.
type TimeoutError struct {
	Timeout time.Duration
	Err     error
}

func (e *TimeoutError) Error() string {
	return fmt.Sprintf("batchq: handler timed out after %v (WithTimeout): %v", e.Timeout, e.Err)
}

func (e *TimeoutError) Unwrap() error { return e.Err }

// ErrDecode wraps the error of an item that does not decode into the
// handler's type. Such an item goes to dead letters at once.
var ErrDecode = errors.New("batchq: item does not decode into the handler's type")
