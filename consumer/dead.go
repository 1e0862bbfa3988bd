package consumer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/batchq/batchq/internal/jsonarray"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/store"
)

// DeadLetter is an item that failed for good, kept with its last error.
type DeadLetter struct {
	ID       string          `json:"id"`
	Queue    string          `json:"queue"`
	Shard    int             `json:"shard"`
	Key      string          `json:"key"`
	Item     json.RawMessage `json:"item"` // byte for byte as appended; null when Corrupt and not a string
	Attempts int             `json:"attempts"`
	Error    string          `json:"error"`
	FailedAt time.Time       `json:"failed_at"`
	// Corrupt marks a key's whole value that was not a JSON array; Item holds
	// it (as a JSON string when it was not JSON). It cannot be requeued.
	Corrupt bool `json:"corrupt,omitempty"`
}

// Requeueable reports whether d holds an item that RequeueDead can put
// back: not a corrupt value, and an item a producer would take (valid JSON,
// nested at most producer.MaxItemDepth levels).
func (d DeadLetter) Requeueable() bool { return d.requeueError() == nil }

func (d DeadLetter) requeueError() error {
	switch {
	case d.Corrupt || len(d.Item) == 0:
		return ErrNotRequeueable
	case !json.Valid(d.Item):
		return fmt.Errorf("%w: the item is not valid JSON", ErrNotRequeueable)
	}
	if err := jsonarray.CheckDepth(d.Item, jsonarray.MaxDepth); err != nil {
		return fmt.Errorf("%w: the item is %v", ErrNotRequeueable, err)
	}
	return nil
}

// deadEnvelope is the stored form of a DeadLetter.
func (d DeadLetter) encode() []byte {
	b := make([]byte, 0, len(d.Item)+len(d.Key)+len(d.Error)+96)
	b = append(b, `{"id":`...)
	b = appendString(b, d.ID)
	b = append(b, `,"queue":`...)
	b = appendString(b, d.Queue)
	b = append(b, `,"shard":`...)
	b = strconv.AppendInt(b, int64(d.Shard), 10)
	b = append(b, `,"key":`...)
	b = appendString(b, d.Key)
	b = append(b, `,"attempts":`...)
	b = strconv.AppendInt(b, int64(d.Attempts), 10)
	b = append(b, `,"error":`...)
	b = appendString(b, d.Error)
	b = append(b, `,"failed_at":`...)
	b = strconv.AppendInt(b, d.FailedAt.UnixMilli(), 10)
	if d.Corrupt {
		b = append(b, `,"corrupt":true`...)
	}
	b = append(b, `,"item":`...)
	if len(d.Item) == 0 {
		b = append(b, "null"...)
	} else {
		b = append(b, d.Item...)
	}
	return append(b, '}')
}

func decodeDead(env string) (DeadLetter, error) {
	var s struct {
		DeadLetter
		FailedAt int64 `json:"failed_at"`
	}
	if err := json.Unmarshal([]byte(env), &s); err != nil {
		return DeadLetter{}, err
	}
	d := s.DeadLetter
	d.FailedAt = time.UnixMilli(s.FailedAt)
	return d, nil
}

// ErrNotRequeueable reports a dead letter that holds no item a producer
// would take: a key's corrupt value, or an item that is not valid JSON or
// nests too deeply.
var ErrNotRequeueable = errors.New("consumer: dead letter holds a corrupt value, not an item")

// DeadLetters returns up to limit dead letters of a queue, newest first
// (over all its shards).
func (c *Consumer) DeadLetters(ctx context.Context, queue string, limit int) ([]DeadLetter, error) {
	if err := keys.CheckQueue(queue); err != nil {
		return nil, err
	}
	var out []DeadLetter
	for shard := range c.shards {
		ids, envs, err := store.ListDead(ctx, c.c, c.space(queue, shard), 0, limit)
		if err != nil {
			return nil, fmt.Errorf("dead letters of %s: %w", queue, err)
		}
		for i, env := range envs {
			d, err := decodeDead(env)
			if err != nil {
				// Listed, not fatal: one bad envelope must not hide the
				// others; it can be purged.
				d = DeadLetter{ID: ids[i], Queue: queue, Key: "", Item: jsonString(env), Corrupt: true,
					Error: "the stored dead letter does not decode: " + err.Error()}
			}
			d.Shard = shard
			out = append(out, d)
		}
	}
	if c.shards > 1 {
		// Each shard's list is newest first (ties: the later id first, so
		// the items of one batch, which share a time, list last first).
		slices.SortStableFunc(out, func(a, b DeadLetter) int {
			if n := b.FailedAt.Compare(a.FailedAt); n != 0 {
				return n
			}
			return strings.Compare(b.ID, a.ID)
		})
	}
	return out[:min(limit, len(out))], nil
}

// CountDead returns the number of dead letters of a queue.
func (c *Consumer) CountDead(ctx context.Context, queue string) (int64, error) {
	if err := keys.CheckQueue(queue); err != nil {
		return 0, err
	}
	var n int64
	for shard := 0; shard < c.shards; shard++ {
		m, err := store.CountDead(ctx, c.c, c.space(queue, shard))
		if err != nil {
			return n, fmt.Errorf("count dead letters of %s: %w", queue, err)
		}
		n += m
	}
	return n, nil
}

// RequeueDead appends each dead letter's item to the end of its key, as a
// fresh item with no attempts, and removes the dead letter: atomically for
// each, in the order given, all in one round trip (in chunks of 1,000). It
// returns how many it requeued; dead letters already gone are skipped. A
// letter that cannot be requeued (corrupt, or not of this consumer's
// shards) is an error before anything is requeued; a Redis error stops it
// at that letter's chunk.
func (c *Consumer) RequeueDead(ctx context.Context, letters ...DeadLetter) (int, error) {
	rs := make([]store.Requeued, len(letters))
	for i, d := range letters {
		if err := d.requeueError(); err != nil {
			return 0, fmt.Errorf("requeue %s: %w", d.ID, err)
		}
		if err := errors.Join(keys.CheckQueue(d.Queue), keys.CheckKey(d.Key)); err != nil {
			return 0, fmt.Errorf("requeue %s: %w", d.ID, err)
		}
		if d.Shard < 0 || d.Shard >= c.shards {
			return 0, fmt.Errorf("requeue %s: shard %d out of range", d.ID, d.Shard)
		}
		rs[i] = store.Requeued{Space: c.space(d.Queue, d.Shard), ID: d.ID, Key: d.Key, Item: string(d.Item)}
	}
	n := 0
	for chunk := range slices.Chunk(rs, 1000) {
		oks, errs := store.RequeueMany(ctx, c.c, chunk)
		var first error
		for i, ok := range oks {
			if ok {
				n++
			}
			if errs[i] != nil && first == nil {
				first = fmt.Errorf("requeue %s: %w", chunk[i].ID, errs[i])
			}
		}
		if first != nil {
			return n, first
		}
	}
	return n, nil
}

// RequeueNewestDead requeues up to max of a queue's dead letters, newest
// first (max <= 0: all), as RequeueDead does, in passes of 500. Only
// letters that died before it started count: items that fail again while
// it runs are not requeued in a loop. Within a pass letters go back oldest
// first, so the items of a batch that died together keep their order in
// their key. Letters that cannot be requeued (corrupt values, which
// PurgeDead deletes) are left in place and counted in skipped.
func (c *Consumer) RequeueNewestDead(ctx context.Context, queue string, max int) (requeued, skipped int, err error) {
	start := c.now() // dead letters are stamped by their workers' reckoning of the server's clock
	total, err := c.CountDead(ctx, queue)
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
			letters, err := c.DeadLetters(ctx, queue, read)
			if err != nil {
				return requeued, skipped, err
			}
			ok := make([]DeadLetter, 0, len(letters))
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
			n, err := c.RequeueDead(ctx, ok...)
			requeued += n
			if err != nil || n == 0 || end {
				return requeued, skipped, err
			}
			break
		}
	}
	return requeued, skipped, nil
}

// PurgeDead deletes every dead letter of a queue, and the values kept in
// quarantine, and returns how many dead letters there were.
func (c *Consumer) PurgeDead(ctx context.Context, queue string) (int64, error) {
	if err := keys.CheckQueue(queue); err != nil {
		return 0, err
	}
	var n int64
	for shard := 0; shard < c.shards; shard++ {
		m, err := store.PurgeDead(ctx, c.c, c.space(queue, shard))
		if err != nil {
			return n, fmt.Errorf("purge dead letters of %s: %w", queue, err)
		}
		n += m
	}
	return n, nil
}
