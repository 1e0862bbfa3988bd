package producer_test

// The README's producer snippets are copied from this file;
// TestREADMESnippetsAreExamples (readme_test.go, at the root) fails when
// they differ.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/producer"
)

// Email is an item of the "emails" queue, stored as JSON.
type Email struct {
	To string `json:"to"`
}

// signupHandler queues a welcome email for each signup. rdb is the
// service's Redis client; the producer, like the handler, is safe for
// concurrent use.
func signupHandler(rdb rueidis.Client) (http.Handler, error) {
	p, err := producer.New(rdb)
	if err != nil {
		return nil, err
	}
	emails := producer.NewQueue[Email](p, "emails") // typed; p.Add takes items of any type
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// One round trip, however many items: nil means they are all stored.
		err := emails.Add(r.Context(), "user:"+r.FormValue("user"), Email{To: r.FormValue("email")})
		switch {
		case errors.Is(err, producer.ErrKeyName):
			// A user name too long, or with control characters: nothing is
			// stored, and trying again cannot help.
			http.Error(w, "invalid user", http.StatusBadRequest)
			return
		case err != nil:
			// The error says whether trying again can help, and whether
			// the item may be stored all the same: see the producer's errors.
			http.Error(w, "could not queue the email", http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusAccepted)
	}), nil
}

// A web handler appends an item to the key of its user; the item waits in
// the key's JSON array for a worker.
func ExampleNewQueue() {
	rdb, err := embedded.Start() // in production: your own rueidis.Client
	if err != nil {
		panic(err)
	}
	defer rdb.Close()
	h, err := signupHandler(rdb.Client)
	if err != nil {
		panic(err)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/signup?user=42&email=a@example.com", nil))
	fmt.Println(rec.Code)
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/signup?user=%0A&email=b@example.com", nil))
	fmt.Println(rec.Code)

	in, err := inspect.New(rdb.Client, "") // the default prefix
	if err != nil {
		panic(err)
	}
	key, err := in.Peek(context.Background(), "emails", "user:42")
	if err != nil {
		panic(err)
	}
	fmt.Println(string(key.Array))
	// Output:
	// 202
	// 400
	// [{"to":"a@example.com"}]
}

// newEventsProducer returns a producer under which a key of the "events"
// queue is due for workers once it holds 500 items, once no item has come
// for a second, and at the latest 10s after its first item.
func newEventsProducer(rdb rueidis.Client) (*producer.Producer, error) {
	return producer.New(rdb, producer.WithFlushPolicy("events",
		producer.FlushPolicy{MaxAge: 10 * time.Second, Quiet: time.Second, MaxItems: 500}))
}

// Under a flush policy a key waits for more items before workers see it;
// at MaxItems it is due at once.
func ExampleWithFlushPolicy() {
	rdb, err := embedded.Start() // in production: your own rueidis.Client
	if err != nil {
		panic(err)
	}
	defer rdb.Close()
	p, err := newEventsProducer(rdb.Client)
	if err != nil {
		panic(err)
	}
	in, err := inspect.New(rdb.Client, "") // the default prefix
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	events := make([]any, 500)
	for i := range events {
		events[i] = map[string]int{"n": i}
	}
	for _, n := range []int{499, 1} {
		if err := p.Add(ctx, "events", "device:7", events[:n]...); err != nil {
			panic(err)
		}
		ks, err := in.Keys(ctx, "events", inspect.ByItems, 1)
		if err != nil {
			panic(err)
		}
		fmt.Printf("%s holds %d items, due in %v\n", ks[0].Key, ks[0].Items, time.Until(ks[0].Due).Round(time.Second))
	}
	// Output:
	// device:7 holds 499 items, due in 1s
	// device:7 holds 500 items, due in 0s
}
