package producer

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"
)

// flushTimeout bounds one merge call sent on behalf of lingering callers.
const flushTimeout = 10 * time.Second

// WithLinger makes the producer gather the appends to each key for up to
// wait (at most a second), or until maxItems items are waiting, and send them
// as one merge call: fewer round trips and much less Redis time per item,
// for at most wait of extra latency. Each caller still learns whether its
// own items were stored: Add returns once the call holding them has returned,
// with its error (all the gathered items of a call are stored, or none).
// Items of one caller keep their order; items of concurrent callers to one
// key are stored in the order they arrived.
func WithLinger(wait time.Duration, maxItems int) Option {
	return func(p *Producer) error {
		if wait <= 0 || wait > time.Second || maxItems < 1 {
			return fmt.Errorf("producer: linger wants 0 < wait <= 1s and maxItems >= 1, got %v and %d", wait, maxItems)
		}
		p.linger = &linger{wait: wait, maxItems: maxItems, pending: make(map[lingerKey]*gathered)}
		return nil
	}
}

// linger gathers the appends of concurrent callers per key.
type linger struct {
	wait     time.Duration
	maxItems int

	mu      sync.Mutex
	pending map[lingerKey]*gathered
}

type lingerKey struct{ queue, key string }

// gathered is one merge call in the making.
type gathered struct {
	parts []string // each caller's items, joined by commas
	n     int      // items in parts
	bytes int      // the array they would make, in bytes
	timer *time.Timer
	done  chan struct{} // closed once err is set
	err   error
}

// add queues the n items of joined for key and waits for the call that
// sends them.
func (l *linger) add(ctx context.Context, p *Producer, queue, key, joined string, n int) error {
	k := lingerKey{queue, key}
	l.mu.Lock()
	g := l.pending[k]
	var early *gathered
	if g != nil && p.caps.Bytes > 0 && g.bytes+len(joined)+1 > p.caps.Bytes {
		// These items would take the call past the key's byte cap: send
		// what is gathered now and start afresh.
		delete(l.pending, k)
		early, g = g, nil
	}
	if g == nil {
		g = &gathered{done: make(chan struct{}), bytes: 1}
		l.pending[k] = g
		g.timer = time.AfterFunc(l.wait, func() { l.flush(p, k, g) })
	}
	g.parts = append(g.parts, joined)
	g.n += n
	g.bytes += len(joined) + 1
	full := g.n >= l.maxItems || (p.caps.Items > 0 && g.n >= p.caps.Items)
	l.mu.Unlock()
	if early != nil {
		l.send(p, k, early)
	}
	if full {
		l.flush(p, k, g)
	}
	select {
	case <-g.done:
		return g.err
	case <-ctx.Done():
		// The items may still be stored by the call: the outcome is unknown,
		// as with any Redis error.
		return fmt.Errorf("append to %s/%s: %w", queue, key, ctx.Err())
	}
}

// flush sends g unless another flush of it came first.
func (l *linger) flush(p *Producer, k lingerKey, g *gathered) {
	l.mu.Lock()
	if l.pending[k] != g {
		l.mu.Unlock()
		return
	}
	delete(l.pending, k)
	l.mu.Unlock()
	l.send(p, k, g)
}

// send makes g's merge call and hands its error to g's callers.
func (l *linger) send(p *Producer, k lingerKey, g *gathered) {
	g.timer.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), flushTimeout)
	defer cancel()
	g.err = p.send(ctx, k.queue, k.key, strings.Join(g.parts, ","), g.n)
	close(g.done)
}
