package batchq

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
)

// finish settles a handled batch, without waiting, and gives up its slot.
// A batch whose items all succeeded gives up its slot at once, and its
// lease is released by its fetcher's next round, or by the ack loop if no
// round comes within releaseWait. The ack loop settles every other batch,
// together with those that finish while an earlier group is on its way;
// such a batch keeps its slot until it is settled, so that a worker whose
// settles fail does not fetch more.
func (r *runner) finish(f *fetcher, b *protocol.Batch, out []protocol.Outcome) {
	if b.Releasable(out) {
		r.release(1)
		f.enqueue(ackReq{b: b, out: out, done: func(err error) { r.settled(f.q, b, out, err, nil) }})
		return
	}
	r.acks <- ackReq{b: b, out: out, done: func(err error) { r.settled(f.q, b, out, err, func() { r.release(1) }) }}
}

// ackReq asks for a batch to be settled; done gets the outcome. done must
// not block: it runs on the fetcher or the ack loop.
type ackReq struct {
	b    *protocol.Batch
	out  []protocol.Outcome
	done func(error)
}

// settled ends the settling of b, whose first try returned err, and calls
// end (if not nil) once b is settled or given up on. If Redis failed, it
// tries again on a goroutine of its own, with backoff, while the batch
// keeps its lease heartbeat; it gives up once the shutdown timeout has
// passed: the lease then expires and the batch is delivered again.
func (r *runner) settled(q *queue, b *protocol.Batch, out []protocol.Outcome, err error, end func()) {
	if err == nil || errors.Is(err, protocol.ErrLeaseLost) || r.hctx.Err() != nil {
		r.settleEnded(q, b, out, err, 1, end)
		return
	}
	go func() {
		for attempt := 2; ; attempt++ {
			r.redisFailed("settling a batch", err, zap.String("queue", q.name), zap.String("key", keys.Short(b.Key)),
				zap.Int("items", len(b.Items)), zap.Int("attempt", attempt-1))
			t := time.NewTimer(retryWait(attempt - 1))
			select {
			case <-t.C:
			case <-r.hctx.Done():
				t.Stop()
			}
			ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
			err = r.w.cons.Settle(ctx, b, out)
			cancel()
			if err == nil || errors.Is(err, protocol.ErrLeaseLost) || r.hctx.Err() != nil {
				r.settleEnded(q, b, out, err, attempt, end)
				return
			}
		}
	}()
}

// settleEnded records how the settling of b ended, at its attempt-th try.
func (r *runner) settleEnded(q *queue, b *protocol.Batch, out []protocol.Outcome, err error, attempt int, end func()) {
	log := r.w.log.With(zap.String("queue", q.name), zap.String("key", keys.Short(b.Key)), zap.Int("items", len(b.Items)))
	switch {
	case err == nil:
		if attempt > 1 {
			r.redisOK()
		}
		var n [4]int // by protocol.OutcomeKind
		for _, o := range out {
			n[o.Kind]++
		}
		r.w.obs.Settled(q.name, n[protocol.Done], n[protocol.Retry], n[protocol.Dead])
		if n[protocol.Retry]+n[protocol.Dead] > 0 {
			r.logFailures(log, q, b, out, n[protocol.Done], n[protocol.Retry], n[protocol.Dead])
		}
	case errors.Is(err, protocol.ErrLeaseLost) && attempt == 1 && b.Releasable(out):
		// The reaper may have come between the release's DEL and ZREM, and
		// found nothing to put back.
		log.Warn("lease expired before the batch was settled; it will be delivered again, unless the reaper found it released already")
	case errors.Is(err, protocol.ErrLeaseLost) && attempt == 1:
		log.Warn("lease expired before the batch was settled; it will be delivered again")
	case errors.Is(err, protocol.ErrLeaseLost):
		// Most likely the earlier try landed and only its reply was lost.
		log.Info("lease gone when the settle was tried again: the earlier try landed unseen, or the lease expired before the batch was settled and it will be delivered again",
			zap.Int("attempt", attempt))
	default:
		log.Error("giving up settling the batch at shutdown; it will be delivered again", zap.Error(err))
	}
	if end != nil {
		end()
	}
	r.mu.Lock()
	delete(r.active, b)
	r.mu.Unlock()
	r.batches.Done()
}

// logFailures logs a settled batch with failed items: one line for the
// batch, with counts and the first error, and one per dead letter.
func (r *runner) logFailures(log *zap.Logger, q *queue, b *protocol.Batch, out []protocol.Outcome, done, retried, dead int) {
	var first error
	var delay time.Duration // the soonest retry
	logged := 0             // dead letter lines
	for i, o := range out {
		switch o.Kind {
		case protocol.Retry:
			if first == nil {
				first = o.Err
			}
			if delay == 0 || o.Delay < delay {
				delay = o.Delay
			}
		case protocol.Dead:
			if first == nil {
				first = o.Err
			}
			if logged++; logged > maxDeadLines {
				continue
			}
			it := b.Items[i]
			r.w.log.Warn("item moved to dead letters", zap.String("queue", q.name), zap.String("key", keys.Short(it.Key)),
				zap.Int("attempts", it.Attempt+1), zap.String("error", logSafe(o.Err)))
		}
	}
	fields := []zap.Field{zap.Int("done", done), zap.Int("retried", retried), zap.Int("dead", dead), zap.String("error", logSafe(first))}
	if dead > maxDeadLines {
		fields = append(fields, zap.Int("dead_not_logged", dead-maxDeadLines))
	}
	if retried > 0 {
		fields = append(fields, zap.Duration("next_retry_in", delay))
	}
	log.Warn("batch failed", fields...)
}

// maxDeadLines bounds the dead letter lines logged for one batch: a
// call of 10,000 items that failed for good is one batch line and this
// many others. The dead letters themselves are all kept.
const maxDeadLines = 20

// logSafe returns err's text for a log line, which must not hold an item's
// contents: the error of an item that does not decode (Go's JSON errors
// may quote its values) becomes where and why it failed; a panic, that the
// handler panicked (its value is logged at debug level where it happens).
// Dead letters keep the whole error.
func logSafe(err error) string {
	var pe *PanicError
	var te *json.UnmarshalTypeError
	var se *json.SyntaxError
	switch {
	case err == nil:
		return ""
	case errors.As(err, &te):
		return fmt.Sprintf("%v: field %q (offset %d) cannot hold the JSON value for Go type %v", ErrDecode, te.Field, te.Offset, te.Type)
	case errors.As(err, &se):
		return fmt.Sprintf("%v: invalid JSON at offset %d", ErrDecode, se.Offset)
	case errors.Is(err, ErrDecode):
		return ErrDecode.Error() + " (the dead letter holds the decoder's error)"
	case errors.As(err, &pe):
		return "handler panicked (the dead letter or retry holds its value)"
	}
	return err.Error()
}

// maxAckGroup bounds the batches the ack loop settles in one round trip.
const maxAckGroup = 256

// ackLoop settles the batches sent on r.acks until done is closed (after
// every batch has settled), together those that come while an earlier group
// is on its way: one round trip for many under load, no added wait when
// idle.
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
			req.done(errs[i])
		}
		clear(group) // drop references to settled batches
	}
}
