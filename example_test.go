package batchq_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"syscall"
	"time"

	"github.com/oklog/run"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/batchqtest"
	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/producer"
)

// The examples run on an in-process Redis (embedded) and end with
// batchqtest.RunUntilIdle, which runs a worker until its queues are idle;
// a worker binary calls Run instead (see Example_runGroup).

// Email is the item of the examples' "emails" queue.
type Email struct {
	To string `json:"to"`
}

// Event is the item of the examples' "events" queue.
type Event struct {
	Name string `json:"name"`
}

// start returns an in-process Redis, and a producer and a worker that use
// it (the worker handles one call at a time, so that the output is in
// order).
func start() (*embedded.Redis, *producer.Producer, *batchq.Worker) {
	r, err := embedded.Start()
	if err != nil {
		log.Fatal(err)
	}
	p, err := producer.New(r.Client)
	if err != nil {
		log.Fatal(err)
	}
	w, err := batchq.NewWorker(r.Client, batchq.WithConcurrency(1))
	if err != nil {
		log.Fatal(err)
	}
	return r, p, w
}

func untilIdle(w *batchq.Worker, opts ...batchqtest.Option) batchqtest.Result {
	res, err := batchqtest.RunUntilIdle(context.Background(), w, opts...)
	if err != nil {
		log.Fatal(err)
	}
	return res
}

// Handle registers a handler of one item at a time, decoded into its type.
func ExampleHandle() {
	r, p, w := start()
	defer r.Close()
	ctx := context.Background()
	if err := p.Add(ctx, "emails", "user:42", Email{To: "a@example.com"}, Email{To: "b@example.com"}); err != nil {
		log.Fatal(err)
	}

	batchq.Handle(w, "emails", func(ctx context.Context, e Email) error {
		info, _ := batchq.Info(ctx)
		fmt.Printf("send to %s (key %s, attempt %d)\n", e.To, info.Key, info.Attempt+1)
		return nil
	})
	untilIdle(w)
	// Output:
	// send to a@example.com (key user:42, attempt 1)
	// send to b@example.com (key user:42, attempt 1)
}

// HandleBatch registers a handler of all the items a key held, here cut to
// calls of at most two items (WithMaxBatch).
func ExampleHandleBatch() {
	r, p, w := start()
	defer r.Close()
	ctx := context.Background()
	for _, name := range []string{"signup", "login", "logout"} {
		if err := p.Add(ctx, "events", "user:42", Event{Name: name}); err != nil {
			log.Fatal(err)
		}
	}

	batchq.HandleBatch(w, "events", func(ctx context.Context, key string, evs []Event) error {
		fmt.Printf("%s: %d event(s), first %s\n", key, len(evs), evs[0].Name)
		return nil
	}, batchq.WithMaxBatch(2, 0))
	untilIdle(w)
	// Output:
	// user:42: 2 event(s), first signup
	// user:42: 1 event(s), first logout
}

// A handler's error decides what becomes of its item: any error is retried
// with the queue's backoff, RetryAfter sets the delay, NoRetry sends the
// item to dead letters at once, as does running out of attempts.
func ExampleRetryAfter() {
	r, p, w := start()
	defer r.Close()
	ctx := context.Background()
	if err := p.Add(ctx, "emails", "user:42", Email{To: "busy@example.com"}, Email{To: "nobody@invalid"}); err != nil {
		log.Fatal(err)
	}

	errBusy := errors.New("mail server busy")
	batchq.Handle(w, "emails", func(ctx context.Context, e Email) error {
		info, _ := batchq.Info(ctx)
		switch {
		case e.To == "nobody@invalid":
			fmt.Println("no such address: to dead letters")
			return batchq.NoRetry(errors.New("no such address"))
		case info.Attempt == 0:
			fmt.Println("busy: try again in 10ms")
			return batchq.RetryAfter(10*time.Millisecond, errBusy)
		}
		fmt.Printf("sent at attempt %d\n", info.Attempt+1)
		return nil
	}, batchq.WithMaxAttempts(3))
	res := untilIdle(w, batchqtest.WithRetriesWithin(time.Second))

	letters, err := w.DeadLetters().List(ctx, "emails", 10)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%d dead letter: %s, %q\n", res.DeadLetters, letters[0].Item, letters[0].Error)
	// Output:
	// busy: try again in 10ms
	// no such address: to dead letters
	// sent at attempt 2
	// 1 dead letter: {"to":"nobody@invalid"}, "no such address"
}

// Middleware wraps every handler of a worker (Use), or of one queue
// (WithMiddleware), as net/http middleware wraps a handler.
func ExampleWorker_Use() {
	r, p, w := start()
	defer r.Close()
	ctx := context.Background()
	if err := p.Add(ctx, "emails", "user:42", Email{To: "a@example.com"}); err != nil {
		log.Fatal(err)
	}

	w.Use(func(next batchq.HandlerFunc) batchq.HandlerFunc {
		return func(ctx context.Context, c batchq.Call) error {
			err := next(ctx, c)
			fmt.Printf("%s/%s: %d item(s), attempt %d, error %v\n", c.Queue, c.Key, len(c.Items), c.Attempt+1, err)
			return err
		}
	})
	batchq.Handle(w, "emails", func(ctx context.Context, e Email) error {
		fmt.Println("send to", e.To)
		return nil
	})
	untilIdle(w)
	// Output:
	// send to a@example.com
	// emails/user:42: 1 item(s), attempt 1, error <nil>
}

// A worker binary runs its worker in an oklog/run group, beside a signal
// handler: SIGINT or SIGTERM stops it gracefully. Here a third actor stands
// for the signal: it ends the group once an item was handled.
func Example_runGroup() {
	r, p, w := start()
	defer r.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := p.Add(ctx, "emails", "user:42", Email{To: "a@example.com"}); err != nil {
		log.Fatal(err)
	}
	sent := make(chan struct{})
	batchq.Handle(w, "emails", func(ctx context.Context, e Email) error {
		fmt.Println("send to", e.To)
		close(sent)
		return nil
	})

	var g run.Group
	g.Add(run.SignalHandler(ctx, os.Interrupt, syscall.SIGTERM))
	g.Add(func() error { return w.Run(ctx) }, func(error) { cancel() })
	g.Add(func() error {
		select {
		case <-sent:
			return errors.New("done")
		case <-ctx.Done():
			return ctx.Err()
		}
	}, func(error) { cancel() })
	fmt.Println("group ended:", g.Run())
	// Output:
	// send to a@example.com
	// group ended: done
}
