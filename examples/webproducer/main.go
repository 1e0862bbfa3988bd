// Command webproducer is an HTTP front of a batchq producer: it appends the
// JSON of request bodies to queues, for workers such as examples/worker.
//
//	go run ./examples/webproducer -addr :8080 -redis 127.0.0.1:6379
//
// Without -redis or $REDIS_ADDR it starts an embedded in-process Redis and
// logs its address, which workers can be pointed at.
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
// escaped (user%2F42). Answers:
//
//	202 {"queued":n}   the n items are stored
//	400 {"error":...}  invalid JSON, queue name or key; nothing is stored
//	413 {"error":...}  the body is larger than -max-body-bytes, or an item
//	                   larger than -max-item-bytes; nothing is stored
//	503 {"error":...}  Redis did not answer within 2s; nothing is stored
//	405                another method than POST
//
// SIGINT or SIGTERM stops it gracefully: requests under way are finished.
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
	"syscall"
	"time"

	"github.com/oklog/run"
	"github.com/redis/rueidis"
	"go.uber.org/zap"

	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/producer"
)

// config is what the flags set.
type config struct {
	addr     string
	redis    string
	prefix   string
	shards   int
	maxItem  int
	maxBody  int64
	shutdown time.Duration
}

func main() {
	var cfg config
	flag.StringVar(&cfg.addr, "addr", ":8080", "address to listen on")
	flag.StringVar(&cfg.redis, "redis", os.Getenv("REDIS_ADDR"), "Redis address, or a seed of a Redis Cluster; $REDIS_ADDR by default; empty starts an embedded in-process Redis")
	flag.StringVar(&cfg.prefix, "prefix", "batchq", "prefix of every Redis key; must match the workers'")
	flag.IntVar(&cfg.shards, "shards", 1, "shards of every queue, each its own hash slot on a Redis Cluster (at least 4x its masters); must match the workers'")
	flag.IntVar(&cfg.maxItem, "max-item-bytes", producer.DefaultMaxItemBytes, "size limit of one item")
	flag.Int64Var(&cfg.maxBody, "max-body-bytes", 16<<20, "size limit of a request body")
	flag.DurationVar(&cfg.shutdown, "shutdown-timeout", 10*time.Second, "how long requests under way may take at shutdown")
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
	rdb, closeRedis, err := connect(cfg.redis, log)
	if err != nil {
		return err
	}
	defer closeRedis()
	p, err := producer.New(rdb, producer.WithPrefix(cfg.prefix), producer.WithShards(cfg.shards), producer.WithMaxItemBytes(cfg.maxItem))
	if err != nil {
		return err
	}
	a := &api{p: p, maxBody: cfg.maxBody, timeout: 2 * time.Second, log: log}

	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: a.routes(), ReadHeaderTimeout: 5 * time.Second}
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
	}, func(error) {
		sctx, scancel := context.WithTimeout(context.Background(), cfg.shutdown)
		defer scancel()
		if err := srv.Shutdown(sctx); err != nil {
			log.Warn("requests still running at shutdown timeout", zap.Error(err))
		}
	})
	err = g.Run()
	if errors.Is(err, run.ErrSignal) {
		log.Info("stopped", zap.String("reason", err.Error()))
		return nil
	}
	return err
}

// connect returns a client of the Redis at addr or, when addr is empty, of
// an embedded in-process Redis, and a function that closes it.
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
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		return nil, nil, fmt.Errorf("connect to Redis at %s: %w", addr, err)
	}
	log.Info("connected to Redis", zap.String("redis", addr))
	return c, c.Close, nil
}

// api is the HTTP API of a producer.
type api struct {
	p       *producer.Producer
	maxBody int64         // request body limit, in bytes
	timeout time.Duration // how long one append may wait for Redis
	log     *zap.Logger
}

// routes returns the handler of every route. The mux answers 405 to other
// methods than POST.
func (a *api) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /queues/{queue}/keys/{key}", a.add)
	return mux
}

// add appends the items of the body to the key of a queue.
func (a *api) add(w http.ResponseWriter, r *http.Request) {
	queue, key := r.PathValue("queue"), r.PathValue("key")
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, a.maxBody))
	var tooLarge *http.MaxBytesError
	if errors.As(err, &tooLarge) {
		reply(w, http.StatusRequestEntityTooLarge, fmt.Errorf("body larger than %d bytes", a.maxBody))
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
	switch {
	case errors.Is(err, producer.ErrInvalidJSON), errors.Is(err, producer.ErrQueueName), errors.Is(err, producer.ErrKeyName):
		reply(w, http.StatusBadRequest, err)
	case errors.Is(err, producer.ErrItemTooLarge):
		reply(w, http.StatusRequestEntityTooLarge, err)
	case err != nil:
		a.log.Warn("append failed", zap.String("queue", queue), zap.String("key", key), zap.Error(err))
		w.Header().Set("Retry-After", "1")
		reply(w, http.StatusServiceUnavailable, errors.New("cannot store items now; try again"))
	default:
		reply(w, http.StatusAccepted, map[string]int{"queued": len(items)})
	}
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

// reply writes v as a JSON body, or {"error": v} when v is an error.
func reply(w http.ResponseWriter, code int, v any) {
	if err, ok := v.(error); ok {
		v = map[string]string{"error": err.Error()}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}
