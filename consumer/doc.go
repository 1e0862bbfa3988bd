// Package consumer drains batchq queues: it finds due keys through each
// queue shard's ready index (never SCAN or KEYS), moves each key's whole JSON
// array out of Redis with one MULTI/EXEC, and records the outcome of every
// item when the batch is settled.
//
// Most programs use batchq.Worker, which runs a Consumer for them. Use this
// package directly to drain queues by hand, or to inspect and requeue dead
// letters.
//
// # Delivery
//
// By default a drain is at-least-once: the MULTI/EXEC renames the key's
// array to a lease key and records the lease's deadline, so a worker that
// dies mid-batch loses nothing: once the deadline passes, any worker's Reap
// puts the batch back in front of its key. Running batches keep their lease
// by Extend. Settle releases the lease, fenced by its token: a settlement
// that arrives after its lease was reaped is refused with ErrLeaseLost, and
// the batch is delivered again.
//
// WithAtMostOnce selects the literal GETDEL drain instead: no lease, one
// less write per batch, and a worker that dies after the drain loses its
// batch.
//
// Items appended while a key is drained are either in that batch or in the
// next one: the append script and the drain transaction are each atomic.
//
// # Clocks
//
// Due times and lease deadlines are Unix milliseconds from the clock of the
// process that writes them (producer or consumer); a lease is reaped once a
// reaper's clock passes its deadline. Keep the clocks of the machines in
// sync to well under the lease TTL.
//
// # Redis layout
//
// Every key of a queue shard shares the hash tag {<queue>:<shard>}; see
// WithShards. Per shard: the items of each key (k:<key>, a JSON array any
// Redis client can GET), the ready index, the leases, the retries and the
// dead letters.
package consumer
