// Package metrics exports the state and the activity of batchq queues to
// Prometheus.
//
// A *Metrics is three things at once:
//
//   - a producer.Observer: it counts the items and bytes producers append,
//     and the appends that fail;
//   - a batchq.Observer: it counts the batches workers fetch, the items they
//     handle, retry and move to dead letters, and times every handler call;
//   - a prometheus.Collector: at each scrape it reads the depth of every
//     queue from Redis through an inspect.Inspector (ready keys, pending
//     items, batches in flight, retries, dead letters, lag, and the keys that
//     have been due longest) and exports it as gauges.
//
// Wire one Metrics into every producer and worker of a process, and register
// it once:
//
//	in, err := inspect.New(rdb) // the default prefix; inspect.WithPrefix sets another
//	if err != nil {
//		return err
//	}
//	m, err := metrics.New(in)
//	if err != nil {
//		return err
//	}
//	prometheus.MustRegister(m)
//	http.Handle("GET /metrics", promhttp.Handler())
//	p, err := producer.New(rdb, producer.WithObserver(m))
//	if err != nil {
//		return err
//	}
//	w, err := batchq.NewWorker(rdb, batchq.WithObserver(m))
//	if err != nil {
//		return err
//	}
//
// (Example, in this package's tests, runs the same with a registry of its
// own.)
//
// The counters are those of this process; sum them over processes in
// queries. The gauges read Redis, so every process that exports them
// exports the same values: scrape them from one process, or aggregate them
// with max rather than sum.
//
// Every metric is named batchq_* and labelled with its queue; the handler
// histogram also with its result ("ok" or "error"), and the lag of a key
// with the key, for at most WithLaggingKeys keys per queue. No payload ever
// reaches a label. Label values that are not valid UTF-8 have the invalid
// bytes replaced by U+FFFD.
//
// A scrape never fails because Redis cannot be read: it then exports the
// counters, batchq_up 0 and one more batchq_scrape_errors_total, and no
// queue gauges. Nothing is logged.
package metrics
