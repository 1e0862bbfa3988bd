package producer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/store"
)

// flushTimeout bounds one merge call sent on behalf of lingering callers.
const flushTimeout = 10 * time.Second

// WithLinger makes the producer gather concurrent appends per queue shard,
// whatever their keys, and send each gathering as one script call that
// appends to all of its keys: fewer round trips and much less Redis time per
// item. A gathering is sent once it holds maxItems items, and otherwise:
//
//   - with wait > 0 (at most a second), wait after its first append: at most
//     wait of extra latency, for fuller calls at low load;
//   - with wait == 0, as soon as no earlier call of this producer for the
//     shard is in flight (group commit): no added latency when idle, and
//     under load each call carries everything that came in while the one
//     before it was on its way.
//
// Each caller still learns whether its own items were stored: Add returns
// once the call holding them has returned, with the outcome for its key (the
// gathered items of one key are all stored, or none; one key refused by its
// caps does not fail the others). Items of one caller keep their order;
// items of concurrent callers to one key are stored in the order they
// arrived.
func WithLinger(wait time.Duration, maxItems int) Option {
	return func(p *Producer) error {
		if wait < 0 || wait > time.Second || maxItems < 1 {
			return fmt.Errorf("producer: linger wants 0 <= wait <= 1s and maxItems >= 1, got %v and %d", wait, maxItems)
		}
		p.linger = &linger{wait: wait, maxItems: maxItems, shards: make(map[shardKey]*shardState)}
		return nil
	}
}

// linger gathers the appends of concurrent callers per queue shard.
type linger struct {
	wait     time.Duration
	maxItems int

	mu     sync.Mutex
	shards map[shardKey]*shardState
}

type shardKey struct {
	queue string
	shard int
}

// shardState is what a shard has gathered and not sent yet.
type shardState struct {
	queue []*gathered // oldest first; only the last one takes more appends
	busy  bool        // with wait == 0: a goroutine is sending this shard's gatherings
}

// gathered is one merge call in the making.
type gathered struct {
	byKey map[string]*keyPart
	keys  []*keyPart // in the order of their first append
	n     int        // items, all keys
	timer *time.Timer
	done  chan struct{} // closed once err and the parts' errs are set
	err   error         // the call's own error: every key's outcome unknown
}

// keyPart is what a gathering appends to one key.
type keyPart struct {
	key   string
	parts []string // each caller's items, joined by commas
	n     int
	bytes int // the array these items make, in bytes
	err   error
}

// add queues the n items of joined for key and waits for the call that
// sends them.
func (l *linger) add(ctx context.Context, p *Producer, queue, key, joined string, n int) error {
	sk := shardKey{queue, keys.Shard(key, p.shards)}
	l.mu.Lock()
	s := l.shards[sk]
	if s == nil {
		s = &shardState{}
		l.shards[sk] = s
	}
	var g *gathered
	if len(s.queue) > 0 {
		g = s.queue[len(s.queue)-1]
		if !g.fits(p, l.maxItems, key, joined, n) {
			// Seal it: with a timer, send it now; with group commit, it
			// waits its turn.
			if l.wait > 0 {
				s.queue = s.queue[:len(s.queue)-1]
				go l.send(p, sk, g)
			}
			g = nil
		}
	}
	if g == nil {
		g = &gathered{byKey: make(map[string]*keyPart), done: make(chan struct{})}
		s.queue = append(s.queue, g)
		if l.wait > 0 {
			g.timer = time.AfterFunc(l.wait, func() { l.flush(p, sk, g) })
		}
	}
	kp := g.byKey[key]
	if kp == nil {
		kp = &keyPart{key: key, bytes: 1}
		g.byKey[key] = kp
		g.keys = append(g.keys, kp)
	}
	kp.parts = append(kp.parts, joined)
	kp.n += n
	kp.bytes += len(joined) + 1
	g.n += n
	full := g.n >= l.maxItems
	switch {
	case l.wait == 0 && !s.busy:
		s.busy = true
		go l.drive(p, sk, s)
	case l.wait > 0 && full:
		l.removeLocked(sk, g)
		go l.send(p, sk, g)
	}
	l.mu.Unlock()

	select {
	case <-g.done:
		if g.err != nil {
			return g.err
		}
		return kp.err
	case <-ctx.Done():
		// The items may still be stored by the call: the outcome is unknown,
		// as with any Redis error.
		return fmt.Errorf("append to %s/%s: %w", queue, key, ctx.Err())
	}
}

// fits reports whether n more items for key fit in g without passing
// maxItems for the gathering or the producer's caps for the key.
func (g *gathered) fits(p *Producer, maxItems int, key string, joined string, n int) bool {
	if g.n >= maxItems {
		return false
	}
	kp := g.byKey[key]
	if kp == nil {
		return true
	}
	return (p.caps.Items == 0 || kp.n+n <= p.caps.Items) && (p.caps.Bytes == 0 || kp.bytes+len(joined)+1 <= p.caps.Bytes)
}

// removeLocked takes g off its shard's queue, if it is still there.
func (l *linger) removeLocked(sk shardKey, g *gathered) bool {
	s := l.shards[sk]
	for i, x := range s.queue {
		if x == g {
			s.queue = append(s.queue[:i], s.queue[i+1:]...)
			if len(s.queue) == 0 && !s.busy {
				delete(l.shards, sk)
			}
			return true
		}
	}
	return false
}

// flush sends g when its timer fires, unless it was sent already.
func (l *linger) flush(p *Producer, sk shardKey, g *gathered) {
	l.mu.Lock()
	ok := l.removeLocked(sk, g)
	l.mu.Unlock()
	if ok {
		l.send(p, sk, g)
	}
}

// drive sends a shard's gatherings one after the other until none is left
// (wait == 0: group commit).
func (l *linger) drive(p *Producer, sk shardKey, s *shardState) {
	for {
		l.mu.Lock()
		if len(s.queue) == 0 {
			s.busy = false
			delete(l.shards, sk)
			l.mu.Unlock()
			return
		}
		g := s.queue[0]
		s.queue = s.queue[1:]
		l.mu.Unlock()
		l.send(p, sk, g)
	}
}

// send makes g's merge call and hands each key's outcome to its callers.
func (l *linger) send(p *Producer, sk shardKey, g *gathered) {
	if g.timer != nil {
		g.timer.Stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), flushTimeout)
	defer cancel()
	defer close(g.done)
	if len(g.keys) == 1 {
		// One key: the plain merge script.
		kp := g.keys[0]
		kp.err = p.send(ctx, sk.queue, kp.key, strings.Join(kp.parts, ","), kp.n)
		return
	}
	ks := make([]store.KeyItems, len(g.keys))
	for i, kp := range g.keys {
		ks[i] = store.KeyItems{Key: kp.key, Items: strings.Join(kp.parts, ","), N: kp.n}
	}
	errs, err := store.AppendMany(ctx, p.c, keys.For(p.prefix, sk.queue, sk.shard), ks, p.caps, p.flush[sk.queue])
	if err != nil {
		g.err = fmt.Errorf("append to %s (%d keys): %w", sk.queue, len(ks), err)
		return
	}
	for i, kp := range g.keys {
		kp.err = p.keyError(sk.queue, kp.key, kp.n, errs[i])
	}
}

// keyError wraps the outcome of an append of n items to a key as Add
// reports it.
func (p *Producer) keyError(queue, key string, n int, err error) error {
	var full *store.FullError
	switch {
	case errors.As(err, &full):
		return &KeyFullError{Queue: queue, Key: key, Items: full.Items, Bytes: full.Bytes, Adding: n,
			MaxItems: p.caps.Items, MaxBytes: p.caps.Bytes}
	case err != nil:
		return fmt.Errorf("append to %s/%s: %w", queue, key, err)
	}
	return nil
}
