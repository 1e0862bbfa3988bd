// Command quickstart shows batchq end to end in one process, with no Redis
// to install: an embedded Redis, an HTTP endpoint that appends to queues, and
// a worker that handles the items.
//
//	go run ./examples/quickstart
//
// It posts 200 orders for 20 customers to its own endpoint
// (POST /queues/orders/keys/{customer}, one JSON array of orders per
// customer), fails every 10th order on its first attempt to show retries,
// waits until every order was handled, shuts down gracefully and prints
//
//	quickstart: produced 200 items, handled 200 items
//
// examples/webproducer and examples/worker are the same two halves as
// separate programs, for a real Redis.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/oklog/run"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/producer"
)

const (
	orders    = 200
	customers = 20
	timeout   = 30 * time.Second
)

// Order is the item of the "orders" queue.
type Order struct {
	ID    int `json:"id"`
	Cents int `json:"cents"`
}

func main() {
	if err := quickstart(os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

func quickstart(out io.Writer) error {
	// An in-process Redis; use rueidis.NewClient with a real address in
	// production.
	r, err := embedded.Start()
	if err != nil {
		return err
	}
	defer r.Close()

	p, err := producer.New(r.Client)
	if err != nil {
		return err
	}
	w, err := batchq.NewWorker(r.Client)
	if err != nil {
		return err
	}
	s := newShop()
	// Retry failed orders after 50ms instead of the default 1s and more.
	batchq.Handle(w, "orders", s.handle, batchq.WithBackoff(batchq.Constant(50*time.Millisecond)))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: producerAPI(p), ReadHeaderTimeout: 5 * time.Second}
	base := "http://" + ln.Addr().String()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var produced int
	var g run.Group
	g.Add(run.SignalHandler(ctx, os.Interrupt, syscall.SIGTERM))
	g.Add(func() error { return w.Run(ctx) }, func(error) { cancel() })
	g.Add(func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}, func(error) {
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer scancel()
		srv.Shutdown(sctx)
	})
	// The demo itself: when it returns, the group stops the others.
	g.Add(func() error {
		var err error
		if produced, err = produce(ctx, base); err != nil {
			return err
		}
		fmt.Fprintf(out, "quickstart: posted %d orders for %d customers to %s\n", produced, customers, base)
		return s.wait(ctx, produced)
	}, func(error) { cancel() })
	if err := g.Run(); err != nil {
		return err
	}
	fmt.Fprintf(out, "quickstart: %d orders failed their first attempt and were retried\n", s.retried())
	fmt.Fprintf(out, "quickstart: produced %d items, handled %d items\n", produced, s.handled())
	return nil
}

// producerAPI is a minimal HTTP front of a producer:
// POST /queues/{queue}/keys/{key} with one JSON value, or a JSON array of
// values that are appended as many items. examples/webproducer is a fuller
// version.
func producerAPI(p *producer.Producer) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /queues/{queue}/keys/{key}", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		items, err := split(body)
		if err == nil {
			err = p.AddRaw(r.Context(), r.PathValue("queue"), r.PathValue("key"), items...)
		}
		switch {
		case errors.Is(err, producer.ErrInvalidJSON), errors.Is(err, producer.ErrItemTooLarge),
			errors.Is(err, producer.ErrQueueName), errors.Is(err, producer.ErrKeyName):
			http.Error(w, err.Error(), http.StatusBadRequest)
		case err != nil:
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
		default:
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusAccepted)
			fmt.Fprintf(w, "{\"queued\":%d}\n", len(items))
		}
	})
	return mux
}

// split returns the items of a request body: the elements of a JSON array,
// byte for byte, or else the body itself as one item.
func split(body []byte) ([]json.RawMessage, error) {
	body = bytes.TrimSpace(body)
	if len(body) == 0 || body[0] != '[' {
		return []json.RawMessage{body}, nil
	}
	var items []json.RawMessage
	if err := json.Unmarshal(body, &items); err != nil {
		return nil, fmt.Errorf("%w: %v", producer.ErrInvalidJSON, err)
	}
	return items, nil
}

// produce posts the orders, one request per customer, and returns how many
// the endpoint accepted.
func produce(ctx context.Context, base string) (int, error) {
	batches := make([][]Order, customers)
	for id := 1; id <= orders; id++ {
		c := id % customers
		batches[c] = append(batches[c], Order{ID: id, Cents: 100 * id})
	}
	accepted := 0
	for c, batch := range batches {
		n, err := post(ctx, fmt.Sprintf("%s/queues/orders/keys/customer-%d", base, c), batch)
		if err != nil {
			return accepted, err
		}
		accepted += n
	}
	return accepted, nil
}

// post sends v as JSON and returns the number of items queued.
func post(ctx context.Context, url string, v any) (int, error) {
	body, err := json.Marshal(v)
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return 0, fmt.Errorf("POST %s: %s: %s", url, resp.Status, bytes.TrimSpace(msg))
	}
	var res struct {
		Queued int `json:"queued"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
		return 0, fmt.Errorf("POST %s: %w", url, err)
	}
	return res.Queued, nil
}

// shop handles orders and counts them. It is safe for concurrent use: the
// worker runs handlers of different customers at once.
type shop struct {
	mu     sync.Mutex
	failed map[int]bool // orders whose first attempt failed
	done   int          // successful handler calls: a duplicate would show
}

func newShop() *shop {
	return &shop{failed: make(map[int]bool)}
}

// handle is the handler of the "orders" queue. Every 10th order fails its
// first attempt; batchq retries it after the queue's backoff.
func (s *shop) handle(ctx context.Context, o Order) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if o.ID%10 == 0 && !s.failed[o.ID] {
		s.failed[o.ID] = true
		return fmt.Errorf("order %d: payment service busy", o.ID)
	}
	s.done++
	return nil
}

func (s *shop) handled() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.done
}

func (s *shop) retried() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.failed)
}

// wait polls until n orders were handled, for up to timeout.
func (s *shop) wait(ctx context.Context, n int) error {
	ctx, cancel := context.WithTimeoutCause(ctx, timeout, fmt.Errorf("timed out after %v", timeout))
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for s.handled() < n {
		select {
		case <-ctx.Done():
			return fmt.Errorf("handled %d of %d items: %w", s.handled(), n, context.Cause(ctx))
		case <-tick.C:
		}
	}
	return nil
}
