package producer

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
)

// flushTimeout bounds one merge call sent on behalf of lingering callers,
// beyond the wait for replicas' acknowledgements (WithReplicaAcks).
const flushTimeout = 10 * time.Second

// errNoAnswer ends a call sent on behalf of lingering callers after
// flushTimeout.
var errNoAnswer = fmt.Errorf("no answer within %v (and the wait for replicas, if any): %w", flushTimeout, context.DeadlineExceeded)

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
// once the call holding them has returned, with its own outcome (one key
// refused by its caps does not fail the others; when the gathered items of
// a key pass its cap together, each caller's items are tried on their own).
// A caller whose context ends before its items were sent takes them back:
// they are not stored. Items of one caller keep their order; with wait ==
// 0, items of concurrent callers to one key are stored in the order they
// arrived.
//
// The calls go out from goroutines and timers of the producer: call Close
// at shutdown, to send what is gathered at once and wait for them.
func WithLinger(wait time.Duration, maxItems int) Option {
	return func(p *Producer) error {
		if wait < 0 || wait > time.Second || maxItems < 1 {
			return fmt.Errorf("producer: linger wants 0 <= wait <= 1s and maxItems >= 1, got %v and %d", wait, maxItems)
		}
		ctx, cancel := context.WithCancel(context.Background())
		p.linger = &linger{wait: wait, maxItems: maxItems, shards: make(map[shardKey]*shardState),
			ctx: ctx, cancel: cancel, idle: make(chan struct{})}
		return nil
	}
}

// linger gathers the appends of concurrent callers per queue shard.
type linger struct {
	wait     time.Duration
	maxItems int
	ctx      context.Context    // every call's parent: cancelled when a Close gives up (close.go)
	cancel   context.CancelFunc // cancels ctx

	mu      sync.Mutex
	shards  map[shardKey]*shardState
	running int           // goroutines and armed timers (see start, arm and end)
	closed  bool          // Close has sent every gathering; add refuses
	idle    chan struct{} // closed once closed and nothing runs
	gaveUp  error         // the error of the Close whose ctx ended first, if one did
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
	sent  bool          // taken off its shard's queue to be sent: no caller may leave
	done  chan struct{} // closed once the parts' errs are set
}

// keyPart is what a gathering appends to one key.
type keyPart struct {
	key   string
	parts []*part // in the order of their callers' arrival
	n     int
	bytes int // the array these items make, in bytes
}

// part is one caller's items.
type part struct {
	joined string // the items, joined by commas
	n      int
	err    error // set before the gathering's done is closed
	gone   bool  // the caller gave up while the call was on its way (under linger.mu)
}

// add queues the n items of joined for key and waits for the call that
// sends them.
func (l *linger) add(ctx context.Context, p *Producer, queue string, shard int, key, joined string, n int) error {
	sk := shardKey{queue, shard}
	l.mu.Lock()
	if l.closed {
		// Begun before Close, but too late for its flush: refused like the
		// appends that begin after it.
		l.mu.Unlock()
		return appendErr(queue, key, ErrClosed)
	}
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
				g.sent = true
				l.start(func() { l.send(p, sk, g) })
			}
			g = nil
		}
	}
	if g == nil {
		g = &gathered{byKey: make(map[string]*keyPart), done: make(chan struct{})}
		s.queue = append(s.queue, g)
		if l.wait > 0 {
			l.arm(g, func() { l.flush(p, sk, g) })
		}
	}
	kp := g.byKey[key]
	if kp == nil {
		kp = &keyPart{key: key, bytes: 1}
		g.byKey[key] = kp
		g.keys = append(g.keys, kp)
	}
	pt := &part{joined: joined, n: n}
	kp.parts = append(kp.parts, pt)
	kp.n += n
	kp.bytes += len(joined) + 1
	g.n += n
	full := g.n >= l.maxItems
	switch {
	case l.wait == 0 && !s.busy:
		s.busy = true
		l.start(func() { l.drive(p, sk, s) })
	case l.wait > 0 && full:
		l.removeLocked(sk, g)
		g.sent = true
		l.start(func() { l.send(p, sk, g) })
	}
	l.mu.Unlock()

	select {
	case <-g.done:
		return pt.err
	case <-ctx.Done():
	}
	select {
	case <-g.done: // both at once: the outcome is known
		return pt.err
	default:
	}
	if l.leave(sk, g, kp, pt) {
		return fmt.Errorf("producer: append to %s: not sent: %w", target(queue, key), ctx.Err())
	}
	// The call holding the items is on its way: they may be stored, as with
	// any Redis error the outcome is unknown.
	return appendErr(queue, key, ctx.Err())
}

// start runs fn in a goroutine that Close waits for. Call it with l.mu held
// and l.closed false.
func (l *linger) start(fn func()) {
	l.running++
	go func() {
		defer l.end()
		fn()
	}()
}

// arm sets g's timer to run fn after the linger's wait. An armed timer
// counts as running until fn returns or stopTimerLocked stops it. Call it with
// l.mu held and l.closed false.
func (l *linger) arm(g *gathered, fn func()) {
	l.running++
	g.timer = time.AfterFunc(l.wait, func() {
		defer l.end()
		fn()
	})
}

// stopTimerLocked stops g's timer, if it has one that has not fired.
func (l *linger) stopTimerLocked(g *gathered) {
	if g.timer != nil && g.timer.Stop() {
		l.endLocked()
	}
}

// end marks a goroutine of start or arm as done.
func (l *linger) end() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.endLocked()
}

func (l *linger) endLocked() {
	l.running--
	if l.closed && l.running == 0 {
		close(l.idle)
	}
}

// leave takes pt out of g unless g was sent already, and reports whether it
// did; if g was sent, it marks pt gone so that no second call is made for
// it. A gathering left empty is dropped.
func (l *linger) leave(sk shardKey, g *gathered, kp *keyPart, pt *part) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if g.sent {
		pt.gone = true
		return false
	}
	kp.parts = slices.DeleteFunc(kp.parts, func(x *part) bool { return x == pt })
	kp.n -= pt.n
	kp.bytes -= len(pt.joined) + 1
	g.n -= pt.n
	if len(kp.parts) == 0 {
		delete(g.byKey, kp.key)
		g.keys = slices.DeleteFunc(g.keys, func(x *keyPart) bool { return x == kp })
	}
	if len(g.keys) == 0 {
		l.removeLocked(sk, g)
		l.stopTimerLocked(g)
	}
	return true
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
	if s == nil {
		return false
	}
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
	g.sent = g.sent || ok
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
		g.sent = true
		l.mu.Unlock()
		l.send(p, sk, g)
	}
}

// errNotSent is the outcome of the items of a call that Close gave up on
// before it was made (see outcome).
var errNotSent = errors.New("not sent")

// send makes g's merge call and hands each caller its outcome.
func (l *linger) send(p *Producer, sk shardKey, g *gathered) {
	defer close(g.done)
	l.mu.Lock()
	l.stopTimerLocked(g)
	l.mu.Unlock()
	ctx, cancel := l.callContext(p.acks.Timeout)
	defer cancel()
	errs := make([]error, len(g.keys)) // by key, as the protocol returned them
	switch {
	case l.ctx.Err() != nil:
		for i := range errs {
			errs[i] = errNotSent
		}
	case len(g.keys) == 1:
		// One key: the plain merge script.
		kp := g.keys[0]
		errs[0] = p.merge(ctx, sk.queue, sk.shard, kp.key, kp.joined(), kp.n)
	default:
		ks := make([]protocol.KeyItems, len(g.keys))
		for i, kp := range g.keys {
			ks[i] = protocol.KeyItems{Key: kp.key, Payload: protocol.Payload(kp.joined()), N: kp.n}
		}
		kerrs, err := protocol.AppendMany(ctx, p.c, keys.For(p.prefix, sk.queue, sk.shard), ks, p.caps, p.flush[sk.queue], p.clock.NowMs(), p.acks)
		for i := range errs {
			errs[i] = err
			if err == nil {
				errs[i] = kerrs[i]
			}
		}
	}
	for i, kp := range g.keys {
		var full *protocol.FullError
		if errors.As(errs[i], &full) && len(kp.parts) > 1 {
			// Together the callers' items pass the key's cap: each caller's
			// may still fit on its own, in arrival order; not those of
			// callers who gave up meanwhile, which must not be stored
			// behind their backs.
			l.mu.Lock()
			gone := make([]bool, len(kp.parts))
			for j, pt := range kp.parts {
				gone[j] = pt.gone
			}
			l.mu.Unlock()
			for j, pt := range kp.parts {
				err := errs[i]
				switch {
				case gone[j]:
				case l.ctx.Err() != nil:
					err = errNotSent
				default:
					err = p.merge(ctx, sk.queue, sk.shard, kp.key, pt.joined, pt.n)
				}
				pt.err = l.outcome(ctx, p, sk.queue, kp.key, pt.n, err)
			}
			continue
		}
		for _, pt := range kp.parts {
			pt.err = l.outcome(ctx, p, sk.queue, kp.key, pt.n, errs[i])
		}
	}
}

// callContext returns the context of one call sent for lingering callers:
// it ends when a Close gives up (l.ctx) or after flushTimeout and wait, the
// time WAIT may take behind the call (0 without replica acks). It has no
// deadline, on purpose: rueidis makes a lone call whose context has one
// synchronously, bounded by the connection's deadline, where cancelling the
// context does not cut it short; without one, it does.
func (l *linger) callContext(wait time.Duration) (context.Context, func()) {
	ctx, cancel := context.WithCancelCause(l.ctx)
	t := time.AfterFunc(flushTimeout+wait, func() { cancel(errNoAnswer) })
	return ctx, func() {
		t.Stop()
		cancel(nil)
	}
}

// outcome returns the error a caller gets for the n items of a call to key
// that returned err, ctx being the call's: errNotSent, a call cut short by
// Close and one that had no answer in time get their own, every other
// error is wrapped by keyError.
func (l *linger) outcome(ctx context.Context, p *Producer, queue, key string, n int, err error) error {
	switch {
	case err == errNotSent:
		return fmt.Errorf("producer: append to %s: not sent: %w", target(queue, key), ErrClosed)
	case errors.Is(err, context.Canceled) && l.ctx.Err() != nil:
		return fmt.Errorf("producer: append to %s: call cut short by Close, the items may be stored: %w", target(queue, key), err)
	case errors.Is(err, context.Canceled) && context.Cause(ctx) == errNoAnswer:
		return appendErr(queue, key, errNoAnswer)
	}
	return p.keyError(queue, key, n, err)
}

// joined returns the items of every part, joined by commas.
func (kp *keyPart) joined() string {
	if len(kp.parts) == 1 {
		return kp.parts[0].joined
	}
	var b strings.Builder
	b.Grow(kp.bytes)
	for i, pt := range kp.parts {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(pt.joined)
	}
	return b.String()
}

// keyError wraps the outcome of an append of n items to a key as Add
// reports it. Every script call's outcome passes here: the first that
// Redis answered begins the eviction check of WithLogger (memory.go), so
// that a Redis unreachable at start does not spend it.
func (p *Producer) keyError(queue, key string, n int, err error) error {
	var full *protocol.FullError
	var ack *protocol.AckError
	if err == nil || errors.As(err, &ack) || errors.As(err, &full) || errors.Is(err, protocol.ErrNotArray) || errors.Is(err, protocol.ErrOutOfMemory) {
		p.checkEviction()
	}
	switch {
	case errors.As(err, &ack):
		return &ReplicaAckError{Queue: queue, Key: key, Adding: n, Want: ack.Want, Got: ack.Got, Timeout: ack.Timeout, Err: ack.Err}
	case errors.As(err, &full):
		return &KeyFullError{Queue: queue, Key: key, Items: full.Items, Bytes: full.Bytes, Adding: n,
			MaxItems: p.caps.Items, MaxBytes: p.caps.Bytes}
	case err != nil:
		return appendErr(queue, key, err)
	}
	return nil
}
