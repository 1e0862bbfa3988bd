package batchq_test

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// A producer and a worker given different default shard counts (or none)
// agree on the queue's, the registry's: whichever writes the queue first
// records it, and every item is handled. Before, a producer with 4 shards
// and a worker with 1 left three items in four in shards nobody drained.
func TestRegistryDecidesShards(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		for _, tt := range []struct {
			name             string
			producer, worker int // WithDefaultShards; 0: none
			producerFirst    bool
		}{
			{"producer 4 first, worker default", 4, 0, true},
			{"worker 4 first, producer default", 0, 4, false},
			{"producer 3 first, worker 5", 3, 5, true},
		} {
			t.Run(tt.name, func(t *testing.T) {
				ctx := context.Background()
				queue := "q" + strconv.Itoa(tt.producer) + strconv.Itoa(tt.worker)
				var popts []producer.Option
				if tt.producer > 0 {
					popts = append(popts, producer.WithDefaultShards(tt.producer))
				}
				p, err := producer.New(b.Client, append(popts, producer.WithPrefix(b.Prefix))...)
				must(t, err)
				var wopts []batchq.Option
				if tt.worker > 0 {
					wopts = append(wopts, batchq.WithDefaultShards(tt.worker))
				}
				c := &calls{}
				first := tt.producer
				if !tt.producerFirst {
					// A worker records the queue, and stops before the producer
					// appends.
					first = tt.worker
					w0 := newWorker(t, b, wopts...)
					batchq.Handle(w0, queue, c.handle)
					stop := runWorker(t, w0)
					in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
					must(t, err)
					eventually(t, 10*time.Second, "the worker records the queue", func() bool {
						_, err := in.Queue(ctx, queue)
						return err == nil
					})
					stop()
				}
				const n = 40
				for i := range n {
					must(t, p.Add(ctx, queue, "k"+strconv.Itoa(i), item{ID: i}))
				}
				// Each key is in its shard under the first writer's count.
				for i := range n {
					k := "k" + strconv.Itoa(i)
					if got := testredis.Keys(t, b, keys.For(b.Prefix, queue, keys.Shard(k, first)).Items(k)); len(got) != 1 {
						t.Fatalf("key %s is not in its shard of %d: %v", k, first, got)
					}
				}
				w := newWorker(t, b, wopts...)
				batchq.Handle(w, queue, c.handle)
				runWorker(t, w)
				eventually(t, 10*time.Second, "every item handled", func() bool { return c.handled() == n })
				c.checkOnce(t)
				in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
				must(t, err)
				if q, err := in.Queue(ctx, queue); err != nil || q.Shards != first {
					t.Fatalf("the registry holds %+v, %v; want the first writer's %d shards", q, err, first)
				}
			})
		}
	})
}

// Growing a queue online, under load, from 2 shards to 8: the running
// workers drain the new shards within seconds, the running producer routes
// by the new count within seconds, and every item is handled exactly once.
func TestGrowShardsUnderLoad(t *testing.T) {
	testredis.Each(t, testGrowShards)
}

// The same on a Redis Cluster of three masters.
func TestGrowShardsOnCluster(t *testing.T) {
	testGrowShards(t, testredis.Cluster(t))
}

func testGrowShards(t *testing.T, b testredis.Backend) {
	ctx := context.Background()
	const queue = "grow"
	in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
	must(t, err)
	must(t, in.CreateQueue(ctx, queue, 2))

	c := &calls{}
	var logs []func(string) int
	var stops []func()
	startWorker := func() {
		log, observedLogs := observed(t)
		w := newWorker(t, b, batchq.WithLogger(log), batchq.WithConcurrency(8))
		batchq.Handle(w, queue, c.handle)
		stops = append(stops, runWorker(t, w))
		logs = append(logs, func(msg string) int { return observedLogs.FilterMessage(msg).Len() })
	}
	startWorker()
	startWorker()

	// Four appenders, each with its own ids, over 200 keys, until stopped.
	p := newProducer(t, b)
	var next atomic.Int64
	stopLoad := make(chan struct{})
	var load sync.WaitGroup
	for range 4 {
		load.Go(func() {
			for {
				select {
				case <-stopLoad:
					return
				default:
				}
				i := next.Add(1) - 1
				if err := p.Add(ctx, queue, "k"+strconv.FormatInt(i%200, 10), item{ID: int(i)}); err != nil {
					t.Errorf("Add: %v", err)
					return
				}
				time.Sleep(time.Millisecond)
			}
		})
	}
	time.Sleep(time.Second)
	grownAt := time.Now()
	old, err := in.SetShards(ctx, queue, 8)
	if err != nil || old != 2 {
		t.Fatalf("SetShards: %d, %v", old, err)
	}
	eventually(t, 10*time.Second, "both workers drain the new shards", func() bool {
		return logs[0]("the queue has more shards: draining them too") == 1 && logs[1]("the queue has more shards: draining them too") == 1
	})
	t.Logf("the workers drained 8 shards %v after the growth", time.Since(grownAt).Round(time.Millisecond))
	time.Sleep(2 * time.Second)
	close(stopLoad)
	load.Wait()
	added := int(next.Load())
	eventually(t, 30*time.Second, "every item handled", func() bool { return c.handled() == added })
	c.checkOnce(t)
	t.Logf("%d items appended under load, each handled once", added)

	// The producer routes by 8 now: with the workers stopped, keys land in
	// the shards the growth added.
	for _, stop := range stops {
		stop()
	}
	for i := range 100 {
		must(t, p.Add(ctx, queue, "after"+strconv.Itoa(i), item{ID: added + i}))
	}
	inNew := 0
	for shard := 2; shard < 8; shard++ {
		inNew += len(testredis.Keys(t, b, keys.For(b.Prefix, queue, shard).Items("after*")))
	}
	if inNew == 0 {
		t.Fatal("no key of 100 appended after the growth is in the new shards: the producer still routes by 2")
	}
	st, err := in.Stats(ctx, queue)
	must(t, err)
	if st.Shards != 8 || st.PendingItems != 100 {
		t.Fatalf("stats %+v, want 8 shards and 100 pending items", st)
	}
	startWorker()
	eventually(t, 30*time.Second, "the items appended after the growth handled", func() bool { return c.handled() == added+100 })
	c.checkOnce(t)
}

// A registry value that is not a shard count (another program wrote "0")
// strands nothing: the producer's first append records the default over it,
// and a worker drains every item.
func TestCorruptShardCountIsReplaced(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		must(t, b.Client.Do(ctx, b.Client.B().Hset().Key(keys.Registry(b.Prefix)).FieldValue().FieldValue("q", "0").Build()).Error())
		p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(3))
		must(t, err)
		const n = 30
		for i := range n {
			must(t, p.Add(ctx, "q", "k"+strconv.Itoa(i), item{ID: i}))
		}
		w := newWorker(t, b)
		c := &calls{}
		batchq.Handle(w, "q", c.handle)
		runWorker(t, w)
		eventually(t, 10*time.Second, "every item handled", func() bool { return c.handled() == n })
		c.checkOnce(t)
		if v, err := b.Client.Do(ctx, b.Client.B().Hget().Key(keys.Registry(b.Prefix)).Field("q").Build()).ToString(); err != nil || v != "3" {
			t.Fatalf("the registry holds %q, %v; want 3", v, err)
		}
	})
}

// A worker started while Redis is down takes its queues' shard counts once
// Redis answers: it drains every shard of a queue recorded with more shards
// than the worker's default.
func TestWorkerStartedWhileRedisIsDown(t *testing.T) {
	srv := testredis.Start(t, "--appendonly", "yes", "--appendfsync", "always")
	b := srv.Backend(t)
	ctx := context.Background()
	in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
	must(t, err)
	must(t, in.CreateQueue(ctx, "q", 3))
	srv.Stop()
	log, logs := observed(t)
	w := newWorker(t, b, batchq.WithLogger(log))
	c := &calls{}
	batchq.Handle(w, "q", c.handle)
	runWorker(t, w)
	eventually(t, 10*time.Second, "the worker to say it cannot read the counts", func() bool {
		return logs.FilterMessage("cannot read the queues' shard counts from the registry; taking no work until it can (every 2s)").Len() == 1
	})
	srv.Restart(t)
	p := newProducer(t, b)
	const n = 30
	eventually(t, 10*time.Second, "an append to succeed", func() bool { return p.Add(ctx, "q", "k0", item{ID: 0}) == nil })
	for i := 1; i < n; i++ {
		must(t, p.Add(ctx, "q", "k"+strconv.Itoa(i), item{ID: i}))
	}
	eventually(t, 15*time.Second, "every item handled", func() bool { return c.handled() == n })
	c.checkOnce(t)
	if q, err := in.Queue(ctx, "q"); err != nil || q.Shards != 3 {
		t.Fatalf("queue %+v, %v; want its 3 shards kept", q, err)
	}
}

// A queue forgotten and recorded anew with fewer shards, by a new first
// writer, is raised again by a running producer that still routes by more:
// the items it routes land in shards the workers drain.
func TestForgottenQueueIsRaisedAgain(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
		must(t, err)
		must(t, in.CreateQueue(ctx, "q", 4))
		old := newProducer(t, b)
		must(t, old.Add(ctx, "q", "warm", item{ID: -1})) // old routes by 4 from now on
		w0 := newWorker(t, b)
		c0 := &calls{}
		batchq.Handle(w0, "q", c0.handle)
		stop := runWorker(t, w0)
		eventually(t, 10*time.Second, "the first item handled", func() bool { return c0.handled() == 1 })
		stop()
		eventually(t, 10*time.Second, "the queue forgotten", func() bool { return in.Forget(ctx, "q") == nil })
		fresh, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(1))
		must(t, err)
		must(t, fresh.Add(ctx, "q", "k0", item{ID: 0}))
		if q, err := in.Queue(ctx, "q"); err != nil || q.Shards != 1 {
			t.Fatalf("queue %+v, %v; want it recorded anew with 1 shard", q, err)
		}
		time.Sleep(protocol.ShardsEvery + 100*time.Millisecond) // old reads the count again at its next append
		const n = 30
		for i := 1; i < n; i++ {
			must(t, old.Add(ctx, "q", "k"+strconv.Itoa(i), item{ID: i}))
		}
		if q, err := in.Queue(ctx, "q"); err != nil || q.Shards != 4 {
			t.Fatalf("queue %+v, %v; want it raised back to 4 shards", q, err)
		}
		w := newWorker(t, b)
		c := &calls{}
		batchq.Handle(w, "q", c.handle)
		runWorker(t, w)
		eventually(t, 10*time.Second, "every item handled", func() bool { return c.handled() == n })
		c.checkOnce(t)
	})
}
