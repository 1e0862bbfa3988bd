// Command webproducer is an HTTP front of a batchq producer: it appends the
// JSON of request bodies to queues, for workers such as examples/worker.
//
//	go run ./examples/webproducer -addr :8080 -redis 127.0.0.1:6379
//
// Without -redis or $REDIS_ADDR it starts an embedded in-process Redis and
// logs its address, which workers can be pointed at. -redis takes what
// examples/worker takes: HOST:PORT (a server, or any node of a Redis
// Cluster), a redis:// or rediss:// URL, or
// sentinel://MASTER@HOST:PORT,HOST:PORT... for the master of a Sentinel
// setup, followed when the Sentinels fail it over.
//
// It serves one route:
//
//	POST /queues/{queue}/keys/{key}
//
// A body holding one JSON value appends it as one item. A body holding a
// JSON array appends each element as an item, in order, in one round trip
// to Redis. To append an array as one item, wrap it in another array:
//
//	curl -d '{"id":1}'            localhost:8080/queues/orders/keys/user:42  # 1 item: {"id":1}
//	curl -d '[{"id":2},{"id":3}]' localhost:8080/queues/orders/keys/user:42  # 2 items
//	curl -d '[[1,2,3]]'           localhost:8080/queues/orders/keys/user:42  # 1 item: [1,2,3]
//
// Items are stored byte for byte as sent. A key holding a slash is sent
// escaped (user%2F42). With -queues, only the queues listed are served;
// without it, any queue name is taken, so that anyone who can post creates
// queues (it warns at start). With -linger, the appends of concurrent
// requests to a queue shard go to Redis in one call (group commit). With
// -replica-acks N, a 202 means that N replicas of the key's master have the
// items too (they survive a failover to one of them); when fewer
// acknowledge within 1s, the answer is 503 unknown.
//
// Every answer but 202 has the body {"error": "...", "stored": "none"} or
// {"error": "...", "stored": "unknown"}: "none" means nothing of the request
// is stored, "unknown" that the items may be stored, so that sending them
// again may store them twice.
//
//	202 {"queued":n}  the n items are stored
//	400 none          invalid JSON, an item nested more than 512 levels
//	                  deep, or an invalid queue name or key
//	404 none          a queue not in -queues, or another path
//	405 none          another method than POST
//	408 none          the body did not arrive within -read-timeout
//	409 none          the key holds a value batchq did not write; a worker
//	                  moves it to dead letters, and the key takes items again
//	413 none          the body is larger than -max-body-bytes, an item larger
//	                  than -max-item-bytes, or the items more than a key may
//	                  hold: never storable as sent
//	503 none          the key is full, Redis is out of memory (maxmemory),
//	                  Redis cannot be reached, or the server is shutting
//	                  down: try again (Retry-After: 1)
//	503 unknown       Redis did not answer within 2s, or the connection broke:
//	                  the items may be stored (no Retry-After); or, with
//	                  -replica-acks, the master stored them but too few
//	                  replicas acknowledged them within 1s
//
// Requests must arrive within -read-timeout (10s), headers within 5s: a
// client that trickles its body is cut off.
//
// SIGINT or SIGTERM stops it gracefully: it takes no new request, lets those
// under way finish for up to -shutdown-timeout, then closes the producer,
// which sends what it has gathered (with -linger) within 2s. A request
// still running after that is answered 503 (nothing stored) or, if its
// call was cut short, 503 unknown.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/oklog/run"
	"github.com/redis/rueidis"
	"go.uber.org/zap"

	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/internal/redisaddr"
	"github.com/batchq/batchq/producer"
)

// config is what the flags set.
type config struct {
	addr        string
	redis       string
	prefix      string
	queues      string // comma-separated; empty: any queue
	maxItem     int
	maxBody     int64
	readTimeout time.Duration
	shutdown    time.Duration
	linger      bool
	replicaAcks int // replicas that must acknowledge each append (producer.WithReplicaAcks, 1s)
}

func main() {
	var cfg config
	flag.StringVar(&cfg.addr, "addr", ":8080", "address to listen on")
	flag.StringVar(&cfg.redis, "redis", os.Getenv("REDIS_ADDR"), "Redis: HOST:PORT of a server or of any node of a Redis Cluster, a redis:// or rediss:// URL (rediss: TLS), or sentinel://MASTER@HOST:PORT,HOST:PORT... (a Sentinel setup: its master named MASTER, followed on failover); $REDIS_ADDR by default; empty starts an embedded in-process Redis")
	flag.StringVar(&cfg.prefix, "prefix", "batchq", "prefix of every Redis key; must match the workers'")
	flag.StringVar(&cfg.queues, "queues", "", "comma-separated queues to serve, others get 404 (say orders,emails); empty serves any queue, so that anyone who can post creates queues")
	flag.IntVar(&cfg.maxItem, "max-item-bytes", producer.DefaultMaxItemBytes, "size limit of one item")
	flag.Int64Var(&cfg.maxBody, "max-body-bytes", 16<<20, "size limit of a request body")
	flag.DurationVar(&cfg.readTimeout, "read-timeout", 10*time.Second, "how long a request, body included, may take to arrive")
	flag.DurationVar(&cfg.shutdown, "shutdown-timeout", 10*time.Second, "how long requests under way may take at shutdown")
	flag.IntVar(&cfg.replicaAcks, "replica-acks", 0, "answer 202 only once this many replicas of the key's master have the items (WAIT, 1s timeout; 503 unknown when fewer acknowledge); 0: the master's word")
	flag.BoolVar(&cfg.linger, "linger", false, "send the appends of concurrent requests to a queue shard in one Redis call (group commit: producer.WithLinger(0, 1000)); no added latency")
	flag.Parse()

	log, err := zap.NewProduction()
	if err != nil {
		fmt.Fprintln(os.Stderr, "webproducer:", err)
		os.Exit(1)
	}
	defer log.Sync()
	if err := serve(cfg, log); err != nil {
		log.Fatal("webproducer failed", zap.Error(err))
	}
}

// serve runs the HTTP server until SIGINT or SIGTERM.
func serve(cfg config, log *zap.Logger) error {
	if cfg.maxBody < 1 {
		return fmt.Errorf("-max-body-bytes must be positive, got %d", cfg.maxBody)
	}
	if cfg.readTimeout <= 0 {
		return fmt.Errorf("-read-timeout must be positive, got %v", cfg.readTimeout)
	}
	queues, err := parseQueues(cfg.queues)
	if err != nil {
		return err
	}
	if queues == nil {
		log.Warn("no -queues: any queue name is served, so anyone who can post creates queues, each in the registry, the metrics and the status page")
	}
	rdb, closeRedis, err := connect(cfg.redis, log)
	if err != nil {
		return err
	}
	defer closeRedis()
	p, err := producer.New(rdb, append(producerOptions(cfg), producer.WithLogger(log))...)
	if err != nil {
		return err
	}
	a := &api{p: p, queues: queues, maxBody: cfg.maxBody, timeout: 2 * time.Second, log: log}

	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	srv := newServer(a, cfg.readTimeout)
	log.Info("listening", zap.String("addr", ln.Addr().String()), zap.String("prefix", cfg.prefix))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var g run.Group
	g.Add(run.SignalHandler(ctx, os.Interrupt, syscall.SIGTERM))
	g.Add(func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}, func(error) { shutdown(srv, a, cfg.shutdown) })
	err = g.Run()
	if errors.Is(err, run.ErrSignal) {
		log.Info("stopped", zap.String("reason", err.Error()))
		return nil
	}
	return err
}

// shutdown stops srv, letting the requests under way finish for up to
// timeout, then a's producer: once no handler appends any more, Close sends
// what the producer has gathered and waits for it, for up to a.timeout, as
// long as one append may wait for Redis. The Redis client is closed after
// it, by serve.
func shutdown(srv *http.Server, a *api, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		a.log.Warn("requests still running at shutdown timeout", zap.Error(err))
	}
	pctx, pcancel := context.WithTimeout(context.Background(), a.timeout)
	defer pcancel()
	if err := a.p.Close(pctx); err != nil {
		a.log.Warn("appends not sent at shutdown: their requests are answered 503", zap.Error(err))
	}
}

// newServer returns the HTTP server of a: it cuts off a client whose
// headers take more than 5s, or whose request takes more than readTimeout.
func newServer(a *api, readTimeout time.Duration) *http.Server {
	return &http.Server{
		Handler:           a.routes(),
		ReadHeaderTimeout: min(5*time.Second, readTimeout),
		ReadTimeout:       readTimeout,
		WriteTimeout:      readTimeout + a.timeout + 5*time.Second,
		IdleTimeout:       time.Minute,
	}
}

// parseQueues parses -queues: nil when empty (any queue), else the set of
// the names, each checked.
func parseQueues(list string) (map[string]bool, error) {
	if strings.TrimSpace(list) == "" {
		return nil, nil
	}
	queues := make(map[string]bool)
	for name := range strings.SplitSeq(list, ",") {
		name = strings.TrimSpace(name)
		if err := producer.CheckQueue(name); err != nil {
			return nil, fmt.Errorf("-queues: %w", err)
		}
		queues[name] = true
	}
	return queues, nil
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
		log.Info("no -redis or $REDIS_ADDR: started an embedded Redis; workers can use it with -redis, its data is lost at exit",
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

// api is the HTTP API of a producer.
type api struct {
	p       *producer.Producer
	queues  map[string]bool // the queues served; nil: any
	maxBody int64           // request body limit, in bytes
	timeout time.Duration   // how long one append may wait for Redis
	log     *zap.Logger
}

// routes returns the handler of every route: other methods than POST get
// 405, other paths 404, each with a JSON body like every other answer.
func (a *api) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/queues/{queue}/keys/{key}", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			reply(w, http.StatusMethodNotAllowed, fmt.Errorf("%s: only POST appends items", r.Method))
			return
		}
		a.add(w, r)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusNotFound, errors.New("no such route: POST /queues/{queue}/keys/{key}"))
	})
	return mux
}

// add appends the items of the body to the key of a queue.
func (a *api) add(w http.ResponseWriter, r *http.Request) {
	queue, key := r.PathValue("queue"), r.PathValue("key")
	if a.queues != nil && !a.queues[queue] {
		reply(w, http.StatusNotFound, fmt.Errorf("no queue %q here", queue))
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, a.maxBody))
	var tooLarge *http.MaxBytesError
	if errors.As(err, &tooLarge) {
		reply(w, http.StatusRequestEntityTooLarge, fmt.Errorf("body larger than %d bytes", a.maxBody))
		return
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		reply(w, http.StatusRequestTimeout, errors.New("the body did not arrive in time"))
		return
	}
	if err != nil {
		reply(w, http.StatusBadRequest, fmt.Errorf("cannot read body: %w", err))
		return
	}
	items, err := split(body)
	if err == nil {
		ctx, cancel := context.WithTimeout(r.Context(), a.timeout)
		defer cancel()
		err = a.p.AddRaw(ctx, queue, key, items...)
	}
	if err == nil {
		reply(w, http.StatusAccepted, map[string]int{"queued": len(items)})
		return
	}
	ans := answerFor(err)
	if ans.status == http.StatusServiceUnavailable {
		a.log.Warn("append failed", zap.String("queue", queue), zap.String("key", key), zap.String("stored", ans.stored), zap.Error(err))
	}
	if ans.retryAfter {
		w.Header().Set("Retry-After", "1")
	}
	reply(w, ans.status, failure{Error: ans.message + ": " + err.Error(), Stored: ans.stored})
}

// Values of failure.Stored.
const (
	storedNone    = "none"    // nothing of the request is stored
	storedUnknown = "unknown" // the items may or may not be stored
)

// failure is the body of an answer other than 202.
type failure struct {
	Error  string `json:"error"`
	Stored string `json:"stored"`
}

// producerOptions returns the producer's options that the flags set.
func producerOptions(cfg config) []producer.Option {
	opts := []producer.Option{producer.WithPrefix(cfg.prefix), producer.WithMaxItemBytes(cfg.maxItem)}
	if cfg.linger {
		opts = append(opts, producer.WithLinger(0, 1000))
	}
	if cfg.replicaAcks != 0 {
		opts = append(opts, producer.WithReplicaAcks(cfg.replicaAcks, time.Second))
	}
	return opts
}

// answer is how the API answers a failed append.
type answer struct {
	status     int
	message    string
	stored     string // storedNone or storedUnknown
	retryAfter bool   // the same request may succeed in a moment
}

// answerFor returns the answer to an append that failed with err. Only the
// producer's own errors say that nothing was stored; any other error (a
// timeout, a lost connection) leaves it unknown, and the answer says so, so
// that a client does not retry blindly and store the items twice.
func answerFor(err error) answer {
	switch {
	case errors.Is(err, producer.ErrInvalidJSON), errors.Is(err, producer.ErrTooDeep),
		errors.Is(err, producer.ErrQueueName), errors.Is(err, producer.ErrKeyName):
		return answer{http.StatusBadRequest, "invalid request; nothing is stored", storedNone, false}
	case errors.Is(err, producer.ErrItemTooLarge), errors.Is(err, producer.ErrTooMany):
		return answer{http.StatusRequestEntityTooLarge, "too large to store, now or later; nothing is stored", storedNone, false}
	case errors.Is(err, producer.ErrNotArray):
		return answer{http.StatusConflict, "the key holds a value batchq did not write; nothing is stored (a worker moves the value to dead letters, then the key takes items again)", storedNone, false}
	case errors.Is(err, producer.ErrClosed):
		return answer{http.StatusServiceUnavailable, "shutting down; nothing is stored; try again", storedNone, true}
	case errors.Is(err, producer.ErrKeyFull):
		return answer{http.StatusServiceUnavailable, "the key is full; nothing is stored; try again once a worker has drained it", storedNone, true}
	case errors.Is(err, producer.ErrOutOfMemory):
		return answer{http.StatusServiceUnavailable, "Redis is out of memory; nothing is stored; try again once it has room", storedNone, true}
	case errors.Is(err, producer.ErrReplicaAcks):
		return answer{http.StatusServiceUnavailable, "stored on the Redis master, but too few replicas acknowledged the items within 1s (or the wait for them failed): unknown whether they survive a failover; retrying may store them twice", storedUnknown, false}
	case notSent(err):
		return answer{http.StatusServiceUnavailable, "cannot reach Redis; nothing is stored; try again", storedNone, true}
	}
	return answer{http.StatusServiceUnavailable, "unknown whether the items are stored: retrying may store them twice", storedUnknown, false}
}

// notSent reports whether err says that the append never left this
// process: no connection to Redis could be made.
func notSent(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// split returns the items of a body: the elements of a JSON array, byte for
// byte, or else the whole body as one item (AddRaw checks that it is JSON).
func split(body []byte) ([]json.RawMessage, error) {
	body = bytes.Trim(body, " \t\r\n") // JSON's whitespace
	if len(body) == 0 {
		return nil, fmt.Errorf("%w: empty body", producer.ErrInvalidJSON)
	}
	if body[0] != '[' {
		return []json.RawMessage{body}, nil
	}
	var items []json.RawMessage
	if err := json.Unmarshal(body, &items); err != nil {
		return nil, fmt.Errorf("%w: %v", producer.ErrInvalidJSON, err)
	}
	return items, nil
}

// reply writes v as a JSON body, or {"error": v, "stored": "none"} when v
// is an error.
func reply(w http.ResponseWriter, code int, v any) {
	if err, ok := v.(error); ok {
		v = failure{Error: err.Error(), Stored: storedNone}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}
