package batchq

import (
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/batchq/batchq/internal/protocol"
)

// Options follow one rule across batchq's packages: an option checks its
// value and returns an error, never panicking; a constructor (NewWorker)
// returns that error, and a registration (Handle, HandleRaw, HandleBatch,
// Use), which has nothing to return, panics with it, as net/http's Handle
// does. Runtime conditions are errors.

// Option configures a Worker.
type Option func(*workerConfig) error

type workerConfig struct {
	log             *zap.Logger
	concurrency     int
	shutdownTimeout time.Duration
	consumer        []protocol.Option
	observer        Observer
}

// WithConcurrency sets how many handler calls a worker runs at once
// (default 16): the batches of as many keys, or the items of one busy key.
func WithConcurrency(n int) Option {
	return func(c *workerConfig) error {
		if n < 1 {
			return fmt.Errorf("concurrency must be at least 1, got %d", n)
		}
		c.concurrency = n
		return nil
	}
}

// WithLogger sets the logger (default: none). The worker logs lifecycle at
// info level and failures at warn level: one line at start when a Redis
// node may evict keys (it asks every node the client knows for its
// maxmemory-policy), one line per batch with failed
// items (with counts and the first error), one per dead letter (at most 20
// per batch), and one when Redis calls start failing, then at most one
// every 30 seconds until they have succeeded for 5 seconds with no failure
// (at info level). It logs queues and keys (cut to 64 bytes) but never an
// item's contents: not the values a decoder quotes, nor a panic's value
// (at debug level only).
func WithLogger(l *zap.Logger) Option {
	return func(c *workerConfig) error {
		if l == nil {
			return errors.New("nil logger")
		}
		c.log = l
		return nil
	}
}

// WithShutdownTimeout sets how long Run lets running handlers finish after
// its context is cancelled before it cancels their contexts (default 30s).
func WithShutdownTimeout(d time.Duration) Option {
	return func(c *workerConfig) error {
		if d < 0 {
			return fmt.Errorf("negative shutdown timeout %v", d)
		}
		c.shutdownTimeout = d
		return nil
	}
}

// WithPrefix sets the prefix of every Redis key (default "batchq"). It must
// match the producers'.
func WithPrefix(p string) Option { return withConsumer(protocol.WithPrefix(p)) }

// WithDefaultShards sets the shards of a queue this worker is the first to
// record: 1 to 1024. A queue's shard count lives in the registry, where
// its first writer (a producer, a worker or batchq queue create) records it
// and every producer and worker reads it, so this never disagrees with a
// producer's: once a queue is recorded, its count is the registry's.
// Without it a new queue gets 1 shard on a single server, and on Redis
// Cluster enough to put at least two on every master (read from CLUSTER
// SLOTS; where an ACL refuses it, four per node, which may leave a master
// without one).
func WithDefaultShards(n int) Option { return withConsumer(protocol.WithDefaultShards(n)) }

// WithLeaseTTL sets how long a batch stays leased without a heartbeat
// (default 5s): the batches of a worker that died go back to their keys
// within about this time plus a second. Live workers extend their leases
// every third of it; a worker cut off from Redis for longer is taken for dead.
func WithLeaseTTL(d time.Duration) Option { return withConsumer(protocol.WithLeaseTTL(d)) }

// WithAtMostOnce drains keys without a lease (GETDEL): a worker that dies
// mid-batch loses the rest of that batch. Failed items are still retried.
func WithAtMostOnce() Option { return withConsumer(protocol.WithAtMostOnce()) }

// WithDeadLetterCap bounds the dead letters kept per queue shard (default
// 100,000, the oldest dropped first; 0 keeps them all).
func WithDeadLetterCap(n int) Option { return withConsumer(protocol.WithDeadLetterCap(n)) }

// WithName names the worker in the leases it holds (default
// "<hostname>-<pid>-<random>"): 1-128 bytes of UTF-8 without colons,
// braces or control characters. It should be unique: a worker that stops
// takes its name off the list of live workers.
func WithName(name string) Option { return withConsumer(protocol.WithName(name)) }

func withConsumer(o protocol.Option) Option {
	return func(c *workerConfig) error {
		c.consumer = append(c.consumer, o)
		return nil
	}
}

// QueueOption configures the handling of one queue. Like an Option, it
// returns an error for an invalid value; Handle, HandleRaw and HandleBatch
// panic with it.
type QueueOption func(*queue) error

// WithBackoff sets the delay before each retry of a failed item (default
// DefaultBackoff).
func WithBackoff(b Backoff) QueueOption {
	return func(q *queue) error {
		if b == nil {
			return errors.New("nil backoff")
		}
		q.backoff = b
		return nil
	}
}

// WithMaxAttempts sets how many times an item is tried before it goes to
// dead letters (default 10; 1 means no retry).
func WithMaxAttempts(n int) QueueOption {
	return func(q *queue) error {
		if n < 1 {
			return fmt.Errorf("max attempts must be at least 1, got %d", n)
		}
		q.maxAttempts = n
		return nil
	}
}

// WithTimeout sets how long one handler call may take (default 1 minute):
// its context is cancelled then, and its error is recorded as a
// *TimeoutError naming the timeout. A handler that ignores its context is
// abandoned about 2s later, still running: its items count as failed with
// a *TimeoutError wrapping ErrHandlerTimeout (or, when the shutdown timeout
// cancelled it, as not handled: they go back to their key), and the rest
// of its batch is handled. 0 means no timeout.
func WithTimeout(d time.Duration) QueueOption {
	return func(q *queue) error {
		if d < 0 {
			return fmt.Errorf("negative timeout %v", d)
		}
		q.timeout = d
		return nil
	}
}

// WithOrderedKeys makes the queue's keys ordered: at most one batch of a
// key is out at a time, across all workers, and a key's items are handled
// one after another, in append order (the batches of different keys still
// run at once). A failed item holds its key: the items after it, and those
// appended meanwhile, wait behind it, in order, until it succeeds or goes
// to dead letters; then the key moves on. A batch whose worker died is
// delivered again before anything newer of its key (the items of it that
// were handled run again: delivery is at-least-once). Every worker of the
// queue must register it with WithOrderedKeys, as it registers the same
// handler; producers need nothing. It costs an ordered drain a second
// round trip, and a batch of one item a settle script (README, "Ordered
// keys", has the measured cost). Handle panics when the worker has
// WithAtMostOnce: order needs leases.
func WithOrderedKeys() QueueOption {
	return func(q *queue) error {
		q.ordered = true
		return nil
	}
}

// WithMaxBatch bounds the calls of a batch handler (HandleBatch): each gets
// at most items items and at most bytes bytes of JSON, in append order; an
// item bigger than bytes gets a call of its own. Each call has its own
// outcome, and the calls of one batch may run at once. 0 means no bound,
// the default for both: a call gets all the items drained from its key,
// which the producer's per-key caps bound (WithMaxKeyItems, 1,000,000, and
// WithMaxKeyBytes, 64 MiB). A negative bound is an error, and so is any
// bound given to Handle or HandleRaw: their calls get one item.
func WithMaxBatch(items, bytes int) QueueOption {
	return func(q *queue) error {
		if items < 0 || bytes < 0 {
			return fmt.Errorf("negative batch bound (%d items, %d bytes)", items, bytes)
		}
		if !q.batch && (items > 0 || bytes > 0) {
			return errors.New("WithMaxBatch bounds HandleBatch's calls; Handle and HandleRaw get one item a call")
		}
		q.maxItems, q.maxBytes = items, bytes
		return nil
	}
}
