package batchq

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/batchq/batchq/internal/protocol"
)

// runner is the state of one Run.
type runner struct {
	w     *Worker
	hctx  context.Context // handlers' parent context
	stop  <-chan struct{} // closed when shutdown begins
	slots chan struct{}   // one token per batch being handled or settled by the ack loop, and per helper
	loops atomic.Int32    // fetch loops: a queue's shards, summed over the queues
	work  chan job        // batches to handle, taken by the executors
	help  chan job        // batches to help with, taken by idle executors
	acks  chan ackReq     // batches to settle, served by ackLoop
	// batches counts the batches started and not yet settled (or given
	// up on); executing, the executors, less those abandoned.
	batches   sync.WaitGroup
	executing sync.WaitGroup
	fetchers  sync.WaitGroup // the fetch loops (see grow)

	acquiring sync.Mutex   // held by the one caller of acquire waiting for slots
	waiting   atomic.Int32 // fetchers in acquire: helpers leave, and no more are recruited
	helping   atomic.Int32 // helpers at work, each in a slot it gives back after a step (see batchRun.givesBack)

	mu        sync.Mutex
	active    map[*protocol.Batch]struct{} // the batches of batches, for the lease heartbeat
	executors map[*executor]struct{}       // the executors, less those abandoned
	abandoned atomic.Int64
	// trouble is when a Redis call last failed (Unix ns). Reaping pauses
	// for a lease TTL after it: other workers' heartbeats may have failed
	// too, and their live batches must not be taken from them.
	trouble atomic.Int64
	// synced is set once the consumer's clock has been synced to the
	// server's: until then the worker neither fetches nor reaps, since its
	// deadlines could be off by its clock's skew.
	synced atomic.Bool
	// outage is the run of failed Redis calls under way, if any (see
	// redisFailed); inOutage is set while it lasts.
	outage   outage
	inOutage atomic.Bool
}

// An outage is a run of failed Redis calls.
type outage struct {
	mu       sync.Mutex
	since    time.Time // its first failure; zero: none under way
	logged   time.Time // when it was last logged
	failures int
	last     time.Time // its latest failure
}

// outageLogEvery is how often a worker logs that Redis calls keep failing;
// outageQuiet, how long calls must succeed without a failure for an outage
// to end (when one node of a Redis Cluster is down, calls to the others
// succeed all along).
var (
	outageLogEvery = 30 * time.Second
	outageQuiet    = 5 * time.Second
)

// redisFailed records and logs a failed Redis call: what it was, and
// fields about it. Any failure, a lost connection or a reply such as BUSY,
// LOADING or READONLY, may have failed heartbeats too, and starts or
// continues an outage: its first failure is logged, then one line every
// outageLogEvery with the count, until calls succeed for outageQuiet
// (redisOK). (The replies of batchq's scripts that a worker gets are
// outcomes, such as a lease lost, handled where they come, not failures.)
func (r *runner) redisFailed(what string, err error, fields ...zap.Field) {
	fields = append(fields, zap.Error(err))
	now := time.Now()
	r.trouble.Store(now.UnixNano())
	o := &r.outage
	o.mu.Lock()
	defer o.mu.Unlock()
	o.failures++
	o.last = now
	switch {
	case o.since.IsZero():
		o.since, o.logged, o.failures = now, now, 1
		r.inOutage.Store(true)
		r.w.log.Warn("Redis call failed: "+what+"; retrying (further failures are logged every "+outageLogEvery.String()+")", fields...)
	case now.Sub(o.logged) >= outageLogEvery:
		o.logged = now
		r.w.log.Warn("Redis calls still failing: "+what,
			append(fields, zap.Int("failures", o.failures), zap.Duration("since", now.Sub(o.since)))...)
	}
}

// redisOK records a Redis call that succeeded, ending an outage whose
// latest failure is outageQuiet old.
func (r *runner) redisOK() {
	if !r.inOutage.Load() {
		return
	}
	o := &r.outage
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.since.IsZero() || time.Since(o.last) < outageQuiet {
		return
	}
	r.w.log.Info("Redis calls succeed again", zap.Int("failures", o.failures), zap.Duration("outage", time.Since(o.since)))
	o.since, o.failures = time.Time{}, 0
	r.inOutage.Store(false)
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

// acquire takes n slots, at most the worker's concurrency, waiting for
// each, and returns how many it took: fewer when shutdown begins first. One
// caller at a time waits: fetch loops that each held part of the slots they
// wait for would wait for each other for ever. While it waits, helpers give
// their slots back after their step.
func (r *runner) acquire(n int) int {
	r.acquiring.Lock()
	defer r.acquiring.Unlock()
	for i := range n {
		if r.tryAcquire() {
			continue
		}
		r.waiting.Add(1)
		select {
		case r.slots <- struct{}{}:
			r.waiting.Add(-1)
		case <-r.stop:
			r.waiting.Add(-1)
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

// room returns how many slots a fetch loop may pop keys for: those free,
// and those of helpers, which give them back after their step once a
// fetch loop waits for them.
func (r *runner) room() int { return r.free() + int(r.helping.Load()) }

// start hands b, in a slot the caller holds, to a free executor. One is
// free: an executor is busy only with a batch or a helper's part of one,
// each of which holds a slot.
func (r *runner) start(f *fetcher, b *protocol.Batch) {
	r.mu.Lock()
	r.active[b] = struct{}{}
	r.mu.Unlock()
	r.batches.Add(1)
	br := &batchRun{f: f, b: b, out: make([]protocol.Outcome, len(b.Items))}
	if f.q.batch {
		br.steps = f.q.plan(b)
	}
	if b.Ordered {
		br.keys = br.byKey()
	}
	r.work <- job{br: br}
}

func (r *runner) activeCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.active)
}

// checkServer records the queues in the registry, syncs the consumer's
// clock to the server's and warns about server settings that lose items.
// Failures are logged, not fatal: Redis may be down at start, and an ACL
// may deny CONFIG.
func (r *runner) checkServer(ctx context.Context, queues []*queue) {
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	if err := r.register(ctx, queues); err != nil {
		r.w.log.Warn("cannot read the queues' shard counts from the registry; taking no work until it can (every 2s)", zap.Error(err))
	}
	if !r.sync(ctx) {
		r.w.log.Warn("cannot read the Redis server's clock; waiting for it before taking work")
	} else if off := r.w.cons.Offset(); off > time.Second || off < -time.Second {
		r.w.log.Warn("the local clock is off the Redis server's; batchq uses the server's", zap.Duration("offset", off))
	}
	if ev := r.w.cons.Evictions(ctx); len(ev.Nodes) > 0 {
		r.w.log.Warn(protocol.EvictionWarning,
			zap.String("maxmemory_policy", strings.Join(ev.Policies, ",")), zap.Strings("nodes", ev.Nodes))
	}
}

// register records the worker's queues in the registry, where a queue's
// shard count lives, and reads their counts: a queue no one recorded yet
// gets the worker's default (WithDefaultShards), and one that holds fewer
// shards than the worker drains (it was forgotten and recorded anew) is
// raised to them. The same script call announces the worker as a live one
// for the inspector (batchq workers). The worker registers at start, with
// every clock sync, and whenever shardsLoop finds a queue's count missing
// or below its own.
func (r *runner) register(ctx context.Context, queues []*queue) error {
	qs := make([]protocol.Known, len(queues))
	for i, q := range queues {
		qs[i] = protocol.Known{Queue: q.name, Shards: int(q.shards.Load())}
	}
	recorded, err := r.w.cons.Announce(ctx, r.w.concurrency, qs...)
	for i, n := range recorded {
		queues[i].recorded.Store(int32(n))
	}
	return err
}

// grow starts fetch loops for the shards of each queue that the registry
// counts and the worker does not drain yet: all of them at start, and
// those a raised count adds. It runs on Run's goroutine before shardsLoop
// starts, then on shardsLoop's only.
func (r *runner) grow(ctx context.Context, queues []*queue) {
	for _, q := range queues {
		have, want := int(q.shards.Load()), int(q.recorded.Load())
		if want <= have || ctx.Err() != nil {
			continue
		}
		if have > 0 {
			r.w.log.Info("the queue has more shards: draining them too", zap.String("queue", q.name),
				zap.Int("shards", want), zap.Int("were", have))
		}
		r.loops.Add(int32(want - have))
		for shard := have; shard < want; shard++ {
			f := &fetcher{r: r, q: q, shard: shard, log: r.w.log.With(zap.String("queue", q.name), zap.Int("shard", shard))}
			r.fetchers.Go(func() { f.run(ctx) })
		}
		q.shards.Store(int32(want))
	}
}

// shardsLoop reads the shard counts of the worker's queues every
// protocol.ShardsEvery until ctx is done, and starts fetch loops for the
// shards a raised count adds (grow): a queue grown online (batchq queue
// shards) is drained whole within seconds. The old shards keep their loops:
// a count never shrinks, and they may hold items routed by the old count.
// A read is one HMGET; a queue the registry lacks, or counts below what the
// worker drains (Redis was down at start, or the queue was forgotten),
// makes the worker register again.
func (r *runner) shardsLoop(ctx context.Context, queues []*queue) {
	t := time.NewTicker(protocol.ShardsEvery)
	defer t.Stop()
	names := make([]string, len(queues))
	for i, q := range queues {
		names[i] = q.name
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, redisTimeout)
		counts, err := r.w.cons.ReadShards(rctx, names...)
		again := err != nil
		for i, n := range counts {
			if q := queues[i]; n < int(q.shards.Load()) || n == 0 {
				again = true
			} else {
				q.recorded.Store(int32(n))
			}
		}
		if again {
			err = r.register(rctx, queues)
		}
		cancel()
		switch {
		case err != nil && ctx.Err() == nil:
			r.redisFailed("reading the queues' shards", err)
		case err == nil:
			r.redisOK()
		}
		r.grow(ctx, queues)
	}
}

// sync syncs the consumer's clock to the server's and reports whether it
// did.
func (r *runner) sync(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	if err := r.w.cons.Sync(ctx); err != nil {
		if ctx.Err() == nil {
			r.redisFailed("reading the server's clock", err)
		}
		return false
	}
	r.synced.Store(true)
	return true
}

// syncLoop keeps the worker's view of the server current until ctx is
// done: every syncEvery (every reapEvery until the first success) it syncs
// the consumer's clock to the server's and, when that worked, registers
// the queues again, so that the worker learns of producers deployed after
// it (see register).
func (r *runner) syncLoop(ctx context.Context, queues []*queue) {
	t := time.NewTicker(reapEvery)
	defer t.Stop()
	last := time.Now() // checkServer synced and registered
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if r.synced.Load() && time.Since(last) < syncEvery {
			continue
		}
		if r.sync(ctx) {
			last = time.Now()
			rctx, cancel := context.WithTimeout(ctx, redisTimeout)
			r.register(rctx, queues) // failures show in the next fetch or reap
			cancel()
		}
	}
}

// reapLoop returns the expired leases of every shard of the worker's
// queues every reapEvery until ctx is done, while the clock is synced and
// Redis calm (see calm). It takes no slot, so long handlers do
// not delay the redelivery of a dead worker's batches.
func (r *runner) reapLoop(ctx context.Context, queues []*queue) {
	t := time.NewTicker(reapEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !r.calm() {
			continue
		}
		for _, q := range queues {
			for shard := range int(q.shards.Load()) {
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
					r.redisFailed("reap", err, zap.String("queue", q.name), zap.Int("shard", shard))
				case err == nil:
					r.redisOK()
				}
				if n > 0 {
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
			r.redisFailed("extending leases", err, zap.Int("batches", len(bs)))
		} else {
			r.redisOK()
		}
		cancel()
	}
}
