// Package inspect reads the state of batchq queues from Redis: how deep
// they are, how late, which keys lag most, what a key holds, the retries
// waiting for their next attempt, the dead letters, and the live workers.
// The metrics package, the batchq CLI and the status page are built on it.
//
// The inspector finds queues in the registry producers and workers keep
// under the prefix (<prefix>:queues, queue -> shards), never by SCAN, and
// workers in the list they announce themselves in (Workers). The registry
// is where a queue's shard count lives: its first writer records it, and
// every producer, worker and reader takes it from there. The inspector only
// reads, except for CreateQueue and SetShards, which record and raise a
// queue's shard count, Forget, which takes an empty queue out of the
// registry, and the dead-letter actions of the client it hands out
// (DeadLetters).
//
// Reading pending item counts costs one command per ready key: Stats and
// Keys look at most MaxKeysPerShard ready keys of each shard (Stats says so
// in Partial when there were more; Keys then ranks those it looked at).
//
// Every error it returns starts with "inspect: ", and wraps what caused it:
// errors.Is finds ErrNoQueue, ErrNotEmpty, ErrQueueExists, ErrShrink and rueidis's errors through it.
package inspect

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
)

// MaxKeysPerShard bounds the ready keys of one shard that Stats and Keys
// read item counts and sizes of.
const MaxKeysPerShard = 10_000

// ErrNoQueue reports a queue that is not in the registry of the prefix.
// It is always returned wrapped, in an error that names the queue
// (inspect: no such queue "x" under prefix "batchq").
var ErrNoQueue = errors.New("no such queue")

// ErrQueueExists reports a queue that CreateQueue found recorded already,
// with another shard count. It is always returned wrapped.
var ErrQueueExists = errors.New("the queue exists")

// ErrBadCount reports a registry value that is not a shard count (another
// program wrote it): the queue's next writer replaces it (CreateQueue or
// SetShards, or a producer's or worker's registration). It is always
// returned wrapped.
var ErrBadCount = protocol.ErrBadCount

// ErrShrink reports a shard count SetShards refused: below the queue's.
// It is always returned wrapped.
var ErrShrink = errors.New("a queue's shards cannot shrink")

// ErrNotEmpty reports a queue that Forget keeps: it holds items. It is
// always returned wrapped, in an error that says what the queue holds.
var ErrNotEmpty = errors.New("the queue holds items")

// Inspector reads queues under one prefix. It is safe for concurrent use.
type Inspector struct {
	c      rueidis.Client
	prefix string
}

// Option configures New.
type Option func(*Inspector) error

// WithPrefix sets the prefix of the Redis keys the inspector reads
// (default "batchq", batchq's default), as producers and workers have it:
// 1-512 bytes without braces. An invalid prefix makes New fail.
func WithPrefix(p string) Option {
	return func(in *Inspector) error {
		if err := keys.CheckPrefix(p); err != nil {
			return err
		}
		in.prefix = p
		return nil
	}
}

// New returns an inspector that reads the queues under batchq's default
// prefix ("batchq"), or under the one WithPrefix gives, through c, which
// the caller keeps owning. It returns an error, and no inspector, when c is
// nil or an option is invalid.
func New(c rueidis.Client, opts ...Option) (*Inspector, error) {
	if c == nil {
		return nil, errors.New("inspect: nil client")
	}
	in := &Inspector{c: c, prefix: keys.DefaultPrefix}
	for _, o := range opts {
		if o == nil {
			return nil, errors.New("inspect: nil option")
		}
		if err := o(in); err != nil {
			return nil, fmt.Errorf("inspect: %w", err)
		}
	}
	return in, nil
}

// Prefix returns the prefix the inspector reads.
func (in *Inspector) Prefix() string { return in.prefix }

// Queue is a queue found in the registry.
type Queue struct {
	Name   string `json:"name"`
	Shards int    `json:"shards"`
}

// Queues returns the queues in the registry, sorted by name.
func (in *Inspector) Queues(ctx context.Context) ([]Queue, error) {
	m, err := in.c.Do(ctx, in.c.B().Hgetall().Key(keys.Registry(in.prefix)).Build()).AsStrMap()
	if err != nil {
		return nil, fmt.Errorf("inspect: read the queue registry: %w", err)
	}
	qs := make([]Queue, 0, len(m))
	for name, v := range m {
		q, err := registered(name, v)
		if err != nil {
			return nil, err
		}
		qs = append(qs, q)
	}
	slices.SortFunc(qs, func(a, b Queue) int { return cmp.Compare(a.Name, b.Name) })
	return qs, nil
}

// Queue returns the registered queue called name, or an error wrapping
// ErrNoQueue.
func (in *Inspector) Queue(ctx context.Context, name string) (Queue, error) {
	if err := keys.CheckQueue(name); err != nil {
		return Queue{}, fmt.Errorf("inspect: %w", err)
	}
	v, err := in.c.Do(ctx, in.c.B().Hget().Key(keys.Registry(in.prefix)).Field(name).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return Queue{}, fmt.Errorf("inspect: %w %q under prefix %q", ErrNoQueue, keys.Short(name), keys.Short(in.prefix))
	}
	if err != nil {
		return Queue{}, fmt.Errorf("inspect: read the queue registry: %w", err)
	}
	return registered(name, v)
}

// registered returns the queue name whose shard count the registry holds
// as v: 1 to keys.MaxShards, as producers and workers record it.
func registered(name, v string) (Queue, error) {
	n, err := protocol.ParseShards(v)
	if err != nil {
		return Queue{}, fmt.Errorf("inspect: queue registry: queue %q: %w", keys.Short(name), err)
	}
	return Queue{Name: name, Shards: n}, nil
}

// Forget takes a queue out of the registry, so that the tools, the metrics
// and the status page no longer list it, after checking that it holds
// nothing: no pending key, batch in flight, retry or dead letter (purge
// those first). It returns an error wrapping ErrNoQueue for a queue not
// registered, and one wrapping ErrNotEmpty, changing nothing, for one that
// holds items. If items arrive while it forgets, it registers the queue
// again and returns ErrNotEmpty (wrapped).
// A running producer or worker of the queue records it again within
// seconds, with the shards it routes or drains by, so that no shard that
// may hold items is left out of the count.
func (in *Inspector) Forget(ctx context.Context, name string) error {
	q, err := in.Queue(ctx, name)
	if err != nil {
		return err
	}
	empty := func() error {
		st, err := in.StatsOf(ctx, q)
		if err != nil {
			return err
		}
		if s := st[0]; s.ReadyKeys+s.InFlightBatches+s.Retries+s.DeadLetters > 0 {
			return fmt.Errorf("inspect: %w: queue %q has %d pending keys, %d batches in flight, %d retries and %d dead letters",
				ErrNotEmpty, keys.Short(name), s.ReadyKeys, s.InFlightBatches, s.Retries, s.DeadLetters)
		}
		return nil
	}
	if err := empty(); err != nil {
		return err
	}
	// The counts it had before go too: they told where its keys' items
	// might still be, and it holds none.
	for _, r := range in.c.DoMulti(ctx,
		in.c.B().Hdel().Key(keys.Registry(in.prefix)).Field(name).Build(),
		in.c.B().Hdel().Key(keys.Grown(in.prefix)).Field(name).Build()) {
		if err := r.Error(); err != nil {
			return fmt.Errorf("inspect: forget queue %q: %w", keys.Short(name), err)
		}
	}
	if err := empty(); err != nil {
		if _, rerr := protocol.Register(ctx, in.c, in.prefix, protocol.Known{Queue: name, Shards: q.Shards, Default: q.Shards}); rerr != nil {
			return fmt.Errorf("%w; registering it again failed: %v", err, rerr)
		}
		return err
	}
	return nil
}

// CreateQueue records a queue with shards shards (1 to 1024), before any
// producer or worker writes it, which would record the default: 1 on a
// single server, enough for two on every master of a Redis Cluster. It
// fails with an error wrapping ErrQueueExists when the queue is recorded
// with another count (raise it with SetShards), and does nothing when it
// is recorded with this one.
func (in *Inspector) CreateQueue(ctx context.Context, name string, shards int) error {
	if err := keys.CheckQueue(name); err != nil {
		return fmt.Errorf("inspect: %w", err)
	}
	if shards < 1 || shards > keys.MaxShards {
		return fmt.Errorf("inspect: shards must be 1-%d, got %d", keys.MaxShards, shards)
	}
	got, err := protocol.Register(ctx, in.c, in.prefix, protocol.Known{Queue: name, Default: shards})
	if err != nil {
		return fmt.Errorf("inspect: create queue %q: %w", keys.Short(name), err)
	}
	if got[0] != shards {
		return fmt.Errorf("inspect: create queue %q: %w with %d shards", keys.Short(name), ErrQueueExists, got[0])
	}
	return nil
}

// SetShards raises the shard count of a registered queue to shards, online,
// and returns the count it had. Running producers route keys by the new
// count, and running workers drain the new shards as well as the old, within
// a few seconds (protocol.ShardsEvery, 2s); nothing is lost or handled
// twice, but while producers move over a key may have items in two shards,
// delivered as two batches. Counts only grow: a lower one fails with an
// error wrapping ErrShrink, since the other shards may hold items; the same
// count does nothing.
func (in *Inspector) SetShards(ctx context.Context, name string, shards int) (int, error) {
	if err := keys.CheckQueue(name); err != nil {
		return 0, fmt.Errorf("inspect: %w", err)
	}
	old, err := protocol.SetShards(ctx, in.c, in.prefix, name, shards)
	var se *protocol.ShrinkError
	switch {
	case errors.Is(err, protocol.ErrNoQueue):
		return 0, fmt.Errorf("inspect: %w %q under prefix %q", ErrNoQueue, keys.Short(name), keys.Short(in.prefix))
	case errors.As(err, &se):
		return 0, fmt.Errorf("inspect: queue %q: %w: it has %d, and %d would strand the items in the others", keys.Short(name), ErrShrink, se.Recorded, se.Asked)
	case err != nil:
		return 0, fmt.Errorf("inspect: set the shards of queue %q: %w", keys.Short(name), err)
	}
	return old, nil
}

// Stats is the state of a queue, summed over its shards.
type Stats struct {
	Queue  string `json:"queue"`
	Shards int    `json:"shards"`
	// ReadyKeys are keys with pending items (due or not yet due).
	ReadyKeys int64 `json:"ready_keys"`
	// PendingItems are the items waiting in those keys.
	PendingItems int64 `json:"pending_items"`
	// InFlightBatches and InFlightItems are leased to workers.
	InFlightBatches int64 `json:"in_flight_batches"`
	InFlightItems   int64 `json:"in_flight_items"`
	// Retries wait for their next attempt; DeadLetters failed for good.
	Retries     int64 `json:"retries"`
	DeadLetters int64 `json:"dead_letters"`
	// OldestDue is the due time of the key that has waited longest (zero
	// when no key is pending). Lag is how long it has been due: the age of
	// its oldest item when the queue has no flush policy.
	OldestDue time.Time     `json:"oldest_due,omitzero"`
	Lag       time.Duration `json:"lag_ns"`
	// Partial is set when a shard had more than MaxKeysPerShard ready keys
	// or leases: PendingItems and InFlightItems then count those only.
	Partial bool `json:"partial,omitempty"`
	// Now is the Redis server's time the stats were read at.
	Now time.Time `json:"now"`
}

// Stats returns the state of a registered queue.
func (in *Inspector) Stats(ctx context.Context, name string) (Stats, error) {
	q, err := in.Queue(ctx, name)
	if err != nil {
		return Stats{}, err
	}
	all, err := in.StatsOf(ctx, q)
	if err != nil {
		return Stats{}, err
	}
	return all[0], nil
}

// AllStats returns the state of every registered queue, sorted by name.
func (in *Inspector) AllStats(ctx context.Context) ([]Stats, error) {
	qs, err := in.Queues(ctx)
	if err != nil {
		return nil, err
	}
	return in.StatsOf(ctx, qs...)
}

// StatsOf returns the state of the queues qs (as Queues returns them), in
// their order. It reads them all together, in four round trips whatever
// their number (two when they are all empty): a page of many queues costs
// little more than one.
func (in *Inspector) StatsOf(ctx context.Context, qs ...Queue) ([]Stats, error) {
	if len(qs) == 0 {
		return nil, nil
	}
	now, err := protocol.Time(ctx, in.c) // alone: rueidis takes no keyless command in a cross-slot DoMulti
	if err != nil {
		return nil, fmt.Errorf("inspect: read the server's clock: %w", err)
	}
	// Per shard: pending keys (due, then scheduled), leases, retries, dead
	// letters, the oldest due key, and the names to read counts of.
	const per = 10
	var cmds rueidis.Commands
	top := strconv.Itoa(MaxKeysPerShard - 1)
	for _, q := range qs {
		for shard := range q.Shards {
			sp := keys.For(in.prefix, q.Name, shard)
			cmds = append(cmds,
				in.c.B().Zcard().Key(sp.Ready()).Build(),
				in.c.B().Zcard().Key(sp.Later()).Build(),
				in.c.B().Zcard().Key(sp.Leases()).Build(),
				in.c.B().Zcard().Key(sp.Retry()).Build(),
				in.c.B().Zcard().Key(sp.Dead()).Build(),
				in.c.B().Zrange().Key(sp.Ready()).Min("0").Max("0").Withscores().Build(),
				in.c.B().Zrange().Key(sp.Later()).Min("0").Max("0").Withscores().Build(),
				in.c.B().Zrange().Key(sp.Ready()).Min("0").Max(top).Build(),
				in.c.B().Zrange().Key(sp.Later()).Min("0").Max(top).Build(),
				in.c.B().Zrange().Key(sp.Leases()).Min("0").Max(top).Build(),
			)
		}
	}
	res := in.c.DoMulti(ctx, cmds...)
	out := make([]Stats, len(qs))
	readyKeys := make([][][]string, len(qs)) // by queue, then shard
	leases := make([][][]string, len(qs))
	i := 0
	for qi, q := range qs {
		st := Stats{Queue: q.Name, Shards: q.Shards, Now: now}
		readyKeys[qi], leases[qi] = make([][]string, q.Shards), make([][]string, q.Shards)
		for shard := range q.Shards {
			r := res[i : i+per]
			i += per
			var n [5]int64
			for j := range n {
				if n[j], err = r[j].AsInt64(); err != nil {
					return nil, fmt.Errorf("inspect: queue %q shard %d: %w", keys.Short(q.Name), shard, err)
				}
			}
			st.ReadyKeys += n[0] + n[1]
			st.InFlightBatches += n[2]
			st.Retries += n[3]
			st.DeadLetters += n[4]
			for _, h := range r[5:7] {
				head, err := h.AsZScores()
				if err != nil {
					return nil, fmt.Errorf("inspect: queue %q shard %d: %w", keys.Short(q.Name), shard, err)
				}
				if len(head) > 0 {
					due, held := dueAt(head[0].Score)
					if !held && (st.OldestDue.IsZero() || due.Before(st.OldestDue)) {
						st.OldestDue = due
					}
				}
			}
			var names [3][]string
			for j := range names {
				if names[j], err = r[7+j].AsStrSlice(); err != nil {
					return nil, fmt.Errorf("inspect: queue %q shard %d: %w", keys.Short(q.Name), shard, err)
				}
			}
			readyKeys[qi][shard] = append(names[0], names[1]...)
			for _, m := range names[2] {
				leases[qi][shard] = append(leases[qi][shard], protocol.ParseLease(m).Token)
			}
			st.Partial = st.Partial || n[0]+n[1] > MaxKeysPerShard || n[2] > MaxKeysPerShard
		}
		if !st.OldestDue.IsZero() && now.After(st.OldestDue) {
			st.Lag = now.Sub(st.OldestDue)
		}
		out[qi] = st
	}
	pending, err := in.counts(ctx, qs, readyKeys, func(sp keys.Space, k string) string { return sp.Count(k) })
	if err != nil {
		return nil, err
	}
	inFlight, err := in.counts(ctx, qs, leases, func(sp keys.Space, tok string) string { return sp.LeaseCount(tok) })
	if err != nil {
		return nil, err
	}
	for qi := range out {
		out[qi].PendingItems, out[qi].InFlightItems = sum(pending[qi]), sum(inFlight[qi])
	}
	return out, nil
}

func sum(counts [][]int64) int64 {
	var n int64
	for _, cs := range counts {
		for _, c := range cs {
			n += c
		}
	}
	return n
}

// counts reads the items the count key of each of names[queue][shard]
// records: one MGET per queue shard, all in one round trip. A missing count
// is 0: a lease of retries has none, and a key may be drained meanwhile.
func (in *Inspector) counts(ctx context.Context, qs []Queue, names [][][]string, countKey func(keys.Space, string) string) ([][][]int64, error) {
	type at struct{ q, shard int }
	var cmds rueidis.Commands
	var where []at
	out := make([][][]int64, len(qs))
	for qi, q := range qs {
		out[qi] = make([][]int64, q.Shards)
		for shard, ns := range names[qi] {
			if len(ns) == 0 {
				continue
			}
			sp := keys.For(in.prefix, q.Name, shard)
			ks := make([]string, len(ns))
			for i, n := range ns {
				ks[i] = countKey(sp, n)
			}
			cmds = append(cmds, in.c.B().Mget().Key(ks...).Build())
			where = append(where, at{qi, shard})
		}
	}
	for i, r := range in.c.DoMulti(ctx, cmds...) {
		vals, err := r.ToArray()
		if err != nil {
			return nil, fmt.Errorf("inspect: queue %q shard %d: %w", keys.Short(qs[where[i].q].Name), where[i].shard, err)
		}
		cs := make([]int64, len(vals))
		for j, v := range vals {
			if n, err := v.AsInt64(); err == nil {
				cs[j], _ = protocol.UnpackCount(n)
			}
		}
		out[where[i].q][where[i].shard] = cs
	}
	return out, nil
}

// DueKey is a pending key and when it is due.
type DueKey struct {
	Key   string `json:"key"`
	Shard int    `json:"shard"`
	// Due is when the key fell due for workers, or falls due (under a
	// flush policy); Lag how long it has been due at now, 0 if not yet.
	Due time.Time     `json:"due"`
	Lag time.Duration `json:"lag_ns"`
}

// DueKeys returns, for each of the queues qs, up to limit of its pending
// keys that are due longest, oldest first, with their lag at now (the
// server's time, as Stats.Now gives it). It reads them all in one round
// trip, whatever the number of queues.
func (in *Inspector) DueKeys(ctx context.Context, now time.Time, limit int, qs ...Queue) ([][]DueKey, error) {
	if limit < 1 {
		return nil, fmt.Errorf("inspect: limit must be at least 1, got %d", limit)
	}
	var cmds rueidis.Commands
	for _, q := range qs {
		for shard := range q.Shards {
			cmds = append(cmds, in.pendingKeys(q.Name, shard, limit)...)
		}
	}
	res := in.c.DoMulti(ctx, cmds...)
	out := make([][]DueKey, len(qs))
	i := 0
	for qi, q := range qs {
		for shard := range q.Shards {
			zs, err := zscores(res[i : i+2])
			i += 2
			if err != nil {
				return nil, fmt.Errorf("inspect: queue %q shard %d: %w", keys.Short(q.Name), shard, err)
			}
			for _, z := range zs {
				due, held := dueAt(z.Score)
				if held {
					continue // not due: it waits for its hold to end
				}
				k := DueKey{Key: z.Member, Shard: shard, Due: due}
				if now.After(k.Due) {
					k.Lag = now.Sub(k.Due)
				}
				out[qi] = append(out[qi], k)
			}
		}
		slices.SortStableFunc(out[qi], func(a, b DueKey) int { return a.Due.Compare(b.Due) })
		out[qi] = out[qi][:min(limit, len(out[qi]))]
	}
	return out, nil
}

// pendingKeys returns the commands that read up to n pending keys of a
// queue shard, due longest first, with their due times: those due (the
// ready index) and those a flush policy scheduled (the later index).
func (in *Inspector) pendingKeys(queue string, shard, n int) rueidis.Commands {
	sp := keys.For(in.prefix, queue, shard)
	top := strconv.Itoa(n - 1)
	return rueidis.Commands{
		in.c.B().Zrange().Key(sp.Ready()).Min("0").Max(top).Withscores().Build(),
		in.c.B().Zrange().Key(sp.Later()).Min("0").Max(top).Withscores().Build(),
	}
}

// zscores returns the members and scores of the replies to pendingKeys.
func zscores(res []rueidis.RedisResult) ([]rueidis.ZScore, error) {
	var out []rueidis.ZScore
	for _, r := range res {
		zs, err := r.AsZScores()
		if err != nil {
			return nil, err
		}
		out = append(out, zs...)
	}
	return out, nil
}

// KeyStats is one pending key of a queue.
type KeyStats struct {
	Key   string `json:"key"`
	Shard int    `json:"shard"`
	Items int64  `json:"items"`
	Bytes int64  `json:"bytes"`
	// Due is when the key is due for workers (or, while a worker drains
	// it, when its claim ends). It is zero, and left out of JSON, when the
	// key has none: it is held, or (Peek) on neither the ready nor the
	// later index. Lag is how long it has been due, 0 if not yet.
	Due time.Time     `json:"due,omitzero"`
	Lag time.Duration `json:"lag_ns"`
	// Held marks a key of an ordered queue that waits for its batch out,
	// or its failed item's retry, to be settled.
	Held bool `json:"held,omitempty"`
}

// dueAt returns the due time a score of the ready or later index records,
// or held for a key that waits for its hold to end (protocol.HeldDue).
func dueAt(score float64) (due time.Time, held bool) {
	if score >= protocol.HeldDue {
		return time.Time{}, true
	}
	return time.UnixMilli(int64(score)), false
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// SortBy orders the keys Keys returns.
type SortBy string

// Orders of Keys.
const (
	ByAge   SortBy = "age"   // longest due first
	ByItems SortBy = "items" // most items first
	ByBytes SortBy = "bytes" // largest first
)

// ParseSortBy parses "age", "items" or "bytes".
func ParseSortBy(s string) (SortBy, error) {
	switch b := SortBy(s); b {
	case ByAge, ByItems, ByBytes:
		return b, nil
	}
	return "", fmt.Errorf("inspect: unknown order %q: want age, items or bytes", s)
}

// Keys returns up to limit pending keys of a registered queue, ordered by.
func (in *Inspector) Keys(ctx context.Context, name string, by SortBy, limit int) ([]KeyStats, error) {
	q, err := in.Queue(ctx, name)
	if err != nil {
		return nil, err
	}
	if _, err := ParseSortBy(string(by)); err != nil {
		return nil, err
	}
	if limit < 1 {
		return nil, fmt.Errorf("inspect: limit must be at least 1, got %d", limit)
	}
	now, err := protocol.Time(ctx, in.c)
	if err != nil {
		return nil, fmt.Errorf("inspect: read the server's clock: %w", err)
	}
	// By age, the limit oldest of each shard are enough; otherwise every
	// ready key (up to the bound) is a candidate.
	n := MaxKeysPerShard
	if by == ByAge {
		n = min(limit, MaxKeysPerShard)
	}
	var cmds rueidis.Commands
	for shard := range q.Shards {
		cmds = append(cmds, in.pendingKeys(q.Name, shard, n)...)
	}
	res := in.c.DoMulti(ctx, cmds...)
	var all []KeyStats
	names := make([][]string, q.Shards)
	for shard := range q.Shards {
		zs, err := zscores(res[2*shard : 2*shard+2])
		if err != nil {
			return nil, fmt.Errorf("inspect: queue %q shard %d: %w", keys.Short(q.Name), shard, err)
		}
		for _, z := range zs {
			ks := KeyStats{Key: z.Member, Shard: shard}
			if ks.Due, ks.Held = dueAt(z.Score); !ks.Held && now.After(ks.Due) {
				ks.Lag = now.Sub(ks.Due)
			}
			all = append(all, ks)
			names[shard] = append(names[shard], z.Member)
		}
	}
	if err := in.fill(ctx, q, all, names); err != nil {
		return nil, err
	}
	switch by {
	case ByAge: // held keys, which are not due, last
		slices.SortStableFunc(all, func(a, b KeyStats) int {
			return cmp.Or(cmp.Compare(btoi(a.Held), btoi(b.Held)), a.Due.Compare(b.Due))
		})
	case ByItems:
		slices.SortStableFunc(all, func(a, b KeyStats) int { return cmp.Compare(b.Items, a.Items) })
	case ByBytes:
		slices.SortStableFunc(all, func(a, b KeyStats) int { return cmp.Compare(b.Bytes, a.Bytes) })
	}
	return all[:min(limit, len(all))], nil
}

// fill reads the item counts and sizes of ks, whose names per shard are
// names (in the same order as ks).
func (in *Inspector) fill(ctx context.Context, q Queue, ks []KeyStats, names [][]string) error {
	all, err := in.counts(ctx, []Queue{q}, [][][]string{names}, func(sp keys.Space, k string) string { return sp.Count(k) })
	if err != nil {
		return err
	}
	counts := all[0]
	cmds := make(rueidis.Commands, 0, len(ks))
	for _, k := range ks {
		cmds = append(cmds, in.c.B().Strlen().Key(keys.For(in.prefix, q.Name, k.Shard).Items(k.Key)).Build())
	}
	res := in.c.DoMulti(ctx, cmds...)
	next := make([]int, q.Shards)
	for i := range ks {
		sh := ks[i].Shard
		ks[i].Items = counts[sh][next[sh]]
		next[sh]++
		// A key holding another Redis type answers WRONGTYPE: size 0.
		ks[i].Bytes, _ = res[i].AsInt64()
	}
	return nil
}

// MaxPeekBytes bounds the array Peek returns.
const MaxPeekBytes = 16 << 20

// Peeked is what a key holds.
type Peeked struct {
	KeyStats
	// Array is the pending JSON array, byte for byte (nil when the key
	// holds nothing).
	Array json.RawMessage `json:"array"`
}

// Peek returns the pending items of a key of a registered queue, without
// taking them. A key holding more than MaxPeekBytes is an error, as is a
// key holding something other than a string.
func (in *Inspector) Peek(ctx context.Context, name, key string) (Peeked, error) {
	q, err := in.Queue(ctx, name)
	if err != nil {
		return Peeked{}, err
	}
	if err := keys.CheckStoredKey(key); err != nil { // not CheckKey: a key stored before it refused control characters can be read
		return Peeked{}, fmt.Errorf("inspect: %w", err)
	}
	shard := keys.Shard(key, q.Shards)
	sp := keys.For(in.prefix, q.Name, shard)
	res := in.c.DoMulti(ctx,
		in.c.B().Strlen().Key(sp.Items(key)).Build(),
		in.c.B().Get().Key(sp.Count(key)).Build(),
		in.c.B().Zscore().Key(sp.Ready()).Member(key).Build(),
		in.c.B().Zscore().Key(sp.Later()).Member(key).Build())
	p := Peeked{KeyStats: KeyStats{Key: key, Shard: shard}}
	if p.Bytes, err = res[0].AsInt64(); err != nil {
		t, _ := protocol.Type(ctx, in.c, sp.Items(key))
		return Peeked{}, fmt.Errorf("inspect: key %q of queue %s holds a Redis %s, not a JSON array: %w", keys.Short(key), keys.Short(name), t, err)
	}
	if v, err := res[1].AsInt64(); err == nil {
		p.Items, _ = protocol.UnpackCount(v)
	}
	score, err := res[2].AsFloat64()
	if rueidis.IsRedisNil(err) {
		score, err = res[3].AsFloat64()
	}
	if err == nil {
		p.Due, p.Held = dueAt(score)
		if now, err := protocol.Time(ctx, in.c); err == nil && !p.Held && now.After(p.Due) {
			p.Lag = now.Sub(p.Due)
		}
	}
	if p.Bytes > MaxPeekBytes {
		return Peeked{}, fmt.Errorf("inspect: key %q of queue %s holds %d bytes, more than Peek returns (%d)", keys.Short(key), keys.Short(name), p.Bytes, MaxPeekBytes)
	}
	if p.Bytes == 0 {
		return p, nil
	}
	v, err := in.c.Do(ctx, in.c.B().Get().Key(sp.Items(key)).Build()).AsBytes()
	if rueidis.IsRedisNil(err) {
		return p, nil // drained meanwhile
	}
	if err != nil {
		return Peeked{}, fmt.Errorf("inspect: read key %q of queue %s: %w", keys.Short(key), keys.Short(name), err)
	}
	p.Array, p.Bytes = v, int64(len(v))
	return p, nil
}

// DeadLetters returns a client of the dead letters of a registered queue
// (List, Count, Requeue, RequeueNewest, Purge), under the inspector's
// prefix; like every reader, it takes the queue's shard count from the
// registry. The client's own errors start with
// "deadletter: ".
func (in *Inspector) DeadLetters(ctx context.Context, name string) (*deadletter.Client, error) {
	if _, err := in.Queue(ctx, name); err != nil {
		return nil, err
	}
	// Cannot fail: New checked the prefix.
	return deadletter.New(in.c, deadletter.WithPrefix(in.prefix))
}
