package producer_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// A full key refuses the append with a typed error and stores nothing; the
// item count follows the key through drains, returns and reaps.
func TestKeyCaps(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithMaxKeyItems(5), producer.WithMaxKeyBytes(64))
		c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix), protocol.WithLeaseTTL(100*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		add := func(items ...int) error {
			raws := make([]json.RawMessage, len(items))
			for i, it := range items {
				raws[i], _ = json.Marshal(it)
			}
			return p.AddRaw(ctx, "q", "k", raws...)
		}
		full := func(err error, items, bytes int64) {
			t.Helper()
			var kf *producer.KeyFullError
			if !errors.Is(err, producer.ErrKeyFull) || !errors.As(err, &kf) {
				t.Fatalf("got %v, want ErrKeyFull", err)
			}
			if kf.Items != items || kf.Bytes != bytes || kf.MaxItems != 5 || kf.MaxBytes != 64 {
				t.Fatalf("KeyFullError %+v, want %d items %d bytes", kf, items, bytes)
			}
		}
		must := func(err error) {
			t.Helper()
			if err != nil {
				t.Fatal(err)
			}
		}
		must(add(1, 2, 3))
		full(add(4, 5, 6), 3, 7) // [1,2,3] is 7 bytes
		must(add(4, 5))
		full(add(6), 5, 11)
		if got, _ := get(t, b, "q", "k"); got != "[1,2,3,4,5]" {
			t.Fatalf("refused appends changed the key: %s", got)
		}
		// The byte cap: one long string item.
		must(p.AddRaw(ctx, "q", "s", json.RawMessage(`"`+strings.Repeat("x", 50)+`"`)))
		err = p.AddRaw(ctx, "q", "s", json.RawMessage(`"`+strings.Repeat("y", 10)+`"`))
		if !errors.Is(err, producer.ErrKeyFull) {
			t.Fatalf("byte cap: got %v", err)
		}

		// One call that alone passes a cap is refused before Redis.
		if err := add(1, 2, 3, 4, 5, 6); !errors.Is(err, producer.ErrTooMany) {
			t.Fatalf("6 items against a cap of 5: got %v, want ErrTooMany", err)
		}
		if err := p.AddRaw(ctx, "q", "t", json.RawMessage(`"`+strings.Repeat("z", 70)+`"`)); !errors.Is(err, producer.ErrTooMany) {
			t.Fatalf("72 bytes against a cap of 64: got %v, want ErrTooMany", err)
		}

		// Drained: the count starts again from zero.
		// fetchKey fetches until it holds k's batch, putting any other
		// batch back.
		fetchKey := func() *protocol.Batch {
			t.Helper()
			for range 20 {
				f, err := c.Fetch(ctx, "q", 0, 10)
				must(err)
				var kb *protocol.Batch
				for _, bt := range f.Batches {
					if bt.Key == "k" {
						kb = bt
						continue
					}
					must(c.Settle(ctx, bt, nil)) // nil: all unfinished
				}
				if kb != nil {
					return kb
				}
				time.Sleep(10 * time.Millisecond)
			}
			t.Fatal("key k not fetched")
			return nil
		}
		bt := fetchKey()
		must(add(6, 7, 8, 9, 10))
		full(add(11), 5, 12)
		must(c.Settle(ctx, bt, []protocol.Outcome{{Kind: protocol.Done}, {Kind: protocol.Done}, {Kind: protocol.Done}, {Kind: protocol.Done}, {Kind: protocol.Done}}))

		// Unfinished items come back with their count.
		bt = fetchKey()
		must(c.Settle(ctx, bt, []protocol.Outcome{{Kind: protocol.Done}, {Kind: protocol.Done}, {Kind: protocol.Done}}))
		if got, _ := get(t, b, "q", "k"); got != "[9,10]" {
			t.Fatalf("after returning two items the key holds %s", got)
		}
		must(add(11, 12, 13))
		full(add(14), 5, 15)

		// A reaped batch comes back with its count.
		bt = fetchKey()
		_ = bt // abandoned, as by a crashed worker
		must(add(20))
		time.Sleep(150 * time.Millisecond)
		if n, err := c.Reap(ctx, "q", 0); err != nil || n != 1 {
			t.Fatalf("Reap: %d, %v", n, err)
		}
		if got, _ := get(t, b, "q", "k"); got != "[9,10,11,12,13,20]" {
			t.Fatalf("after the reap the key holds %s", got)
		}
		full(add(21), 6, 18)
	})
}

// A key whose item count is not an integer (written by something other
// than batchq) refuses appends with ErrNotArray and stores nothing, alone:
// the other keys of a lingering producer's call are stored.
func TestCorruptCountRefusesOnlyItsKey(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithLinger(time.Second, 2))
		must := func(err error) {
			t.Helper()
			if err != nil {
				t.Fatal(err)
			}
		}
		must(p.AddRaw(ctx, "q", "bad", json.RawMessage(`1`), json.RawMessage(`2`))) // maxItems 2: sent at once
		sp := keys.For(b.Prefix, "q", 0)
		must(b.Client.Do(ctx, b.Client.B().Set().Key(sp.Count("bad")).Value("many").Build()).Error())

		errs := make(chan error, 2)
		go func() { errs <- p.AddRaw(ctx, "q", "bad", json.RawMessage(`3`)) }()
		go func() { errs <- p.AddRaw(ctx, "q", "good", json.RawMessage(`4`)) }()
		var notArray, ok int
		for range 2 {
			switch err := <-errs; {
			case errors.Is(err, producer.ErrNotArray):
				notArray++
			case err == nil:
				ok++
			default:
				t.Fatalf("append: %v", err)
			}
		}
		if notArray != 1 || ok != 1 {
			t.Fatalf("%d ErrNotArray and %d stored, want one each", notArray, ok)
		}
		if v, _ := get(t, b, "q", "bad"); v != "[1,2]" {
			t.Fatalf("the key with a corrupt count holds %s", v)
		}
		if v, _ := get(t, b, "q", "good"); v != "[4]" {
			t.Fatalf("the other key holds %s", v)
		}
	})
}
