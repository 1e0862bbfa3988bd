// Package deadletter reads and manages the dead letters of batchq queues:
// the items that failed for good, each kept with its key, its attempts and
// its last error, and the values found in a key that were not items. A
// worker hands one out (batchq.Worker.DeadLetters), the inspector another
// for a registered queue (inspect.Inspector.DeadLetters), and New makes one
// for any queue, without a worker.
//
//	dl, err := deadletter.New(rdb)
//	n, err := dl.Count(ctx, "emails")
//	letters, err := dl.List(ctx, "emails", 100) // newest first
//	letters, err = dl.Get(ctx, "emails", id)    // by id
//	_, err = dl.Requeue(ctx, letters...)        // back to the end of their keys
//	_, err = dl.Purge(ctx, "emails")
//
// Every error it returns starts with "deadletter: ", and wraps what caused
// it: errors.Is finds ErrNotRequeueable and rueidis's errors through it.
package deadletter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/jsonarray"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
)

// Letter is an item that failed for good, kept with its last error, or a
// value found in a key that was not an item (Corrupt).
type Letter struct {
	ID       string          `json:"id"`
	Queue    string          `json:"queue"`
	Shard    int             `json:"shard"`
	Key      string          `json:"key"`
	Item     json.RawMessage `json:"item"` // byte for byte as appended; null when Corrupt and not a string
	Attempts int             `json:"attempts"`
	Error    string          `json:"error"`
	FailedAt time.Time       `json:"failed_at"`
	// Corrupt marks a value that was not an item: a key's whole value that
	// was not a JSON array, or an element of one that was not valid JSON.
	// Item holds it (as a JSON string when it was not JSON). It cannot be
	// requeued.
	Corrupt bool `json:"corrupt,omitempty"`
}

// ErrNotRequeueable reports a letter that holds no item a producer would
// take: a corrupt value, or an item that is not valid JSON or nests too
// deeply. Requeue returns it wrapped, in an error that names the letter.
var ErrNotRequeueable = errors.New("the letter holds a corrupt value, not an item")

// Requeueable reports whether l holds an item that Requeue can put back:
// not a corrupt value, and an item a producer would take (valid JSON,
// nested at most producer.MaxItemDepth levels).
func (l Letter) Requeueable() bool { return l.requeueError() == nil }

func (l Letter) requeueError() error {
	switch {
	case l.Corrupt || len(l.Item) == 0:
		return ErrNotRequeueable
	case !json.Valid(l.Item):
		return fmt.Errorf("%w: the item is not valid JSON", ErrNotRequeueable)
	}
	if err := jsonarray.CheckDepth(l.Item, jsonarray.MaxDepth); err != nil {
		return fmt.Errorf("%w: the item is %v", ErrNotRequeueable, err)
	}
	return nil
}

// Client reads and manages the dead letters of the queues under one
// prefix. It is safe for concurrent use.
type Client struct {
	c      rueidis.Client
	prefix string
}

// Option configures New.
type Option func(*Client) error

// WithPrefix sets the prefix of every Redis key (default "batchq"), as
// producers and workers have it: 1-512 bytes without braces. An invalid
// prefix makes New fail.
func WithPrefix(p string) Option {
	return func(c *Client) error {
		if err := keys.CheckPrefix(p); err != nil {
			return err
		}
		c.prefix = p
		return nil
	}
}

// New returns a Client of the dead letters under the default prefix
// ("batchq"), or the one WithPrefix gives, that uses c, which the caller
// keeps owning. It reads each queue's shards in the registry of the prefix,
// as producers and workers do. It returns an
// error, and no client, when c is nil or an option is invalid.
func New(c rueidis.Client, opts ...Option) (*Client, error) {
	if c == nil {
		return nil, errors.New("deadletter: nil client")
	}
	cl := &Client{c: c, prefix: keys.DefaultPrefix}
	for _, o := range opts {
		if o == nil {
			return nil, errors.New("deadletter: nil option")
		}
		if err := o(cl); err != nil {
			return nil, fmt.Errorf("deadletter: %w", err)
		}
	}
	return cl, nil
}

func (c *Client) space(queue string, shard int) keys.Space { return keys.For(c.prefix, queue, shard) }

// shards returns the shard counts of queues, as the registry records them:
// 1 for a queue it does not hold (no producer or worker wrote it).
func (c *Client) shards(ctx context.Context, queues ...string) ([]int, error) {
	ns, err := protocol.ReadShards(ctx, c.c, c.prefix, queues...)
	if err != nil {
		return nil, err
	}
	for i := range ns {
		ns[i] = max(1, ns[i])
	}
	return ns, nil
}

// List returns up to limit dead letters of a queue, newest first (over all
// its shards). A letter whose stored form does not decode (written by
// another program) is listed as a corrupt letter, which Purge deletes.
func (c *Client) List(ctx context.Context, queue string, limit int) ([]Letter, error) {
	if err := keys.CheckQueue(queue); err != nil {
		return nil, fmt.Errorf("deadletter: %w", err)
	}
	ns, err := c.shards(ctx, queue)
	if err != nil {
		return nil, fmt.Errorf("deadletter: dead letters of %s: %w", keys.Short(queue), err)
	}
	shards := ns[0]
	var out []Letter
	for shard := range shards {
		ids, envs, err := protocol.ListDead(ctx, c.c, c.space(queue, shard), 0, limit)
		if err != nil {
			return nil, fmt.Errorf("deadletter: dead letters of %s: %w", keys.Short(queue), err)
		}
		for i, env := range envs {
			out = append(out, decode(queue, shard, ids[i], env))
		}
	}
	if shards > 1 {
		// Each shard's list is newest first (ties: the later id first, so
		// the items of one batch, which share a time, list last first).
		slices.SortStableFunc(out, func(a, b Letter) int {
			if n := b.FailedAt.Compare(a.FailedAt); n != 0 {
				return n
			}
			return strings.Compare(b.ID, a.ID)
		})
	}
	return out[:min(limit, len(out))], nil
}

// decode returns the dead letter id of a queue shard stored as env. One
// that does not decode is a corrupt letter, not an error: one bad envelope
// must not hide the others, and it can be purged.
func decode(queue string, shard int, id, env string) Letter {
	d, err := protocol.DecodeDead(env)
	l := Letter(d)
	if err != nil {
		l = Letter{ID: id, Queue: queue, Item: protocol.JSONString(env), Corrupt: true,
			Error: "the stored dead letter does not decode: " + err.Error()}
	}
	l.Shard = shard
	return l
}

// Get returns the dead letters of a queue whose ids are given, in the
// order of ids (an id given twice once), looking in every shard at once:
// two round trips, one to read the queue's shard count. Ids that name no
// letter (requeued or purged already, or never there) are left out. A
// letter whose stored form does not decode is returned as a corrupt
// letter, as List does.
func (c *Client) Get(ctx context.Context, queue string, ids ...string) ([]Letter, error) {
	if err := keys.CheckQueue(queue); err != nil {
		return nil, fmt.Errorf("deadletter: %w", err)
	}
	if len(ids) == 0 {
		return nil, nil
	}
	ns, err := c.shards(ctx, queue)
	if err != nil {
		return nil, fmt.Errorf("deadletter: dead letters of %s: %w", keys.Short(queue), err)
	}
	spaces := make([]keys.Space, ns[0])
	for shard := range spaces {
		spaces[shard] = c.space(queue, shard)
	}
	envs, err := protocol.GetDead(ctx, c.c, spaces, ids)
	if err != nil {
		return nil, fmt.Errorf("deadletter: dead letters of %s: %w", keys.Short(queue), err)
	}
	var out []Letter
	seen := make(map[string]bool, len(ids))
	for j, id := range ids {
		for shard := range envs {
			if env := envs[shard][j]; env != "" && !seen[id] {
				seen[id] = true
				out = append(out, decode(queue, shard, id, env))
			}
		}
	}
	return out, nil
}

// Count returns the number of dead letters of a queue.
func (c *Client) Count(ctx context.Context, queue string) (int64, error) {
	return c.sum(ctx, queue, "count", protocol.CountDead)
}

// sum adds up what fn returns for each shard of queue; what names it in an
// error.
func (c *Client) sum(ctx context.Context, queue, what string, fn func(context.Context, rueidis.Client, keys.Space) (int64, error)) (int64, error) {
	if err := keys.CheckQueue(queue); err != nil {
		return 0, fmt.Errorf("deadletter: %w", err)
	}
	ns, err := c.shards(ctx, queue)
	if err != nil {
		return 0, fmt.Errorf("deadletter: %s dead letters of %s: %w", what, keys.Short(queue), err)
	}
	var n int64
	for shard := range ns[0] {
		m, err := fn(ctx, c.c, c.space(queue, shard))
		if err != nil {
			return n, fmt.Errorf("deadletter: %s dead letters of %s: %w", what, keys.Short(queue), err)
		}
		n += m
	}
	return n, nil
}

// Requeue appends each letter's item to the end of its key, as a fresh item
// with no attempts, and removes the letter: atomically for each, in the
// order given, all in one round trip (in chunks of 1,000), after one that
// reads the shard counts of their queues. It returns how
// many it requeued; letters already gone are skipped. A letter that cannot
// be requeued (not Requeueable, or of a shard past its queue's count) is an
// error before anything is requeued; a Redis error stops it at that
// letter's chunk. A key that producers now refuse (one with control
// characters or invalid UTF-8, stored before they did) takes its items
// back all the same.
func (c *Client) Requeue(ctx context.Context, letters ...Letter) (int, error) {
	var queues []string
	for _, d := range letters {
		if !slices.Contains(queues, d.Queue) && keys.CheckQueue(d.Queue) == nil {
			queues = append(queues, d.Queue)
		}
	}
	var shards []int
	if len(queues) > 0 {
		var err error
		if shards, err = c.shards(ctx, queues...); err != nil {
			return 0, fmt.Errorf("deadletter: requeue: %w", err)
		}
	}
	rs := make([]protocol.Requeued, len(letters))
	for i, d := range letters {
		if err := d.requeueError(); err != nil {
			return 0, fmt.Errorf("deadletter: requeue %q: %w", keys.Short(d.ID), err)
		}
		if err := errors.Join(keys.CheckQueue(d.Queue), keys.CheckStoredKey(d.Key)); err != nil {
			return 0, fmt.Errorf("deadletter: requeue %q: %w", keys.Short(d.ID), err)
		}
		if d.Shard < 0 || d.Shard >= shards[slices.Index(queues, d.Queue)] {
			return 0, fmt.Errorf("deadletter: requeue %q: shard %d out of range", keys.Short(d.ID), d.Shard)
		}
		rs[i] = protocol.Requeued{Space: c.space(d.Queue, d.Shard), ID: d.ID, Key: d.Key, Item: string(d.Item)}
	}
	n := 0
	for chunk := range slices.Chunk(rs, 1000) {
		oks, errs := protocol.RequeueMany(ctx, c.c, chunk)
		var first error
		for i, ok := range oks {
			if ok {
				n++
			}
			if errs[i] != nil && first == nil {
				first = fmt.Errorf("deadletter: requeue %s: %w", keys.Short(chunk[i].ID), errs[i])
			}
		}
		if first != nil {
			return n, first
		}
	}
	return n, nil
}

// RequeueNewest requeues up to max of a queue's dead letters, newest first
// (max <= 0: all), as Requeue does, in passes of 500. Only letters that
// died before it started count: items that fail again while it runs are
// not requeued in a loop. Within a pass letters go back oldest first, so
// the items of a batch that died together keep their order in their key.
// Letters that cannot be requeued (corrupt values, which Purge deletes) are
// left in place and counted in skipped.
func (c *Client) RequeueNewest(ctx context.Context, queue string, max int) (requeued, skipped int, err error) {
	// Letters are stamped by their workers' reckoning of the server's clock.
	start, err := protocol.Time(ctx, c.c)
	if err != nil {
		return 0, 0, fmt.Errorf("deadletter: requeue dead letters of %s: read the server's clock: %w", keys.Short(queue), err)
	}
	total, err := c.Count(ctx, queue)
	if err != nil {
		return 0, 0, err
	}
	want := int(total)
	if max > 0 {
		want = min(want, max)
	}
	const pass = 500
	for requeued < want {
		// Letters left in place (corrupt ones, and those that died since
		// the start) stay at the front of the list: read past them.
		read := skipped + min(pass, want-requeued)
		for {
			letters, err := c.List(ctx, queue, read)
			if err != nil {
				return requeued, skipped, err
			}
			ok := make([]Letter, 0, len(letters))
			fresh := 0
			skipped = 0
			for _, d := range letters {
				switch {
				case d.FailedAt.After(start):
					fresh++
				case !d.Requeueable():
					skipped++
				case len(ok) < want-requeued:
					ok = append(ok, d)
				}
			}
			end := len(letters) < read // nothing more to read
			if len(ok) == 0 {
				if end {
					return requeued, skipped, nil
				}
				read = skipped + fresh + pass // only letters left in place so far: read on
				continue
			}
			slices.Reverse(ok)
			n, err := c.Requeue(ctx, ok...)
			requeued += n
			if err != nil || n == 0 || end {
				return requeued, skipped, err
			}
			break
		}
	}
	return requeued, skipped, nil
}

// Purge deletes every dead letter of a queue, and the values kept in
// quarantine, and returns how many dead letters there were.
func (c *Client) Purge(ctx context.Context, queue string) (int64, error) {
	return c.sum(ctx, queue, "purge", protocol.PurgeDead)
}
