package batchq

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"
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
)

// ErrNoHandlers is returned by Run when no handler was registered.
var ErrNoHandlers = errors.New("batchq: no handler registered")

// Worker drains queues and hands each item to the handler registered for
// its queue. Register handlers with Handle, HandleRaw or HandleBatch, then
// call Run once.
//
// Within a batch (the items of one key drained at once) items are handled
// one after the other, in append order; up to the worker's concurrency
// batches are handled at once.
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

// WithConcurrency sets how many batches a worker handles at once (default 16).
func WithConcurrency(n int) Option {
	return func(c *workerConfig) error {
		if n < 1 {
			return fmt.Errorf("batchq: concurrency must be at least 1, got %d", n)
		}
		c.concurrency = n
		return nil
	}
}

// WithLogger sets the logger (default: none). The worker logs failures at
// warn level and lifecycle at info level, with the queue and key but never
// an item's contents.
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
// "<hostname>-<pid>-<random>"); it may not hold a colon.
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
// its context is cancelled then. A handler that ignores its context is
// abandoned 2s later, still running, and its item counts as failed with
// ErrHandlerTimeout (or, when the shutdown timeout cancelled it, as not
// handled: it goes back to its key). 0 means no timeout.
func WithTimeout(d time.Duration) QueueOption {
	return func(q *queue) {
		if d < 0 {
			panic(fmt.Sprintf("batchq: negative timeout %v", d))
		}
		q.timeout = d
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
// attempt (see NoRetry and RetryAfter). Handle panics when queue already
// has a handler, when its name is invalid, or once Run has been called.
func Handle[T any](w *Worker, queueName string, fn func(ctx context.Context, item T) error, opts ...QueueOption) {
	if fn == nil {
		panic("batchq: nil handler")
	}
	w.register(queueName, opts, func(r *runner, q *queue, b *protocol.Batch, out []protocol.Outcome) {
		for i, it := range b.Items {
			if r.stopping() {
				return // the rest stays Unfinished
			}
			v, err := decode[T](it.Data)
			if err != nil {
				out[i] = protocol.Outcome{Kind: protocol.Dead, Err: err}
				continue
			}
			info := ItemInfo{Queue: q.name, Key: it.Key, Attempt: it.Attempt}
			err = r.call(q, info, func(ctx context.Context) error { return fn(ctx, v) })
			out[i] = r.outcome(q, info, it.Attempt, err)
		}
	})
}

// HandleRaw registers fn as the handler of queue's items, each passed as the
// JSON bytes that were appended. See Handle.
func HandleRaw(w *Worker, queueName string, fn func(ctx context.Context, item json.RawMessage) error, opts ...QueueOption) {
	Handle(w, queueName, fn, opts...)
}

// HandleBatch registers fn as the handler of queue's batches: fn gets all
// the items drained from one key at once, in append order, each decoded
// into a T (items that do not decode go to dead letters and are left out).
// A nil error means every item is done; a *BatchError fails only the items
// it names; any other error fails them all. See Handle.
func HandleBatch[T any](w *Worker, queueName string, fn func(ctx context.Context, key string, items []T) error, opts ...QueueOption) {
	if fn == nil {
		panic("batchq: nil handler")
	}
	w.register(queueName, opts, func(r *runner, q *queue, b *protocol.Batch, out []protocol.Outcome) {
		// A batch of retries may hold items of several keys: one call per key.
		for _, group := range groupByKey(b.Items) {
			if r.stopping() {
				return
			}
			vals := make([]T, 0, len(group))
			idx := make([]int, 0, len(group)) // vals[j] is b.Items[idx[j]]
			attempt := 0
			for _, i := range group {
				v, err := decode[T](b.Items[i].Data)
				if err != nil {
					out[i] = protocol.Outcome{Kind: protocol.Dead, Err: err}
					continue
				}
				vals = append(vals, v)
				idx = append(idx, i)
				attempt = max(attempt, b.Items[i].Attempt)
			}
			if len(vals) == 0 {
				continue
			}
			info := ItemInfo{Queue: q.name, Key: b.Items[group[0]].Key, Attempt: attempt}
			err := r.call(q, info, func(ctx context.Context) error { return fn(ctx, info.Key, vals) })
			var be *BatchError
			if errors.As(err, &be) {
				var failed map[int]error // a nil *BatchError fails nothing
				if be != nil {
					failed = be.Failed
				}
				for j, i := range idx {
					out[i] = r.outcome(q, info, b.Items[i].Attempt, failed[j])
				}
				continue
			}
			for _, i := range idx {
				out[i] = r.outcome(q, info, b.Items[i].Attempt, err)
			}
		}
	})
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
		return v, fmt.Errorf("%w: %v", ErrDecode, err)
	}
	return v, nil
}

// queue is a registered queue: its handler and retry settings.
type queue struct {
	name        string
	backoff     Backoff
	maxAttempts int
	timeout     time.Duration
	// handle fills out[i] with the outcome of b.Items[i]; entries it leaves
	// untouched are Unfinished.
	handle func(r *runner, q *queue, b *protocol.Batch, out []protocol.Outcome)
	// warnedShards is the registry's shard count last warned about (see
	// runner.register; written at start, then by the reap loop only).
	warnedShards int
}

func (w *Worker) register(name string, opts []QueueOption, handle func(*runner, *queue, *protocol.Batch, []protocol.Outcome)) {
	if err := keys.CheckQueue(name); err != nil {
		panic(err.Error())
	}
	q := &queue{name: name, backoff: DefaultBackoff, maxAttempts: DefaultMaxAttempts, timeout: DefaultTimeout, handle: handle}
	for _, o := range opts {
		o(q)
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
	if len(queues) == 0 {
		return ErrNoHandlers
	}

	// Handlers run under hctx, which outlives ctx by the shutdown timeout.
	hctx, hcancel := context.WithCancel(context.WithoutCancel(ctx))
	defer hcancel()
	r := &runner{
		w:      w,
		hctx:   hctx,
		stop:   ctx.Done(),
		slots:  make(chan struct{}, w.concurrency),
		loops:  len(queues) * w.cons.Shards(),
		acks:   make(chan ackReq),
		active: make(map[*protocol.Batch]struct{}),
	}
	w.log.Info("worker started", zap.String("name", w.cons.Name()), zap.Int("queues", len(queues)),
		zap.Int("shards", w.cons.Shards()), zap.Int("concurrency", w.concurrency))
	r.checkServer(ctx, queues)

	extendDone := make(chan struct{})
	var background sync.WaitGroup
	background.Go(func() { r.extendLoop(extendDone) })
	background.Go(func() { r.ackLoop(extendDone) })
	background.Go(func() { r.reapLoop(ctx, queues) })

	var fetchers sync.WaitGroup
	for _, q := range queues {
		for shard := range w.cons.Shards() {
			fetchers.Go(func() { r.fetchLoop(ctx, q, shard) })
		}
	}
	fetchers.Wait()

	w.log.Info("worker stopping", zap.Int("running_batches", r.activeCount()), zap.Duration("shutdown_timeout", w.shutdownTimeout))
	hard := time.AfterFunc(w.shutdownTimeout, hcancel)
	r.batches.Wait()
	hard.Stop()
	close(extendDone)
	background.Wait()
	w.log.Info("worker stopped", zap.Int64("abandoned_handlers", r.abandoned.Load()))
	return nil
}

// runner is the state of one Run.
type runner struct {
	w       *Worker
	hctx    context.Context // handlers' parent context
	stop    <-chan struct{} // closed when shutdown begins
	slots   chan struct{}   // one token per running batch
	loops   int             // fetch loops: queues times shards
	acks    chan ackReq     // batches to settle, served by ackLoop
	batches sync.WaitGroup

	mu        sync.Mutex
	active    map[*protocol.Batch]struct{}
	abandoned atomic.Int64
	// trouble is when a Redis call last failed (Unix ns). Reaping pauses
	// for a lease TTL after it: other workers' heartbeats may have failed
	// too, and their live batches must not be taken from them.
	trouble atomic.Int64
	// synced is set once the consumer's clock has been synced to the
	// server's: until then the worker neither fetches nor reaps, since its
	// deadlines could be off by its clock's skew.
	synced atomic.Bool
}

// redisFailed records a failed Redis call. Only batchq's own error replies
// (a corrupt or full key, a lease in an unexpected state) leave Redis
// trusted; anything else, a lost connection or a reply such as BUSY,
// LOADING or READONLY, may have failed heartbeats too.
func (r *runner) redisFailed(err error) {
	if !protocol.Trusted(err) {
		r.trouble.Store(time.Now().UnixNano())
	}
}

// calm reports whether the clock is synced and no Redis call failed for a
// lease TTL.
func (r *runner) calm() bool {
	return r.synced.Load() && time.Since(time.Unix(0, r.trouble.Load())) > r.w.cons.LeaseTTL()
}

func (r *runner) stopping() bool {
	select {
	case <-r.stop:
		return true
	default:
		return false
	}
}

// acquire takes n slots, waiting for each, and returns how many it took:
// fewer when shutdown begins first.
func (r *runner) acquire(n int) int {
	for i := range n {
		select {
		case r.slots <- struct{}{}:
		case <-r.stop:
			return i
		}
	}
	return n
}

// tryAcquire takes a slot if one is free, and reports whether it did.
func (r *runner) tryAcquire() bool {
	select {
	case r.slots <- struct{}{}:
		return true
	default:
		return false
	}
}

func (r *runner) release(n int) {
	for range n {
		<-r.slots
	}
}

// free returns how many slots are free now.
func (r *runner) free() int { return cap(r.slots) - len(r.slots) }

func (r *runner) activeCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.active)
}

// fetchLoop keeps one queue shard's due work flowing into free slots. It
// pops due keys from the shard's wake list, blocking while there are none,
// and drains them into batches, one round trip each way. And it claims,
// every maxIdleWait and whenever a known due time has come: due retries
// (for which it waits for a slot, so that keys always due cannot starve
// them), keys a flush policy scheduled, and keys a dead worker popped but
// never drained (docs/PROTOCOL.md).
func (r *runner) fetchLoop(ctx context.Context, q *queue, shard int) {
	log := r.w.log.With(zap.String("queue", q.name), zap.Int("shard", shard))
	failures := 0
	failed := func(what string, err error) {
		failures++
		r.redisFailed(err)
		log.Warn(what+" failed", zap.Error(err), zap.Int("failures", failures))
		r.sleep(retryWait(failures))
	}
	var nextClaim, nextRetry time.Time // zero: at once, and none known
	for !r.stopping() {
		if !r.synced.Load() {
			r.sleep(100 * time.Millisecond) // the reap loop syncs
			continue
		}
		now := r.w.cons.Now()
		retryDue := !nextRetry.IsZero() && !now.Before(nextRetry)
		if retryDue || !now.Before(nextClaim) {
			slot := r.tryAcquire()
			if !slot && retryDue {
				if slot = r.acquire(1) == 1; !slot {
					return
				}
			}
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), redisTimeout)
			f, err := r.w.cons.Claim(cctx, q.name, shard, slot)
			cancel()
			used := r.started(q, f, log)
			if slot && used == 0 {
				r.release(1)
			}
			if err != nil {
				failed("claim", err)
				continue
			}
			failures = 0
			nextClaim, nextRetry = now.Add(maxIdleWait), f.NextRetry
			for _, t := range []time.Time{f.NextKey, f.NextRetry} {
				if !t.IsZero() && t.Before(nextClaim) {
					nextClaim = t
				}
			}
		}
		count := max(1, r.free()/r.loops)
		wait := min(max(nextClaim.Sub(now), time.Millisecond), maxIdleWait)
		popped, hint, err := r.w.cons.Pop(ctx, q.name, shard, count, wait)
		if hint {
			nextClaim = time.Time{} // a producer scheduled a key: learn when it is due
		}
		if err != nil {
			if ctx.Err() == nil {
				failed("pop", err)
			}
			continue
		}
		if len(popped) == 0 {
			continue
		}
		if got := r.acquire(len(popped)); got < len(popped) {
			// Shutdown came first: the keys go back for another worker.
			r.release(got)
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), redisTimeout)
			if err := r.w.cons.Unpop(uctx, q.name, shard, popped); err != nil {
				log.Warn("could not put popped keys back; a claim finds them again", zap.Error(err), zap.Int("keys", len(popped)))
			}
			cancel()
			return
		}
		// A drain under way completes even if shutdown begins: what it
		// drained is put back at once by the batches it starts.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), redisTimeout)
		f, err := r.w.cons.Drain(dctx, q.name, shard, popped)
		cancel()
		r.release(len(popped) - r.started(q, f, log))
		if err != nil {
			failed("drain", err)
			continue
		}
		failures = 0
	}
}

// started starts the batches of f, each in a slot the caller holds, and
// logs and counts its dead letters. It returns how many batches it started.
func (r *runner) started(q *queue, f protocol.Fetched, log *zap.Logger) int {
	for _, b := range f.Batches {
		size := 0
		for _, it := range b.Items {
			size += len(it.Data)
		}
		r.w.obs.Fetched(q.name, len(b.Items), size, b.Retry())
		r.start(q, b)
	}
	for _, d := range f.Dead {
		log.Warn("moved a corrupt value to dead letters", zap.String("key", d.Key), zap.String("reason", d.Error))
	}
	if len(f.Dead) > 0 {
		r.w.obs.Settled(q.name, 0, 0, len(f.Dead)) // one dead letter per corrupt value
	}
	return len(f.Batches)
}

// checkServer records the queues in the registry, syncs the consumer's
// clock to the server's and warns about server settings that lose items.
// Failures are logged, not fatal: Redis may be down at start, and an ACL
// may deny CONFIG.
func (r *runner) checkServer(ctx context.Context, queues []*queue) {
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	if err := r.register(ctx, queues); err != nil {
		r.w.log.Warn("cannot record the queues in the registry; the inspector finds them once a producer appends", zap.Error(err))
	}
	if !r.sync(ctx) {
		r.w.log.Warn("cannot read the Redis server's clock; waiting for it before taking work")
	} else if off := r.w.cons.Offset(); off > time.Second || off < -time.Second {
		r.w.log.Warn("the local clock is off the Redis server's; batchq uses the server's", zap.Duration("offset", off))
	}
	policy, err := r.w.cons.EvictionPolicy(ctx)
	if err == nil && policy != "noeviction" {
		r.w.log.Warn("Redis may evict keys, and with them items: set maxmemory-policy noeviction",
			zap.String("maxmemory_policy", policy))
	}
}

// register records the worker's queues in the registry and warns, once per
// count, about a queue that producers or other workers split into more
// shards than this worker drains: items in the other shards would wait for
// a worker with as many. The worker registers at start and with every clock
// sync, so that it learns of producers deployed after it.
func (r *runner) register(ctx context.Context, queues []*queue) error {
	names := make([]string, len(queues))
	for i, q := range queues {
		names[i] = q.name
	}
	recorded, err := r.w.cons.Register(ctx, names...)
	for i, n := range recorded {
		if q := queues[i]; n > r.w.cons.Shards() && n != q.warnedShards {
			q.warnedShards = n
			r.w.log.Warn("a producer or worker split this queue into more shards than this worker drains: items in the other shards wait for a worker with as many (WithShards must match)",
				zap.String("queue", q.name), zap.Int("recorded_shards", n), zap.Int("shards", r.w.cons.Shards()))
		}
	}
	return err
}

// sync syncs the consumer's clock to the server's and reports whether it
// did.
func (r *runner) sync(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	if err := r.w.cons.Sync(ctx); err != nil {
		if ctx.Err() == nil {
			r.redisFailed(err)
		}
		return false
	}
	r.synced.Store(true)
	return true
}

// reapLoop returns the expired leases of every shard of the worker's queues
// every reapEvery until ctx is done, and syncs the clock every syncEvery.
// It takes no slot, so long handlers do not delay the redelivery of a dead
// worker's batches.
func (r *runner) reapLoop(ctx context.Context, queues []*queue) {
	t := time.NewTicker(reapEvery)
	defer t.Stop()
	lastSync := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !r.synced.Load() || time.Since(lastSync) >= syncEvery {
			if r.sync(ctx) {
				lastSync = time.Now()
				rctx, cancel := context.WithTimeout(ctx, redisTimeout)
				r.register(rctx, queues) // failures show in the next fetch or reap
				cancel()
			}
		}
		if !r.calm() {
			continue
		}
		for _, q := range queues {
			for shard := range r.w.cons.Shards() {
				rctx, cancel := context.WithTimeout(ctx, redisTimeout)
				start := time.Now()
				n, err := r.w.cons.Reap(rctx, q.name, shard)
				cancel()
				if time.Since(start) > r.w.cons.LeaseTTL()/3 {
					// Redis was slow to answer: other workers' heartbeats
					// may have been held up too. Let them renew first.
					r.trouble.Store(time.Now().UnixNano())
				}
				switch {
				case err != nil && ctx.Err() == nil:
					r.redisFailed(err)
					r.w.log.Warn("reap failed", zap.String("queue", q.name), zap.Int("shard", shard), zap.Error(err))
				case n > 0:
					r.w.log.Info("returned the batches of expired leases", zap.String("queue", q.name), zap.Int("shard", shard), zap.Int("leases", n))
				}
			}
		}
	}
}

// retryWait is the pause after the n-th Redis failure in a row: 50ms
// doubling to 500ms, so that a worker is back within a second of Redis.
func retryWait(n int) time.Duration {
	return min(50*time.Millisecond<<min(n-1, 4), 500*time.Millisecond)
}

// sleep waits d or until shutdown begins.
func (r *runner) sleep(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-r.stop:
	}
}

// start handles b in a goroutine that holds one slot.
func (r *runner) start(q *queue, b *protocol.Batch) {
	r.mu.Lock()
	r.active[b] = struct{}{}
	r.mu.Unlock()
	r.batches.Go(func() {
		defer func() { <-r.slots }()
		out := make([]protocol.Outcome, len(b.Items))
		r.handle(q, b, out)
		r.settle(q, b, out)
		r.mu.Lock()
		delete(r.active, b)
		r.mu.Unlock()
	})
}

// handle runs q's handler over b. A panic outside the user's handler (in a
// Backoff, say) is recovered: the items without an outcome yet go back
// unhandled rather than taking the process down.
func (r *runner) handle(q *queue, b *protocol.Batch, out []protocol.Outcome) {
	defer func() {
		v := recover()
		if v == nil {
			return
		}
		r.w.log.Error("panic while handling a batch", zap.String("queue", q.name), zap.String("key", b.Key), zap.Any("panic", v))
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
	q.handle(r, q, b, out)
}

// settle records a batch's outcomes, trying again while Redis fails: the
// batch keeps its slot and its lease heartbeat meanwhile. It gives up only
// once the shutdown timeout has passed; the lease then expires and the
// batch is delivered again.
func (r *runner) settle(q *queue, b *protocol.Batch, out []protocol.Outcome) {
	for attempt := 1; ; attempt++ {
		var err error
		if attempt == 1 {
			err = r.ack(b, out)
		} else {
			ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
			err = r.w.cons.Settle(ctx, b, out)
			cancel()
		}
		if err == nil {
			var n [4]int // by protocol.OutcomeKind
			for _, o := range out {
				n[o.Kind]++
			}
			r.w.obs.Settled(q.name, n[protocol.Done], n[protocol.Retry], n[protocol.Dead])
			return
		}
		log := r.w.log.With(zap.String("queue", q.name), zap.String("key", b.Key), zap.Int("items", len(b.Items)))
		switch {
		case errors.Is(err, protocol.ErrLeaseLost) && attempt == 1:
			log.Warn("lease expired before the batch was settled; it will be delivered again")
			return
		case errors.Is(err, protocol.ErrLeaseLost):
			// Most likely the earlier try landed and only its reply was lost.
			log.Info("lease gone when the settle was tried again: the earlier try landed unseen, or the lease expired before the batch was settled and it will be delivered again",
				zap.Int("attempt", attempt))
			return
		case r.hctx.Err() != nil:
			log.Error("giving up settling the batch at shutdown; it will be delivered again", zap.Error(err))
			return
		}
		r.redisFailed(err)
		log.Warn("settle failed; retrying", zap.Error(err), zap.Int("attempt", attempt))
		t := time.NewTimer(retryWait(attempt))
		select {
		case <-t.C:
		case <-r.hctx.Done():
			t.Stop()
		}
	}
}

// ackReq asks the ack loop to settle a batch.
type ackReq struct {
	b    *protocol.Batch
	out  []protocol.Outcome
	done chan error
}

// maxAckGroup bounds the batches settled in one round trip.
const maxAckGroup = 256

// ack settles b through the ack loop, which settles together the batches
// that finish while an earlier group is on its way: one round trip for
// many acks under load, no added wait when idle.
func (r *runner) ack(b *protocol.Batch, out []protocol.Outcome) error {
	req := ackReq{b: b, out: out, done: make(chan error, 1)}
	r.acks <- req
	return <-req.done
}

// ackLoop serves ack until done is closed (after every batch has settled).
func (r *runner) ackLoop(done <-chan struct{}) {
	group := make([]ackReq, 0, maxAckGroup)
	batches := make([]*protocol.Batch, 0, maxAckGroup)
	outs := make([][]protocol.Outcome, 0, maxAckGroup)
	for {
		select {
		case <-done:
			return
		case req := <-r.acks:
			group = append(group[:0], req)
		}
	more:
		for len(group) < maxAckGroup {
			select {
			case req := <-r.acks:
				group = append(group, req)
			default:
				break more
			}
		}
		batches, outs = batches[:0], outs[:0]
		for _, req := range group {
			batches, outs = append(batches, req.b), append(outs, req.out)
		}
		ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
		errs := r.w.cons.SettleAll(ctx, batches, outs)
		cancel()
		for i, req := range group {
			req.done <- errs[i]
		}
		clear(group) // drop references to settled batches
	}
}

// extendLoop extends the leases of running batches every third of the
// lease TTL until done is closed.
func (r *runner) extendLoop(done <-chan struct{}) {
	t := time.NewTicker(r.w.cons.LeaseTTL() / 3)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		r.mu.Lock()
		bs := make([]*protocol.Batch, 0, len(r.active))
		for b := range r.active {
			bs = append(bs, b)
		}
		r.mu.Unlock()
		if len(bs) == 0 {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), r.w.cons.LeaseTTL()/3)
		if err := r.w.cons.Extend(ctx, bs...); err != nil {
			r.redisFailed(err)
			r.w.log.Warn("extending leases failed", zap.Error(err), zap.Int("batches", len(bs)))
		}
		cancel()
	}
}

// call runs one handler call with the queue's timeout, recovering panics.
// A handler that outlives its context by abandonGrace is abandoned.
func (r *runner) call(q *queue, info ItemInfo, fn func(context.Context) error) error {
	ctx := context.WithValue(r.hctx, infoKey{}, info)
	cancel := func() {}
	if q.timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, q.timeout)
	}
	defer cancel()
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- r.safe(ctx, info, fn) }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		t := time.NewTimer(abandonGrace)
		defer t.Stop()
		select {
		case err = <-done:
		case <-t.C:
			r.abandoned.Add(1)
			r.w.log.Error("handler ignored its context; abandoned", zap.String("queue", info.Queue), zap.String("key", info.Key))
			err = ErrHandlerTimeout
		}
	}
	r.w.obs.Handled(q.name, time.Since(start), err)
	return err
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
