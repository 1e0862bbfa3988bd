package batchq

import (
	"context"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
)

// A fetcher keeps one queue shard's due work flowing into free slots.
type fetcher struct {
	r     *runner
	q     *queue
	shard int
	log   *zap.Logger

	// releases holds batches of the shard whose items all succeeded, each
	// waiting for the fetcher's next round to release its lease; armed, that
	// a timer sends them to the ack loop after releaseWait if none comes.
	mu       sync.Mutex
	releases []ackReq
	armed    bool
}

// enqueue queues req for the fetcher's next round.
func (f *fetcher) enqueue(req ackReq) {
	f.mu.Lock()
	f.releases = append(f.releases, req)
	arm := !f.armed
	f.armed = true
	f.mu.Unlock()
	if arm {
		time.AfterFunc(releaseWait, f.flushReleases)
	}
}

// flushReleases sends the queued releases to the ack loop: no round came
// for them in time.
func (f *fetcher) flushReleases() {
	f.mu.Lock()
	reqs := f.releases
	f.releases, f.armed = nil, false
	f.mu.Unlock()
	for _, req := range reqs {
		f.r.acks <- req
	}
}

// takeReleases takes the queued releases, at most maxReleases.
func (f *fetcher) takeReleases() []ackReq {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := min(len(f.releases), maxReleases)
	reqs := slices.Clone(f.releases[:n])
	f.releases = append(f.releases[:0], f.releases[n:]...)
	return reqs
}

// run pops due keys from the shard's wake list, blocking while there are
// none, and drains them into batches in slots. A drain is one round trip,
// and it carries the lease releases of batches that succeeded since the
// last one and the pop of the keys that came meanwhile: while keys keep
// coming, a round trip per round of batches.
// And it claims, every maxIdleWait and whenever a known due time has come:
// due retries (for which it waits for a slot, so that keys always due
// cannot starve them), keys a flush policy scheduled, and keys a dead
// worker popped but never drained (docs/PROTOCOL.md).
func (f *fetcher) run(ctx context.Context) {
	r, q, shard := f.r, f.q, f.shard
	failures := 0
	failed := func(what string, err error) {
		failures++
		r.redisFailed(what, err, zap.String("queue", q.name), zap.Int("shard", shard))
		r.sleep(retryWait(failures))
	}
	var popped []string                     // keys to drain
	defer func() { f.unpop(ctx, popped) }() // shutdown came first: the keys go back for another worker
	var conn protocol.Conn                  // an ordered queue's drains WATCH on it
	defer conn.Close()
	var nextClaim, nextRetry time.Time // zero: at once, and none known
	for !r.stopping() {
		if !r.synced.Load() {
			r.sleep(100 * time.Millisecond) // the sync loop syncs
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
			fe, err := r.w.cons.Claim(cctx, q.name, shard, slot)
			cancel()
			used := f.started(fe)
			if slot && used == 0 {
				r.release(1)
			}
			if err != nil {
				failed("claiming keys and retries", err)
				continue
			}
			failures = 0
			r.redisOK()
			nextClaim, nextRetry = now.Add(maxIdleWait), fe.NextRetry
			for _, t := range []time.Time{fe.NextKey, fe.NextRetry} {
				if !t.IsZero() && t.Before(nextClaim) {
					nextClaim = t
				}
			}
		}
		if len(popped) == 0 {
			count := max(1, r.room()/int(r.loops.Load()))
			wait := min(max(nextClaim.Sub(now), time.Millisecond), maxIdleWait)
			// The pop's deadline is past its server-side timeout: a
			// connection that answers nothing (cut without a reset, or a
			// server that lost its blocked clients) must not hold the loop.
			pctx, cancel := context.WithTimeout(ctx, wait+popGrace)
			ks, hint, err := r.w.cons.Pop(pctx, q.name, shard, count, wait)
			cancel()
			if hint {
				nextClaim = time.Time{} // a producer scheduled a key: learn when it is due
			}
			if err != nil {
				if ctx.Err() == nil {
					failed("popping due keys", err)
				}
				continue
			}
			popped = ks
			if len(popped) == 0 {
				continue
			}
		}
		if got := r.acquire(len(popped)); got < len(popped) {
			r.release(got) // shutdown came first
			return
		}
		// Keys that come while this round is on its way are popped by it,
		// as many as there are free slots: they are drained by the next
		// round, without a blocking pop in between.
		popMax := 0
		if free := r.room(); free > 0 {
			popMax = max(1, free/int(r.loops.Load()))
		}
		reqs := f.takeReleases()
		done := make([]*protocol.Batch, len(reqs))
		for i, req := range reqs {
			done[i] = req.b
		}
		// A round under way completes even if shutdown begins: what it
		// drained is put back at once by the batches it starts, and what it
		// popped by the deferred put-back.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), redisTimeout)
		res, err := r.w.cons.Round(rctx, q.name, shard, &conn, done, popped, popMax)
		cancel()
		for i, req := range reqs {
			req.done(res.Done[i])
		}
		r.release(len(popped) - f.started(res.Fetched))
		if res.Hint {
			nextClaim = time.Time{}
		}
		if err != nil {
			// Draining a key twice is harmless (the second drain finds it
			// gone), and one that was not drained must not wait for a
			// sweep: drain them again. The keys the round popped go back
			// for any worker: this one has no slots for them.
			f.unpop(ctx, res.Next)
			failed("draining keys", err)
			continue
		}
		failures = 0
		r.redisOK()
		popped = res.Next
	}
}

// unpop puts popped keys that will not be drained back on the wake list.
// If that fails, a claim's sweep finds them (docs/PROTOCOL.md, "Sweep").
func (f *fetcher) unpop(ctx context.Context, popped []string) {
	if len(popped) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), redisTimeout)
	defer cancel()
	if err := f.r.w.cons.Unpop(ctx, f.q.name, f.shard, popped); err != nil {
		f.log.Warn("could not put popped keys back; a claim finds them again", zap.Error(err), zap.Int("keys", len(popped)))
	}
}

// started starts the batches of fe, each in a slot the caller holds, and
// logs and counts its dead letters. It returns how many batches it started.
func (f *fetcher) started(fe protocol.Fetched) int {
	for _, b := range fe.Batches {
		size := 0
		for _, it := range b.Items {
			size += len(it.Data)
		}
		f.r.w.obs.Fetched(f.q.name, len(b.Items), size, b.Retry())
		f.r.start(f, b)
	}
	for _, d := range fe.Dead {
		f.log.Warn("moved a corrupt value to dead letters", zap.String("key", keys.Short(d.Key)), zap.String("reason", d.Error))
	}
	if len(fe.Dead) > 0 {
		f.r.w.obs.Settled(f.q.name, 0, 0, len(fe.Dead)) // one dead letter per corrupt value
	}
	return len(fe.Batches)
}
