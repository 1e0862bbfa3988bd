package producer

import (
	"context"
	"errors"
	"fmt"
	"slices"
)

// ErrClosed: the producer was closed before the items were sent; nothing of
// the call is stored. Add, AddRaw and Queue.Add return it, wrapped, once
// Close has been called, and so do the calls whose items a Close gave up on
// (see Close).
var ErrClosed = errors.New("producer closed")

// Close stops the producer. From the moment it is called, Add, AddRaw and
// Queue.Add fail at once with an error wrapping ErrClosed and store
// nothing; so do calls begun before Close whose items had not yet joined a
// gathering of the lingering producer.
//
// A producer with WithLinger sends at once every gathering it holds,
// without waiting for their linger timers, waits for the calls on their way
// and for its goroutines, and returns nil once every gathered item has been
// sent and each of its callers has its outcome. A producer without linger
// has nothing of its own on its way: Close returns nil at once (calls
// already under way run in their callers' goroutines and go on). Either
// cancels the eviction check of WithLogger, if it runs, and waits for it to
// end, which takes no Redis round trip.
//
// If ctx ends first, Close cancels the calls still on their way, waits for
// the producer's goroutines to end (which takes no Redis round trip), and
// returns ctx's error, wrapped. No item is dropped silently: the callers of
// the items it had not sent yet get an error wrapping ErrClosed (those
// items are not stored), and the callers whose call was on its way get an
// error wrapping context.Canceled (as with any Redis or context error, the
// items may be stored).
//
// Close is safe for concurrent use and may be called more than once: every
// call returns once the producer's goroutines have ended, with nil, or with
// the error of the Close whose ctx ended first. No goroutine of the
// producer is left after it returns. It never closes the rueidis client,
// which the caller owns: close that after Close returns.
func (p *Producer) Close(ctx context.Context) error {
	p.closed.Store(true)
	p.log.stop() // the eviction check (WithLogger): cancelled, it ends at once
	if p.linger == nil {
		return nil
	}
	return p.linger.close(ctx, p)
}

// close sends every gathering at once (the first time), then waits for
// the linger's goroutines, or for ctx: then it gives up, and waits for the
// goroutines, which end without waiting for Redis. A ctx that has ended
// already gives up at once, on anything still to do.
func (l *linger) close(ctx context.Context, p *Producer) error {
	l.mu.Lock()
	if !l.closed {
		if ctx.Err() != nil && l.running > 0 {
			l.giveUpLocked(ctx)
		}
		// With a wait, each gathering waits for its timer: send them all
		// now. With group commit (wait 0), a shard's gatherings wait for
		// the goroutine that sends its calls one after the other, already
		// running.
		if l.wait > 0 {
			for sk, s := range l.shards {
				for _, g := range slices.Clone(s.queue) {
					l.removeLocked(sk, g)
					g.sent = true
					l.start(func() { l.send(p, sk, g) })
				}
			}
		}
		l.closed = true
		if l.running == 0 {
			close(l.idle)
		}
	}
	l.mu.Unlock()

	select {
	case <-l.idle:
		return l.result()
	case <-ctx.Done():
	}
	l.mu.Lock()
	select {
	case <-l.idle: // all sent, as ctx ended
	default:
		l.giveUpLocked(ctx)
	}
	l.mu.Unlock()
	<-l.idle
	return l.result()
}

// giveUpLocked cancels the calls on their way, and makes those not sent yet
// fail with ErrClosed (see send): every Close then returns ctx's error.
func (l *linger) giveUpLocked(ctx context.Context) {
	if l.gaveUp == nil {
		l.gaveUp = fmt.Errorf("producer: close: %w", ctx.Err())
		l.cancel()
	}
}

// result is what Close returns once the linger's goroutines have ended.
func (l *linger) result() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.gaveUp
}
