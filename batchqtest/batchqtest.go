package batchqtest

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
)

// DefaultPollInterval is how often RunUntilIdle reads the state of the
// worker's queues unless WithPollInterval says otherwise.
const DefaultPollInterval = 5 * time.Millisecond

// readTimeout bounds the read of the queues' state after Run returned.
const readTimeout = 5 * time.Second

// Option configures RunUntilIdle.
type Option func(*config) error

type config struct {
	within time.Duration
	poll   time.Duration
}

// WithRetriesWithin makes RunUntilIdle wait for the retries due within d of
// each look at the queues, besides those due already (the default, d = 0):
// with a backoff shorter than d, a failing item is tried again and again
// until it succeeds or goes to dead letters. A retry is handled when the
// worker's next claim finds it due, up to a second after its due time. A
// negative d makes RunUntilIdle fail.
func WithRetriesWithin(d time.Duration) Option {
	return func(c *config) error {
		if d < 0 {
			return fmt.Errorf("negative retry horizon %v", d)
		}
		c.within = d
		return nil
	}
}

// WithPollInterval sets how often RunUntilIdle reads the state of the
// worker's queues (default DefaultPollInterval, 5ms): each read is one
// round trip to Redis. A d that is not positive makes RunUntilIdle fail.
func WithPollInterval(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("poll interval must be positive, got %v", d)
		}
		c.poll = d
		return nil
	}
}

// State is what the queues of a worker hold. Times are on the Redis
// server's clock.
type State struct {
	// PendingKeys are keys with items waiting for a worker: due, on the wake
	// list, or held back by a flush policy.
	PendingKeys int64
	// InFlight are batches leased to a worker: being handled, or handled
	// and not yet settled.
	InFlight int64
	// Retries are failed items scheduled for another attempt; NextRetry is
	// when the first of them is due (zero when there is none).
	Retries   int64
	NextRetry time.Time
	// DeadLetters are the items that failed for good (those of earlier runs
	// included), and values found under keys that were not JSON arrays.
	DeadLetters int64
}

// Result is the state of a worker's queues once Run returned: State sums
// them, Queues has each by name.
type Result struct {
	State
	Queues map[string]State
}

// RunUntilIdle runs w (w.Run) until every queue registered on w is idle,
// then stops it gracefully and returns once Run returned, with what the
// queues hold then.
//
// A queue is idle when no key of it holds items (due, on the wake list, or
// held back by a flush policy: RunUntilIdle waits until they fall due),
// no batch is leased (being handled, or handled and not yet settled) and no
// retry is due. Items that handlers append during the run are handled too:
// RunUntilIdle reads the state of every shard of every queue of w in Redis,
// each shard at once (one script), every poll interval, and stops only when
// two reads in a row find them all idle.
//
// Retries due later do not keep it running: they are counted in the Result,
// as are the dead letters. WithRetriesWithin makes it wait for those due
// soon. A retry counts as due when one of the reads finds its time come, so
// one due within a poll interval or two of the end (a backoff of a few
// milliseconds) may be waited for without WithRetriesWithin. A due retry is
// handled when the worker next claims, up to a second later.
//
// RunUntilIdle returns an error wrapping ctx.Err() if ctx ends before the
// queues are idle (it still stops w and waits for Run, which lets running
// handlers finish for up to the worker's shutdown timeout: use a short
// WithShutdownTimeout in tests whose handlers may block), Run's own error
// if Run fails (batchq.ErrNoHandlers, say), and an option's error, before
// it runs w, if an option is invalid. Its own errors start with
// "batchqtest: "; Run's, with "batchq: ". w's Run may be called once, so RunUntilIdle
// may be too.
//
// Each read reads every shard of the queues, as the registry counts them.
// A worker with batchq.WithAtMostOnce holds no lease while it handles a batch, so
// RunUntilIdle may see its queues idle while a handler runs; it still waits
// for that handler when it stops the worker, but what the handler appends
// or leaves to retry stays in Redis, as the Result shows.
func RunUntilIdle(ctx context.Context, w *batchq.Worker, opts ...Option) (Result, error) {
	cfg := config{poll: DefaultPollInterval}
	for _, o := range opts {
		if o == nil {
			return Result{}, errors.New("batchqtest: nil option")
		}
		if err := o(&cfg); err != nil {
			return Result{}, fmt.Errorf("batchqtest: %w", err)
		}
	}
	q := queues{c: w.Client(), prefix: w.Prefix(), names: w.Queues()}

	// Only end stops the worker: were it stopped by ctx, Run could return
	// before this loop sees ctx done, and the loop would take that for a
	// failed Run.
	runCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	defer stop()
	done := make(chan error, 1)
	go func() { done <- w.Run(runCtx) }()
	// end stops Run, waits for it, and reads what the queues hold.
	end := func() (snapshot, error) {
		stop()
		if err := <-done; err != nil {
			return snapshot{}, err // the worker's own, "batchq: ..."
		}
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), readTimeout)
		defer cancel()
		s, err := q.read(rctx, 0)
		if err != nil {
			return snapshot{}, fmt.Errorf("batchqtest: after Run: %w", err)
		}
		return s, nil
	}

	tick := time.NewTicker(cfg.poll)
	defer tick.Stop()
	for idle := 0; idle < 2; {
		select {
		case err := <-done:
			if err == nil {
				err = errors.New("batchqtest: Run returned before the queues were idle")
			}
			return Result{}, err // a non-nil one is the worker's own, "batchq: ..."
		case <-ctx.Done():
			s, err := end()
			if err != nil {
				return Result{}, err
			}
			left := s.busy
			if left == "" {
				left = "nothing, once the worker stopped"
			}
			return s.result(), fmt.Errorf("batchqtest: %w before the queues were idle; they hold %s", ctx.Err(), left)
		case <-tick.C:
		}
		// A read that fails counts as not idle; should Redis stay out of
		// reach, ctx ends it.
		if s, err := q.read(ctx, cfg.within); err != nil || s.busy != "" {
			idle = 0
		} else {
			idle++
		}
	}
	s, err := end()
	if err != nil {
		return Result{}, err
	}
	return s.result(), nil
}

// queues are the queues of a worker, as RunUntilIdle reads them.
type queues struct {
	c      rueidis.Client
	prefix string
	names  []string
}

// snapshot is what queues hold, and busy why they are not idle ("" when
// they are).
type snapshot struct {
	queues map[string]State
	names  []string
	busy   string
}

// read reads the shard counts of q, then the state of every shard (see
// protocol.ReadStates) in one round trip. A retry due within horizon of
// the server's time is busy.
func (q queues) read(ctx context.Context, horizon time.Duration) (snapshot, error) {
	shards, err := protocol.ReadShards(ctx, q.c, q.prefix, q.names...)
	if err != nil {
		return snapshot{}, err
	}
	var spaces []keys.Space
	from := make([]int, len(q.names)+1) // queue i's states are states[from[i]:from[i+1]]
	for i, name := range q.names {
		for shard := range max(1, shards[i]) {
			spaces = append(spaces, keys.For(q.prefix, name, shard))
		}
		from[i+1] = len(spaces)
	}
	states, err := protocol.ReadStates(ctx, q.c, spaces)
	if err != nil {
		return snapshot{}, err
	}
	s := snapshot{queues: make(map[string]State, len(q.names)), names: q.names}
	var busy []string
	for i, name := range q.names {
		var st State
		var wake, due int64
		for _, sh := range states[from[i]:from[i+1]] {
			st.PendingKeys += sh.Ready + sh.Later
			st.InFlight += sh.Leases
			st.Retries += sh.Retries
			st.DeadLetters += sh.Dead
			wake += sh.Wake
			if next := sh.NextRetry; !next.IsZero() {
				if st.NextRetry.IsZero() || next.Before(st.NextRetry) {
					st.NextRetry = next
				}
				if !next.After(sh.Now.Add(horizon)) {
					due++
				}
			}
		}
		s.queues[name] = st
		var why []string
		for _, c := range []struct {
			n         int64
			one, many string
		}{
			{st.PendingKeys, "key pending", "keys pending"},
			{wake, "name on the wake list", "names on the wake lists"},
			{st.InFlight, "batch in flight", "batches in flight"},
			{due, "shard with a retry due", "shards with a retry due"},
		} {
			switch {
			case c.n == 1:
				why = append(why, "1 "+c.one)
			case c.n > 1:
				why = append(why, fmt.Sprintf("%d %s", c.n, c.many))
			}
		}
		if len(why) > 0 {
			busy = append(busy, fmt.Sprintf("queue %q: %s", keys.Short(name), strings.Join(why, ", ")))
		}
	}
	s.busy = strings.Join(busy, "; ")
	return s, nil
}

// result sums s into a Result.
func (s snapshot) result() Result {
	r := Result{Queues: s.queues}
	for _, name := range s.names {
		st := s.queues[name]
		r.PendingKeys += st.PendingKeys
		r.InFlight += st.InFlight
		r.Retries += st.Retries
		r.DeadLetters += st.DeadLetters
		if !st.NextRetry.IsZero() && (r.NextRetry.IsZero() || st.NextRetry.Before(r.NextRetry)) {
			r.NextRetry = st.NextRetry
		}
	}
	return r
}

// Redis starts an in-process Redis (miniredis, through package embedded)
// for the test and returns a client connected to it, with client-side
// caching disabled as batchq wants. Both are closed when the test ends.
// Tests that need the server itself (to move its clock, say) use
// embedded.Start.
func Redis(t testing.TB) rueidis.Client {
	t.Helper()
	r, err := embedded.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r.Client
}
