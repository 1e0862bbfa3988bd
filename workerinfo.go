package batchq

import (
	"maps"
	"slices"

	"github.com/redis/rueidis"
)

// Queues returns the names of the queues registered on w (with Handle,
// HandleRaw or HandleBatch), sorted. It is safe for concurrent use.
func (w *Worker) Queues() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Sorted(maps.Keys(w.queues))
}

// Prefix returns the prefix of the Redis keys of w's queues (WithPrefix,
// "batchq" by default).
func (w *Worker) Prefix() string { return w.cons.Prefix() }

// Client returns the client w uses: the one given to NewWorker, which the
// caller keeps owning.
func (w *Worker) Client() rueidis.Client { return w.cons.Client() }
