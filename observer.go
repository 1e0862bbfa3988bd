package batchq

import (
	"errors"
	"time"
)

// Observer is told what a Worker does, for metrics: the metrics package
// implements it for Prometheus. Its methods are called from the worker's
// goroutines, concurrently, and must return quickly. They get no payload.
type Observer interface {
	// Fetched: the worker took a batch of the queue: the items drained from
	// one key (retry false), or due retries (retry true); bytes is the size
	// of their JSON.
	Fetched(queue string, items, bytes int, retry bool)
	// Handled: one handler call (one item, or one key's items, or a
	// WithMaxBatch chunk of them, for a batch handler), with its middleware,
	// returned err after d, or was abandoned (see WithTimeout). A call of
	// items that do not decode fails without reaching the handler.
	Handled(queue string, d time.Duration, err error)
	// Settled: the outcomes of a batch were recorded in Redis: done items,
	// items scheduled for another attempt, and items moved to dead letters
	// (items that did not decode included). A fetch that moves corrupt
	// values to dead letters reports them here too, one per value.
	Settled(queue string, done, retried, dead int)
}

// WithObserver makes the worker report to o (see Observer).
func WithObserver(o Observer) Option {
	return func(c *workerConfig) error {
		if o == nil {
			return errors.New("nil observer")
		}
		c.observer = o
		return nil
	}
}

// nopObserver is the observer of a worker without WithObserver.
type nopObserver struct{}

func (nopObserver) Fetched(string, int, int, bool)          {}
func (nopObserver) Handled(string, time.Duration, error)    {}
func (nopObserver) Settled(queue string, done, r, dead int) {}
