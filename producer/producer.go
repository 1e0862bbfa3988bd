// Package producer appends items to batchq queues.
//
// An item is one JSON value. Items appended to the same (queue, key) pile up
// in one JSON array in Redis until a worker drains the key. Each Add is one
// round trip: the items are validated in Go, then one Lua script (sent with
// EVALSHA, falling back to EVAL after a server restart) splices them onto
// the stored array without decoding it, so an append costs the same whatever
// the array holds, and marks the key ready for workers: due at once, or as
// the queue's FlushPolicy says. Items are stored byte for byte: numbers,
// unicode and key order survive as written.
//
// A Producer is safe for concurrent use; concurrent calls share connections
// and are pipelined by the rueidis client. A nil error means the items are
// stored in Redis. A validation error (ErrInvalidJSON, ErrTooDeep,
// ErrItemTooLarge, ErrMarshal, ErrQueueName, ErrKeyName, ErrTooMany), ErrKeyFull,
// ErrNotArray, ErrOutOfMemory (Redis is past maxmemory under noeviction) or
// ErrClosed means none of them is. A Redis or context error (a timeout, a lost connection) leaves it
// unknown: the script may have run before the reply was lost, so adding the
// items again may store them twice. So does ErrReplicaAcks: the master
// stored them, but fewer replicas than WithReplicaAcks asks for have them. Every error starts with "producer: ";
// test them with errors.Is and errors.As, not by their text.
//
//	p, err := producer.New(rdb)
//	err = p.Add(r.Context(), "emails", "user:42", Email{To: "a@example.com"})
//
// A producer with WithLinger sends appends from goroutines of its own: at
// shutdown, once nothing calls Add any more (an HTTP server has drained),
// call Close, which sends what it has gathered and waits for them. After
// Close, appends fail with ErrClosed. Close never closes the rueidis client:
// close it after Close returns.
//
//	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
//	defer cancel()
//	err = p.Close(ctx)
package producer

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/jsonarray"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
)

// Default limits.
const (
	DefaultMaxItemBytes = 1 << 20   // one item
	DefaultMaxKeyItems  = 1_000_000 // the pending items of one key
	DefaultMaxKeyBytes  = 64 << 20  // the pending bytes of one key

	// MaxKeyBytesLimit is Redis' largest string: no key's array may be
	// longer, whatever its cap.
	MaxKeyBytesLimit = 512 << 20

	// MaxKeyItemsLimit is the most items a key may hold, whatever its cap
	// (batchq keeps a key's items and bytes in one integer that Lua must
	// read exactly).
	MaxKeyItemsLimit = protocol.MaxKeyItems

	// MaxItemDepth is how deeply an item may nest arrays and objects: 1 for
	// {"a":1}, 2 for {"a":[1]}. Deeper items fail with ErrTooDeep. (Workers
	// send deeper items that reach a key another way to dead letters, alone.)
	MaxItemDepth = jsonarray.MaxDepth
)

// Errors returned by Add and AddRaw, wrapped with the queue, key and item
// index; test them with errors.Is.
var (
	// ErrInvalidJSON: a raw item is not one valid JSON value.
	ErrInvalidJSON = errors.New("invalid JSON")
	// ErrTooDeep: an item nests arrays and objects deeper than MaxItemDepth.
	ErrTooDeep = errors.New("item nested too deeply")
	// ErrItemTooLarge: an item is larger than the producer's limit.
	ErrItemTooLarge = errors.New("item too large")
	// ErrMarshal: a value could not be encoded as JSON.
	ErrMarshal = errors.New("cannot encode item as JSON")
	// ErrNotArray: the key holds a value batchq did not write, however much
	// it looks like a JSON array ("[ ]", "[1,2]]"): batchq knows its arrays
	// by the count it keeps beside each, of their items and length. The key
	// is made due, so that a worker drains the value (an array's elements
	// are handled as items, anything else goes to dead letters); appends
	// then work again. An item whose append returned nil never ends
	// up inside such a value.
	ErrNotArray = protocol.ErrNotArray
	// ErrQueueName and ErrKeyName: the queue name or the key is not valid
	// (see CheckQueue and CheckKey). Names are checked before items.
	ErrQueueName = keys.ErrQueueName
	ErrKeyName   = keys.ErrKeyName
	// ErrKeyFull: the items would take the key past its item or byte cap.
	// The error is a *KeyFullError. Nothing is stored and nothing is
	// dropped: the key is due (at once, or when a worker's claim on it
	// ends), so try again once a worker has drained it.
	ErrKeyFull = errors.New("key full")
	// ErrTooMany: the items of one call alone pass the key's item or byte
	// cap; they could never be stored in one call.
	ErrTooMany = errors.New("the items of one call pass the key's cap")
)

// KeyFullError reports an append refused by a key's caps.
type KeyFullError struct {
	Queue, Key string
	Items      int64 // items the key holds
	Bytes      int64 // bytes the key holds
	Adding     int   // items of the refused append
	MaxItems   int
	MaxBytes   int
}

func (e *KeyFullError) Error() string {
	return fmt.Sprintf("producer: append to %s: key full: it holds %d items and %d bytes; adding %d items would pass the cap of %d items or %d bytes",
		target(e.Queue, e.Key), e.Items, e.Bytes, e.Adding, e.MaxItems, e.MaxBytes)
}

// Is reports whether target is ErrKeyFull.
func (e *KeyFullError) Is(target error) bool { return target == ErrKeyFull }

// Producer appends items to queues. It is safe for concurrent use.
type Producer struct {
	c       rueidis.Client
	prefix  string
	shards  protocol.Defaults // the shards of a queue this producer records first
	started time.Time         // when New ran: the monotonic base of registration.read
	refresh time.Duration     // how often a queue's shard count is read again: protocol.ShardsEvery
	maxItem int
	caps    protocol.Caps
	flush   map[string]protocol.Flush // by queue; missing: due at once
	linger  *linger                   // nil: every call is sent at once
	acks    protocol.Acks             // replicas that must acknowledge each append (WithReplicaAcks)
	known   sync.Map                  // queue -> *registration: its shards, from the registry
	obs     Observer                  // nil: none
	log     logging                   // WithLogger's logger and its eviction check (memory.go)
	clock   *protocol.Clock           // the server's clock, as this producer knows it
	syncing chan struct{}             // holds a token while one caller syncs the clock
	closed  atomic.Bool               // Close was called: appends fail with ErrClosed
}

// Observer is told about appends, for metrics: the metrics package
// implements it for Prometheus. Appended is called once per Add or AddRaw
// whose items passed validation, after the items were stored (err nil) or
// not, from the caller's goroutine; it must return quickly. It gets no
// payload: bytes is the size of the items' JSON.
type Observer interface {
	Appended(queue string, items, bytes int, err error)
}

// WithObserver makes the producer report its appends to o.
func WithObserver(o Observer) Option {
	return func(pr *Producer) error {
		if o == nil {
			return errors.New("producer: nil observer")
		}
		pr.obs = o
		return nil
	}
}

// Option configures a Producer.
type Option func(*Producer) error

// WithPrefix sets the prefix of every Redis key (default "batchq"). It must
// match the workers'.
func WithPrefix(p string) Option {
	return func(pr *Producer) error {
		if err := keys.CheckPrefix(p); err != nil {
			return fmt.Errorf("producer: %w", err)
		}
		pr.prefix = p
		return nil
	}
}

// WithDefaultShards sets the shards of a queue this producer is the first
// to write: 1 to 1024. A queue's shard count lives in the registry, where
// its first writer records it and every producer and worker reads it, so
// this never disagrees with a worker's: once a queue is recorded, its
// count is the registry's. Without it a new queue gets 1 shard on a single
// server, and on Redis Cluster enough to put at least two on every master
// (read from CLUSTER SLOTS; where an ACL refuses it, four per node, which
// may leave a master without one).
func WithDefaultShards(n int) Option {
	return func(pr *Producer) error {
		if n < 1 || n > keys.MaxShards {
			return fmt.Errorf("producer: shards must be 1-%d, got %d", keys.MaxShards, n)
		}
		pr.shards.Fixed = n
		return nil
	}
}

// WithMaxItemBytes sets the size limit of one encoded item (default 1 MiB).
func WithMaxItemBytes(n int) Option {
	return func(pr *Producer) error {
		if n < 1 {
			return fmt.Errorf("producer: max item bytes must be positive, got %d", n)
		}
		pr.maxItem = n
		return nil
	}
}

// WithMaxKeyItems caps the pending items of one key (default 1,000,000; 0
// for MaxKeyItemsLimit, 8,388,607, the highest cap). An append that would
// pass it fails with ErrKeyFull.
func WithMaxKeyItems(n int) Option {
	return func(pr *Producer) error {
		if n < 0 || n > MaxKeyItemsLimit {
			return fmt.Errorf("producer: max key items must be 0-%d, got %d", MaxKeyItemsLimit, n)
		}
		pr.caps.Items = n
		return nil
	}
}

// WithMaxKeyBytes caps the pending bytes of one key, the size of its JSON
// array (default 64 MiB; 0 for Redis' own limit on a string, 512 MiB, which
// is also the highest cap). An append that would pass it fails with
// ErrKeyFull.
func WithMaxKeyBytes(n int) Option {
	return func(pr *Producer) error {
		if n < 0 || n > MaxKeyBytesLimit {
			return fmt.Errorf("producer: max key bytes must be 0-%d, got %d", MaxKeyBytesLimit, n)
		}
		pr.caps.Bytes = n
		return nil
	}
}

// New returns a Producer that uses c, which the caller keeps owning. Create
// the client with DisableCache: true; batchq has no use for client-side
// caching. A nil client, or an option given a bad value, is an error.
func New(c rueidis.Client, opts ...Option) (*Producer, error) {
	if c == nil {
		return nil, errors.New("producer: nil client")
	}
	p := &Producer{c: c, prefix: keys.DefaultPrefix, started: time.Now(), refresh: protocol.ShardsEvery, maxItem: DefaultMaxItemBytes,
		caps:  protocol.Caps{Items: DefaultMaxKeyItems, Bytes: DefaultMaxKeyBytes},
		clock: protocol.NewClock(nil), syncing: make(chan struct{}, 1)}
	for _, o := range opts {
		if o == nil {
			return nil, errors.New("producer: nil option")
		}
		if err := o(p); err != nil {
			return nil, err
		}
	}
	if p.caps.Items == 0 {
		p.caps.Items = MaxKeyItemsLimit
	}
	if p.caps.Bytes == 0 {
		p.caps.Bytes = MaxKeyBytesLimit
	}
	return p, nil
}

// Add encodes each item as JSON and appends them, in order, to the key of a
// queue, in one round trip. A json.RawMessage item is taken as raw JSON, as
// with AddRaw. Adding no item does nothing. Values are encoded like
// json.Marshal does, but without escaping <, > and &. After Close it fails
// at once with ErrClosed.
func (p *Producer) Add(ctx context.Context, queue, key string, items ...any) error {
	if len(items) == 0 {
		return nil
	}
	if err := p.begin(queue, key); err != nil {
		return err
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	for i, it := range items {
		start := buf.Len()
		if i > 0 {
			buf.WriteByte(',')
			start++
		}
		if raw, ok := it.(json.RawMessage); ok {
			if err := p.check(raw); err != nil {
				return itemErr(queue, key, i, err)
			}
			buf.Write(raw)
			continue
		}
		if err := enc.Encode(it); err != nil {
			return itemErr(queue, key, i, fmt.Errorf("%w: %v", ErrMarshal, err))
		}
		buf.Truncate(buf.Len() - 1) // Encode ends with a newline
		if n := buf.Len() - start; n > p.maxItem {
			return itemErr(queue, key, i, fmt.Errorf("%w: %d bytes, limit %d", ErrItemTooLarge, n, p.maxItem))
		}
		if err := checkDepth(buf.Bytes()[start:]); err != nil {
			return itemErr(queue, key, i, err)
		}
	}
	return p.append(ctx, queue, key, buf.String(), len(items))
}

// AddRaw appends items that are already JSON, in order, to the key of a
// queue, in one round trip. Each item must be exactly one valid JSON value;
// it is stored byte for byte. Adding no item does nothing. After Close it
// fails at once with ErrClosed.
func (p *Producer) AddRaw(ctx context.Context, queue, key string, items ...json.RawMessage) error {
	if len(items) == 0 {
		return nil
	}
	if err := p.begin(queue, key); err != nil {
		return err
	}
	n := len(items) - 1
	for i, it := range items {
		if err := p.check(it); err != nil {
			return itemErr(queue, key, i, err)
		}
		n += len(it)
	}
	buf := make([]byte, 0, n)
	for i, it := range items {
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, it...)
	}
	return p.append(ctx, queue, key, string(buf), len(items))
}

func (p *Producer) check(raw json.RawMessage) error {
	if len(raw) > p.maxItem {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrItemTooLarge, len(raw), p.maxItem)
	}
	if !json.Valid(raw) {
		return ErrInvalidJSON
	}
	return checkDepth(raw)
}

func checkDepth(item []byte) error {
	if err := jsonarray.CheckDepth(item, MaxItemDepth); err != nil {
		return fmt.Errorf("%w: %v", ErrTooDeep, err)
	}
	return nil
}

// begin checks a queue's name and a key before anything else (every error
// after it names them, and may then do so as they are, shortened), then
// that the producer is not closed.
func (p *Producer) begin(queue, key string) error {
	if err := keys.CheckQueue(queue); err != nil {
		return fmt.Errorf("producer: %w", err)
	}
	if err := keys.CheckKey(key); err != nil {
		return fmt.Errorf("producer: %w", err)
	}
	if p.closed.Load() {
		return appendErr(queue, key, ErrClosed)
	}
	return nil
}

// append stores the items of a call whose names and items passed their
// checks.
func (p *Producer) append(ctx context.Context, queue, key, joined string, n int) error {
	err := p.store(ctx, queue, key, joined, n)
	if p.obs != nil {
		p.obs.Appended(queue, n, len(joined), err)
	}
	return err
}

func (p *Producer) store(ctx context.Context, queue, key, joined string, n int) error {
	if (p.caps.Items > 0 && n > p.caps.Items) || (p.caps.Bytes > 0 && len(joined)+2 > p.caps.Bytes) {
		return fmt.Errorf("producer: append to %s: %w: %d items, %d bytes; cap %d items, %d bytes",
			target(queue, key), ErrTooMany, n, len(joined)+2, p.caps.Items, p.caps.Bytes)
	}
	shards, err := p.shardsOf(ctx, queue)
	if err != nil {
		return appendErr(queue, key, err)
	}
	if err := p.syncClock(ctx); err != nil {
		return appendErr(queue, key, err)
	}
	shard := keys.Shard(key, shards)
	if p.linger != nil {
		return p.linger.add(ctx, p, queue, shard, key, joined, n)
	}
	return p.keyError(queue, key, n, p.merge(ctx, queue, shard, key, joined, n))
}

// registration is a queue's shard count as the producer last read it
// from the registry.
type registration struct {
	shards  atomic.Int32  // 0: not read yet
	read    atomic.Int64  // when it was last read, or tried (ns since the producer's start)
	writing chan struct{} // holds a token while one caller reads it
}

// shardsOf returns the shard count of queue, the registry's. The first
// appends to a queue wait for one round trip (or their context) that
// records the queue, if no one did, and reads its count (on Redis Cluster,
// for the producer's first queue nobody recorded, three: the default is
// placed by CLUSTER SLOTS, see protocol.Defaults); later ones pay a
// map load and two atomic loads, and every protocol.ShardsEvery one caller
// reads the count again while the others go on with the last, so that the
// producer routes by a count raised meanwhile (batchq queue shards) within
// seconds.
func (p *Producer) shardsOf(ctx context.Context, queue string) (int, error) {
	v, ok := p.known.Load(queue)
	if !ok {
		v, _ = p.known.LoadOrStore(queue, &registration{writing: make(chan struct{}, 1)})
	}
	r := v.(*registration)
	n := int(r.shards.Load())
	if n > 0 && p.since(r.read.Load()) < p.refresh {
		return n, nil
	}
	if n > 0 {
		select {
		case r.writing <- struct{}{}:
		default:
			return n, nil // another caller is at it
		}
	} else {
		select {
		case r.writing <- struct{}{}:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	defer func() { <-r.writing }()
	if n = int(r.shards.Load()); n > 0 && p.since(r.read.Load()) < p.refresh {
		return n, nil
	}
	got, err := p.readShards(ctx, queue, n)
	if err != nil {
		if n > 0 {
			// The last count will do until the next try, ShardsEvery on:
			// the registry's count only grows, and workers drain every
			// shard below it.
			r.read.Store(int64(time.Since(p.started)))
			return n, nil
		}
		return 0, err
	}
	r.shards.Store(int32(got))
	r.read.Store(int64(time.Since(p.started)))
	return got, nil
}

// since returns how long ago t was, t being a time since the producer's
// start (on the monotonic clock: a step of the wall clock moves neither).
func (p *Producer) since(t int64) time.Duration { return time.Since(p.started) - time.Duration(t) }

// readShards reads the shard count of queue from the registry. A producer
// that routed by known shards already (0: none) reads it with one HMGET,
// and records the queue again only when the registry holds fewer (the
// queue was forgotten and recorded anew meanwhile: the items it routed may
// be in shards up to known); one that never did records the queue, which
// is a no-op when someone did.
func (p *Producer) readShards(ctx context.Context, queue string, known int) (int, error) {
	if known > 0 {
		ns, err := protocol.ReadShards(ctx, p.c, p.prefix, queue)
		switch {
		case errors.Is(err, protocol.ErrBadCount): // registering replaces it
		case err != nil:
			return 0, err
		case ns[0] >= known:
			return ns[0], nil
		}
	}
	ns, err := protocol.RegisterNew(ctx, p.c, p.prefix, &p.shards, protocol.Known{Queue: queue, Shards: known, Default: p.shards.Cheap(p.c, queue)})
	if err != nil {
		return 0, err
	}
	return ns[0], nil
}

// syncEvery is how often a producer measures the server's clock.
const syncEvery = 30 * time.Second

// syncClock measures the offset of the server's clock from the local one,
// which the merge script takes its due times from: before the first append
// (the first callers wait for one round trip, or their context), then every
// syncEvery, by one caller while the others go on with the last offset.
func (p *Producer) syncClock(ctx context.Context) error {
	if p.clock.SyncedWithin(syncEvery) {
		return nil
	}
	never := !p.clock.SyncedWithin(math.MaxInt64)
	if never {
		select {
		case p.syncing <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
	} else {
		select {
		case p.syncing <- struct{}{}:
		default:
			return nil // another caller is at it
		}
	}
	defer func() { <-p.syncing }()
	if p.clock.SyncedWithin(syncEvery) {
		return nil
	}
	if err := p.clock.Sync(ctx, p.c); err != nil && never {
		return err
	} // else the last offset will do until the next try
	return nil
}

// merge makes one merge call for the n items of one key, and returns the
// protocol's error as it is (see keyError).
func (p *Producer) merge(ctx context.Context, queue string, shard int, key, joined string, n int) error {
	sp := keys.For(p.prefix, queue, shard)
	return protocol.Append(ctx, p.c, sp, key, protocol.Payload(joined), n, p.caps, p.flush[queue], p.clock.NowMs(), p.acks)
}

// CheckQueue returns an ErrQueueName error when name cannot be a queue's
// name, and nil when it can: for checking names that come from outside
// before use.
func CheckQueue(name string) error {
	if err := keys.CheckQueue(name); err != nil {
		return fmt.Errorf("producer: %w", err)
	}
	return nil
}

// CheckKey returns an ErrKeyName error when k cannot be a key of a queue,
// and nil when it can: 1-512 bytes of UTF-8 without control characters (NUL,
// newline, escape and the like), which could forge log lines or terminal
// output. Any other character is fine, colons and braces included.
func CheckKey(k string) error {
	if err := keys.CheckKey(k); err != nil {
		return fmt.Errorf("producer: %w", err)
	}
	return nil
}

// appendErr is the error of an append to a queue's key that failed with
// err, as callers get it.
func appendErr(queue, key string, err error) error {
	return fmt.Errorf("producer: append to %s: %w", target(queue, key), err)
}

func itemErr(queue, key string, i int, err error) error {
	return fmt.Errorf("producer: append to %s: item %d: %w", target(queue, key), i, err)
}

// target names a queue's key in an error, as "queue/key", each cut to its
// first 64 bytes or so (keys.Short): both are checked before any error names
// them, so they hold no control characters, but they may be 512 bytes long.
func target(queue, key string) string { return keys.Short(queue) + "/" + keys.Short(key) }

// Queue is a typed view of one queue of a Producer.
type Queue[T any] struct {
	p    *Producer
	name string
}

// NewQueue returns a typed view of queue.
func NewQueue[T any](p *Producer, queue string) Queue[T] {
	return Queue[T]{p: p, name: queue}
}

// Add appends items to key, as Producer.Add does; after the producer's
// Close it fails at once with ErrClosed.
func (q Queue[T]) Add(ctx context.Context, key string, items ...T) error {
	if len(items) == 0 {
		return nil
	}
	anys := make([]any, len(items))
	for i := range items {
		anys[i] = items[i]
	}
	return q.p.Add(ctx, q.name, key, anys...)
}
