// Command worker drains one batchq queue and logs a JSON line per item it
// handles, for producers such as examples/webproducer.
//
//	go run ./examples/worker -redis 127.0.0.1:6379 -queue orders
//
// Without -redis or $REDIS_ADDR it starts an embedded in-process Redis,
// where nothing produces items: point a producer at the address it logs.
// -redis takes HOST:PORT (a server, or any node of a Redis Cluster), a
// redis:// or rediss:// URL (with the user and password, if the server
// wants them), or the Sentinels of a Sentinel setup and the name they
// monitor the master under:
//
//	go run ./examples/worker -redis sentinel://mymaster@10.0.0.7:26379,10.0.0.8:26379,10.0.0.9:26379
//
// It then works on the master, and follows the Sentinels to the new one
// when they fail it over; so does the status page.
//
// The handler only simulates work: it waits -work, fails a fraction -fail
// of first attempts (batchq retries them with its default backoff, 1s
// doubling), and logs the item's queue, key, attempt and "id" field, never
// the item itself:
//
//	{"level":"info","ts":...,"msg":"handled","queue":"orders","key":"user:42","attempt":0,"id":1}
//
// With -metrics ADDR it serves, on that address, Prometheus metrics at
// /metrics (package metrics) and the status page at /status/ (package
// statuspage): the depth, lag and dead letters of every queue under the
// prefix, with requeue and purge buttons. The page has no login of its
// own: keep ADDR on loopback (127.0.0.1:9090) or behind a proxy that has.
// Both answer requests for IP addresses, localhost and the host name of
// ADDR; -status-hosts names more (a proxy's, say): others get 421, so that
// no web page can reach them through a DNS name of its own (DNS rebinding).
//
// With -ordered it registers the queue with ordered keys
// (batchq.WithOrderedKeys): one batch of a key at a time across all
// workers, the key's items in append order, and a failed item holding back
// those after it until it succeeds or goes to dead letters. Start every
// worker of the queue with it.
//
// SIGINT or SIGTERM stops it gracefully: it fetches no more, lets running
// handlers finish for up to -shutdown-timeout, puts back the items it had
// not started, and exits 0.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/oklog/run"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/rueidis"
	"go.uber.org/zap"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/redisaddr"
	"github.com/batchq/batchq/metrics"
	"github.com/batchq/batchq/statuspage"
)

// config is what the flags set.
type config struct {
	redis       string
	prefix      string
	queue       string
	concurrency int
	work        time.Duration
	fail        float64
	shutdown    time.Duration
	metrics     string
	statusHosts string
	ordered     bool
}

func main() {
	var cfg config
	flag.StringVar(&cfg.redis, "redis", os.Getenv("REDIS_ADDR"), "Redis: HOST:PORT of a server or of any node of a Redis Cluster, a redis:// or rediss:// URL (rediss: TLS), or sentinel://MASTER@HOST:PORT,HOST:PORT... (a Sentinel setup: its master named MASTER, followed on failover); $REDIS_ADDR by default; empty starts an embedded in-process Redis")
	flag.StringVar(&cfg.prefix, "prefix", "batchq", "prefix of every Redis key; must match the producers'")
	flag.StringVar(&cfg.queue, "queue", "orders", "queue to drain")
	flag.IntVar(&cfg.concurrency, "concurrency", batchq.DefaultConcurrency, "batches handled at once")
	flag.DurationVar(&cfg.work, "work", 0, "simulated time to handle one item")
	flag.Float64Var(&cfg.fail, "fail", 0, "fraction (0 to 1) of first attempts that fail")
	flag.DurationVar(&cfg.shutdown, "shutdown-timeout", batchq.DefaultShutdownTimeout, "how long running handlers may finish at shutdown")
	flag.StringVar(&cfg.metrics, "metrics", "", "address to serve /metrics (Prometheus) and /status/ (the status page, whose buttons requeue and purge dead letters) on, e.g. 127.0.0.1:9090; it has no login: keep it on loopback or behind one; empty: none")
	flag.BoolVar(&cfg.ordered, "ordered", false, "handle the queue's keys in order (batchq.WithOrderedKeys): one batch of a key at a time, a failed item holding back those after it; every worker of the queue must agree")
	flag.StringVar(&cfg.statusHosts, "status-hosts", "", "comma-separated host names the status page answers to besides IP addresses, localhost and the host of -metrics (say the name of a proxy in front of it)")
	flag.Parse()

	// One line per item: turn off the production logger's sampling, which
	// would drop repeated lines.
	lc := zap.NewProductionConfig()
	lc.Sampling = nil
	log, err := lc.Build()
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(1)
	}
	defer log.Sync()
	if err := work(cfg, log); err != nil {
		log.Fatal("worker failed", zap.Error(err))
	}
}

// work drains the queue until SIGINT or SIGTERM.
func work(cfg config, log *zap.Logger) error {
	if cfg.fail < 0 || cfg.fail > 1 {
		return fmt.Errorf("-fail must be between 0 and 1, got %v", cfg.fail)
	}
	rdb, closeRedis, err := connect(cfg.redis, log)
	if err != nil {
		return err
	}
	defer closeRedis()
	opts := []batchq.Option{
		batchq.WithPrefix(cfg.prefix),
		batchq.WithConcurrency(cfg.concurrency),
		batchq.WithShutdownTimeout(cfg.shutdown),
		batchq.WithLogger(log),
	}
	var srv *http.Server
	var ln net.Listener
	if cfg.metrics != "" {
		in, err := inspect.New(rdb, inspect.WithPrefix(cfg.prefix))
		if err != nil {
			return err
		}
		m, err := metrics.New(in)
		if err != nil {
			return err
		}
		opts = append(opts, batchq.WithObserver(m))
		reg := prometheus.NewRegistry()
		reg.MustRegister(m, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		page, err := statuspage.New(in, statuspage.WithLogger(log), statuspage.WithAllowedHosts(statusHosts(cfg.metrics, cfg.statusHosts)...))
		if err != nil {
			return err
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.Handle("/status/", http.StripPrefix("/status", page))
		// The metrics name keys too: they answer the same hosts as the page.
		srv = &http.Server{Handler: statuspage.HostHandler(mux, statusHosts(cfg.metrics, cfg.statusHosts)...), ReadHeaderTimeout: 10 * time.Second}
	}
	w, err := batchq.NewWorker(rdb, opts...)
	if err != nil {
		return err
	}
	if srv != nil {
		if ln, err = net.Listen("tcp", cfg.metrics); err != nil {
			return fmt.Errorf("-metrics: %w", err)
		}
		log.Info("serving metrics and the status page", zap.String("addr", ln.Addr().String()))
	}
	h := handler{work: cfg.work, fail: cfg.fail, log: log}
	var qopts []batchq.QueueOption
	if cfg.ordered {
		qopts = append(qopts, batchq.WithOrderedKeys())
	}
	batchq.HandleRaw(w, cfg.queue, h.handle, qopts...)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var g run.Group
	g.Add(run.SignalHandler(ctx, os.Interrupt, syscall.SIGTERM))
	g.Add(func() error { return w.Run(ctx) }, func(error) { cancel() })
	if srv != nil {
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
	}
	err = g.Run()
	if errors.Is(err, run.ErrSignal) {
		log.Info("exiting", zap.String("reason", err.Error()))
		return nil
	}
	return err
}

// statusHosts returns the host names the status page answers to besides IP
// addresses and localhost: the host of the address it listens on, when that
// is a name, and those listed in extra (comma-separated).
func statusHosts(listen, extra string) []string {
	var hosts []string
	if h, _, err := net.SplitHostPort(listen); err == nil && h != "" {
		if _, err := netip.ParseAddr(strings.Trim(h, "[]")); err != nil {
			hosts = append(hosts, h)
		}
	}
	for h := range strings.SplitSeq(extra, ",") {
		if h = strings.TrimSpace(h); h != "" {
			hosts = append(hosts, h)
		}
	}
	return hosts
}

// connect returns a client of the Redis that addr names (see package
// internal/redisaddr) or, when addr is empty, of an embedded in-process
// Redis, and a function that closes it.
func connect(addr string, log *zap.Logger) (rueidis.Client, func(), error) {
	if addr == "" {
		r, err := embedded.Start()
		if err != nil {
			return nil, nil, err
		}
		log.Info("no -redis or $REDIS_ADDR: started an embedded Redis; this worker is alone with it until a producer uses its address",
			zap.String("redis", r.Addr()))
		return r.Client, r.Close, nil
	}
	a, err := redisaddr.Parse(addr)
	if err != nil {
		return nil, nil, fmt.Errorf("-redis: %w", err)
	}
	c, err := rueidis.NewClient(a.Option)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to Redis at %s: %w", a, err)
	}
	log.Info("connected to Redis", zap.String("redis", a.Display))
	return c, c.Close, nil
}

// handler simulates the work on one item.
type handler struct {
	work time.Duration // time one item takes
	fail float64       // fraction of first attempts that fail
	log  *zap.Logger
}

var errSimulated = errors.New("simulated failure (-fail)")

func (h handler) handle(ctx context.Context, item json.RawMessage) error {
	info, _ := batchq.Info(ctx)
	if h.work > 0 {
		select {
		case <-time.After(h.work):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if info.Attempt == 0 && rand.Float64() < h.fail {
		return errSimulated
	}
	h.log.Info("handled",
		zap.String("queue", info.Queue),
		zap.String("key", info.Key),
		zap.Int("attempt", info.Attempt),
		idField(item),
	)
	return nil
}

// idField returns the "id" of an item that is a JSON object with a string
// or number "id", as a log field, and zap.Skip() otherwise. Only that field
// is decoded: the item itself is never logged.
func idField(item json.RawMessage) zap.Field {
	var v struct {
		ID any `json:"id"`
	}
	d := json.NewDecoder(bytes.NewReader(item))
	d.UseNumber() // keep ids past 2^53 exact
	if d.Decode(&v) != nil {
		return zap.Skip() // not an object
	}
	switch id := v.ID.(type) {
	case string:
		return zap.String("id", id)
	case json.Number:
		if n, err := id.Int64(); err == nil {
			return zap.Int64("id", n)
		}
		return zap.String("id", id.String())
	}
	return zap.Skip() // no id, or not a string or number
}
