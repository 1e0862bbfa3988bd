// Package batchqtest helps tests of code that uses batchq: RunUntilIdle
// runs a worker until it has handled everything its queues hold, then stops
// it, so that a test checks what its handlers did without polling the
// queues' state or sleeping.
//
// A test appends items as the code under test does, registers its handlers
// on a worker, runs the worker until idle, then checks:
//
//	func TestWelcomeEmails(t *testing.T) {
//		ctx := t.Context()
//		rdb := batchqtest.Redis(t) // an in-process Redis, closed when the test ends
//		p, err := producer.New(rdb)
//		if err != nil {
//			t.Fatal(err)
//		}
//		if err := signUp(ctx, p, "a@example.com"); err != nil { // the code under test
//			t.Fatal(err)
//		}
//
//		w, err := batchq.NewWorker(rdb, batchq.WithShutdownTimeout(time.Second))
//		if err != nil {
//			t.Fatal(err)
//		}
//		var sent []string // handlers run on the worker's goroutines: guard what they share
//		var mu sync.Mutex
//		batchq.Handle(w, "emails", func(ctx context.Context, e Email) error {
//			mu.Lock()
//			defer mu.Unlock()
//			sent = append(sent, e.To)
//			return nil
//		})
//		res, err := batchqtest.RunUntilIdle(ctx, w)
//		if err != nil {
//			t.Fatal(err)
//		}
//		if len(sent) != 1 || res.DeadLetters != 0 {
//			t.Errorf("sent %v, %d dead letters", sent, res.DeadLetters)
//		}
//	}
//
// RunUntilIdle returns once no key holds items, no batch is in flight and
// no retry is due; the items handlers append meanwhile are handled too.
// Retries due later are left for the Result to report, unless
// WithRetriesWithin asks to wait for them: with a short backoff
// (batchq.WithBackoff(batchq.Constant(10*time.Millisecond))), a test sees
// an item retried until it succeeds or goes to dead letters. On a queue
// with ordered keys (batchq.WithOrderedKeys), the items a failed item holds
// back wait with its retry, and are reported with it, not waited for.
//
// A worker runs once, so each RunUntilIdle needs a new worker. Run it
// against the same Redis and prefix as the producers; Redis gives a fresh
// miniredis per test, and tests that share a server give each its own
// prefix (batchq.WithPrefix, producer.WithPrefix).
package batchqtest
