// Package batchq is a queue worker framework on Redis for work that comes
// in batches.
//
// Producers (package producer) append JSON items to a key of a queue; the
// items of one key pile up in one JSON array in Redis. A Worker drains whole
// keys at once and hands each item to the handler registered for its queue,
// typed with generics:
//
//	w, err := batchq.NewWorker(rdb, batchq.WithConcurrency(64), batchq.WithLogger(log))
//	if err != nil {
//		return err
//	}
//	batchq.Handle(w, "emails", func(ctx context.Context, e Email) error { return send(ctx, e) })
//	batchq.HandleBatch(w, "events", func(ctx context.Context, key string, evs []Event) error { return store(ctx, key, evs) },
//		batchq.WithMaxBatch(500, 0)) // at most 500 events per call
//
//	ctx, cancel := context.WithCancel(ctx)
//	defer cancel()
//	var g run.Group
//	g.Add(run.SignalHandler(ctx, os.Interrupt, syscall.SIGTERM))
//	g.Add(func() error { return w.Run(ctx) }, func(error) { cancel() })
//	if err := g.Run(); err != nil && !errors.Is(err, run.ErrSignal) {
//		return err // a signal is how a worker is told to stop
//	}
//
// The README's "In short" has the whole main function (it is
// examples/worker's Example_worker), and package batchqtest runs a worker
// in a test until its queues are idle.
//
// # Guarantees
//
// Delivery is at-least-once: every item whose append returned nil is
// handled successfully at least once, or ends in dead letters with its last
// error, across crashed workers, graceful restarts and lost connections.
// Without a crash, every item is handled exactly once; a Redis that stops
// answering for a while does not change that, since a worker that saw Redis
// fail reaps no lease until a lease TTL after Redis answers again. A drained batch is
// leased: if its worker dies, the lease expires (WithLeaseTTL, 5s by
// default) and another worker gets the batch again, so the items the dead
// worker had already handled run twice. WithAtMostOnce trades that for
// GETDEL drains that lose the batches of a dead worker.
//
// What Redis itself loses in a crash depends on its persistence settings:
// with appendonly yes and appendfsync always nothing acknowledged is lost;
// with appendfsync everysec up to about a second of writes (appends, drains
// and acks) can be lost; without persistence, everything.
//
// # Handling
//
// Up to the worker's concurrency handler calls run at once: the batches of
// many keys, and, while slots are free, the items of one busy key (for
// Handle) or its WithMaxBatch chunks (for HandleBatch). A batch's calls
// are taken in append order, but those that run at once may start and end
// in any order. Items appended to a key while its batch runs form a new
// batch, which may run at the same time: no order is guaranteed between the
// items of a key, unless the queue has WithOrderedKeys. Then at most one
// batch of a key is out at a time, across all workers, its items run one
// after another in append order, and a failed item holds back those after
// it until it succeeds or goes to dead letters.
//
// Every item gets its own outcome: a success is never run again because
// another item of its batch failed. A failed item is retried after its
// queue's backoff (DefaultBackoff unless set), with its attempt count kept
// in Redis, and after the queue's max attempts (10 by default) it goes to
// dead letters. NoRetry and RetryAfter let a handler decide. A panic is
// recovered and counts as a failure. An item that does not decode into the
// handler's type goes to dead letters at once, as does a key whose value is
// not a JSON array.
//
// # Middleware
//
// Worker.Use wraps the handler of every queue, and WithMiddleware one
// queue's, in Middleware: a func(next HandlerFunc) HandlerFunc, as net/http
// middleware is, that sees each Call (queue, key, attempt, the raw JSON of
// its items) and its error. The worker's panic recovery is built on it, and
// OpenTelemetry tracing is middleware of a module of its own
// (github.com/batchq/batchq/otel).
//
// # Options and errors
//
// An option checks its value and returns an error: NewWorker returns it, and
// Handle, HandleRaw, HandleBatch and Use, which return nothing, panic with
// it, as http.Handle does. Runtime conditions are errors, each starting with
// "batchq: ". Retry decisions are types middleware can find with errors.As:
// *NoRetryError, *RetryAfterError, *BatchError, *PanicError, *TimeoutError.
//
// # Shutdown
//
// Run returns once its context is cancelled and shutdown is done: fetching
// stops, handlers already running may finish within the shutdown timeout,
// then their contexts are cancelled, and every item not handled goes back
// to the front of its key at once. The library never handles OS signals.
package batchq
