package metrics_test

import (
	"context"
	"log"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/rueidis"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/metrics"
	"github.com/batchq/batchq/producer"
)

// One Metrics observes the producers and workers of a process and reads
// the queues' depth from Redis at each scrape.
func Example() {
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{"127.0.0.1:6379"}, DisableCache: true})
	if err != nil {
		log.Fatal(err)
	}
	defer rdb.Close()

	in, err := inspect.New(rdb, "") // the default prefix
	if err != nil {
		log.Fatal(err)
	}
	m := metrics.New(in, metrics.WithLaggingKeys(3))
	reg := prometheus.NewRegistry()
	reg.MustRegister(m)

	p, err := producer.New(rdb, producer.WithObserver(m))
	if err != nil {
		log.Fatal(err)
	}
	w, err := batchq.NewWorker(rdb, batchq.WithObserver(m))
	if err != nil {
		log.Fatal(err)
	}
	batchq.Handle(w, "emails", func(ctx context.Context, to string) error { return nil })

	http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	go http.ListenAndServe(":9090", nil)

	_ = p.Add(context.Background(), "emails", "user:42", "a@example.com")
	_ = w.Run(context.Background())
}
