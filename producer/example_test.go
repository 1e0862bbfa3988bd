package producer_test

// The README's producer snippets are copied from this file;
// TestREADMESnippetsAreExamples (readme_test.go, at the root) fails when
// they differ.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"sync"
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

// Add appends items to the JSON array of a queue's key, in one round trip;
// a plain GET reads the array, as a worker will drain it.
func ExampleProducer_Add() {
	rdb, err := embedded.Start() // in production: your own rueidis.Client
	if err != nil {
		panic(err)
	}
	defer rdb.Close()
	p, err := producer.New(rdb.Client)
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	if err := p.Add(ctx, "emails", "user:42", Email{To: "a@example.com"}, Email{To: "b@example.com"}); err != nil {
		panic(err)
	}
	// Raw JSON is stored byte for byte, spaces and number forms included.
	if err := p.Add(ctx, "emails", "user:42", json.RawMessage(`{"to": "c@example.com", "n": 1e3}`)); err != nil {
		panic(err)
	}
	// A refused call stores none of its items.
	err = p.Add(ctx, "emails", "user:42", Email{To: "d@example.com"}, make(chan int))
	fmt.Println(errors.Is(err, producer.ErrMarshal))

	// The key's array lives at <prefix>:{<queue>:<shard>}:k:<key>.
	array, err := rdb.Client.Do(ctx, rdb.Client.B().Get().Key("batchq:{emails:0}:k:user:42").Build()).ToString()
	if err != nil {
		panic(err)
	}
	fmt.Println(array)
	// Output:
	// true
	// [{"to":"a@example.com"},{"to":"b@example.com"},{"to": "c@example.com", "n": 1e3}]
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

	in, err := inspect.New(rdb.Client) // the default prefix
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
	in, err := inspect.New(rdb.Client) // the default prefix
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

// With WithLinger, concurrent appends to a queue shard go to Redis together,
// in one script call for all their keys, and each caller gets its own
// outcome. At shutdown, Close sends what is gathered and waits; appends
// after it fail with ErrClosed.
func ExampleWithLinger() {
	rdb, err := embedded.Start() // in production: your own rueidis.Client
	if err != nil {
		panic(err)
	}
	defer rdb.Close()
	// A gathering goes out 5ms after its first append, or at 100 items.
	p, err := producer.New(rdb.Client, producer.WithLinger(5*time.Millisecond, 100))
	if err != nil {
		panic(err)
	}
	var wg sync.WaitGroup
	for i := range 3 { // three requests at once
		wg.Go(func() {
			err := p.Add(context.Background(), "events", fmt.Sprintf("device:%d", i), map[string]int{"n": i})
			if err != nil {
				panic(err)
			}
		})
	}
	wg.Wait()

	// At shutdown, once nothing calls Add any more (a web service: once
	// http.Server.Shutdown has returned), send what the producer has
	// gathered and wait for its goroutines; close the Redis client after.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Close(ctx); err != nil {
		// ctx ended first: the callers whose items were not sent got
		// ErrClosed, those whose call was cut short context.Canceled.
		log.Printf("closing the producer: %v", err)
	}

	err = p.Add(ctx, "events", "device:0", map[string]int{"n": 3})
	fmt.Println(errors.Is(err, producer.ErrClosed))
	in, err := inspect.New(rdb.Client) // the default prefix
	if err != nil {
		panic(err)
	}
	for i := range 3 {
		key, err := in.Peek(ctx, "events", fmt.Sprintf("device:%d", i))
		if err != nil {
			panic(err)
		}
		fmt.Printf("%s %s\n", key.Key, key.Array)
	}
	// Output:
	// true
	// device:0 [{"n":0}]
	// device:1 [{"n":1}]
	// device:2 [{"n":2}]
}
