package batchq

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/rueidis"
	"go.uber.org/zap"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/internal/protocol"
)

// Defaults of a Worker and of its queues.
const (
	DefaultConcurrency     = 16
	DefaultShutdownTimeout = 30 * time.Second
	DefaultMaxAttempts     = 10
	DefaultTimeout         = time.Minute
)

// Tuning constants.
const (
	// maxIdleWait bounds how long an idle fetch loop blocks before it looks
	// for due retries and expired leases again. New keys wake it at once.
	maxIdleWait = protocol.ClaimEvery
	// reapEvery is how often a worker reaps the expired leases of its queues.
	reapEvery = time.Second
	// syncEvery is how often a worker measures the Redis server's clock.
	syncEvery = 30 * time.Second
	// abandonGrace is how long a handler may outlive its context before the
	// worker stops waiting for it.
	abandonGrace = 2 * time.Second
	// panicRetryDelay is the retry delay of items whose batch panicked
	// outside the user's handler.
	panicRetryDelay = time.Minute
	// redisTimeout bounds one fetch or settle round trip.
	redisTimeout = 10 * time.Second
	// popGrace bounds how long a blocking pop may outlive its server-side
	// timeout.
	popGrace = 2 * time.Second
	// releaseWait is how long a batch whose items all succeeded waits for
	// its fetcher's next round to release its lease, before it is settled
	// on its own round trip. At a steady trickle of keys the next round
	// comes first, and the release costs no round trip of its own.
	releaseWait = 2 * time.Millisecond
	// maxReleases bounds the lease releases of one round.
	maxReleases = 256
)

// ErrNoHandlers is returned by Run when no handler was registered.
var ErrNoHandlers = errors.New("batchq: no handler registered")

// Worker drains queues and hands each item to the handler registered for
// its queue. Register handlers with Handle, HandleRaw or HandleBatch, then
// call Run once.
//
// A batch is the items of one key drained at once. Up to the worker's
// concurrency handler calls run at once: the batches of many keys, and the
// items (or WithMaxBatch chunks) of one busy key while slots are free. A
// batch's calls are taken in append order; those that run at once may
// start and end in any order.
type Worker struct {
	cons            *protocol.Consumer
	dead            *deadletter.Client
	log             *zap.Logger
	concurrency     int
	shutdownTimeout time.Duration
	obs             Observer

	mu         sync.Mutex
	queues     map[string]*queue
	middleware []Middleware // Use's
	running    bool
}

// NewWorker returns a Worker that uses rdb, which the caller keeps owning
// (create it with DisableCache: true).
func NewWorker(rdb rueidis.Client, opts ...Option) (*Worker, error) {
	if rdb == nil {
		return nil, errors.New("batchq: nil client")
	}
	cfg := workerConfig{log: zap.NewNop(), concurrency: DefaultConcurrency, shutdownTimeout: DefaultShutdownTimeout, observer: nopObserver{}}
	for _, o := range opts {
		if o == nil {
			return nil, errors.New("batchq: nil option")
		}
		if err := o(&cfg); err != nil {
			return nil, fmt.Errorf("batchq: %w", err)
		}
	}
	cons, err := protocol.NewConsumer(rdb, cfg.consumer...)
	if err != nil {
		return nil, fmt.Errorf("batchq: %w", err)
	}
	dead, err := deadletter.New(rdb, deadletter.WithPrefix(cons.Prefix()))
	if err != nil {
		return nil, fmt.Errorf("batchq: %w", err)
	}
	return &Worker{
		cons:            cons,
		dead:            dead,
		log:             cfg.log.Named("batchq"),
		concurrency:     cfg.concurrency,
		shutdownTimeout: cfg.shutdownTimeout,
		obs:             cfg.observer,
		queues:          make(map[string]*queue),
	}, nil
}

// DeadLetters returns a client of the dead letters of the worker's queues
// (with its prefix and shards), to list, requeue or purge them.
func (w *Worker) DeadLetters() *deadletter.Client { return w.dead }

// Run drains the registered queues until ctx is cancelled, then shuts down:
// it stops fetching, lets running handlers finish for up to the shutdown
// timeout, then cancels their contexts; the items of a batch not yet handled
// go back to their key at once. Run returns nil once all of that is done, so
// it fits an oklog/run group:
//
//	g.Add(func() error { return w.Run(ctx) }, func(error) { cancel() })
//
// Redis errors do not end Run: it logs them and tries again with backoff.
// Run may be called once.
func (w *Worker) Run(ctx context.Context) error {
	w.mu.Lock()
	if w.running {
		w.mu.Unlock()
		return errors.New("batchq: Run called twice")
	}
	w.running = true
	queues := make([]*queue, 0, len(w.queues))
	for _, q := range w.queues {
		queues = append(queues, q)
	}
	middleware := w.middleware
	w.mu.Unlock()
	slices.SortFunc(queues, func(a, b *queue) int { return strings.Compare(a.name, b.name) }) // listed in order by batchq workers
	if len(queues) == 0 {
		return ErrNoHandlers
	}

	// Handlers run under hctx, which outlives ctx by the shutdown timeout.
	hctx, hcancel := context.WithCancel(context.WithoutCancel(ctx))
	defer hcancel()
	r := &runner{
		w:         w,
		hctx:      hctx,
		stop:      ctx.Done(),
		slots:     make(chan struct{}, w.concurrency),
		work:      make(chan job),
		help:      make(chan job),
		acks:      make(chan ackReq, maxAckGroup),
		active:    make(map[*protocol.Batch]struct{}),
		executors: make(map[*executor]struct{}),
	}
	for _, q := range queues {
		var err error
		if q.chain, err = r.chain(q.handler, slices.Concat(middleware, q.middleware)...); err != nil {
			return fmt.Errorf("%w (queue %s)", err, q.name)
		}
		if q.ordered {
			w.cons.Order(q.name)
		}
	}
	r.checkServer(ctx, queues)
	w.log.Info("worker started", zap.String("name", w.cons.Name()), zap.Int("queues", len(queues)),
		zap.Int("concurrency", w.concurrency))

	extendDone := make(chan struct{})
	var background sync.WaitGroup
	background.Go(func() { r.extendLoop(extendDone) })
	background.Go(func() { r.ackLoop(extendDone) })
	background.Go(func() { r.syncLoop(ctx, queues) })
	background.Go(func() { r.reapLoop(ctx, queues) })
	background.Go(func() { r.watchdog(extendDone) })
	for range w.concurrency {
		x := r.newExecutor()
		r.executing.Add(1)
		go x.loop(nil)
	}

	// Fetch loops start for the shards the registry counts, here, then in
	// shardsLoop as the count grows (or once Redis answers, if it did not
	// at start); shardsLoop returns when ctx is done, so no loop starts
	// once the wait for them begins.
	r.grow(ctx, queues)
	r.shardsLoop(ctx, queues)
	r.fetchers.Wait()
	close(r.work)

	w.log.Info("worker stopping", zap.Int("running_batches", r.activeCount()), zap.Duration("shutdown_timeout", w.shutdownTimeout))
	hard := time.AfterFunc(w.shutdownTimeout, hcancel)
	r.batches.Wait()
	hard.Stop()
	r.executing.Wait()
	close(extendDone)
	background.Wait()
	r.retire()
	w.log.Info("worker stopped", zap.Int64("abandoned_handlers", r.abandoned.Load()))
	return nil
}
