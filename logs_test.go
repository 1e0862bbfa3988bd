package batchq_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/testredis"
)

// Tests of what a worker logs: a line per failed batch and per dead letter,
// not per retried item; an outage logged once, not per failed call.

// loggedWorker returns a worker logging to an observer (observed) at info
// level and up.
func loggedWorker(t *testing.T, b testredis.Backend, opts ...batchq.Option) (*batchq.Worker, *observer.ObservedLogs) {
	t.Helper()
	log, logs := observed(t, zap.IncreaseLevel(zap.InfoLevel))
	w := newWorker(t, b, append(opts, batchq.WithLogger(log))...)
	return w, logs
}

func TestFailedBatchIsOneLine(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		addItems(t, b, "q", "k", 0, 5)
		// The decoder quotes the number in its error: it must not reach a log.
		if err := newProducer(t, b).AddRaw(context.Background(), "q", "k", []byte(`{"id":987654321987654321987}`)); err != nil {
			t.Fatal(err)
		}
		w, logs := loggedWorker(t, b)
		var calls atomic.Int32
		batchq.HandleBatch(w, "q", func(ctx context.Context, key string, items []item) error {
			if calls.Add(1) == 1 {
				return errors.New("store down")
			}
			return nil
		}, batchq.WithBackoff(batchq.Constant(10*time.Millisecond)))
		runWorker(t, w)
		eventually(t, 10*time.Second, "the retry", func() bool { return calls.Load() == 2 })
		eventually(t, 5*time.Second, "the failed batch's line", func() bool {
			return logs.FilterMessage("batch failed").Len() == 1
		})
		time.Sleep(100 * time.Millisecond) // the retried batch settles
		failed := logs.FilterMessage("batch failed").All()
		if len(failed) != 1 {
			t.Fatalf("%d lines for failed batches, want 1", len(failed))
		}
		f := failed[0]
		fields := f.ContextMap()
		if f.Level != zapcore.WarnLevel || fields["done"] != int64(0) || fields["retried"] != int64(5) ||
			fields["dead"] != int64(1) || fields["key"] != "k" || !strings.Contains(fields["error"].(string), "store down") {
			t.Fatalf("failed batch logged as %v %v", f.Level, fields)
		}
		dead := logs.FilterMessage("item moved to dead letters").All()
		if len(dead) != 1 || !strings.Contains(dead[0].ContextMap()["error"].(string), `does not decode into the handler's type: field "id"`) {
			t.Fatalf("dead letter lines: %v", dead)
		}
		letters, err := newDeadLetters(t, b).List(context.Background(), "q", 1)
		if err != nil || len(letters) != 1 || !strings.Contains(letters[0].Error, "987654321987654321987") {
			t.Fatalf("the dead letter does not keep the decoder's whole error: %+v %v", letters, err)
		}
		for _, e := range logs.All() {
			if e.Level == zapcore.InfoLevel && strings.Contains(e.Message, "retry") {
				t.Errorf("an info line per retried item: %q %v", e.Message, e.ContextMap())
			}
			for k, v := range e.ContextMap() {
				if s, ok := v.(string); ok && strings.Contains(s, "987654321") {
					t.Errorf("a log line holds a payload in %s: %q", k, s)
				}
			}
		}
	})
}

// A handler that its timeout ends fails with an error that names the
// timeout.
func TestTimeoutErrorNamesTheTimeout(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		addItems(t, b, "q", "k", 0, 1)
		w, logs := loggedWorker(t, b)
		var got atomic.Value
		batchq.Handle(w, "q", func(ctx context.Context, it item) error {
			<-ctx.Done()
			return ctx.Err()
		}, batchq.WithTimeout(50*time.Millisecond), batchq.WithMaxAttempts(1))
		runWorker(t, w)
		dl := newDeadLetters(t, b)
		eventually(t, 10*time.Second, "the dead letter", func() bool {
			ls, err := dl.List(context.Background(), "q", 1)
			if err == nil && len(ls) == 1 {
				got.Store(ls[0].Error)
			}
			return got.Load() != nil
		})
		if msg := got.Load().(string); !strings.Contains(msg, "timed out after 50ms") || !strings.Contains(msg, "deadline exceeded") {
			t.Fatalf("dead letter's error %q does not name the timeout", msg)
		}
		eventually(t, 5*time.Second, "the dead letter's line", func() bool {
			return logs.FilterMessage("item moved to dead letters").Len() == 1
		})
	})
}

// While Redis is down, the worker logs the outage once, not every failed
// call of every shard, and logs when Redis is back.
func TestOutageIsLoggedOnce(t *testing.T) {
	check := func(t *testing.T, b testredis.Backend, down, up func()) {
		w, logs := loggedWorker(t, b, batchq.WithDefaultShards(4))
		var calls atomic.Int32
		batchq.Handle(w, "q", func(ctx context.Context, it item) error {
			calls.Add(1)
			return nil
		})
		runWorker(t, w)
		addItems(t, b, "q", "k", 0, 1)
		eventually(t, 10*time.Second, "the first item", func() bool { return calls.Load() == 1 })
		down()
		eventually(t, 10*time.Second, "the outage line", func() bool {
			return logs.FilterMessageSnippet("Redis call failed").Len() > 0
		})
		time.Sleep(2 * time.Second) // 4 fetch loops, the reaper and the clock sync fail meanwhile
		up()
		eventually(t, 10*time.Second, "the end of the outage", func() bool {
			return logs.FilterMessage("Redis calls succeed again").Len() == 1
		})
		var warns []string
		for _, e := range logs.FilterLevelExact(zapcore.WarnLevel).All() {
			warns = append(warns, e.Message)
		}
		if len(warns) != 1 {
			t.Fatalf("%d warn lines in a 2s outage, want 1: %q", len(warns), warns)
		}
		end := logs.FilterMessage("Redis calls succeed again").All()[0].ContextMap()
		if end["failures"].(int64) < 4 {
			t.Fatalf("the outage's end counts %v failures, want at least one per fetch loop", end["failures"])
		}
		addItems(t, b, "q", "k", 1, 2)
		eventually(t, 10*time.Second, "an item after the outage", func() bool { return calls.Load() == 2 })
	}
	t.Run("miniredis", func(t *testing.T) {
		// Every command fails meanwhile. (A miniredis closed and restarted
		// never answers a BLPOP again, even on a list that holds items.)
		b := testredis.Mini(t)
		check(t, b, func() { b.Mini.SetError("LOADING Redis is loading the dataset in memory") }, func() { b.Mini.SetError("") })
	})
	t.Run("redis", func(t *testing.T) {
		srv := testredis.Start(t)
		b := srv.Backend(t)
		check(t, b, srv.Stop, func() { srv.Restart(t) })
	})
}

// A call of many items that fails for good is one batch line and a bounded
// number of dead letter lines; a panic's value is logged at debug level
// only, since it may hold an item.
func TestManyDeadLettersAreLoggedBounded(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		addItems(t, b, "q", "k", 0, 100)
		w, logs := loggedWorker(t, b)
		batchq.HandleBatch(w, "q", func(ctx context.Context, key string, items []item) error {
			panic("secret-payload")
		}, batchq.WithMaxAttempts(1))
		runWorker(t, w)
		eventually(t, 10*time.Second, "the batch line", func() bool { return logs.FilterMessage("batch failed").Len() == 1 })
		fields := logs.FilterMessage("batch failed").All()[0].ContextMap()
		if fields["dead"] != int64(100) || fields["dead_not_logged"] != int64(80) {
			t.Fatalf("batch line %v, want 100 dead and 80 not logged", fields)
		}
		if n := logs.FilterMessage("item moved to dead letters").Len(); n != 20 {
			t.Fatalf("%d dead letter lines, want 20", n)
		}
		for _, e := range logs.All() {
			for k, v := range e.ContextMap() {
				if s, ok := v.(string); ok && strings.Contains(s, "secret-payload") {
					t.Errorf("%s line %q holds the panic's value in %s", e.Level, e.Message, k)
				}
			}
		}
	})
}
