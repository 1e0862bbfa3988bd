package metrics

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/producer"
)

// Defaults of New.
const (
	DefaultLaggingKeys   = 5
	DefaultMaxQueues     = 1000
	DefaultScrapeTimeout = 5 * time.Second
	// MaxLaggingKeys bounds WithLaggingKeys.
	MaxLaggingKeys = 1000
)

var (
	_ prometheus.Collector = (*Metrics)(nil)
	_ batchq.Observer      = (*Metrics)(nil)
	_ producer.Observer    = (*Metrics)(nil)
)

// Metrics counts what producers and workers do, as their Observer, and
// reads the depth of the queues from Redis when it is collected, as a
// prometheus.Collector. Create it with New. It is safe for concurrent use.
type Metrics struct {
	in          *inspect.Inspector
	laggingKeys int
	maxQueues   int
	timeout     time.Duration
	queues      []string            // nil: every registered queue
	allowed     map[string]struct{} // the set of queues; nil: every queue

	// Counted by the observer methods; children cached by queue name.
	vecs                                               []prometheus.Collector
	appendedItems, appendedBytes, appendErrors         *prometheus.CounterVec
	drainedBatches, drainedItems                       *prometheus.CounterVec
	retryBatches, retryItems                           *prometheus.CounterVec
	handledItems, failedItems, retriedItems, deadItems *prometheus.CounterVec
	batchItems, batchBytes, handlerDuration            *prometheus.HistogramVec
	producers, workers                                 sync.Map // queue name -> *producerSeries, *workerSeries

	// Read from Redis at each scrape.
	readyKeys, pendingItems, inFlightBatches, inFlightItems *prometheus.Desc
	retries, deadLetters, oldestAge, keyLag, up, registered *prometheus.Desc
	scrapeErrors                                            prometheus.Counter
}

// Option configures New.
type Option func(*Metrics) error

// WithLaggingKeys sets how many keys of each queue batchq_key_lag_seconds
// reports: those that have been due longest (default 5, at most
// MaxLaggingKeys; 0 turns the metric off). Each is a series labelled with
// the key's name. Another number makes New fail.
func WithLaggingKeys(n int) Option {
	return func(m *Metrics) error {
		if n < 0 || n > MaxLaggingKeys {
			return fmt.Errorf("lagging keys must be 0-%d, got %d", MaxLaggingKeys, n)
		}
		m.laggingKeys = n
		return nil
	}
}

// WithMaxQueues bounds the queues whose gauges a scrape reads from Redis
// and reports (default DefaultMaxQueues, 1000): past it, the queues this
// process's producers and workers use come first, then the others by name.
// batchq_queues says how many are registered, reported or not. It keeps a
// registry flooded with queue names (by anyone who can make a producer
// append to any name) from making scrapes slow and series many, but the
// flood can still push queues this process does not use out of the report
// (names that sort first win): where queue names come from outside,
// WithQueues is the bound to rely on. n below 1 makes New fail.
func WithMaxQueues(n int) Option {
	return func(m *Metrics) error {
		if n < 1 {
			return fmt.Errorf("max queues must be at least 1, got %d", n)
		}
		m.maxQueues = n
		return nil
	}
}

// WithScrapeTimeout bounds the time one collection spends reading Redis
// (default 5s). Past it, the scrape reports what it read and a scrape
// error. A scrape costs a few round trips whatever the number of queues,
// and one command per pending key (up to 10,000 per shard) to count items.
// A d that is not positive makes New fail.
func WithScrapeTimeout(d time.Duration) Option {
	return func(m *Metrics) error {
		if d <= 0 {
			return fmt.Errorf("scrape timeout must be positive, got %v", d)
		}
		m.timeout = d
		return nil
	}
}

// WithQueues limits every metric to the named queues: the gauges read
// only them from Redis (queues not yet registered are left out), and the
// observer methods ignore other queues. By default every queue in the
// inspector's registry and every queue observed is reported. Use it when
// the number of queues is large or not under your control, for example
// when queue names come from requests. No name, or an invalid one, makes
// New fail.
func WithQueues(names ...string) Option {
	return func(m *Metrics) error {
		if len(names) == 0 {
			return errors.New("WithQueues needs at least one queue")
		}
		for _, n := range names {
			if err := keys.CheckQueue(n); err != nil {
				return err
			}
		}
		m.queues = append(m.queues, names...)
		return nil
	}
}

// New returns the metrics of the queues in reads. Register it with a
// prometheus.Registerer, and pass it to producer.WithObserver and
// batchq.WithObserver. It returns an error, and no Metrics, when in is nil
// or an option is invalid.
func New(in *inspect.Inspector, opts ...Option) (*Metrics, error) {
	if in == nil {
		return nil, errors.New("metrics: nil inspector")
	}
	m := &Metrics{in: in, laggingKeys: DefaultLaggingKeys, maxQueues: DefaultMaxQueues, timeout: DefaultScrapeTimeout}
	for _, o := range opts {
		if o == nil {
			return nil, errors.New("metrics: nil option")
		}
		if err := o(m); err != nil {
			return nil, fmt.Errorf("metrics: %w", err)
		}
	}
	if m.queues != nil {
		m.allowed = make(map[string]struct{}, len(m.queues))
		for _, q := range m.queues {
			m.allowed[q] = struct{}{}
		}
	}

	q := []string{"queue"}
	counter := func(name, help string) *prometheus.CounterVec {
		v := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, q)
		m.vecs = append(m.vecs, v)
		return v
	}
	histogram := func(name, help string, buckets []float64, labels ...string) *prometheus.HistogramVec {
		v := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets}, append(q, labels...))
		m.vecs = append(m.vecs, v)
		return v
	}
	m.appendedItems = counter("batchq_appended_items_total", "Items appended to the queue by this process's producers (appends that returned nil).")
	m.appendedBytes = counter("batchq_appended_bytes_total", "Bytes of JSON appended to the queue by this process's producers (appends that returned nil).")
	m.appendErrors = counter("batchq_append_errors_total", "Appends (producer calls) to the queue that failed after their items were validated: a full key, too many items, or a Redis error (then the items may or may not be stored).")
	m.drainedBatches = counter("batchq_drained_batches_total", "Batches drained from the queue's keys by this process's workers, each the whole of one key.")
	m.drainedItems = counter("batchq_drained_items_total", "Items drained from the queue's keys by this process's workers.")
	m.retryBatches = counter("batchq_retry_batches_fetched_total", "Batches of due retries of the queue fetched by this process's workers.")
	m.retryItems = counter("batchq_retry_items_fetched_total", "Items fetched by this process's workers for another attempt after a failure.")
	m.handledItems = counter("batchq_handled_items_total", "Items of the queue handled successfully by this process's workers.")
	m.failedItems = counter("batchq_failed_items_total", "Items of the queue whose attempt failed in this process's workers: retried plus dead-lettered.")
	m.retriedItems = counter("batchq_retried_items_total", "Items of the queue that failed and were scheduled for another attempt.")
	m.deadItems = counter("batchq_dead_lettered_items_total", "Items of the queue moved to dead letters by this process's workers: failed for good, out of attempts, or not decodable.")
	m.batchItems = histogram("batchq_batch_items", "Items per batch drained from one key of the queue (batches of retries left out).",
		prometheus.ExponentialBuckets(1, 4, 11)) // 1 to 1Mi
	m.batchBytes = histogram("batchq_batch_bytes", "Bytes of JSON per batch drained from one key of the queue (batches of retries left out).",
		prometheus.ExponentialBuckets(64, 4, 12)) // 64 B to 256 MiB
	m.handlerDuration = histogram("batchq_handler_duration_seconds", "Duration of handler calls (one item, or one key's items for a batch handler), by result: ok or error.",
		prometheus.ExponentialBucketsRange(0.001, 60, 13), "result") // 1ms to 1m

	gauge := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, append(q, labels...), nil)
	}
	m.readyKeys = gauge("batchq_ready_keys", "Keys of the queue with pending items, due or not yet due.")
	m.pendingItems = gauge("batchq_pending_items", "Items waiting in the queue's keys (counted in at most 10,000 keys per shard).")
	m.inFlightBatches = gauge("batchq_in_flight_batches", "Batches of the queue leased to workers.")
	m.inFlightItems = gauge("batchq_in_flight_items", "Items of the queue in batches leased to workers (counted in at most 10,000 batches per shard).")
	m.retries = gauge("batchq_retries", "Items of the queue waiting for another attempt.")
	m.deadLetters = gauge("batchq_dead_letters", "Dead letters of the queue.")
	m.oldestAge = gauge("batchq_oldest_item_age_seconds", "How long the queue's most overdue key has been due, 0 when none is: the age of its oldest item under the default flush policy (due at the first item), that age less the policy's delay under a FlushPolicy.")
	m.keyLag = gauge("batchq_key_lag_seconds", "How long a key of the queue has been due, for the keys due longest (see WithLaggingKeys); keys not yet due are left out.", "key")
	m.registered = prometheus.NewDesc("batchq_queues", "Queues in the registry, including those not reported past WithMaxQueues (or outside WithQueues).", nil, nil)
	m.up = prometheus.NewDesc("batchq_up", "1 when this scrape read every queue from Redis, 0 when a read failed (see batchq_scrape_errors_total).", nil, nil)
	m.scrapeErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "batchq_scrape_errors_total", Help: "Scrapes that could not read (all of) the queues from Redis."})
	return m, nil
}

// producerSeries are the series of one queue a producer updates.
type producerSeries struct {
	items, bytes, errors prometheus.Counter
}

// workerSeries are the series of one queue a worker updates.
type workerSeries struct {
	drainedBatches, drainedItems, retryBatches, retryItems prometheus.Counter
	batchItems, batchBytes, handledOK, handledErr          prometheus.Observer
	handled, failed, retried, dead                         prometheus.Counter
}

// label makes s a valid label value.
func label(s string) string { return strings.ToValidUTF8(s, "\uFFFD") }

// series returns the series of queue in cache, made by mk the first time,
// or nil when queue is not reported.
func series[S any](m *Metrics, cache *sync.Map, queue string, mk func(label string) *S) *S {
	if s, ok := cache.Load(queue); ok {
		return s.(*S)
	}
	if m.allowed != nil {
		if _, ok := m.allowed[queue]; !ok {
			return nil
		}
	}
	s, _ := cache.LoadOrStore(queue, mk(label(queue)))
	return s.(*S)
}

func (m *Metrics) producer(queue string) *producerSeries {
	return series(m, &m.producers, queue, func(q string) *producerSeries {
		return &producerSeries{
			items:  m.appendedItems.WithLabelValues(q),
			bytes:  m.appendedBytes.WithLabelValues(q),
			errors: m.appendErrors.WithLabelValues(q),
		}
	})
}

func (m *Metrics) worker(queue string) *workerSeries {
	return series(m, &m.workers, queue, func(q string) *workerSeries {
		return &workerSeries{
			drainedBatches: m.drainedBatches.WithLabelValues(q),
			drainedItems:   m.drainedItems.WithLabelValues(q),
			retryBatches:   m.retryBatches.WithLabelValues(q),
			retryItems:     m.retryItems.WithLabelValues(q),
			batchItems:     m.batchItems.WithLabelValues(q),
			batchBytes:     m.batchBytes.WithLabelValues(q),
			handledOK:      m.handlerDuration.WithLabelValues(q, "ok"),
			handledErr:     m.handlerDuration.WithLabelValues(q, "error"),
			handled:        m.handledItems.WithLabelValues(q),
			failed:         m.failedItems.WithLabelValues(q),
			retried:        m.retriedItems.WithLabelValues(q),
			dead:           m.deadItems.WithLabelValues(q),
		}
	})
}

// Appended implements producer.Observer: it counts the items and bytes of
// an append that succeeded, or one append error.
func (m *Metrics) Appended(queue string, items, bytes int, err error) {
	s := m.producer(queue)
	if s == nil {
		return
	}
	if err != nil {
		s.errors.Inc()
		return
	}
	s.items.Add(float64(items))
	s.bytes.Add(float64(bytes))
}

// Fetched implements batchq.Observer: it counts a batch drained from a key
// and observes its size, or counts a batch of retries.
func (m *Metrics) Fetched(queue string, items, bytes int, retry bool) {
	s := m.worker(queue)
	if s == nil {
		return
	}
	if retry {
		s.retryBatches.Inc()
		s.retryItems.Add(float64(items))
		return
	}
	s.drainedBatches.Inc()
	s.drainedItems.Add(float64(items))
	s.batchItems.Observe(float64(items))
	s.batchBytes.Observe(float64(bytes))
}

// Handled implements batchq.Observer: it observes the duration of a
// handler call.
func (m *Metrics) Handled(queue string, d time.Duration, err error) {
	s := m.worker(queue)
	if s == nil {
		return
	}
	if err != nil {
		s.handledErr.Observe(d.Seconds())
	} else {
		s.handledOK.Observe(d.Seconds())
	}
}

// Settled implements batchq.Observer: it counts the outcomes of a batch.
func (m *Metrics) Settled(queue string, done, retried, dead int) {
	s := m.worker(queue)
	if s == nil {
		return
	}
	s.handled.Add(float64(done))
	s.failed.Add(float64(retried + dead))
	s.retried.Add(float64(retried))
	s.dead.Add(float64(dead))
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, v := range m.vecs {
		v.Describe(ch)
	}
	for _, d := range []*prometheus.Desc{m.readyKeys, m.pendingItems, m.inFlightBatches, m.inFlightItems,
		m.retries, m.deadLetters, m.oldestAge, m.keyLag, m.up, m.registered} {
		ch <- d
	}
	m.scrapeErrors.Describe(ch)
}

// Collect implements prometheus.Collector: it sends the counters and
// histograms, then reads the queues from Redis, within the scrape timeout,
// and sends their gauges. When Redis cannot be read it sends batchq_up 0
// and counts a scrape error instead of failing.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	for _, v := range m.vecs {
		v.Collect(ch)
	}
	ctx, cancel := context.WithTimeout(context.Background(), m.timeout)
	defer cancel()
	up := 1.0
	if err := m.collectQueues(ctx, ch); err != nil {
		up = 0
		m.scrapeErrors.Inc()
	}
	ch <- prometheus.MustNewConstMetric(m.up, prometheus.GaugeValue, up)
	m.scrapeErrors.Collect(ch)
}

// collectQueues sends the gauges of the queues it could read, and returns
// the first error.
func (m *Metrics) collectQueues(ctx context.Context, ch chan<- prometheus.Metric) error {
	qs, registered, err := m.reported(ctx)
	if err != nil {
		return err
	}
	ch <- prometheus.MustNewConstMetric(m.registered, prometheus.GaugeValue, float64(registered))
	stats, err := m.in.StatsOf(ctx, qs...)
	if err != nil {
		return err
	}
	var lagging [][]inspect.DueKey
	if m.laggingKeys > 0 && len(stats) > 0 {
		if lagging, err = m.in.DueKeys(ctx, stats[0].Now, m.laggingKeys, qs...); err != nil {
			return err
		}
	}
	seen := make(map[string]bool, len(stats)) // two names may share a label after label()
	for i, st := range stats {
		q := label(st.Queue)
		if seen[q] {
			continue
		}
		seen[q] = true
		for _, g := range []struct {
			d *prometheus.Desc
			v float64
		}{
			{m.readyKeys, float64(st.ReadyKeys)},
			{m.pendingItems, float64(st.PendingItems)},
			{m.inFlightBatches, float64(st.InFlightBatches)},
			{m.inFlightItems, float64(st.InFlightItems)},
			{m.retries, float64(st.Retries)},
			{m.deadLetters, float64(st.DeadLetters)},
			{m.oldestAge, st.Lag.Seconds()},
		} {
			ch <- prometheus.MustNewConstMetric(g.d, prometheus.GaugeValue, g.v, q)
		}
		if lagging == nil {
			continue
		}
		seenKey := make(map[string]bool, len(lagging[i]))
		for _, k := range lagging[i] {
			key := label(k.Key)
			if k.Lag <= 0 || seenKey[key] {
				continue
			}
			seenKey[key] = true
			ch <- prometheus.MustNewConstMetric(m.keyLag, prometheus.GaugeValue, k.Lag.Seconds(), q, key)
		}
	}
	return nil
}

// reported returns the registered queues whose gauges a scrape reports,
// and how many queues are registered: those of WithQueues, or up to
// maxQueues, this process's own first.
func (m *Metrics) reported(ctx context.Context) ([]inspect.Queue, int, error) {
	all, err := m.in.Queues(ctx)
	if err != nil {
		return nil, 0, err
	}
	if m.allowed != nil {
		return slices.DeleteFunc(slices.Clone(all), func(q inspect.Queue) bool {
			_, ok := m.allowed[q.Name]
			return !ok
		}), len(all), nil
	}
	if len(all) <= m.maxQueues {
		return all, len(all), nil
	}
	own := func(q inspect.Queue) bool {
		_, w := m.workers.Load(q.Name)
		_, p := m.producers.Load(q.Name)
		return w || p
	}
	out := make([]inspect.Queue, 0, m.maxQueues)
	for _, q := range all {
		if own(q) && len(out) < m.maxQueues {
			out = append(out, q)
		}
	}
	for _, q := range all {
		if !own(q) && len(out) < m.maxQueues {
			out = append(out, q)
		}
	}
	return out, len(all), nil
}
