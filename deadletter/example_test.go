package deadletter_test

// The README's dead-letter snippet is copied from this file;
// TestREADMESnippetsAreExamples (readme_test.go, at the root) fails when
// they differ.

import (
	"context"
	"errors"
	"fmt"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/producer"
)

// requeueDeadEmails prints the dead letters of the "emails" queue and puts
// them back at the end of their keys, once the cause of their failure is
// fixed, say.
func requeueDeadEmails(ctx context.Context, rdb rueidis.Client) error {
	dl, err := deadletter.New(rdb) // or w.DeadLetters(), or inspector.DeadLetters(ctx, "emails")
	if err != nil {
		return err
	}
	n, err := dl.Count(ctx, "emails")
	if err != nil {
		return err
	}
	letters, err := dl.List(ctx, "emails", 100) // newest first
	if err != nil {
		return err
	}
	fmt.Printf("%d dead letters\n", n)
	for _, l := range letters {
		fmt.Printf("%s %s: %d attempts, %q\n", l.Key, l.Item, l.Attempts, l.Error)
	}
	requeued, err := dl.Requeue(ctx, letters...) // as fresh items, with no attempts
	if err != nil {
		return err
	}
	fmt.Printf("%d requeued\n", requeued)
	// dl.RequeueNewest(ctx, "emails", 0) requeues all that died before
	// it started, newest first; dl.Purge(ctx, "emails") deletes them all.
	return nil
}

// A handler that returns batchq.NoRetry sends its item to dead letters at
// once; requeued, the item waits in its key again.
func ExampleClient() {
	rdb, err := embedded.Start() // in production: your own rueidis.Client
	if err != nil {
		panic(err)
	}
	defer rdb.Close()
	ctx := context.Background()

	// A worker that fails an email for good, and stops once it has.
	w, err := batchq.NewWorker(rdb.Client)
	if err != nil {
		panic(err)
	}
	wctx, stop := context.WithCancel(ctx)
	batchq.Handle(w, "emails", func(ctx context.Context, to string) error {
		stop() // Run returns once the item's outcome is stored
		return batchq.NoRetry(errors.New("no such mailbox"))
	})
	p, err := producer.New(rdb.Client)
	if err != nil {
		panic(err)
	}
	if err := p.Add(ctx, "emails", "user:42", "a@example.com"); err != nil {
		panic(err)
	}
	if err := w.Run(wctx); err != nil {
		panic(err)
	}

	if err := requeueDeadEmails(ctx, rdb.Client); err != nil {
		panic(err)
	}
	// Output:
	// 1 dead letters
	// user:42 "a@example.com": 1 attempts, "no such mailbox"
	// 1 requeued
}
