package protocol_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
)

// A retried item is due after its delay, comes back in a retry batch with
// one more attempt and its error, and its bytes unchanged.
func TestRetryIsDueAfterItsDelay(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b)
		const item = `{"z": 1, "a":"é\/😀", "n":12345678901234567890}`
		const delay = 50 * time.Millisecond
		addRaw(t, p, "k", item, `2`)
		bt := fetchOne(t, c)
		start := time.Now() // Settle's clock reads at least this
		settle(t, c, bt, protocol.Outcome{Kind: protocol.Retry, Err: errors.New("boom: it failed"), Delay: delay}, done)
		noLeases(t, b)

		var rb *protocol.Batch
		eventually(t, 5*time.Second, "the retry to be fetched", func() bool {
			f, err := c.Fetch(ctx, queue, 0, 10)
			if err != nil {
				t.Fatal(err)
			}
			if len(f.Batches) == 0 {
				if f.NextRetry.IsZero() {
					t.Fatal("no batch and no next due time while a retry is pending")
				}
				return false
			}
			// Due times are whole milliseconds, rounded down: a retry may
			// fall due up to 1ms before its delay has passed.
			if el := time.Since(start); el < delay-time.Millisecond {
				t.Fatalf("retry fetched %v after Settle, before its %v delay", el, delay)
			}
			if len(f.Batches) != 1 {
				t.Fatalf("got %s, want one retry batch", describe(f))
			}
			rb = f.Batches[0]
			return true
		})
		if !rb.Retry() || rb.Key != "" {
			t.Fatalf("want a retry batch, got key %q", rb.Key)
		}
		checkItems(t, rb, item)
		if it := rb.Items[0]; it.Key != "k" || it.Attempt != 1 || it.LastError != "boom: it failed" {
			t.Fatalf("retry item: key %q attempt %d last error %q", it.Key, it.Attempt, it.LastError)
		}

		// Failing again counts a second attempt; a zero delay is due at once.
		settle(t, c, rb, protocol.Outcome{Kind: protocol.Retry, Err: errors.New("again")})
		rb = fetchOne(t, c)
		checkItems(t, rb, item)
		if it := rb.Items[0]; it.Attempt != 2 || it.LastError != "again" {
			t.Fatalf("second retry: attempt %d last error %q", it.Attempt, it.LastError)
		}
		settle(t, c, rb, done)
		noLeases(t, b)
		f := fetchNone(t, c)
		if !f.NextRetry.IsZero() || !f.NextKey.IsZero() {
			t.Fatalf("nothing pending, but NextRetry is %v, NextKey %v", f.NextRetry, f.NextKey)
		}
	})
}

// With a clock under the test's control: a retry is not due one millisecond
// early, Fetch reports when it is due, and it is fetched at that time.
func TestRetryDueTimeIsExact(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		c := newConsumer(t, b)
		clk := withFakeClock(c)
		addRaw(t, p, "k", `"x"`)
		bt := fetchOne(t, c)
		due := clk.Now().Add(50 * time.Millisecond)
		settle(t, c, bt, protocol.Outcome{Kind: protocol.Retry, Err: errors.New("e"), Delay: 50 * time.Millisecond})
		clk.Advance(49 * time.Millisecond)
		f := fetchNone(t, c)
		if !f.NextRetry.Equal(due) {
			t.Fatalf("NextRetry is %v, want the retry's due time %v", f.NextRetry, due)
		}
		clk.Advance(time.Millisecond)
		rb := fetchOne(t, c)
		if !rb.Retry() || rb.Items[0].Attempt != 1 {
			t.Fatalf("got retry=%v attempt %d", rb.Retry(), rb.Items[0].Attempt)
		}
		settle(t, c, rb, done)
	})
}

// A retry envelope that does not decode (batchq did not write it) goes to
// dead letters with a reason; it never reaches a handler, and the good
// retries claimed with it are delivered.
func TestUndecodableRetryGoesToDeadLetters(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b)
		r := b.Client
		sp := space(b)
		addRaw(t, p, "k", `"good"`)
		settle(t, c, fetchOne(t, c), protocol.Outcome{Kind: protocol.Retry, Err: errors.New("e")})
		plant := func(id, env string) {
			t.Helper()
			for _, cmd := range []rueidis.Completed{
				r.B().Hset().Key(sp.RetryData()).FieldValue().FieldValue(id, env).Build(),
				r.B().Zadd().Key(sp.Retry()).ScoreMember().ScoreMember(0, id).Build(),
			} {
				if err := r.Do(ctx, cmd).Error(); err != nil {
					t.Fatal(err)
				}
			}
		}
		plant("bad1", `not json`)

		f := fetch(t, c, 10)
		if len(f.Batches) != 1 || len(f.Dead) != 1 {
			t.Fatalf("got %s, want the good retry and one dead letter", describe(f))
		}
		rb := f.Batches[0]
		checkItems(t, rb, `"good"`)
		if d := f.Dead[0]; !d.Corrupt || d.ID != "bad1" || string(d.Item) != `"not json"` || !strings.Contains(d.Error, "retry") {
			t.Fatalf("dead letter %+v", d)
		}
		settle(t, c, rb, done)
		noLeases(t, b)

		// Alone in a fetch, it leaves no lease behind.
		plant("bad2", `{"k":"k","a":1}`)
		f = fetch(t, c, 10)
		if len(f.Batches) != 0 || len(f.Dead) != 1 || f.Dead[0].ID != "bad2" {
			t.Fatalf("got %s, want one dead letter", describe(f))
		}
		noLeases(t, b)
		ds := deadLetters(t, c)
		if len(ds) != 2 {
			t.Fatalf("dead letters %+v, want 2", ds)
		}
		for _, d := range ds {
			if !d.Corrupt {
				t.Errorf("dead letter %s not marked corrupt", d.ID)
			}
			if _, err := dl(c).Requeue(ctx, d); !errors.Is(err, deadletter.ErrNotRequeueable) {
				t.Errorf("RequeueDead of %s: got %v, want ErrNotRequeueable", d.ID, err)
			}
		}
		fetchNone(t, c)
	})
}

// A settle that stores a retry due before the next periodic claim pushes a
// hint (an empty name) on the wake list, so that a worker claims at once
// and learns when the retry is due; a retry due later pushes none.
func TestSoonRetryPushesHint(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b)
		wake := func() []string {
			t.Helper()
			names, err := b.Client.Do(ctx, b.Client.B().Lrange().Key(space(b).Wake()).Start(0).Stop(-1).Build()).AsStrSlice()
			if err != nil {
				t.Fatal(err)
			}
			return names
		}
		boom := errors.New("boom")
		addRaw(t, p, "k", `1`)
		settle(t, c, fetchOne(t, c), protocol.Outcome{Kind: protocol.Retry, Err: boom, Delay: time.Hour})
		if names := wake(); len(names) != 0 {
			t.Fatalf("wake list %q after a retry due in an hour, want none", names)
		}
		addRaw(t, p, "k", `2`)
		settle(t, c, fetchOne(t, c), protocol.Outcome{Kind: protocol.Retry, Err: boom, Delay: 50 * time.Millisecond})
		if names := wake(); len(names) != 1 || names[0] != "" {
			t.Fatalf("wake list %q after a retry due in 50ms, want one hint", names)
		}
	})
}
