package batchq

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/rueidis"
	"go.uber.org/zap"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/internal/keys"
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
	maxIdleWait = time.Second
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

	mu      sync.Mutex
	queues  map[string]*queue
	running bool
}

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
			return fmt.Errorf("batchq: concurrency must be at least 1, got %d", n)
		}
		c.concurrency = n
		return nil
	}
}

// WithLogger sets the logger (default: none). The worker logs lifecycle at
// info level and failures at warn level: one line per batch with failed
// items (with counts and the first error), one per dead letter (at most 20
// per batch), and one when Redis calls start failing, then at most one
// every 30 seconds until they have succeeded for 5 seconds with no failure
// (at info level). It logs queues and keys (cut to 64 bytes) but never an
// item's contents: not the values a decoder quotes, nor a panic's value
// (at debug level only).
func WithLogger(l *zap.Logger) Option {
	return func(c *workerConfig) error {
		if l == nil {
			return errors.New("batchq: nil logger")
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
			return fmt.Errorf("batchq: negative shutdown timeout %v", d)
		}
		c.shutdownTimeout = d
		return nil
	}
}

// WithPrefix sets the prefix of every Redis key (default "batchq"). It must
// match the producers'.
func WithPrefix(p string) Option { return withConsumer(protocol.WithPrefix(p)) }

// WithShards sets the number of shards of every queue (default 1). It must
// match the producers'.
func WithShards(n int) Option { return withConsumer(protocol.WithShards(n)) }

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

// NewWorker returns a Worker that uses rdb, which the caller keeps owning
// (create it with DisableCache: true).
func NewWorker(rdb rueidis.Client, opts ...Option) (*Worker, error) {
	cfg := workerConfig{log: zap.NewNop(), concurrency: DefaultConcurrency, shutdownTimeout: DefaultShutdownTimeout, observer: nopObserver{}}
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, err
		}
	}
	cons, err := protocol.NewConsumer(rdb, cfg.consumer...)
	if err != nil {
		return nil, err
	}
	dead, err := deadletter.New(rdb, deadletter.WithPrefix(cons.Prefix()), deadletter.WithShards(cons.Shards()))
	if err != nil {
		return nil, err
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

// QueueOption configures the handling of one queue.
type QueueOption func(*queue)

// WithBackoff sets the delay before each retry of a failed item (default
// DefaultBackoff).
func WithBackoff(b Backoff) QueueOption {
	return func(q *queue) {
		if b == nil {
			panic("batchq: nil backoff")
		}
		q.backoff = b
	}
}

// WithMaxAttempts sets how many times an item is tried before it goes to
// dead letters (default 10; 1 means no retry).
func WithMaxAttempts(n int) QueueOption {
	return func(q *queue) {
		if n < 1 {
			panic(fmt.Sprintf("batchq: max attempts must be at least 1, got %d", n))
		}
		q.maxAttempts = n
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
	return func(q *queue) {
		if d < 0 {
			panic(fmt.Sprintf("batchq: negative timeout %v", d))
		}
		q.timeout = d
	}
}

// WithMaxBatch bounds the calls of a batch handler (HandleBatch): each gets
// at most items items and at most bytes bytes of JSON, in append order; an
// item bigger than bytes gets a call of its own. Each call has its own
// outcome, and the calls of one batch may run at once. 0 means no bound,
// the default for both: a call gets all the items drained from its key,
// which the producer's per-key caps bound (WithMaxKeyItems, 1,000,000, and
// WithMaxKeyBytes, 64 MiB). It panics given a negative bound, and
// registering it with Handle or HandleRaw panics: their calls get one item.
func WithMaxBatch(items, bytes int) QueueOption {
	return func(q *queue) {
		if items < 0 || bytes < 0 {
			panic(fmt.Sprintf("batchq: negative batch bound (%d items, %d bytes)", items, bytes))
		}
		q.maxItems, q.maxBytes = items, bytes
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

// Handle registers fn as the handler of queue's items, each decoded from
// JSON into a T. An item that does not decode goes to dead letters at once.
// A nil error from fn means the item is done; any other error fails this
// attempt (see NoRetry and RetryAfter). The items of one key's batch start
// in append order, and run at once while the worker has free slots. Handle
// panics when queue already has a handler, when its name is invalid, or
// once Run has been called.
func Handle[T any](w *Worker, queueName string, fn func(ctx context.Context, item T) error, opts ...QueueOption) {
	if fn == nil {
		panic("batchq: nil handler")
	}
	// A step is an item.
	w.register(queueName, opts, false, func(x *executor, j job, s int) bool {
		br := j.br
		q, it := br.f.q, br.b.Items[s]
		v, err := decode[T](it.Data)
		if err != nil {
			br.out[s] = protocol.Outcome{Kind: protocol.Dead, Err: err}
			return true
		}
		info := ItemInfo{Queue: q.name, Key: it.Key, Attempt: it.Attempt}
		return x.call(j, info, s, func(ctx context.Context) error { return fn(ctx, v) },
			func(err error) { br.out[s] = x.r.outcome(q, it.Attempt, err) })
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
		panic("batchq: nil handler")
	}
	// A step is a chunk of a key's items (see queue.plan).
	w.register(queueName, opts, true, func(x *executor, j job, s int) bool {
		br := j.br
		q, b := br.f.q, br.b
		step := br.steps[s]
		vals := make([]T, 0, len(step))
		idx := make([]int, 0, len(step)) // vals[k] is b.Items[idx[k]]
		attempt := 0
		for _, i := range step {
			v, err := decode[T](b.Items[i].Data)
			if err != nil {
				br.out[i] = protocol.Outcome{Kind: protocol.Dead, Err: err}
				continue
			}
			vals = append(vals, v)
			idx = append(idx, i)
			attempt = max(attempt, b.Items[i].Attempt)
		}
		if len(vals) == 0 {
			return true
		}
		info := ItemInfo{Queue: q.name, Key: b.Items[step[0]].Key, Attempt: attempt}
		apply := func(err error) {
			failed, ok := itemErrors(err, len(vals))
			for k, i := range idx {
				e := err
				if ok {
					e = failed[k]
				}
				br.out[i] = x.r.outcome(q, b.Items[i].Attempt, e)
			}
		}
		return x.call(j, info, s, func(ctx context.Context) error { return fn(ctx, info.Key, vals) }, apply)
	})
}

// itemErrors returns the errors of the n items of a batch handler's call
// that returned err, by index, and true, when err is or wraps a
// *BatchError: nil for an item that succeeded. A NoRetry or RetryAfter
// around the *BatchError applies to each failed item (a RetryAfter of the
// item's own comes first). It returns false, for every item to take err,
// when err is some other error, or a *BatchError with an index that is not
// one of the call's items: such a handler has miscounted, and no failure
// may be lost.
func itemErrors(err error, n int) (map[int]error, bool) {
	var be *BatchError
	if !errors.As(err, &be) {
		return nil, false
	}
	if be == nil { // a nil *BatchError fails nothing
		return nil, true
	}
	for k := range be.Failed {
		if k < 0 || k >= n {
			return nil, false
		}
	}
	if error(be) == err {
		return be.Failed, true
	}
	var nr *noRetryError
	noRetry := errors.As(err, &nr)
	var ra *retryAfterError
	retryAfter := errors.As(err, &ra)
	failed := make(map[int]error, len(be.Failed))
	for k, e := range be.Failed {
		if e == nil {
			continue
		}
		var own *retryAfterError
		switch {
		case noRetry:
			e = NoRetry(e)
		case retryAfter && !errors.As(e, &own):
			e = RetryAfter(ra.d, e)
		}
		failed[k] = e
	}
	return failed, true
}

// plan returns the steps of a batch handler's batch b: the indexes of its
// items, grouped by key (in order of first appearance) and cut to the
// queue's batch bounds.
func (q *queue) plan(b *protocol.Batch) [][]int {
	groups := groupByKey(b.Items)
	if q.maxItems == 0 && q.maxBytes == 0 {
		return groups
	}
	steps := make([][]int, 0, len(groups))
	for _, g := range groups {
		start, size := 0, 0
		for k, i := range g {
			n := len(b.Items[i].Data)
			if k > start && (q.maxItems > 0 && k-start == q.maxItems || q.maxBytes > 0 && size+n > q.maxBytes) {
				steps = append(steps, g[start:k:k])
				start, size = k, 0
			}
			size += n
		}
		steps = append(steps, g[start:])
	}
	return steps
}

// groupByKey returns the indexes of items grouped by key, groups in order of
// first appearance.
func groupByKey(items []protocol.Item) [][]int {
	if len(items) > 0 && items[0].Key == items[len(items)-1].Key {
		all := true
		for _, it := range items {
			if it.Key != items[0].Key {
				all = false
				break
			}
		}
		if all {
			idx := make([]int, len(items))
			for i := range idx {
				idx[i] = i
			}
			return [][]int{idx}
		}
	}
	pos := make(map[string]int)
	var groups [][]int
	for i, it := range items {
		g, ok := pos[it.Key]
		if !ok {
			g = len(groups)
			pos[it.Key] = g
			groups = append(groups, nil)
		}
		groups[g] = append(groups[g], i)
	}
	return groups
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
	// step runs step s of j's batch, one handler call, and fills in the
	// outcomes of its items (those it leaves untouched are Unfinished). It
	// returns false, at once, when x.call does.
	step func(x *executor, j job, s int) bool
	// warnedShards is the registry's shard count last warned about (see
	// runner.register; written at start, then by the reap loop only).
	warnedShards int
}

func (w *Worker) register(name string, opts []QueueOption, batch bool, step func(*executor, job, int) bool) {
	if err := keys.CheckQueue(name); err != nil {
		panic(err.Error())
	}
	q := &queue{name: name, backoff: DefaultBackoff, maxAttempts: DefaultMaxAttempts, timeout: DefaultTimeout, batch: batch, step: step}
	for _, o := range opts {
		o(q)
	}
	if !batch && (q.maxItems > 0 || q.maxBytes > 0) {
		panic("batchq: WithMaxBatch given to Handle or HandleRaw for queue " + name + ": it bounds HandleBatch's calls")
	}
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
		loops:     len(queues) * w.cons.Shards(),
		work:      make(chan job),
		help:      make(chan job),
		acks:      make(chan ackReq, maxAckGroup),
		active:    make(map[*protocol.Batch]struct{}),
		executors: make(map[*executor]struct{}),
	}
	w.log.Info("worker started", zap.String("name", w.cons.Name()), zap.Int("queues", len(queues)),
		zap.Int("shards", w.cons.Shards()), zap.Int("concurrency", w.concurrency))
	r.checkServer(ctx, queues)

	extendDone := make(chan struct{})
	var background sync.WaitGroup
	background.Go(func() { r.extendLoop(extendDone) })
	background.Go(func() { r.ackLoop(extendDone) })
	background.Go(func() { r.reapLoop(ctx, queues) })
	background.Go(func() { r.watchdog(extendDone) })
	for range w.concurrency {
		x := r.newExecutor()
		r.executing.Add(1)
		go x.loop(nil)
	}

	var fetchers sync.WaitGroup
	for _, q := range queues {
		for shard := range w.cons.Shards() {
			f := &fetcher{r: r, q: q, shard: shard, log: w.log.With(zap.String("queue", q.name), zap.Int("shard", shard))}
			fetchers.Go(func() { f.run(ctx) })
		}
	}
	fetchers.Wait()
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
