package inspect

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
)

// Retry is an item waiting for its next attempt on a queue's retry index.
// Retries a worker has claimed are in flight, not here.
type Retry struct {
	ID    string `json:"id"`
	Queue string `json:"queue"`
	Shard int    `json:"shard"`
	Key   string `json:"key"`
	// Item is byte for byte as appended (the stored form, as a JSON
	// string, when Corrupt). It may be sensitive: the CLI shows it only
	// with -items.
	Item json.RawMessage `json:"item"`
	// Attempts counts the failed attempts so far; Error is the last one's
	// error, "" when none was stored (an item a shutdown left unfinished).
	Attempts int    `json:"attempts"`
	Error    string `json:"error"`
	// Due is when a worker may take it again (the server's clock).
	Due time.Time `json:"due"`
	// Behind counts the items of its key held back behind it, on a queue
	// with ordered keys: they run after it, in order.
	Behind int `json:"behind,omitempty"`
	// Corrupt marks a retry whose stored form does not decode (written by
	// another program): a worker moves it to dead letters when it is due.
	Corrupt bool `json:"corrupt,omitempty"`
}

// Retries is a page of a queue's retries.
type Retries struct {
	Queue string `json:"queue"`
	// Total counts every retry waiting on the queue.
	Total   int64   `json:"total"`
	Retries []Retry `json:"retries"`
	// Now is the Redis server's time they were read at.
	Now time.Time `json:"now"`
}

// Retries returns up to limit retries of a registered queue, over all its
// shards, soonest due first (ties: by id, so the items of one batch keep
// their order), and how many there are. It reads them in four round
// trips (the registry, the server's clock, the indexes, the retries),
// however many shards the queue has.
func (in *Inspector) Retries(ctx context.Context, name string, limit int) (Retries, error) {
	q, err := in.Queue(ctx, name)
	if err != nil {
		return Retries{}, err
	}
	if limit < 1 {
		return Retries{}, fmt.Errorf("inspect: limit must be at least 1, got %d", limit)
	}
	now, err := protocol.Time(ctx, in.c)
	if err != nil {
		return Retries{}, fmt.Errorf("inspect: read the server's clock: %w", err)
	}
	spaces := make([]keys.Space, q.Shards)
	for shard := range spaces {
		spaces[shard] = keys.For(in.prefix, q.Name, shard)
	}
	waiting, counts, err := protocol.ListRetries(ctx, in.c, q.Name, spaces, limit)
	if err != nil {
		return Retries{}, fmt.Errorf("inspect: retries of %q: %w", keys.Short(name), err)
	}
	out := Retries{Queue: q.Name, Now: now, Retries: make([]Retry, len(waiting))}
	for i, w := range waiting {
		out.Retries[i] = Retry(w)
	}
	for _, n := range counts {
		out.Total += n
	}
	return out, nil // ListRetries chose and sorted them
}
