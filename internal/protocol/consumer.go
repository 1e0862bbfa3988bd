package protocol

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/jsonarray"
	"github.com/batchq/batchq/internal/keys"
)

// Defaults.
const (
	DefaultLeaseTTL        = 5 * time.Second
	DefaultDeadLetterCap   = 100_000
	DefaultRetriesPerFetch = 100
)

// StrandGrace is how long a due key may wait off the wake list before a
// claim pushes it again: it was popped by a worker that died before
// draining it (docs/PROTOCOL.md, "Sweep").
const StrandGrace = 2 * time.Second

// Consumer runs the worker's side of the protocol on the queues of one
// prefix: it claims, pops and drains keys into leased batches, settles
// them, extends their leases and reaps expired ones. It is safe for
// concurrent use.
type Consumer struct {
	c          rueidis.Client
	prefix     string
	defaults   Defaults // the shards of a queue this consumer records first
	leaseTTL   time.Duration
	atMostOnce bool
	deadCap    int
	retries    int
	name       string
	clock      *Clock
	popper     Popper
	started    atomic.Int64 // when Announce first ran (Unix ms); 0 before
	ordered    sync.Map     // queue name -> true, for ordered queues (see Order)
	grown      sync.Map     // ordered queue name -> the counts it had before ([]int, ascending; see readGrown)
}

// Option configures a Consumer.
type Option func(*Consumer) error

// WithPrefix sets the prefix of every Redis key (default "batchq"). Producers
// and consumers of a queue must agree on it.
func WithPrefix(p string) Option {
	return func(c *Consumer) error {
		if err := keys.CheckPrefix(p); err != nil {
			return err
		}
		c.prefix = p
		return nil
	}
}

// WithDefaultShards sets the shards of a queue the consumer is the first
// to record (default: the Topology's DefaultShards). Once a queue is
// recorded, its count is the registry's.
func WithDefaultShards(n int) Option {
	return func(c *Consumer) error {
		if n < 1 || n > keys.MaxShards {
			return fmt.Errorf("shards must be 1-%d, got %d", keys.MaxShards, n)
		}
		c.defaults.Fixed = n
		return nil
	}
}

// WithLeaseTTL sets how long a drained batch is leased before a reaper may
// hand it to another worker (default 5s). Running batches are extended, so
// it bounds the time to redeliver a dead worker's batches, not the time a
// handler may take.
func WithLeaseTTL(d time.Duration) Option {
	return func(c *Consumer) error {
		if d < 100*time.Millisecond {
			return fmt.Errorf("lease TTL must be at least 100ms, got %v", d)
		}
		c.leaseTTL = d
		return nil
	}
}

// WithAtMostOnce drains keys with GETDEL and no lease: a consumer that dies
// while it holds a batch loses that batch. Failed items are still retried.
func WithAtMostOnce() Option {
	return func(c *Consumer) error {
		c.atMostOnce = true
		return nil
	}
}

// WithDeadLetterCap bounds the dead letters kept per queue shard (default
// 100,000); past it the oldest are dropped. 0 keeps them all.
func WithDeadLetterCap(n int) Option {
	return func(c *Consumer) error {
		if n < 0 {
			return fmt.Errorf("dead letter cap must not be negative, got %d", n)
		}
		c.deadCap = n
		return nil
	}
}

// WithName names the consumer in the leases it holds (default
// "<hostname>-<pid>-<random>"), so that an operator can tell whose they are.
// It may not hold a colon.
func WithName(name string) Option {
	return func(c *Consumer) error {
		if name == "" || len(name) > 128 || strings.ContainsAny(name, ":{}") || !utf8.ValidString(name) || strings.ContainsFunc(name, unicode.IsControl) {
			return fmt.Errorf("name %q must be 1-128 bytes of UTF-8 without colons, braces or control characters", keys.Short(name))
		}
		c.name = name
		return nil
	}
}

// WithClock sets the local clock the consumer reads (default time.Now), for
// tests. The consumer still adds the offset Sync measures to it.
func WithClock(now func() time.Time) Option {
	return func(c *Consumer) error {
		if now == nil {
			return errors.New("nil clock")
		}
		c.clock = NewClock(now)
		return nil
	}
}

func defaultName() string {
	host, _ := os.Hostname()
	host = strings.NewReplacer(":", "_", "{", "_", "}", "_").Replace(host)
	return fmt.Sprintf("%s-%d-%s", host, os.Getpid(), strconv.FormatUint(rand.Uint64()%46656, 36))
}

// NewConsumer returns a Consumer that uses c, which the caller keeps owning.
func NewConsumer(c rueidis.Client, opts ...Option) (*Consumer, error) {
	cs := &Consumer{
		c:        c,
		prefix:   keys.DefaultPrefix,
		leaseTTL: DefaultLeaseTTL,
		deadCap:  DefaultDeadLetterCap,
		retries:  DefaultRetriesPerFetch,
		clock:    NewClock(nil),
	}
	for _, o := range opts {
		if err := o(cs); err != nil {
			return nil, err
		}
	}
	if cs.name == "" {
		cs.name = defaultName()
	}
	return cs, nil
}

// Order makes the consumer treat queue as an ordered queue
// (docs/PROTOCOL.md, "Ordered keys"): at most one batch of a key is out at
// a time, and a failed item holds its key until it succeeds or is dead.
// Every consumer of a queue must agree. Call it before the consumer takes
// work from queue; it cannot be undone.
func (c *Consumer) Order(queue string) { c.ordered.Store(queue, true) }

func (c *Consumer) isOrdered(queue string) bool {
	_, ok := c.ordered.Load(queue)
	return ok
}

// Name returns the consumer's name.
func (c *Consumer) Name() string { return c.name }

// Sync measures the offset of the Redis server's clock from the local
// clock, which the consumer then adds to its own readings: lease deadlines
// and due times are then on the server's clock, so the clocks of consumers
// and producers need not agree. A Worker syncs at start and every 30
// seconds; a consumer that is never synced uses its local clock.
func (c *Consumer) Sync(ctx context.Context) error { return c.clock.Sync(ctx, c.c) }

// Evictions returns the nodes whose maxmemory-policy may evict keys (see
// Evictions). Any policy but noeviction lets Redis drop keys, and the items
// in them, when it is full.
func (c *Consumer) Evictions(ctx context.Context) Evicting { return Evictions(ctx, c.c) }

// Offset returns the server's clock minus the local clock, as last measured
// by Sync.
func (c *Consumer) Offset() time.Duration { return c.clock.Offset() }

// Now returns the Redis server's time as the consumer knows it: its local
// clock plus the offset Sync measured. Deadlines and due times are on this
// clock.
func (c *Consumer) Now() time.Time { return c.clock.Now() }

func (c *Consumer) now() time.Time { return c.clock.Now() }

// fixed sets the Default of each of qs to what costs no round trip to
// know (see Defaults.Cheap and RegisterNew): Announce registers with it.
func (c *Consumer) fixed(qs []Known) {
	for i := range qs {
		qs[i].Default = c.defaults.Cheap(c.c, qs[i].Queue)
	}
}

// ReadShards returns the recorded shard counts of queues (see the
// package's ReadShards). It also reads again the counts the ordered ones
// had before (see Order).
func (c *Consumer) ReadShards(ctx context.Context, queues ...string) ([]int, error) {
	counts, err := ReadShards(ctx, c.c, c.prefix, queues...)
	if err == nil {
		err = c.readGrown(ctx, queues, counts)
	}
	if err != nil {
		return nil, err // no count without what it grew from: a drain of a new shard needs both
	}
	return counts, nil
}

// readGrown reads the counts the ordered queues among queues had before
// their current one (keys.Grown), where ordered drains look for their keys'
// earlier items, and keeps them, followed by the current count, counts[i]
// for queues[i]. The current count is read first (by Announce or
// ReadShards): a count that grew since is read with what it grew from.
func (c *Consumer) readGrown(ctx context.Context, queues []string, counts []int) error {
	var ordered []string
	var current []int
	for i, q := range queues {
		if c.isOrdered(q) {
			ordered, current = append(ordered, q), append(current, counts[i])
		}
	}
	if len(ordered) == 0 {
		return nil
	}
	vals, err := c.c.Do(ctx, c.c.B().Hmget().Key(keys.Grown(c.prefix)).Field(ordered...).Build()).ToArray()
	if err == nil && len(vals) != len(ordered) {
		err = fmt.Errorf("HMGET of %d queues returned %d values", len(ordered), len(vals))
	}
	if err != nil {
		return fmt.Errorf("read the counts ordered queues grew from: %w", err)
	}
	for i, v := range vals {
		if current[i] == 0 {
			continue // not recorded (forgotten meanwhile): the worker registers it again
		}
		s, _ := v.ToString() // nil: it never grew
		c.grown.Store(ordered[i], append(parseGrown(s), current[i]))
	}
	return nil
}

// parseGrown parses a queue's value in keys.Grown ("2,4"), or returns nil
// for none, or for a value that is not ascending counts (another program
// wrote it: there is nothing to go by).
func parseGrown(s string) []int {
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		n, err := ParseShards(f)
		if err != nil || len(out) > 0 && n <= out[len(out)-1] {
			return nil
		}
		out = append(out, n)
	}
	return out
}

// earlier returns the shards of queue where items of key appended before
// those in shard may still be: the key's shard under each count the queue
// had before the first under which the key was in shard. A shard the key
// came back to under a later count is left out (a count that is not a
// multiple of the one before can send a key back): its items may be newer,
// and while the key keeps getting them, this shard would wait for good.
func (c *Consumer) earlier(queue string, shard int, key string) []int {
	v, ok := c.grown.Load(queue)
	if !ok || len(v.([]int)) < 2 {
		return nil
	}
	counts := v.([]int)
	at := make([]int, len(counts)) // the key's shard under each count
	first := len(counts)           // the first count under which it was in shard
	for i, n := range counts {
		at[i] = keys.Shard(key, n)
		if at[i] == shard && first == len(counts) {
			first = i
		}
	}
	var out []int
	for _, s := range at[:first] {
		if !slices.Contains(at[first:], s) && !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}

// Client returns the client the consumer uses.
func (c *Consumer) Client() rueidis.Client { return c.c }

// Prefix returns the prefix of every Redis key.
func (c *Consumer) Prefix() string { return c.prefix }

// LeaseTTL returns the lease TTL.
func (c *Consumer) LeaseTTL() time.Duration { return c.leaseTTL }

// AtMostOnce reports whether batches are drained without a lease.
func (c *Consumer) AtMostOnce() bool { return c.atMostOnce }

func (c *Consumer) space(queue string, shard int) keys.Space {
	return keys.For(c.prefix, queue, shard)
}

func (c *Consumer) nowMs() int64 { return c.clock.NowMs() }

// Batch is a set of items taken from one queue shard at once: either the
// whole array of one key, or due retries (possibly of several keys).
type Batch struct {
	Queue string
	Shard int
	Key   string // the drained key; "" for a batch of retries
	Items []Item
	// Ordered marks a batch of an ordered queue: its items of one key must
	// be handled one after another, and a failed one holds back those after
	// it (see Consumer.Order).
	Ordered bool

	id    string  // unique; the lease's token when leased
	lease Lease   // zero when drained without a lease
	dead  []Entry // bad elements and undecodable retry envelopes, stored as dead letters when b is settled
	// deadHolds are the keys of undecodable retry envelopes of an ordered
	// queue: their holds end when b is settled.
	deadHolds []string
	lost      atomic.Bool
}

// LeaseLost reports whether an Extend found b's lease gone: it expired and
// was reaped (its worker was cut off from Redis for longer than the lease
// TTL, say), and the batch is being delivered again. Handling the rest of
// it would only run its items twice, and, on an ordered queue, beside the
// batch redelivered.
func (b *Batch) LeaseLost() bool { return b.lost.Load() }

// Retry reports whether b holds retries rather than a drained key.
func (b *Batch) Retry() bool { return b.Key == "" }

// Item is one item of a batch.
type Item struct {
	Key       string          // the key it was appended to
	Data      json.RawMessage // the item, byte for byte as appended
	Attempt   int             // failed attempts before this delivery
	LastError string          // the error of the last failed attempt

	held bool // its key is held (an ordered queue's) for its batch
}

// Fetched is what a Round, Claim or Fetch took.
type Fetched struct {
	Batches []*Batch
	// Dead lists keys whose value was not a JSON array (each moved to dead
	// letters whole) and bad elements of arrays; and retries whose stored
	// envelope did not decode. They go to dead letters at once, or, when a
	// batch is returned with them, when that batch is settled.
	Dead []DeadLetter
	// NextKey and NextRetry are when the earliest key a flush policy
	// scheduled and the earliest retry fall due (after Claim or Fetch),
	// zero when none is pending.
	NextKey, NextRetry time.Time
	// Pushed counts the keys Claim put on the wake list: promoted, or
	// stranded by a worker that died between a pop and its drain.
	Pushed int
}

// Claim does the periodic work on a queue shard (claim.lua): it makes the
// keys a flush policy scheduled due once their time has come, pushes again
// the keys that a dead worker popped but never drained, and, withRetries,
// takes up to a batch of due retries into a lease, which Fetched.Batches
// then holds.
func (c *Consumer) Claim(ctx context.Context, queue string, shard int, withRetries bool) (Fetched, error) {
	if err := keys.CheckQueue(queue); err != nil {
		return Fetched{}, err
	}
	sp := c.space(queue, shard)
	now := c.nowMs()
	lease := Lease{Token: newToken(), Owner: c.name}
	a := ClaimArgs{Now: now, Grace: StrandGrace.Milliseconds(), RetryLease: lease, RetryDeadline: now + c.leaseTTL.Milliseconds()}
	if withRetries {
		a.MaxRetries = c.retries
	}
	cl, err := Claim(ctx, c.c, sp, a)
	if err != nil {
		return Fetched{}, fmt.Errorf("claim %s: %w", keys.Short(queue), err)
	}
	f := Fetched{Pushed: cl.Pushed}
	if cl.NextKey > 0 {
		f.NextKey = time.UnixMilli(cl.NextKey)
	}
	if cl.NextRetry > 0 {
		f.NextRetry = time.UnixMilli(cl.NextRetry)
	}
	if len(cl.Retries) == 0 {
		return f, nil
	}
	b := &Batch{Queue: queue, Shard: shard, id: lease.Token, lease: lease, Items: make([]Item, 0, len(cl.Retries)), Ordered: c.isOrdered(queue)}
	var bad []DeadLetter
	for _, e := range cl.Retries {
		var env retryEnvelope
		err := json.Unmarshal([]byte(e.Env), &env)
		if err == nil && len(env.Item) == 0 {
			err = errors.New("no item")
		}
		if err != nil {
			// Only batchq writes retry envelopes; one that does not decode
			// is kept as a dead letter rather than dropped, and never
			// reaches a handler.
			d := DeadLetter{ID: e.ID, Queue: queue, Shard: shard, Item: JSONString(e.Env),
				Error: "undecodable retry envelope: " + err.Error(), FailedAt: c.now(), Corrupt: true}
			bad = append(bad, d)
			b.dead = append(b.dead, Entry{ID: d.ID, Env: string(d.encode())})
			// An ordered retry held its key: the hold ends with the batch,
			// or nothing would ever drain the key again.
			if key, ordered := envelopeKey(e.Env); key != "" && ordered && !slices.Contains(b.deadHolds, key) {
				b.deadHolds = append(b.deadHolds, key)
			}
			continue
		}
		// An ordered key's retry holds the key, and the items it held back
		// come right after it, in order (also on a queue no longer ordered:
		// none may be lost). A retry stored before its queue was ordered
		// holds nothing, and is settled alone.
		b.Items = append(b.Items, Item{Key: env.Key, Data: env.Item, Attempt: env.Attempts, LastError: env.Error, held: env.Ordered})
		b.Ordered = b.Ordered || env.Ordered
		for _, it := range env.Rest {
			b.Items = append(b.Items, Item{Key: env.Key, Data: it, held: env.Ordered})
		}
	}
	if len(b.Items) > 0 {
		// The bad envelopes become dead letters when b is settled.
		f.Batches = append(f.Batches, b)
		f.Dead = append(f.Dead, bad...)
		return f, nil
	}
	// Only bad envelopes: store them and release the lease now.
	s := Settlement{Lease: b.lease, ID: b.id, Dead: b.dead, DeadCap: c.deadCap, Now: bad[0].FailedAt.UnixMilli(), Holds: b.deadHolds}
	if err := Settle(ctx, c.c, sp, s); err == nil {
		f.Dead = append(f.Dead, bad...)
	} // else the lease expires and the reaper puts them back on the retry index
	return f, nil
}

// Pop pops up to max due keys of a queue shard from its wake list, waiting
// up to timeout while none is due; none means the timeout passed. hint
// reports that a producer scheduled a key (a flush policy) meanwhile: the
// caller should Claim soon. Drain the keys it returns at once, with a
// Round: until then they are in no worker's lease, and only a claim's sweep
// finds them again should the worker die.
func (c *Consumer) Pop(ctx context.Context, queue string, shard, max int, timeout time.Duration) (popped []string, hint bool, err error) {
	ks, err := c.popper.Pop(ctx, c.c, c.space(queue, shard), max, timeout)
	popped, hint = splitHints(ks)
	return popped, hint, err
}

// splitHints returns the names of popped without its hints (empty names: a
// key was scheduled, or a retry stored, sooner than the next claim), and
// whether it held one.
func splitHints(popped []string) (names []string, hint bool) {
	names = popped[:0:0]
	for _, k := range popped {
		if k == "" {
			hint = true
		} else {
			names = append(names, k)
		}
	}
	return names, hint
}

// Unpop puts popped keys back on their shard's wake list, for another
// worker: those that will not be drained after all (shutdown came first).
func (c *Consumer) Unpop(ctx context.Context, queue string, shard int, popped []string) error {
	return Unpop(ctx, c.c, c.space(queue, shard), popped)
}

// NoBLMPOP makes the consumer pop one key per BLPOP, as on servers without
// BLMPOP, for tests.
func (c *Consumer) NoBLMPOP() { c.popper.NoBLMPOP() }

// RoundResult is what a Round did.
type RoundResult struct {
	Fetched          // the batches drained, and dead letters
	Done    []error  // the outcome of releasing each done batch: nil, ErrLeaseLost, or an error; always one per batch
	Next    []string // keys popped for the next round
	Hint    bool     // a producer scheduled a key: Claim soon
}

// Round is one round trip of a worker on a queue shard, to the effect of a
// Settle of each batch of done, a drain of popped, and a Pop of up to popMax
// more due keys that does not wait (none when popMax is 0). The drain is one
// MULTI/EXEC that moves each key's array into a lease (without one,
// WithAtMostOnce) and reads it: a value that is not a JSON array goes to
// dead letters whole, an element of an array that is not valid JSON (or
// nests too deeply) alone; a key drained by another worker first is left
// out. done holds batches of this queue shard that are Releasable with the
// outcomes they were handled with: their leases are released without a
// script. (A MULTI may not share a round trip with commands of another hash
// slot in Redis Cluster.) On an ordered queue (see Order), done is empty,
// and the drain takes two round trips on conn, the fetch loop's own (see
// orderedDrain). Drain the keys in Next at once: until then they are in no
// worker's lease (see Pop).
func (c *Consumer) Round(ctx context.Context, queue string, shard int, conn *Conn, done []*Batch, popped []string, popMax int) (RoundResult, error) {
	var r RoundResult
	r.Done = make([]error, len(done))
	refuse := func(err error) (RoundResult, error) {
		for i := range r.Done {
			r.Done[i] = err
		}
		return r, err
	}
	if err := keys.CheckQueue(queue); err != nil {
		return refuse(err)
	}
	sp := c.space(queue, shard)
	if c.isOrdered(queue) && len(popped) > 0 && len(done) == 0 {
		return c.orderedRound(ctx, queue, shard, conn, popped, popMax)
	}
	var cmds rueidis.Commands
	at := make([]int, len(done)) // the index in cmds of each release's ZREM
	for i, b := range done {
		if b.Queue != queue || b.Shard != shard || !b.leased() || len(b.dead) > 0 {
			return refuse(fmt.Errorf("round %s/%d: batch of %s/%d is not releasable here", keys.Short(queue), shard, keys.Short(b.Queue), b.Shard))
		}
		cmds = append(cmds, releaseCmds(c.c, sp, b.lease)...)
		at[i] = len(cmds) - 1
	}
	d := drain{sp: sp, keys: popped}
	if !c.atMostOnce {
		d.leases = make([]Lease, len(popped))
		for i, k := range popped {
			d.leases[i] = Lease{Token: newToken(), Owner: c.name, Key: k}
		}
	}
	multi, exec := -1, -1
	if len(popped) > 0 {
		multi = len(cmds)
		cmds = append(cmds, d.cmds(c.c, c.nowMs()+c.leaseTTL.Milliseconds())...)
		exec = len(cmds) - 1
	}
	if popMax > 0 {
		cmds = append(cmds, lpopCmd(c.c, sp, popMax))
	}
	if len(cmds) == 0 {
		return r, nil
	}
	res := c.c.DoMulti(ctx, cmds...)
	for i, j := range at {
		r.Done[i] = released(res[j])
	}
	var errs []error
	if exec >= 0 {
		drained, phantom, err := d.results(res[multi : exec+1])
		for _, x := range drained {
			c.collect(ctx, &r.Fetched, queue, shard, x)
		}
		errs = append(errs, err, removePhantoms(ctx, c.c, sp, phantom))
	}
	if popMax > 0 {
		next, err := poppedKeys(res[len(res)-1])
		r.Next, r.Hint = splitHints(next)
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return r, fmt.Errorf("drain %s: %w", keys.Short(queue), err)
	}
	return r, nil
}

// orderedRound is a Round of an ordered queue, with keys to drain and no
// releases (an ordered batch is settled by script): two round trips, to
// read the keys' holds under WATCH, then to drain those not held (see
// orderedDrain).
func (c *Consumer) orderedRound(ctx context.Context, queue string, shard int, conn *Conn, popped []string, popMax int) (RoundResult, error) {
	sp := c.space(queue, shard)
	var r RoundResult
	// A name popped twice (a sweep pushed it again while a slow worker had
	// it) is drained once: the second drain in the MULTI would set the
	// key's hold to a lease that holds nothing, and ending that lease would
	// end the hold of the first.
	once := make([]string, 0, len(popped))
	for _, k := range popped {
		if !slices.Contains(once, k) {
			once = append(once, k)
		}
	}
	popped, err := c.waitForEarlier(ctx, queue, shard, once)
	if err != nil {
		return r, fmt.Errorf("drain %s: %w", keys.Short(queue), err)
	}
	if len(popped) == 0 {
		return r, nil
	}
	leases := make([]Lease, len(popped))
	for i, k := range popped {
		leases[i] = Lease{Token: newToken(), Owner: c.name, Key: k}
	}
	drained, phantom, next, err := orderedDrain(ctx, c.c, conn, sp, popped, leases, c.nowMs()+c.leaseTTL.Milliseconds(), popMax)
	if errors.Is(err, errHoldsChanging) {
		// Busy keys, not a failing Redis: they go back for a later pop.
		err = Unpop(ctx, c.c, sp, popped)
	}
	for _, x := range drained {
		c.collect(ctx, &r.Fetched, queue, shard, x)
	}
	r.Next, r.Hint = splitHints(next)
	if len(phantom) > 0 {
		// The drain held keys it found gone: end those holds, and make the
		// keys due if items came since.
		sps := make([]keys.Space, len(phantom))
		ss := make([]Settlement, len(phantom))
		for i, l := range phantom {
			sps[i], ss[i] = sp, Settlement{Lease: l, ID: l.Token, Key: l.Key, Holds: []string{l.Key}, Now: c.nowMs()}
		}
		err = errors.Join(append([]error{err}, SettleMany(ctx, c.c, sps, ss)...)...)
	}
	if err != nil {
		return r, fmt.Errorf("drain %s: %w", keys.Short(queue), err)
	}
	return r, nil
}

// EarlierWait is how long a key of an ordered queue waits, when it has
// items in a shard it was routed to before the queue's shard count grew,
// before a worker looks again.
const EarlierWait = 200 * time.Millisecond

// waitForEarlier returns the keys of popped that may be drained from the
// shard of an ordered queue: those with no items, pending or out, in a
// shard where the key was before the queue's shard count grew (see
// earlier). Each of the others waits EarlierWait on the later index, to be
// promoted and popped again, as a key a flush policy scheduled is. Keys no count moved cost nothing; the others, a round trip
// to look (two EXISTS per earlier shard), and the ones to wait, one more.
func (c *Consumer) waitForEarlier(ctx context.Context, queue string, shard int, popped []string) ([]string, error) {
	var cmds rueidis.Commands
	var of []int // of[j]: the index in popped of cmds[2j] and cmds[2j+1]
	for i, k := range popped {
		for _, s := range c.earlier(queue, shard, k) {
			sp := c.space(queue, s)
			cmds = append(cmds, c.c.B().Exists().Key(sp.Items(k)).Build(), c.c.B().Exists().Key(sp.Hold(k)).Build())
			of = append(of, i)
		}
	}
	if len(cmds) == 0 {
		return popped, nil
	}
	wait := make([]bool, len(popped))
	for j, r := range c.c.DoMulti(ctx, cmds...) {
		n, err := r.AsInt64()
		if err != nil {
			return nil, fmt.Errorf("look for items in earlier shards: %w", err)
		}
		wait[of[j/2]] = wait[of[j/2]] || n > 0
	}
	sp := c.space(queue, shard)
	due := float64(c.nowMs() + EarlierWait.Milliseconds())
	park := rueidis.Commands{c.c.B().Multi().Build()}
	drain := popped[:0:0]
	for i, k := range popped {
		if !wait[i] {
			drain = append(drain, k)
			continue
		}
		park = append(park, c.c.B().Zrem().Key(sp.Ready()).Member(k).Build(),
			c.c.B().Zadd().Key(sp.Later()).Nx().ScoreMember().ScoreMember(due, k).Build())
	}
	if len(park) > 1 {
		// A hint on the wake list has a fetch loop claim, and so learn when
		// the keys are due.
		park = append(park, c.c.B().Rpush().Key(sp.Wake()).Element("").Build(), c.c.B().Exec().Build())
		res := c.c.DoMulti(ctx, park...)
		if err := res[len(res)-1].Error(); err != nil {
			return nil, fmt.Errorf("keep keys waiting for their earlier items: %w", err)
		}
	}
	return drain, nil
}

// Fetch takes up to max batches from a queue shard without waiting: it
// claims (a batch of due retries first, if any), then pops and drains due
// keys for the rest. With at-least-once delivery (the default) every batch
// is leased and must be settled; until then, call Extend to keep its lease.
// A Worker runs Claim, Pop and Round itself; Fetch is for tests.
func (c *Consumer) Fetch(ctx context.Context, queue string, shard, max int) (Fetched, error) {
	if max < 1 {
		return Fetched{}, nil
	}
	f, err := c.Claim(ctx, queue, shard, true)
	if err != nil || len(f.Batches) >= max {
		return f, err
	}
	var conn Conn
	defer conn.Close()
	pop, err := c.Round(ctx, queue, shard, &conn, nil, nil, max-len(f.Batches))
	if err != nil {
		return f, err
	}
	d, err := c.Round(ctx, queue, shard, &conn, nil, pop.Next, 0)
	f.Batches = append(f.Batches, d.Batches...)
	f.Dead = append(f.Dead, d.Dead...)
	return f, err
}

// collect turns one drained key into a batch, or into a dead letter when
// its value is not a JSON array. The array is split element by element, so
// an element that is not valid JSON, or nests deeper than producers allow,
// becomes a dead letter of its own (stored when the batch is settled) and
// its siblings are handled.
func (c *Consumer) collect(ctx context.Context, f *Fetched, queue string, shard int, d Drained) {
	if d.Missing {
		return
	}
	b := &Batch{Queue: queue, Shard: shard, Key: d.Key, id: d.Lease.Token, lease: d.Lease, Ordered: c.isOrdered(queue)}
	if b.id == "" {
		b.id = newToken()
	}
	var reason string
	var raw json.RawMessage
	if d.WrongType {
		typ, _ := Type(ctx, c.c, c.itemsOrLease(b))
		reason = fmt.Sprintf("the key held a Redis %s, not a JSON array; it is kept under %s", typ, c.space(queue, shard).Quarantine(b.id))
	} else {
		parts, err := jsonarray.Split(d.Data)
		if err == nil {
			c.collectParts(ctx, f, b, d.Data, parts)
			return
		}
		reason = "the key held a string that is not a JSON array"
		raw = d.Data
		if !json.Valid(raw) || jsonarray.Depth(raw) > jsonarray.MaxDepth {
			raw = JSONString(string(d.Data)) // as it is, the envelope could not hold it
		}
	}
	dl := DeadLetter{
		ID: b.id, Queue: queue, Shard: shard, Key: d.Key, Item: raw,
		Error: reason, FailedAt: c.now(), Corrupt: true,
	}
	s := Settlement{
		Lease: b.lease, ID: b.id, Key: d.Key, Quarantine: d.WrongType,
		DeadCap: c.deadCap, Now: dl.FailedAt.UnixMilli(),
		Dead: []Entry{{ID: dl.ID, Env: string(dl.encode())}}, Holds: b.holds(),
	}
	if err := Settle(ctx, c.c, c.space(queue, shard), s); err != nil {
		// A leased value is found again after its lease; one drained
		// without a lease is lost (the at-most-once trade).
		return
	}
	f.Dead = append(f.Dead, dl)
}

// maxBadLetters bounds the dead letters one drained value makes of its bad
// elements: past it, the rest of the value is one letter.
const maxBadLetters = 16

// collectParts makes b's items of the parts of data, its key's array. Bad
// parts become dead letters, stored with b's settlement (or at once when no
// part is good): a run of bad parts is one letter, and a value with more
// than maxBadLetters runs is garbage, whose rest is one letter, so that no
// value can flood dead letters.
func (c *Consumer) collectParts(ctx context.Context, f *Fetched, b *Batch, data []byte, parts []jsonarray.Part) {
	b.Items = make([]Item, 0, len(parts))
	var bad []DeadLetter
	for i := 0; i < len(parts); {
		reason := badPart(parts[i])
		if reason == "" {
			b.Items = append(b.Items, Item{Key: b.Key, Data: parts[i].Raw, held: b.Ordered})
			i++
			continue
		}
		last := i
		for last+1 < len(parts) && badPart(parts[last+1]) != "" {
			last++
		}
		what := fmt.Sprintf("item %d", i)
		if len(bad) == maxBadLetters-1 {
			last = len(parts) - 1
			what = fmt.Sprintf("items %d to %d (the rest of the array, after %d bad runs before it)", i, last, len(bad))
		} else if last > i {
			what = fmt.Sprintf("items %d to %d", i, last)
		}
		// Kept as a JSON string: as they are, the bad bytes could not be part
		// of the dead letter's envelope, or would make it too deep to decode.
		d := DeadLetter{ID: fmt.Sprintf("%s-%07d-bad", b.id, i), Queue: b.Queue, Shard: b.Shard, Key: b.Key,
			Item:  JSONString(string(data[parts[i].Start:parts[last].End])),
			Error: what + " of the key's array: " + reason, FailedAt: c.now(), Corrupt: true}
		bad = append(bad, d)
		b.dead = append(b.dead, Entry{ID: d.ID, Env: string(d.encode())})
		i = last + 1
	}
	if len(b.Items) > 0 || len(bad) == 0 {
		f.Batches = append(f.Batches, b)
		f.Dead = append(f.Dead, bad...)
		return
	}
	s := Settlement{Lease: b.lease, ID: b.id, Key: b.Key, Dead: b.dead, DeadCap: c.deadCap, Now: bad[0].FailedAt.UnixMilli(), Holds: b.holds()}
	if err := Settle(ctx, c.c, c.space(b.Queue, b.Shard), s); err == nil {
		f.Dead = append(f.Dead, bad...)
	} // else a leased batch is found again after its lease; one drained without a lease is lost
}

// badPart returns why p cannot be an item, or "" when it can.
func badPart(p jsonarray.Part) string {
	switch {
	case p.Depth > jsonarray.MaxDepth:
		return fmt.Sprintf("nested %d levels deep, more than %d", p.Depth, jsonarray.MaxDepth)
	case p.Err != nil:
		return "not valid JSON: " + p.Err.Error()
	}
	return ""
}

func (c *Consumer) itemsOrLease(b *Batch) string {
	sp := c.space(b.Queue, b.Shard)
	if b.leased() {
		return sp.Lease(b.id)
	}
	return sp.Items(b.Key)
}

// holds returns the key whose hold a drained batch of an ordered queue
// ends when it is settled with nothing left to retry: its own.
func (b *Batch) holds() []string {
	if !b.Ordered || b.Key == "" {
		return nil
	}
	return []string{b.Key}
}

// leased reports whether b is held under a lease.
func (b *Batch) leased() bool { return b.lease.Token != "" }

// Releasable reports whether settling b with outcomes only releases its
// lease: b is leased, not ordered (its settle ends its keys' holds), holds
// no bad elements to store, and every item is Done. Such a batch can be settled by a Round.
func (b *Batch) Releasable(outcomes []Outcome) bool {
	if !b.leased() || b.Ordered || len(b.dead) > 0 || len(outcomes) < len(b.Items) {
		return false
	}
	for _, o := range outcomes[:len(b.Items)] {
		if o.Kind != Done {
			return false
		}
	}
	return true
}

// Outcome is what happened to one item of a batch.
type Outcome struct {
	Kind  OutcomeKind
	Err   error         // the failure, for Retry and Dead
	Delay time.Duration // how long until a retry is due, for Retry
}

// OutcomeKind says what to do with an item when its batch is settled.
type OutcomeKind uint8

const (
	// Unfinished items were not handled (a shutdown came first): a drained
	// key's unfinished items go back in front of its array, unfinished
	// retries back to the retry index, due at once, with their attempt count.
	Unfinished OutcomeKind = iota
	// Done items were handled; they are dropped.
	Done
	// Retry items failed and are due again after Delay, with one more attempt counted.
	Retry
	// Dead items failed for good and go to dead letters with their error.
	Dead
)

// maxErrorLen bounds the error text stored with a retry or dead letter.
const maxErrorLen = 2048

func errText(err error) string {
	if err == nil {
		return "unknown error"
	}
	s := err.Error()
	if len(s) > maxErrorLen {
		s = s[:maxErrorLen] + "..."
	}
	return s
}

// Settle records the outcome of every item of b (outcomes[i] for
// b.Items[i]) and releases its lease, in one atomic script call. A missing
// outcome counts as Unfinished. It returns ErrLeaseLost when the lease had
// already expired and been reaped: then nothing is recorded and the whole
// batch is delivered again.
func (c *Consumer) Settle(ctx context.Context, b *Batch, outcomes []Outcome) error {
	return c.settleAt(ctx, b, outcomes, c.now())
}

// settleAt is Settle as of now.
func (c *Consumer) settleAt(ctx context.Context, b *Batch, outcomes []Outcome, now time.Time) error {
	s, err := c.settlement(b, outcomes, false, now)
	if err != nil {
		return err
	}
	sp := c.space(b.Queue, b.Shard)
	err = Settle(ctx, c.c, sp, s)
	if errors.Is(err, ErrNotArray) {
		// The key now holds a value that is not an array: the unfinished
		// items wait on the retry index instead, due at once, attempts
		// unchanged.
		// The key is made ready, so that a worker moves the bad value to
		// dead letters.
		if s, err = c.settlement(b, outcomes, true, now); err == nil {
			s.MakeReady = true
			err = Settle(ctx, c.c, sp, s)
		}
	}
	if err != nil {
		return fmt.Errorf("settle %s: %w", keys.Short(b.Queue), err)
	}
	return nil
}

// SettleAll settles many batches, each as Settle does, in one round trip:
// errs[i] is what Settle would return for batches[i] and outcomes[i]. A
// worker acks the batches that finish together this way. They are settled
// as of one reading of the clock: retries of the same delay are due at the
// same time, and are claimed together.
func (c *Consumer) SettleAll(ctx context.Context, batches []*Batch, outcomes [][]Outcome) (errs []error) {
	errs = make([]error, len(batches))
	now := c.now()
	sps := make([]keys.Space, 0, len(batches))
	ss := make([]Settlement, 0, len(batches))
	idx := make([]int, 0, len(batches))
	for i, b := range batches {
		s, err := c.settlement(b, outcomes[i], false, now)
		if err != nil {
			errs[i] = err
			continue
		}
		sps, ss, idx = append(sps, c.space(b.Queue, b.Shard)), append(ss, s), append(idx, i)
	}
	for j, err := range SettleMany(ctx, c.c, sps, ss) {
		i := idx[j]
		switch {
		case errors.Is(err, ErrNotArray):
			// Rare: Settle sends the unfinished items to the retry index.
			errs[i] = c.settleAt(ctx, batches[i], outcomes[i], now)
		case err != nil:
			errs[i] = fmt.Errorf("settle %s: %w", keys.Short(batches[i].Queue), err)
		}
	}
	return errs
}

// settlement builds the settlement of b as of now. With
// unfinishedAsRetries, or for a batch of retries, unfinished items go to the
// retry index, due now, rather than back in front of their key.
//
// The items of a held key (an ordered queue's: see Order) are settled by
// key, in order: the first that failed, or that was not handled and cannot
// go back in front of the key, becomes one retry, which keeps the key held,
// with the key's later items that are neither done nor dead, in order, so
// that they run after it; without one, the key's unfinished items go back
// in front of it, and its hold ends. Every other item is settled alone.
func (c *Consumer) settlement(b *Batch, outcomes []Outcome, unfinishedAsRetries bool, now time.Time) (Settlement, error) {
	s := Settlement{Lease: b.lease, ID: b.id, Key: b.Key, DeadCap: c.deadCap, Now: now.UnixMilli(), Dead: slices.Clip(b.dead)}
	unfinishedAsRetries = unfinishedAsRetries || b.Retry()
	outcome := func(i int) Outcome {
		if i < len(outcomes) {
			return outcomes[i]
		}
		return Outcome{}
	}
	var back []byte // unfinished items to put back in front of b.Key
	nback := 0
	putBack := func(it Item) {
		if back == nil {
			back = append(back, '[')
		} else {
			back = append(back, ',')
		}
		back = append(back, it.Data...)
		nback++
	}
	// alone settles b.Items[i], of no held key, on its own.
	alone := func(i int) error {
		it := b.Items[i]
		switch o := outcome(i); o.Kind {
		case Done:
		case Unfinished:
			if !unfinishedAsRetries {
				putBack(it)
				return nil
			}
			env := retryEnvelope{Key: it.Key, Attempts: it.Attempt, Error: it.LastError, Item: it.Data}
			s.Retries = append(s.Retries, Scheduled{ID: itemID(b, i), Due: s.Now, Env: string(env.encode())})
		case Retry:
			env := retryEnvelope{Key: it.Key, Attempts: it.Attempt + 1, Error: errText(o.Err), Item: it.Data}
			s.Retries = append(s.Retries, Scheduled{ID: itemID(b, i), Due: now.Add(o.Delay).UnixMilli(), Env: string(env.encode())})
		case Dead:
			s.Dead = append(s.Dead, c.deadEntry(b, i, o, now))
		default:
			return fmt.Errorf("settle %s: unknown outcome kind %d", keys.Short(b.Queue), o.Kind)
		}
		return nil
	}
	var groups [][]int // an ordered batch's items, by key
	if b.Ordered {
		groups = ByKey(b.Items)
	} else {
		for i := range b.Items {
			if err := alone(i); err != nil {
				return s, err
			}
		}
	}
	for _, idx := range groups {
		if !slices.ContainsFunc(idx, func(i int) bool { return b.Items[i].held }) {
			for _, i := range idx {
				if err := alone(i); err != nil {
					return s, err
				}
			}
			continue
		}
		var head *retryEnvelope // the held key's retry, once an item fails
		var retry Scheduled
		backed := false // an unfinished item of the key went back: so does every later one
		for _, i := range idx {
			it := b.Items[i]
			switch o := outcome(i); {
			case o.Kind == Done:
			case o.Kind == Dead:
				s.Dead = append(s.Dead, c.deadEntry(b, i, o, now))
			case o.Kind > Dead:
				return s, fmt.Errorf("settle %s: unknown outcome kind %d", keys.Short(b.Queue), o.Kind)
			case head != nil:
				head.Rest = append(head.Rest, it.Data)
			case !backed && o.Kind == Retry:
				head = &retryEnvelope{Key: it.Key, Attempts: it.Attempt + 1, Error: errText(o.Err), Item: it.Data, Ordered: true}
				retry = Scheduled{ID: itemID(b, i), Due: now.Add(o.Delay).UnixMilli()}
			case !backed && unfinishedAsRetries:
				head = &retryEnvelope{Key: it.Key, Attempts: it.Attempt, Error: it.LastError, Item: it.Data, Ordered: true}
				retry = Scheduled{ID: itemID(b, i), Due: s.Now}
			default:
				putBack(it)
				backed = true
			}
		}
		if head != nil {
			retry.Env, retry.key = string(head.encode()), head.Key
			s.Retries = append(s.Retries, retry)
		} else {
			s.Holds = append(s.Holds, b.Items[idx[0]].Key)
		}
	}
	if back != nil {
		s.Return, s.ReturnN = string(append(back, ']')), nback
	}
	// A drained batch of an ordered queue ends its key's hold even when it
	// holds no item (its array was "[]", or held only bad elements), and a
	// batch of retries the holds of its undecodable envelopes' keys: unless
	// a retry keeps the key held.
	ends := b.deadHolds
	if b.Ordered && b.Key != "" {
		ends = append(slices.Clip(ends), b.Key)
	}
	for _, k := range ends {
		if !slices.Contains(s.Holds, k) && !slices.ContainsFunc(s.Retries, func(r Scheduled) bool { return r.key == k }) {
			s.Holds = append(s.Holds, k)
		}
	}
	for _, r := range s.Retries {
		s.Hint = s.Hint || r.Due < s.Now+ClaimEvery.Milliseconds()
	}
	return s, nil
}

// envelopeKey returns the key and the ordered mark of a retry envelope,
// read token by token as far as it decodes: encode writes them first, so
// that a damaged envelope still says which key it holds. One that does not
// say it is ordered holds none (a retry stored before its queue was
// ordered, say): ending the key's hold could let a second batch out.
func envelopeKey(env string) (key string, ordered bool) {
	d := json.NewDecoder(strings.NewReader(env))
	if t, err := d.Token(); err != nil || t != json.Delim('{') {
		return "", false
	}
	for d.More() {
		name, err := d.Token()
		if err != nil {
			break
		}
		var v json.RawMessage
		if err := d.Decode(&v); err != nil {
			break
		}
		switch name {
		case "k":
			_ = json.Unmarshal(v, &key)
		case "o":
			_ = json.Unmarshal(v, &ordered)
		}
	}
	return key, ordered
}

// ClaimEvery is how often a worker's fetch loop claims, at least, when it
// knows of nothing due sooner: a settle that stores a retry due before
// that pushes a hint on the wake list, so that the retry is not late.
const ClaimEvery = time.Second

// deadEntry returns the dead letter of b.Items[i], which failed for good
// with o at now.
func (c *Consumer) deadEntry(b *Batch, i int, o Outcome, now time.Time) Entry {
	it := b.Items[i]
	dl := DeadLetter{ID: itemID(b, i), Queue: b.Queue, Shard: b.Shard, Key: it.Key, Item: it.Data, Attempts: it.Attempt + 1, Error: errText(o.Err), FailedAt: now}
	return Entry{ID: dl.ID, Env: string(dl.encode())}
}

// ByKey returns the indexes of items grouped by key, groups in order of
// first appearance.
func ByKey(items []Item) [][]int {
	if len(items) > 0 && items[0].Key == items[len(items)-1].Key {
		all := true
		for _, it := range items {
			if it.Key != items[0].Key {
				all = false
				break
			}
		}
		if all {
			idx := make([]int, len(items))
			for i := range idx {
				idx[i] = i
			}
			return [][]int{idx}
		}
	}
	pos := make(map[string]int)
	var groups [][]int
	for i, it := range items {
		g, ok := pos[it.Key]
		if !ok {
			g = len(groups)
			pos[it.Key] = g
			groups = append(groups, nil)
		}
		groups[g] = append(groups[g], i)
	}
	return groups
}

// itemID names the retry or dead letter of b.Items[i]: unique, since batch
// ids are. The index is zero-padded so that entries of one batch, which
// share a timestamp, sort in item order (dead letters are listed and
// trimmed by time, then id).
func itemID(b *Batch, i int) string { return fmt.Sprintf("%s-%07d", b.id, i) }

// Extend pushes the lease deadline of every given batch to now plus the
// lease TTL, in one round trip (one command per queue shard). Batches
// without a lease are skipped. A batch whose lease was already reaped is not
// brought back: it is marked (see LeaseLost).
func (c *Consumer) Extend(ctx context.Context, batches ...*Batch) error {
	leases := make(map[keys.Space][]Lease)
	for _, b := range batches {
		if b.leased() {
			sp := c.space(b.Queue, b.Shard)
			leases[sp] = append(leases[sp], b.lease)
		}
	}
	gone, err := Extend(ctx, c.c, leases, c.nowMs()+c.leaseTTL.Milliseconds())
	for _, b := range batches {
		if slices.Contains(gone, b.lease) {
			b.lost.Store(true)
		}
	}
	if err != nil {
		return fmt.Errorf("extend leases: %w", err)
	}
	return nil
}

// reapLimit bounds the leases one Reap call returns.
const reapLimit = 100

// Reap returns the items of a queue shard's expired leases to their keys
// (and retries to the retry index), and returns how many leases it reaped.
// Any consumer may reap any lease; concurrent reaps are safe. A reap that
// Redis runs more than a third of the lease TTL after it was sent (Redis
// stalled) reaps nothing: the leases' holders could not renew them.
func (c *Consumer) Reap(ctx context.Context, queue string, shard int) (int, error) {
	now := c.nowMs()
	n, err := Reap(ctx, c.c, c.space(queue, shard), now, reapLimit, now+c.leaseTTL.Milliseconds(), c.maxReapLag())
	if err != nil {
		return n, fmt.Errorf("reap %s: %w", keys.Short(queue), err)
	}
	return n, nil
}

// maxReapLag is how late (ms, on the server's clock) a reap may run after
// it was sent: a third of the lease TTL, the heartbeat period, and at least
// 50ms. A reap that Redis ran later (it stalled) would take leases whose
// holders could not renew them meanwhile.
func (c *Consumer) maxReapLag() int64 {
	return max(c.leaseTTL.Milliseconds()/3, 50)
}

// retryEnvelope is how a retry is stored: the item verbatim, its key, its
// failed attempts and last error.
type retryEnvelope struct {
	Key      string          `json:"k"`
	Attempts int             `json:"a"`
	Error    string          `json:"e,omitempty"`
	Item     json.RawMessage `json:"i"`
	// Ordered marks the retry of an ordered key's failed item: it holds
	// its key, and Rest holds the items after it, not handled yet, in order.
	Ordered bool              `json:"o,omitempty"`
	Rest    []json.RawMessage `json:"r,omitempty"`
}

// encode writes the envelope by hand: encoding/json would re-encode the
// item (it compacts and escapes the output of RawMessage), and items are
// stored byte for byte.
func (e retryEnvelope) encode() []byte {
	b := make([]byte, 0, len(e.Item)+len(e.Key)+len(e.Error)+32)
	b = append(b, `{"k":`...)
	b = appendString(b, e.Key)
	if e.Ordered {
		// Right after the key: a damaged envelope still says it holds it
		// (see envelopeKey).
		b = append(b, `,"o":true`...)
	}
	b = append(b, `,"a":`...)
	b = strconv.AppendInt(b, int64(e.Attempts), 10)
	if e.Error != "" {
		b = append(b, `,"e":`...)
		b = appendString(b, e.Error)
	}
	b = append(b, `,"i":`...)
	b = append(b, e.Item...)
	if len(e.Rest) > 0 {
		b = append(b, `,"r":[`...)
		for i, it := range e.Rest {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, it...)
		}
		b = append(b, ']')
	}
	return append(b, '}')
}

func appendString(b []byte, s string) []byte {
	q, _ := json.Marshal(s) // a string always marshals
	return append(b, q...)
}

// JSONString returns s as a JSON string, its invalid UTF-8 replaced.
func JSONString(s string) json.RawMessage {
	return appendString(nil, strings.ToValidUTF8(s, "\uFFFD"))
}
