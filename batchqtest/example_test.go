package batchqtest_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/batchqtest"
	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/producer"
)

type Email struct {
	To string `json:"to"`
}

// A producer adds items, a handler records them, and RunUntilIdle returns
// once they are all handled.
func Example() {
	ctx := context.Background()
	r, err := embedded.Start() // an in-process Redis; in a test, batchqtest.Redis(t)
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()

	p, err := producer.New(r.Client)
	if err != nil {
		log.Fatal(err)
	}
	for _, to := range []string{"a@example.com", "b@example.com"} {
		if err := p.Add(ctx, "emails", "user:42", Email{To: to}); err != nil {
			log.Fatal(err)
		}
	}

	w, err := batchq.NewWorker(r.Client)
	if err != nil {
		log.Fatal(err)
	}
	var mu sync.Mutex
	var sent []string
	batchq.Handle(w, "emails", func(ctx context.Context, e Email) error {
		mu.Lock()
		defer mu.Unlock()
		sent = append(sent, e.To)
		return nil
	})

	res, err := batchqtest.RunUntilIdle(ctx, w)
	if err != nil {
		log.Fatal(err)
	}
	slices.Sort(sent) // the items of a key may run at once
	fmt.Println(sent)
	fmt.Println("pending keys:", res.PendingKeys, "retries:", res.Retries, "dead letters:", res.DeadLetters)
	// Output:
	// [a@example.com b@example.com]
	// pending keys: 0 retries: 0 dead letters: 0
}

// With WithRetriesWithin, RunUntilIdle waits for retries due soon: here an
// item that fails twice, then succeeds, and one that always fails and goes
// to dead letters after three attempts.
func ExampleWithRetriesWithin() {
	ctx := context.Background()
	r, err := embedded.Start()
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()

	p, err := producer.New(r.Client)
	if err != nil {
		log.Fatal(err)
	}
	if err := p.Add(ctx, "emails", "user:42", Email{To: "flaky@example.com"}, Email{To: "broken@example.com"}); err != nil {
		log.Fatal(err)
	}

	w, err := batchq.NewWorker(r.Client)
	if err != nil {
		log.Fatal(err)
	}
	var mu sync.Mutex
	tries := map[string]int{}
	batchq.Handle(w, "emails", func(ctx context.Context, e Email) error {
		mu.Lock()
		defer mu.Unlock()
		tries[e.To]++
		if e.To == "broken@example.com" || tries[e.To] < 3 {
			return errors.New("mail server said no")
		}
		return nil
	}, batchq.WithBackoff(batchq.Constant(10*time.Millisecond)), batchq.WithMaxAttempts(3))

	res, err := batchqtest.RunUntilIdle(ctx, w, batchqtest.WithRetriesWithin(time.Second))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("tries:", tries["flaky@example.com"], tries["broken@example.com"])
	fmt.Println("retries:", res.Retries, "dead letters:", res.DeadLetters)
	// Output:
	// tries: 3 3
	// retries: 0 dead letters: 1
}

// The README's testing snippet: a test of a handler, with no polling.
func TestWelcomeEmails(t *testing.T) {
	rdb := batchqtest.Redis(t) // an embedded Redis, closed when the test ends
	p, err := producer.New(rdb)
	if err != nil {
		t.Fatal(err)
	}
	w, err := batchq.NewWorker(rdb)
	if err != nil {
		t.Fatal(err)
	}
	var sent atomic.Int32
	batchq.Handle(w, "emails", func(ctx context.Context, e Email) error {
		sent.Add(1)
		return nil
	})
	if err := p.Add(t.Context(), "emails", "user:42", Email{To: "a@example.com"}); err != nil {
		t.Fatal(err)
	}
	// Runs w until nothing is pending, in flight or due, then stops it.
	res, err := batchqtest.RunUntilIdle(t.Context(), w)
	if err != nil {
		t.Fatal(err)
	}
	if sent.Load() != 1 || res.DeadLetters != 0 {
		t.Fatalf("sent %d emails, %d dead letters; want 1 and 0", sent.Load(), res.DeadLetters)
	}
}
