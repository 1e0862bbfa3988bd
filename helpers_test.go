package batchq_test

import (
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// TestMain does one of two things.
//
// With workerEnv set, this process is not a test run: it is a worker
// process the fault suite started by re-executing the test binary
// (startProc), and workerMain runs the worker until it is told to stop. The
// fault harness, re-exec and worker included, is in faultharness_test.go.
//
// Otherwise it runs the tests, then checks that none left goroutines behind.
func TestMain(m *testing.M) {
	if os.Getenv(workerEnv) != "" {
		os.Exit(workerMain())
	}
	// A client closed after a failed connection (TestWrongPassword) leaves
	// rueidis' delayed topology refresh running for up to half a second; a
	// cluster client whose refresh dropped a node (a master killed,
	// failover_test.go) closes that node's connections 5 s later.
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*call).DelayDo.func1"),
		goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*clusterClient)._refresh.func2"))
}

func newProducer(t testing.TB, b testredis.Backend) *producer.Producer {
	t.Helper()
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func newWorker(t testing.TB, b testredis.Backend, opts ...batchq.Option) *batchq.Worker {
	t.Helper()
	opts = append([]batchq.Option{batchq.WithPrefix(b.Prefix), batchq.WithLogger(zaptest.NewLogger(t))}, opts...)
	w, err := batchq.NewWorker(b.Client, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// runWorker starts w.Run and returns a function that cancels it and waits for it
// to return (also called at cleanup).
func runWorker(t testing.TB, w *batchq.Worker) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("Run did not return 30s after cancel")
		}
	}
	t.Cleanup(stop)
	return stop
}

// eventually polls cond until it holds or timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// pending returns the items still stored under the given keys of a queue
// (shard 0), decoded as ints.
func pending(t testing.TB, b testredis.Backend, queue string, keyNames []string) []int {
	t.Helper()
	sp := keys.For(b.Prefix, queue, 0)
	var out []int
	for _, k := range keyNames {
		v, err := b.Client.Do(context.Background(), b.Client.B().Get().Key(sp.Items(k)).Build()).AsBytes()
		if err != nil {
			continue // missing
		}
		var items []item
		if err := json.Unmarshal(v, &items); err != nil {
			t.Fatalf("key %s holds %s: %v", k, v, err)
		}
		for _, it := range items {
			out = append(out, it.ID)
		}
	}
	return out
}

// leftKeys returns the keys of the test's prefix that hold data, leaving
// out wake lists (a key's name pushed twice, by a sweep racing a slow
// worker, may outlive its items: its second drain finds nothing), the
// registry of queues and the list of live workers.
func leftKeys(t testing.TB, b testredis.Backend) []string {
	t.Helper()
	var out []string
	for _, k := range testredis.Keys(t, b, b.Prefix+":*") {
		if !strings.HasSuffix(k, ":wake") && !strings.Contains(k, ":test:") &&
			k != keys.Registry(b.Prefix) && k != keys.Workers(b.Prefix) && k != keys.WorkerData(b.Prefix) {
			out = append(out, k)
		}
	}
	return out
}

// item is the payload of most tests.
type item struct {
	ID int `json:"id"`
}

// newDeadLetters returns a client of the dead letters under b's prefix.
func newDeadLetters(t testing.TB, b testredis.Backend) *deadletter.Client {
	t.Helper()
	c, err := deadletter.New(b.Client, deadletter.WithPrefix(b.Prefix))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// observed returns a logger that keeps in memory every entry it writes, for
// a test to assert on what was logged, and writes the last 200 of them to
// the test log if the test fails: tests that fault workers make them log
// many expected failures, too many to print when nothing is wrong. opts
// apply to the logger; zap.IncreaseLevel keeps out the entries below a
// level, which a test that inspects every entry it sees (a debug line may
// hold an item) needs.
//
// It is the one observed logger of the root package's tests. The internal
// test outage_internal_test.go (package batchq) cannot call it, and makes a
// bare observer of its own: see there.
func observed(t testing.TB, opts ...zap.Option) (*zap.Logger, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		all := logs.All()
		t.Logf("the last %d of %d log entries:", min(len(all), 200), len(all))
		for _, e := range all[max(len(all)-200, 0):] {
			t.Logf("%s %s %s %v", e.Time.Format("15:04:05.000"), e.Level, e.Message, e.ContextMap())
		}
	})
	return zap.New(core, opts...), logs
}
