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
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/jsonarray"
	"github.com/batchq/batchq/internal/keys"
)

// dueSlack is how early a key or retry may be claimed (see Fetch).
const dueSlack = 2 * time.Millisecond

// Defaults.
const (
	DefaultLeaseTTL        = 5 * time.Second
	DefaultDeadLetterCap   = 100_000
	DefaultRetriesPerFetch = 100
)

// Consumer drains queues. It is safe for concurrent use.
type Consumer struct {
	c          rueidis.Client
	prefix     string
	shards     int
	leaseTTL   time.Duration
	atMostOnce bool
	deadCap    int
	retries    int
	name       string
	clock      func() time.Time // the local clock
	offset     atomic.Int64     // the server's clock minus the local clock, in ns (see Sync)
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

// WithShards splits every queue into n shards (default 1), each its own
// hash slot on Redis Cluster. Producers and consumers must agree on it.
func WithShards(n int) Option {
	return func(c *Consumer) error {
		if n < 1 || n > keys.MaxShards {
			return fmt.Errorf("batchq: shards must be 1-%d, got %d", keys.MaxShards, n)
		}
		c.shards = n
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
			return fmt.Errorf("consumer: lease TTL must be at least 100ms, got %v", d)
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
			return fmt.Errorf("consumer: dead letter cap must not be negative, got %d", n)
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
		if name == "" || len(name) > 128 || strings.ContainsAny(name, ":{}") {
			return fmt.Errorf("consumer: name %q must be 1-128 bytes without colons or braces", name)
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
			return errors.New("consumer: nil clock")
		}
		c.clock = now
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
		shards:   1,
		leaseTTL: DefaultLeaseTTL,
		deadCap:  DefaultDeadLetterCap,
		retries:  DefaultRetriesPerFetch,
		clock:    time.Now,
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

// Name returns the consumer's name.
func (c *Consumer) Name() string { return c.name }

// Sync measures the offset of the Redis server's clock from the local
// clock, which the consumer then adds to its own readings: lease deadlines
// and due times are then on the server's clock, so the clocks of consumers
// (and of producers, whose appends read the server's clock) need not agree.
// A Worker syncs at start and every 30 seconds; a consumer that is never
// synced uses its local clock.
func (c *Consumer) Sync(ctx context.Context) error {
	t0 := c.clock()
	server, err := Time(ctx, c.c)
	t1 := c.clock()
	if err != nil {
		return fmt.Errorf("sync clock: %w", err)
	}
	mid := t0.Add(t1.Sub(t0) / 2)
	c.offset.Store(int64(server.Sub(mid)))
	return nil
}

// EvictionPolicy returns the server's maxmemory-policy. Any policy but
// noeviction lets Redis drop keys, and the items in them, when it is full.
func (c *Consumer) EvictionPolicy(ctx context.Context) (string, error) {
	return EvictionPolicy(ctx, c.c)
}

// Offset returns the server's clock minus the local clock, as last measured
// by Sync.
func (c *Consumer) Offset() time.Duration { return time.Duration(c.offset.Load()) }

// Now returns the Redis server's time as the consumer knows it: its local
// clock plus the offset Sync measured. Deadlines and Fetched.Next are on
// this clock.
func (c *Consumer) Now() time.Time { return c.now() }

func (c *Consumer) now() time.Time { return c.clock().Add(time.Duration(c.offset.Load())) }

// Register records queues, with the consumer's shard count, in the
// registry of the consumer's prefix (<prefix>:queues), where the inspector
// finds them. A queue keeps the largest shard count any producer or worker
// recorded; Register returns those counts, in the order of queues, so that
// a caller can see that others split a queue into more shards than it
// drains. A Worker registers its queues when it starts; producers register
// a queue at their first append to it.
func (c *Consumer) Register(ctx context.Context, queues ...string) ([]int, error) {
	if len(queues) == 0 {
		return nil, nil
	}
	return Register(ctx, c.c, c.prefix, c.shards, queues...)
}

// Prefix returns the prefix of every Redis key.
func (c *Consumer) Prefix() string { return c.prefix }

// Shards returns the number of shards of every queue.
func (c *Consumer) Shards() int { return c.shards }

// LeaseTTL returns the lease TTL.
func (c *Consumer) LeaseTTL() time.Duration { return c.leaseTTL }

// AtMostOnce reports whether batches are drained without a lease.
func (c *Consumer) AtMostOnce() bool { return c.atMostOnce }

func (c *Consumer) space(queue string, shard int) keys.Space {
	return keys.For(c.prefix, queue, shard)
}

func (c *Consumer) nowMs() int64 { return c.now().UnixMilli() }

// newID returns a random 128-bit identifier.
func newID() string {
	return strconv.FormatUint(rand.Uint64(), 36) + strconv.FormatUint(rand.Uint64(), 36)
}

// Batch is a set of items taken from one queue shard at once: either the
// whole array of one key, or due retries (possibly of several keys).
type Batch struct {
	Queue string
	Shard int
	Key   string // the drained key; "" for a batch of retries
	Items []Item

	id    string // unique; the lease token when leased
	lease bool
	dead  []Entry // undecodable retry envelopes, stored as dead letters when b is settled
}

// Retry reports whether b holds retries rather than a drained key.
func (b *Batch) Retry() bool { return b.Key == "" }

// Item is one item of a batch.
type Item struct {
	Key       string          // the key it was appended to
	Data      json.RawMessage // the item, byte for byte as appended
	Attempt   int             // failed attempts before this delivery
	LastError string          // the error of the last failed attempt
}

// Fetched is the result of Fetch.
type Fetched struct {
	Batches []*Batch
	// Dead lists keys whose value was not a JSON array; each was moved to
	// dead letters whole. It also lists retries whose stored envelope did
	// not decode: they go to dead letters at once, or, when a retry batch
	// is returned with them, when that batch is settled.
	Dead []DeadLetter
	// Next is the earliest time more work falls due on the shard, zero when
	// nothing is pending. Keys other consumers hold count too.
	Next time.Time
}

// Fetch takes up to max batches from a queue shard: due keys, each drained
// whole, and, when fewer than max keys are due, one batch of due retries.
// With at-least-once delivery (the default) every batch is leased and must
// be settled; until then, call Extend to keep its lease.
func (c *Consumer) Fetch(ctx context.Context, queue string, shard, max int) (Fetched, error) {
	if err := keys.CheckQueue(queue); err != nil {
		return Fetched{}, err
	}
	if max < 1 {
		return Fetched{}, nil
	}
	sp := c.space(queue, shard)
	now := c.nowMs()
	deadline := now + c.leaseTTL.Milliseconds()
	retryToken := newID()
	cl, err := Claim(ctx, c.c, sp, ClaimArgs{
		// Keys are due by the server's clock (their appends read it), which
		// the consumer knows only to within a fraction of a round trip: a
		// key due within dueSlack counts as due, else a key appended just
		// before a fetch could wait for the next one. Retries are due by the
		// consumer's own reckoning of that clock.
		Now: now, KeysDueBy: now + dueSlack.Milliseconds(), MaxKeys: max, ClaimUntil: deadline,
		MaxRetries: c.retries, RetryToken: retryToken, RetryDeadline: deadline, Owner: c.name,
	})
	if err != nil {
		return Fetched{}, fmt.Errorf("fetch %s: %w", queue, err)
	}
	var f Fetched
	if cl.Next > 0 {
		f.Next = time.UnixMilli(cl.Next)
	}
	if len(cl.Retries) > 0 {
		b := &Batch{Queue: queue, Shard: shard, id: retryToken, lease: true, Items: make([]Item, 0, len(cl.Retries))}
		var bad []DeadLetter
		for _, e := range cl.Retries {
			var env retryEnvelope
			err := json.Unmarshal([]byte(e.Env), &env)
			if err == nil && len(env.Item) == 0 {
				err = errors.New("no item")
			}
			if err != nil {
				// Only batchq writes retry envelopes; one that does not
				// decode is kept as a dead letter rather than dropped, and
				// never reaches a handler.
				d := DeadLetter{ID: e.ID, Queue: queue, Shard: shard, Item: JSONString(e.Env),
					Error: "undecodable retry envelope: " + err.Error(), FailedAt: c.now(), Corrupt: true}
				bad = append(bad, d)
				b.dead = append(b.dead, Entry{ID: d.ID, Env: string(d.encode())})
				continue
			}
			b.Items = append(b.Items, Item{Key: env.Key, Data: env.Item, Attempt: env.Attempts, LastError: env.Error})
		}
		if len(b.Items) > 0 {
			// The bad envelopes become dead letters when b is settled.
			f.Batches = append(f.Batches, b)
			f.Dead = append(f.Dead, bad...)
		} else {
			// Only bad envelopes: store them and release the lease now.
			s := Settlement{Token: b.id, ID: b.id, Dead: b.dead, DeadCap: c.deadCap, Now: bad[0].FailedAt.UnixMilli()}
			if err := Settle(ctx, c.c, sp, s); err == nil {
				f.Dead = append(f.Dead, bad...)
			} // else the lease expires and the reaper puts them back on the retry index
		}
	}
	if len(cl.Keys) > 0 {
		var drained []Drained
		if c.atMostOnce {
			drained, err = DrainOnce(ctx, c.c, sp, cl.Keys)
		} else {
			tokens := make([]string, len(cl.Keys))
			for i := range tokens {
				tokens[i] = newID()
			}
			drained, err = Drain(ctx, c.c, sp, cl.Keys, tokens, deadline, c.name)
		}
		for _, d := range drained {
			c.collect(ctx, &f, queue, shard, d)
		}
		if err != nil {
			return f, fmt.Errorf("fetch %s: %w", queue, err)
		}
	}
	return f, nil
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
	b := &Batch{Queue: queue, Shard: shard, Key: d.Key, id: d.Token, lease: d.Token != ""}
	if b.id == "" {
		b.id = newID()
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
		Token: tokenOf(b), ID: b.id, Key: d.Key, Quarantine: d.WrongType,
		DeadCap: c.deadCap, Now: dl.FailedAt.UnixMilli(),
		Dead: []Entry{{ID: dl.ID, Env: string(dl.encode())}},
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
			b.Items = append(b.Items, Item{Key: b.Key, Data: parts[i].Raw})
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
	s := Settlement{Token: tokenOf(b), ID: b.id, Key: b.Key, Dead: b.dead, DeadCap: c.deadCap, Now: bad[0].FailedAt.UnixMilli()}
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
	if b.lease {
		return sp.Lease(b.id)
	}
	return sp.Items(b.Key)
}

func tokenOf(b *Batch) string {
	if b.lease {
		return b.id
	}
	return ""
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
	s, err := c.settlement(b, outcomes, false)
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
		if s, err = c.settlement(b, outcomes, true); err == nil {
			s.MakeReady = true
			err = Settle(ctx, c.c, sp, s)
		}
	}
	if err != nil {
		return fmt.Errorf("settle %s: %w", b.Queue, err)
	}
	return nil
}

// SettleAll settles many batches, each as Settle does, in one round trip:
// errs[i] is what Settle would return for batches[i] and outcomes[i]. A
// worker acks the batches that finish together this way.
func (c *Consumer) SettleAll(ctx context.Context, batches []*Batch, outcomes [][]Outcome) (errs []error) {
	errs = make([]error, len(batches))
	sps := make([]keys.Space, 0, len(batches))
	ss := make([]Settlement, 0, len(batches))
	idx := make([]int, 0, len(batches))
	for i, b := range batches {
		s, err := c.settlement(b, outcomes[i], false)
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
			errs[i] = c.Settle(ctx, batches[i], outcomes[i])
		case err != nil:
			errs[i] = fmt.Errorf("settle %s: %w", batches[i].Queue, err)
		}
	}
	return errs
}

// settlement builds the settlement of b. With unfinishedAsRetries, or for a
// batch of retries, unfinished items go to the retry index, due now, rather
// than back in front of their key.
func (c *Consumer) settlement(b *Batch, outcomes []Outcome, unfinishedAsRetries bool) (Settlement, error) {
	now := c.now()
	s := Settlement{Token: tokenOf(b), ID: b.id, Key: b.Key, DeadCap: c.deadCap, Now: now.UnixMilli(), Dead: slices.Clip(b.dead)}
	unfinishedAsRetries = unfinishedAsRetries || b.Retry()
	var back []byte
	nback := 0
	for i, it := range b.Items {
		var o Outcome
		if i < len(outcomes) {
			o = outcomes[i]
		}
		switch o.Kind {
		case Done:
		case Unfinished:
			if unfinishedAsRetries {
				env := retryEnvelope{Key: it.Key, Attempts: it.Attempt, Error: it.LastError, Item: it.Data}
				s.Retries = append(s.Retries, Scheduled{ID: itemID(b, i), Due: s.Now, Env: string(env.encode())})
				continue
			}
			if back == nil {
				back = append(back, '[')
			} else {
				back = append(back, ',')
			}
			back = append(back, it.Data...)
			nback++
		case Retry:
			env := retryEnvelope{Key: it.Key, Attempts: it.Attempt + 1, Error: errText(o.Err), Item: it.Data}
			s.Retries = append(s.Retries, Scheduled{ID: itemID(b, i), Due: now.Add(o.Delay).UnixMilli(), Env: string(env.encode())})
		case Dead:
			dl := DeadLetter{ID: itemID(b, i), Queue: b.Queue, Shard: b.Shard, Key: it.Key, Item: it.Data, Attempts: it.Attempt + 1, Error: errText(o.Err), FailedAt: now}
			s.Dead = append(s.Dead, Entry{ID: dl.ID, Env: string(dl.encode())})
		default:
			return s, fmt.Errorf("settle %s: unknown outcome kind %d", b.Queue, o.Kind)
		}
	}
	if back != nil {
		s.Return, s.ReturnN = string(append(back, ']')), nback
	}
	return s, nil
}

// itemID names the retry or dead letter of b.Items[i]: unique, since batch
// ids are. The index is zero-padded so that entries of one batch, which
// share a timestamp, sort in item order (dead letters are listed and
// trimmed by time, then id).
func itemID(b *Batch, i int) string { return fmt.Sprintf("%s-%07d", b.id, i) }

// Extend pushes the lease deadline of every given batch to now plus the
// lease TTL, in one round trip (one command per queue shard). Batches
// without a lease are skipped. A batch whose lease was already reaped is not
// brought back.
func (c *Consumer) Extend(ctx context.Context, batches ...*Batch) error {
	leases := make(map[keys.Space][]string)
	for _, b := range batches {
		if b.lease {
			sp := c.space(b.Queue, b.Shard)
			leases[sp] = append(leases[sp], b.id)
		}
	}
	if err := Extend(ctx, c.c, leases, c.nowMs()+c.leaseTTL.Milliseconds()); err != nil {
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
		return n, fmt.Errorf("reap %s: %w", queue, err)
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

// Wait blocks until a producer makes a key of the queue shard ready, or
// until timeout passes or ctx is done. It returns nil in the first two
// cases. It holds one of the client's blocking connections while it waits.
func (c *Consumer) Wait(ctx context.Context, queue string, shard int, timeout time.Duration) error {
	return Wait(ctx, c.c, c.space(queue, shard), timeout)
}

// retryEnvelope is how a retry is stored: the item verbatim, its key, its
// failed attempts and last error.
type retryEnvelope struct {
	Key      string          `json:"k"`
	Attempts int             `json:"a"`
	Error    string          `json:"e,omitempty"`
	Item     json.RawMessage `json:"i"`
}

// encode writes the envelope by hand: encoding/json would re-encode the
// item (it compacts and escapes the output of RawMessage), and items are
// stored byte for byte.
func (e retryEnvelope) encode() []byte {
	b := make([]byte, 0, len(e.Item)+len(e.Key)+len(e.Error)+32)
	b = append(b, `{"k":`...)
	b = appendString(b, e.Key)
	b = append(b, `,"a":`...)
	b = strconv.AppendInt(b, int64(e.Attempts), 10)
	if e.Error != "" {
		b = append(b, `,"e":`...)
		b = appendString(b, e.Error)
	}
	b = append(b, `,"i":`...)
	b = append(b, e.Item...)
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
