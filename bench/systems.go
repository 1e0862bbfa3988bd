package main

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"github.com/redis/rueidis"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/rtcount"
	"github.com/batchq/batchq/producer"
)

// The systems under test, by the names the -systems flag and the report use.
const (
	sysBatchq       = "batchq"
	sysBatchqAcks   = "batchq-acks"
	sysBatchqLinger = "batchq-linger"
	sysLingerAcks   = "batchq-linger-acks"
	sysBatchqOrder  = "batchq-ordered"
	sysAsynqPlain   = "asynq-plain"
	sysAsynqGroup   = "asynq-group"
)

// allSystems lists the systems -systems knows, in the order each phase
// runs them.
var allSystems = []string{sysBatchq, sysBatchqAcks, sysBatchqLinger, sysLingerAcks, sysBatchqOrder, sysAsynqPlain, sysAsynqGroup}

// defaultSystems lists the systems that run when -systems is not given: all
// but batchq-acks and batchq-linger-acks, which need a replica (-replica).
var defaultSystems = []string{sysBatchq, sysBatchqLinger, sysBatchqOrder, sysAsynqPlain, sysAsynqGroup}

// Names shared by every system.
const (
	queueName     = "bench"       // batchq's queue and asynq's task type
	batchTaskType = "bench:batch" // the type of an aggregated asynq task
)

// Replica acknowledgements of batchq-acks:
// producer.WithReplicaAcks(ackReplicas, ackTimeout).
const (
	ackReplicas = 1
	ackTimeout  = time.Second
)

// Linger settings of batchq-linger.
const (
	lingerWait  time.Duration = 0 // group commit: no added wait, one call per shard in flight
	lingerItems               = 1000
)

// A system is one queue library set up as its users would: producers that
// append one item per call, and workers that hand every item to the
// tracker. Producers and workers each get their own connections, as if
// they ran in separate processes.
type system interface {
	// producer connects a producer; close releases it.
	producer() (add appendFunc, close func(), err error)
	// worker prepares workers that report to tr; start starts them, stop
	// shuts them down and waits until they are gone.
	worker(tr *tracker) (start func() error, stop func(), err error)
}

// newSystem returns the system named name. Its clients add each round
// trip they make to trips: a command, a pipeline or a MULTI/EXEC block.
func newSystem(name string, cfg *config, trips *atomic.Int64) (system, error) {
	switch name {
	case sysBatchq:
		return batchqSystem{cfg: cfg, trips: trips}, nil
	case sysBatchqAcks:
		return batchqSystem{cfg: cfg, trips: trips, ackTimeout: ackTimeout}, nil
	case sysBatchqLinger:
		return batchqSystem{cfg: cfg, trips: trips, linger: true}, nil
	case sysLingerAcks:
		return batchqSystem{cfg: cfg, trips: trips, linger: true, ackTimeout: ackTimeout}, nil
	case sysBatchqOrder:
		return batchqSystem{cfg: cfg, trips: trips, ordered: true}, nil
	case sysAsynqPlain:
		return asynqSystem{cfg: cfg, trips: trips}, nil
	case sysAsynqGroup:
		return asynqSystem{cfg: cfg, trips: trips, group: true}, nil
	}
	return nil, fmt.Errorf("unknown system %q (want some of %v)", name, allSystems)
}

// batchqSystem appends with producer.Add and drains with a batchq.Worker
// and a typed handler.
type batchqSystem struct {
	cfg        *config
	trips      *atomic.Int64
	ackTimeout time.Duration // > 0: producer.WithReplicaAcks(ackReplicas, ackTimeout)
	linger     bool          // producer.WithLinger(lingerWait, lingerItems)
	ordered    bool          // the queue has batchq.WithOrderedKeys
}

func (s batchqSystem) client() (rueidis.Client, error) {
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{s.cfg.addr}, DisableCache: true})
	if err != nil {
		return nil, fmt.Errorf("connect to redis: %w", err)
	}
	return rtcount.Into(c, s.trips), nil
}

func (s batchqSystem) producer() (appendFunc, func(), error) {
	c, err := s.client()
	if err != nil {
		return nil, nil, err
	}
	opts := []producer.Option{producer.WithDefaultShards(s.cfg.shards)}
	if s.ackTimeout > 0 {
		opts = append(opts, producer.WithReplicaAcks(ackReplicas, s.ackTimeout))
	}
	if s.linger {
		opts = append(opts, producer.WithLinger(lingerWait, lingerItems))
	}
	p, err := producer.New(c, opts...)
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	add := func(ctx context.Context, key string, it item) error {
		return p.Add(ctx, queueName, key, it)
	}
	return add, c.Close, nil
}

func (s batchqSystem) worker(tr *tracker) (func() error, func(), error) {
	c, err := s.client()
	if err != nil {
		return nil, nil, err
	}
	w, err := batchq.NewWorker(c, batchq.WithConcurrency(s.cfg.concurrency), batchq.WithDefaultShards(s.cfg.shards))
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	var qopts []batchq.QueueOption
	if s.ordered {
		qopts = append(qopts, batchq.WithOrderedKeys())
	}
	batchq.Handle(w, queueName, func(_ context.Context, it item) error {
		tr.handle(it)
		return nil
	}, qopts...)
	ctx, cancel := context.WithCancel(context.Background())
	var done chan struct{} // nil until started
	start := func() error {
		done = make(chan struct{})
		go func() {
			defer close(done)
			_ = w.Run(ctx) // it fails only when misused: no handler, or a second Run
		}()
		return nil
	}
	stop := func() {
		cancel()
		if done != nil {
			<-done
		}
		c.Close()
	}
	return start, stop, nil
}

// asynqSystem enqueues one asynq task per item and processes them with an
// asynq.Server. With group set, each item's task is in the group named by
// its key, and the server aggregates each group into one task holding the
// items as a JSON array.
type asynqSystem struct {
	cfg   *config
	trips *atomic.Int64
	group bool
}

// redis returns the go-redis client asynq.NewClient and asynq.NewServer
// would make of asynq.RedisClientOpt{Addr: addr}, counting its round trips.
func (s asynqSystem) redis() *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: s.cfg.addr})
	c.AddHook(tripHook{s.trips})
	return c
}

// tripHook counts the round trips of a go-redis client: one per command,
// one per pipeline (a MULTI/EXEC block is one).
type tripHook struct{ n *atomic.Int64 }

func (h tripHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h tripHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.n.Add(1)
		return next(ctx, cmd)
	}
}

func (h tripHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.n.Add(1)
		return next(ctx, cmds)
	}
}

func (s asynqSystem) producer() (appendFunc, func(), error) {
	rc := s.redis()
	c := asynq.NewClientFromRedisClient(rc)
	add := func(ctx context.Context, key string, it item) error {
		payload, err := json.Marshal(it)
		if err != nil {
			return err
		}
		var opts []asynq.Option
		if s.group {
			opts = append(opts, asynq.Group(key))
		}
		_, err = c.EnqueueContext(ctx, asynq.NewTask(queueName, payload, opts...))
		return err
	}
	return add, func() { _ = c.Close(); _ = rc.Close() }, nil
}

func (s asynqSystem) worker(tr *tracker) (func() error, func(), error) {
	cfg := asynq.Config{
		Concurrency: s.cfg.concurrency,
		Queues:      map[string]int{"default": 1},
		LogLevel:    asynq.ErrorLevel,
	}
	if s.group {
		cfg.GroupAggregator = asynq.GroupAggregatorFunc(aggregate)
		cfg.GroupMaxSize = s.cfg.groupMaxSize
		cfg.GroupGracePeriod = s.cfg.groupGrace
		cfg.GroupMaxDelay = s.cfg.groupMaxDelay
	}
	rc := s.redis()
	srv := asynq.NewServerFromRedisClient(rc, cfg)
	handler := asynq.HandlerFunc(func(_ context.Context, t *asynq.Task) error {
		switch t.Type() {
		case queueName:
			var it item
			if err := json.Unmarshal(t.Payload(), &it); err != nil {
				return asynq.SkipRetry
			}
			tr.handle(it)
		case batchTaskType:
			var items []item
			if err := json.Unmarshal(t.Payload(), &items); err != nil {
				return asynq.SkipRetry
			}
			for _, it := range items {
				tr.handle(it)
			}
		default:
			return fmt.Errorf("unexpected task type %q: %w", t.Type(), asynq.SkipRetry)
		}
		return nil
	})
	return func() error { return srv.Start(handler) }, func() { srv.Shutdown(); _ = rc.Close() }, nil
}

// aggregate joins the payloads of a group's tasks into one JSON array.
func aggregate(_ string, tasks []*asynq.Task) *asynq.Task {
	n := 2
	for _, t := range tasks {
		n += len(t.Payload()) + 1
	}
	b := make([]byte, 0, n)
	b = append(b, '[')
	for i, t := range tasks {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, t.Payload()...)
	}
	b = append(b, ']')
	return asynq.NewTask(batchTaskType, b)
}
