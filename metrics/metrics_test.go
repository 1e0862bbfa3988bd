package metrics_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/rueidis"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/metrics"
	"github.com/batchq/batchq/producer"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// newMetrics returns metrics of the backend's queues, registered with a
// fresh pedantic registry.
func newMetrics(t *testing.T, b testredis.Backend, opts ...metrics.Option) (*metrics.Metrics, *prometheus.Registry) {
	t.Helper()
	in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
	must(t, err)
	m, err := metrics.New(in, opts...)
	must(t, err)
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m)
	return m, reg
}

func newProducer(t *testing.T, b testredis.Backend, opts ...producer.Option) *producer.Producer {
	t.Helper()
	p, err := producer.New(b.Client, append([]producer.Option{producer.WithPrefix(b.Prefix)}, opts...)...)
	must(t, err)
	return p
}

// gather gathers reg and returns every sample by series, written as in the
// text format (`name{label="value",...}`); a histogram gives its _count
// and _sum. A failed Gather fails the test.
func gather(t *testing.T, reg prometheus.Gatherer) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	must(t, err)
	out := make(map[string]float64)
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			labels := ""
			if len(ls) > 0 {
				labels = "{" + strings.Join(ls, ",") + "}"
			}
			name := mf.GetName()
			switch {
			case m.GetCounter() != nil:
				out[name+labels] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				out[name+labels] = m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				out[name+"_count"+labels] = float64(m.GetHistogram().GetSampleCount())
				out[name+"_sum"+labels] = m.GetHistogram().GetSampleSum()
			default:
				t.Fatalf("unexpected metric type of %s", name)
			}
		}
	}
	return out
}

// check fails the test for every series of want whose value differs in got.
func check(t *testing.T, got, want map[string]float64) {
	t.Helper()
	for _, s := range slices.Sorted(maps.Keys(want)) {
		v, ok := got[s]
		if !ok {
			t.Errorf("%s missing, want %v", s, want[s])
		} else if v != want[s] {
			t.Errorf("%s = %v, want %v", s, v, want[s])
		}
	}
}

// series returns the series of got named name, sorted.
func series(got map[string]float64, name string) []string {
	var out []string
	for s := range got {
		if s == name || strings.HasPrefix(s, name+"{") {
			out = append(out, s)
		}
	}
	slices.Sort(out)
	return out
}

// waitFor gathers reg until cond holds, and returns that gathering.
func waitFor(t *testing.T, reg prometheus.Gatherer, what string, cond func(map[string]float64) bool) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := gather(t, reg)
		if cond(got) {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; last gathered: %v", what, got)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// run runs w until the returned stop is called or the test ends; stop
// waits for Run to return.
func run(t *testing.T, w *batchq.Worker) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	stop = sync.OnceFunc(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(time.Minute):
			t.Errorf("Run did not return within a minute of its context's end")
		}
	})
	t.Cleanup(stop)
	return stop
}

// A producer and a worker report every append, batch, handler call and
// outcome; once the work is done the gauges show empty queues.
func TestObservedWork(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		m, reg := newMetrics(t, b)
		p := newProducer(t, b, producer.WithObserver(m), producer.WithMaxKeyItems(10))

		// Three keys, six items: two fail once, one fails for good.
		keys := map[string][]string{"a": {`"ok"`, `"once"`, `"never"`}, "b": {`"ok"`, `"ok"`}, "c": {`"once"`}}
		var joined, itemBytes float64 // what Appended and Fetched report
		for _, k := range []string{"a", "b", "c"} {
			raws := make([]json.RawMessage, len(keys[k]))
			for i, it := range keys[k] {
				raws[i] = json.RawMessage(it)
				itemBytes += float64(len(it))
			}
			joined += float64(len(strings.Join(keys[k], ",")))
			must(t, p.AddRaw(ctx, "orders", k, raws...))
		}
		// One append fails: its 11 items pass the key's cap of 10.
		tooMany := slices.Repeat([]json.RawMessage{json.RawMessage(`1`)}, 11)
		if err := p.AddRaw(ctx, "orders", "z", tooMany...); !errors.Is(err, producer.ErrTooMany) {
			t.Fatalf("11 items with a cap of 10: %v, want ErrTooMany", err)
		}

		w, err := batchq.NewWorker(b.Client, batchq.WithPrefix(b.Prefix), batchq.WithObserver(m),
			batchq.WithLogger(zaptest.NewLogger(t)))
		must(t, err)
		batchq.Handle(w, "orders", func(ctx context.Context, mode string) error {
			info, _ := batchq.Info(ctx)
			switch {
			case mode == "once" && info.Attempt == 0:
				return errors.New("fails once")
			case mode == "never":
				return batchq.NoRetry(errors.New("fails for good"))
			}
			return nil
		}, batchq.WithBackoff(batchq.Constant(10*time.Millisecond)))
		stop := run(t, w)
		waitFor(t, reg, "every item handled or dead", func(got map[string]float64) bool {
			return got[`batchq_handled_items_total{queue="orders"}`] == 5 &&
				got[`batchq_dead_lettered_items_total{queue="orders"}`] == 1
		})
		stop()

		got := gather(t, reg)
		check(t, got, map[string]float64{
			`batchq_appended_items_total{queue="orders"}`:                          6,
			`batchq_appended_bytes_total{queue="orders"}`:                          joined,
			`batchq_append_errors_total{queue="orders"}`:                           1,
			`batchq_drained_batches_total{queue="orders"}`:                         3,
			`batchq_drained_items_total{queue="orders"}`:                           6,
			`batchq_retry_items_fetched_total{queue="orders"}`:                     2,
			`batchq_handled_items_total{queue="orders"}`:                           5,
			`batchq_failed_items_total{queue="orders"}`:                            3,
			`batchq_retried_items_total{queue="orders"}`:                           2,
			`batchq_dead_lettered_items_total{queue="orders"}`:                     1,
			`batchq_batch_items_count{queue="orders"}`:                             3,
			`batchq_batch_items_sum{queue="orders"}`:                               6,
			`batchq_batch_bytes_count{queue="orders"}`:                             3,
			`batchq_batch_bytes_sum{queue="orders"}`:                               itemBytes,
			`batchq_handler_duration_seconds_count{queue="orders",result="ok"}`:    5,
			`batchq_handler_duration_seconds_count{queue="orders",result="error"}`: 3,
			`batchq_ready_keys{queue="orders"}`:                                    0,
			`batchq_pending_items{queue="orders"}`:                                 0,
			`batchq_in_flight_batches{queue="orders"}`:                             0,
			`batchq_in_flight_items{queue="orders"}`:                               0,
			`batchq_retries{queue="orders"}`:                                       0,
			`batchq_dead_letters{queue="orders"}`:                                  1,
			`batchq_oldest_item_age_seconds{queue="orders"}`:                       0,
			`batchq_up`:                  1,
			`batchq_scrape_errors_total`: 0,
		})
		// The two retries are due 10ms after their batches were settled:
		// one claim may take both, or each its own.
		if n := got[`batchq_retry_batches_fetched_total{queue="orders"}`]; n != 1 && n != 2 {
			t.Errorf("batchq_retry_batches_fetched_total = %v, want 1 or 2", n)
		}
		if s := series(got, "batchq_key_lag_seconds"); len(s) != 0 {
			t.Errorf("key lag of an empty queue: %v", s)
		}
		problems, err := testutil.GatherAndLint(reg)
		must(t, err)
		for _, p := range problems {
			t.Errorf("lint: %s: %s", p.Metric, p.Text)
		}
	})
}

// Items that wait show in the gauges: keys, items, the lag of the queue and
// of its most lagging keys; a key not yet due has no lag.
func TestPending(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithFlushPolicy("slow", producer.FlushPolicy{MaxAge: time.Hour}))
		must(t, p.AddRaw(ctx, "orders", "a", []byte(`1`), []byte(`2`), []byte(`3`)))
		must(t, p.AddRaw(ctx, "orders", "b", []byte(`4`)))
		must(t, p.AddRaw(ctx, "orders", "c", []byte(`5`), []byte(`6`)))
		must(t, p.AddRaw(ctx, "emails", "u", []byte(`{}`)))
		must(t, p.AddRaw(ctx, "slow", "s", []byte(`7`), []byte(`8`)))

		_, reg := newMetrics(t, b, metrics.WithLaggingKeys(2))
		// Due times are in milliseconds: wait until the server's clock has
		// passed those of the last keys.
		got := waitFor(t, reg, "keys b and u lagging", func(got map[string]float64) bool {
			return got[`batchq_key_lag_seconds{key="b",queue="orders"}`] > 0 &&
				got[`batchq_key_lag_seconds{key="u",queue="emails"}`] > 0
		})
		check(t, got, map[string]float64{
			`batchq_ready_keys{queue="orders"}`:            3,
			`batchq_pending_items{queue="orders"}`:         6,
			`batchq_ready_keys{queue="emails"}`:            1,
			`batchq_pending_items{queue="emails"}`:         1,
			`batchq_ready_keys{queue="slow"}`:              1,
			`batchq_pending_items{queue="slow"}`:           2,
			`batchq_oldest_item_age_seconds{queue="slow"}`: 0,
			`batchq_in_flight_batches{queue="orders"}`:     0,
			`batchq_in_flight_items{queue="orders"}`:       0,
			`batchq_retries{queue="orders"}`:               0,
			`batchq_dead_letters{queue="orders"}`:          0,
			`batchq_up`:                                    1,
		})
		for _, q := range []string{"orders", "emails"} {
			if age := got[`batchq_oldest_item_age_seconds{queue="`+q+`"}`]; age <= 0 || age > 60 {
				t.Errorf("oldest item age of %s: %v, want > 0", q, age)
			}
		}
		// The two keys of orders due longest (a before b, c left out), the one
		// of emails, none of slow.
		want := []string{
			`batchq_key_lag_seconds{key="a",queue="orders"}`,
			`batchq_key_lag_seconds{key="b",queue="orders"}`,
			`batchq_key_lag_seconds{key="u",queue="emails"}`,
		}
		if s := series(got, "batchq_key_lag_seconds"); !slices.Equal(s, want) {
			t.Errorf("key lag series: %v, want %v", s, want)
		}
		if a, b := got[want[0]], got[want[1]]; a < b {
			t.Errorf("key a lags %v, less than key b appended after it (%v)", a, b)
		}

		// WithQueues: only the queues named are read and observed.
		only, reg := newMetrics(t, b, metrics.WithQueues("orders", "unknown"), metrics.WithLaggingKeys(0))
		only.Appended("orders", 1, 1, nil)
		only.Appended("emails", 1, 1, nil)
		got = gather(t, reg)
		check(t, got, map[string]float64{
			`batchq_ready_keys{queue="orders"}`:           3,
			`batchq_pending_items{queue="orders"}`:        6,
			`batchq_appended_items_total{queue="orders"}`: 1,
			`batchq_up`: 1,
		})
		for _, s := range slices.Concat(series(got, "batchq_ready_keys"), series(got, "batchq_appended_items_total"), series(got, "batchq_key_lag_seconds")) {
			if !strings.Contains(s, `queue="orders"`) {
				t.Errorf("series of a queue left out: %s", s)
			}
		}
	})
}

// A batch a consumer holds shows as in flight until it is settled.
func TestInFlight(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		must(t, p.AddRaw(ctx, "orders", "a", []byte(`1`), []byte(`2`), []byte(`3`)))
		must(t, p.AddRaw(ctx, "orders", "b", []byte(`4`), []byte(`5`)))
		_, reg := newMetrics(t, b)

		c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix))
		must(t, err)
		must(t, c.Sync(ctx))
		f, err := c.Fetch(ctx, "orders", 0, 1)
		must(t, err)
		if len(f.Batches) != 1 {
			t.Fatalf("fetched %d batches, want 1", len(f.Batches))
		}
		batch := f.Batches[0]
		n := float64(len(batch.Items))
		check(t, gather(t, reg), map[string]float64{
			`batchq_in_flight_batches{queue="orders"}`: 1,
			`batchq_in_flight_items{queue="orders"}`:   n,
			`batchq_ready_keys{queue="orders"}`:        1,
			`batchq_pending_items{queue="orders"}`:     5 - n,
		})

		out := slices.Repeat([]protocol.Outcome{{Kind: protocol.Done}}, len(batch.Items))
		must(t, c.Settle(ctx, batch, out))
		check(t, gather(t, reg), map[string]float64{
			`batchq_in_flight_batches{queue="orders"}`: 0,
			`batchq_in_flight_items{queue="orders"}`:   0,
			`batchq_ready_keys{queue="orders"}`:        1,
			`batchq_pending_items{queue="orders"}`:     5 - n,
		})
	})
}

// When Redis cannot be read, a scrape still succeeds: it reports the
// counters, batchq_up 0 and a scrape error, and no queue gauges.
func TestRedisDown(t *testing.T) {
	t.Run("miniredis", func(t *testing.T) {
		b := testredis.Mini(t)
		testRedisDown(t, b, b.Mini.Close)
	})
	t.Run("redis", func(t *testing.T) {
		s := testredis.Start(t)
		testRedisDown(t, s.Backend(t), s.Stop)
	})
}

func testRedisDown(t *testing.T, b testredis.Backend, stop func()) {
	ctx := context.Background()
	m, reg := newMetrics(t, b, metrics.WithScrapeTimeout(time.Second))
	p := newProducer(t, b, producer.WithObserver(m))
	must(t, p.AddRaw(ctx, "orders", "a", []byte(`1`)))
	check(t, gather(t, reg), map[string]float64{
		`batchq_ready_keys{queue="orders"}`: 1,
		`batchq_up`:                         1,
		`batchq_scrape_errors_total`:        0,
	})

	stop()
	for i := 1; i <= 2; i++ {
		got := gather(t, reg) // fails the test if Gather fails
		check(t, got, map[string]float64{
			`batchq_appended_items_total{queue="orders"}`: 1,
			`batchq_up`:                  0,
			`batchq_scrape_errors_total`: float64(i),
		})
		if s := series(got, "batchq_ready_keys"); len(s) != 0 {
			t.Errorf("gauges of an unreadable queue: %v", s)
		}
	}
}

// Observed queue names that are not valid UTF-8 become valid label values
// rather than a panic or a failed scrape.
func TestInvalidUTF8(t *testing.T) {
	b := testredis.Mini(t)
	m, reg := newMetrics(t, b)
	m.Appended("bad\xff", 2, 10, nil)
	m.Fetched("bad\xfe", 2, 10, false)
	check(t, gather(t, reg), map[string]float64{
		"batchq_appended_items_total{queue=\"bad\uFFFD\"}":  2,
		"batchq_drained_batches_total{queue=\"bad\uFFFD\"}": 1,
	})
}

// New returns an error, and no Metrics, for a nil inspector or an invalid
// option; it never panics.
func TestNewErrors(t *testing.T) {
	b := testredis.Mini(t)
	in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
	must(t, err)
	for _, tt := range []struct {
		name string
		in   *inspect.Inspector
		opts []metrics.Option
		want string
	}{
		{"nil inspector", nil, nil, "metrics: nil inspector"},
		{"negative lagging keys", in, []metrics.Option{metrics.WithLaggingKeys(-1)}, "metrics: lagging keys must be 0-1000, got -1"},
		{"too many lagging keys", in, []metrics.Option{metrics.WithLaggingKeys(metrics.MaxLaggingKeys + 1)}, "metrics: lagging keys must be 0-1000, got 1001"},
		{"zero max queues", in, []metrics.Option{metrics.WithMaxQueues(0)}, "metrics: max queues must be at least 1, got 0"},
		{"zero scrape timeout", in, []metrics.Option{metrics.WithScrapeTimeout(0)}, "metrics: scrape timeout must be positive, got 0s"},
		{"no queues", in, []metrics.Option{metrics.WithQueues()}, "metrics: WithQueues needs at least one queue"},
		{"bad queue name", in, []metrics.Option{metrics.WithQueues("a:b")},
			`metrics: invalid queue name "a:b": must be 1-512 bytes of UTF-8 without braces, colons or control characters, and not . or ..`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m, err := metrics.New(tt.in, tt.opts...)
			if m != nil || err == nil || err.Error() != tt.want {
				t.Errorf("New: %v, %v; want %q", m, err, tt.want)
			}
		})
	}
	if _, err := metrics.New(in, metrics.WithQueues("a:b")); !errors.Is(err, keys.ErrQueueName) {
		t.Errorf("a bad queue name: %v, want it wrapped", err)
	}
	_, err = metrics.New(in, metrics.WithLaggingKeys(0), metrics.WithLaggingKeys(metrics.MaxLaggingKeys),
		metrics.WithScrapeTimeout(time.Millisecond), metrics.WithQueues("a", "b"))
	must(t, err)
}

// A registry flooded with queues (say by POSTs to any queue name) keeps a
// scrape bounded: it reads and reports at most WithMaxQueues queues, this
// process's own first whatever their names, and says how many there are.
func TestManyQueuesStayBounded(t *testing.T) {
	b := testredis.Real(t)
	ctx := context.Background()
	const flood = 10_000
	// Each spam queue as POSTs make it: registered, one key with one item.
	c := b.Client
	var cmds []rueidis.Completed
	for i := range flood {
		q := fmt.Sprintf("spam%05d", i)
		sp := keys.For(b.Prefix, q, 0)
		cmds = append(cmds,
			c.B().Hset().Key(keys.Registry(b.Prefix)).FieldValue().FieldValue(q, "1").Build(),
			c.B().Set().Key(sp.Items("k")).Value("[1]").Build(),
			c.B().Set().Key(sp.Count("k")).Value("1").Build(),
			c.B().Zadd().Key(sp.Ready()).ScoreMember().ScoreMember(1, "k").Build())
	}
	for _, r := range c.DoMulti(ctx, cmds...) {
		must(t, r.Error())
	}
	m, reg := newMetrics(t, b, metrics.WithMaxQueues(100))
	p := newProducer(t, b, producer.WithObserver(m))
	must(t, p.AddRaw(ctx, "zz-own", "k", []byte(`1`))) // sorts last, yet is reported

	start := time.Now()
	got := gather(t, reg)
	took := time.Since(start)
	queues := make(map[string]bool)
	for s := range got {
		if strings.HasPrefix(s, "batchq_ready_keys{") {
			queues[s] = true
		}
	}
	if len(queues) != 100 || got[`batchq_ready_keys{queue="zz-own"}`] != 1 || got[`batchq_queues`] != flood+1 || got[`batchq_up`] != 1 {
		t.Errorf("reported %d queues (want 100), zz-own %v (want 1), batchq_queues %v (want %d), up %v",
			len(queues), got[`batchq_ready_keys{queue="zz-own"}`], got[`batchq_queues`], flood+1, got[`batchq_up`])
	}
	if len(got) > 100*13+50 {
		t.Errorf("%d series, want at most %d", len(got), 100*13+50)
	}
	t.Logf("scrape of %d registered queues, 100 reported: %d series in %v", flood+1, len(got), took)

	// Without a cap worth the name, every queue is read in a few round trips.
	_, all := newMetrics(t, b, metrics.WithMaxQueues(flood+1))
	start = time.Now()
	got = gather(t, all)
	t.Logf("scrape of %d registered queues, all reported: %d series in %v", flood+1, len(got), time.Since(start))
	if got[`batchq_up`] != 1 {
		t.Errorf("batchq_up %v reading every queue", got[`batchq_up`])
	}
}
