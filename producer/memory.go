package producer

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/batchq/batchq/internal/protocol"
)

// ErrOutOfMemory: Redis refused the append because its used memory is past
// maxmemory and its maxmemory-policy evicts nothing (noeviction, the policy
// batchq needs, or a volatile-* policy that finds no key with a TTL).
// Nothing is stored: Redis refuses a script before its first write, and the
// merge script's first write is the one it refuses. Every append fails so
// until memory is freed; workers cannot free it by draining, since Redis
// refuses their drains too (only batches they hold already are handled and
// released), so it takes an operator: raise maxmemory, or free memory
// (see RELIABILITY.md). Adding the items again afterwards stores them once.
var ErrOutOfMemory = protocol.ErrOutOfMemory

// evictionCheckTimeout bounds the eviction check (see WithLogger).
const evictionCheckTimeout = 10 * time.Second

// WithLogger makes the producer log to l, named "producer"; by default it
// logs nothing. It logs one line: a warning, once per producer, when a
// Redis node may evict keys (its maxmemory-policy is not noeviction), since
// an evicted key loses items whose append returned nil. Errors are not
// logged: the caller gets them.
//
// The check asks every node the client knows (on Redis Cluster, masters and
// replicas) for CONFIG GET maxmemory-policy, all at once, from a goroutine
// of the producer that starts after Redis first answers an append (stored
// or refused, not a lost connection) and ends within 10s: no append waits
// for it, and appends cost nothing more. Close cancels it and waits for it. A node that cannot answer (an ACL that denies
// CONFIG, see SECURITY.md) is skipped in silence. Without a logger there is
// no check.
func WithLogger(l *zap.Logger) Option {
	return func(p *Producer) error {
		if l == nil {
			return errors.New("producer: nil logger")
		}
		p.log.log = l.Named("producer")
		return nil
	}
}

// logging is a producer's logger and the eviction check it asks for.
type logging struct {
	log   *zap.Logger // nil: none, and no check
	begun atomic.Bool // the check has begun, or Close came first: none begins any more

	mu     sync.Mutex
	cancel context.CancelFunc // ends the check; nil until it begins
	done   chan struct{}      // closed once the check has ended
}

// checkEviction begins the eviction check, in a goroutine, the first time
// it is called on a producer with a logger, unless Close came first; later
// calls cost an atomic load. keyError calls it after every append Redis
// answered.
func (p *Producer) checkEviction() {
	lg := &p.log
	if lg.log == nil || lg.begun.Load() {
		return
	}
	lg.mu.Lock()
	defer lg.mu.Unlock()
	if lg.begun.Swap(true) {
		return
	}
	// A deadline would keep a cancel from cutting the call short (see
	// linger.callContext): a timer cancels it instead.
	ctx, cancel := context.WithCancel(context.Background())
	t := time.AfterFunc(evictionCheckTimeout, cancel)
	lg.cancel, lg.done = cancel, make(chan struct{})
	go func() {
		defer close(lg.done)
		defer t.Stop()
		defer cancel()
		if ev := protocol.Evictions(ctx, p.c); len(ev.Nodes) > 0 {
			lg.log.Warn(protocol.EvictionWarning,
				zap.String("maxmemory_policy", strings.Join(ev.Policies, ",")), zap.Strings("nodes", ev.Nodes))
		}
	}()
}

// stop keeps the eviction check from beginning, or cancels it and waits for
// its goroutine: Close.
func (lg *logging) stop() {
	lg.mu.Lock()
	lg.begun.Store(true)
	cancel, done := lg.cancel, lg.done
	lg.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}
