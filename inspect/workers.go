package inspect

import (
	"context"
	"fmt"
	"time"

	"github.com/batchq/batchq/internal/protocol"
)

// WorkerExpiry is how long a worker counts as live after it last announced
// itself. A running worker announces itself at start and every 30 seconds,
// and retires when its Run returns.
const WorkerExpiry = protocol.WorkerExpiry

// Worker is a live worker, as it announced itself.
type Worker struct {
	// Name is the worker's name (batchq.WithName), unique per process by
	// default; Host and PID say where it runs.
	Name string `json:"name"`
	Host string `json:"host,omitempty"`
	PID  int    `json:"pid,omitempty"`
	// Queues are the queues it drains, every shard of each (the registry
	// holds their counts), with at most Concurrency batches at a time.
	Queues      []string `json:"queues"`
	Concurrency int      `json:"concurrency"`
	// Started is when its Run began, by the worker's clock (synced to the
	// server's after its start); LastSeen is when it last announced itself,
	// by the server's clock.
	Started  time.Time `json:"started"`
	LastSeen time.Time `json:"last_seen"`
	// Corrupt marks an announcement whose stored form does not decode
	// (written by another program): only Name and LastSeen are known.
	Corrupt bool `json:"corrupt,omitempty"`
}

// LiveWorkers are the workers under the inspector's prefix.
type LiveWorkers struct {
	Workers []Worker `json:"workers"`
	// Now is the Redis server's time they were read at.
	Now time.Time `json:"now"`
}

// Workers returns the workers under the inspector's prefix that announced
// themselves within WorkerExpiry, sorted by name, in two round trips.
func (in *Inspector) Workers(ctx context.Context) (LiveWorkers, error) {
	now, err := protocol.Time(ctx, in.c) // its own round trip: TIME has no key to route it by on a cluster
	if err != nil {
		return LiveWorkers{}, fmt.Errorf("inspect: read the server's clock: %w", err)
	}
	ws, err := protocol.ListWorkers(ctx, in.c, in.prefix, now)
	if err != nil {
		return LiveWorkers{}, fmt.Errorf("inspect: read the live workers: %w", err)
	}
	out := LiveWorkers{Workers: make([]Worker, len(ws)), Now: now}
	for i, w := range ws {
		out.Workers[i] = Worker(w)
	}
	return out, nil
}
