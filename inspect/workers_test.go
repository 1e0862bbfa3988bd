package inspect_test

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/testredis"
)

// A running worker is listed with what it announced at start: name, host,
// process, queues, shards, concurrency, start and last seen; once its Run
// returns it is not. On miniredis, a real redis-server and a Redis Cluster,
// where the announcement shares the registry's hash slot.
func TestWorkers(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) { testWorkers(t, b, 1) })
	t.Run("cluster", func(t *testing.T) { testWorkers(t, testredis.Cluster(t), 4) })
}

func testWorkers(t *testing.T, b testredis.Backend, shards int) {
	ctx := context.Background()
	in, err := inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
	must(t, err)
	if lw, err := in.Workers(ctx); err != nil || len(lw.Workers) != 0 || lw.Now.IsZero() {
		t.Fatalf("Workers before any: %+v, %v", lw, err)
	}

	w, err := batchq.NewWorker(b.Client, batchq.WithPrefix(b.Prefix), batchq.WithDefaultShards(shards),
		batchq.WithName("w-1"), batchq.WithConcurrency(7))
	must(t, err)
	for _, q := range []string{"emails", "orders"} {
		batchq.Handle(w, q, func(context.Context, int) error { return nil })
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- w.Run(runCtx) }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			must(t, err)
		case <-time.After(30 * time.Second):
			t.Fatal("Run did not return")
		}
	}
	defer stop()

	var lw inspect.LiveWorkers
	for deadline := time.Now().Add(10 * time.Second); len(lw.Workers) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the worker was not listed within 10s of its start")
		}
		lw, err = in.Workers(ctx)
		must(t, err)
	}
	host, _ := os.Hostname()
	got := lw.Workers
	if len(got) != 1 {
		t.Fatalf("Workers: %+v", got)
	}
	g := got[0]
	queues := slices.Sorted(slices.Values(g.Queues))
	if g.Name != "w-1" || g.Host != host || g.PID != os.Getpid() || !slices.Equal(queues, []string{"emails", "orders"}) ||
		g.Concurrency != 7 || g.Corrupt {
		t.Errorf("Workers: %+v", g)
	}
	// Times on the server's clock, which is this machine's. Workers reads
	// the clock first: an announcement may land between that and the list.
	if g.Started.Before(start.Add(-time.Second)) || g.LastSeen.Before(g.Started) || g.LastSeen.After(lw.Now.Add(time.Second)) ||
		lw.Now.Sub(g.LastSeen) > 10*time.Second {
		t.Errorf("started %v, last seen %v, now %v (Run started %v)", g.Started, g.LastSeen, lw.Now, start)
	}
	// The queues are registered by the same call.
	qs, err := in.Queues(ctx)
	must(t, err)
	if len(qs) != 2 || qs[0].Shards != shards {
		t.Errorf("Queues: %+v", qs)
	}

	stop()
	if lw, err := in.Workers(ctx); err != nil || len(lw.Workers) != 0 {
		t.Errorf("Workers after Run returned: %+v, %v", lw, err)
	}
}
