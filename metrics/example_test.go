package metrics_test

// The README's metrics snippet is copied from this file;
// TestREADMESnippetsAreExamples (readme_test.go, at the root) fails when
// they differ.

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/rueidis"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/metrics"
	"github.com/batchq/batchq/producer"
)

// instrument returns a producer and a worker that report to one Metrics,
// and serves their metrics, with the depth of every queue read from Redis
// at each scrape, at /metrics on mux.
func instrument(rdb rueidis.Client, mux *http.ServeMux) (*producer.Producer, *batchq.Worker, error) {
	in, err := inspect.New(rdb) // the default prefix; inspect.WithPrefix sets another
	if err != nil {
		return nil, nil, err
	}
	m, err := metrics.New(in)
	if err != nil {
		return nil, nil, err
	}
	reg := prometheus.NewRegistry() // or prometheus.MustRegister(m), served by promhttp.Handler()
	reg.MustRegister(m)
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))

	p, err := producer.New(rdb, producer.WithObserver(m))
	if err != nil {
		return nil, nil, err
	}
	w, err := batchq.NewWorker(rdb, batchq.WithObserver(m))
	if err != nil {
		return nil, nil, err
	}
	return p, w, nil
}

// One Metrics observes the producers and workers of a process and reads
// the queues' depth from Redis at each scrape.
func Example() {
	rdb, err := embedded.Start() // in production: your own rueidis.Client
	if err != nil {
		panic(err)
	}
	defer rdb.Close()
	mux := http.NewServeMux()
	p, w, err := instrument(rdb.Client, mux)
	if err != nil {
		panic(err)
	}

	// Append an item, and handle it with a worker that stops once it has.
	ctx := context.Background()
	if err := p.Add(ctx, "emails", "user:42", "a@example.com"); err != nil {
		panic(err)
	}
	wctx, stop := context.WithCancel(ctx)
	batchq.Handle(w, "emails", func(ctx context.Context, to string) error {
		stop() // Run returns once the item's outcome is stored
		return nil
	})
	if err := w.Run(wctx); err != nil {
		panic(err)
	}

	srv := httptest.NewServer(mux) // in production: your admin server
	defer srv.Close()
	res, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		panic(err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		panic(err)
	}
	for line := range strings.Lines(string(body)) {
		for _, name := range []string{"batchq_appended_items_total", "batchq_handled_items_total", "batchq_pending_items"} {
			if strings.HasPrefix(line, name+"{") {
				fmt.Print(line)
			}
		}
	}
	// Output:
	// batchq_appended_items_total{queue="emails"} 1
	// batchq_handled_items_total{queue="emails"} 1
	// batchq_pending_items{queue="emails"} 0
}
