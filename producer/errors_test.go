package producer_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// Every error a caller gets from the producer starts with "producer: ",
// once: options, New, each way an append fails, the name checks and Close.
func TestErrorsStartWithPackageName(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		newErr := func(opts ...producer.Option) error {
			_, err := producer.New(b.Client, opts...)
			return err
		}
		p := newProducer(t, b, producer.WithMaxKeyItems(1), producer.WithMaxItemBytes(64))
		if err := p.Add(ctx, "q", "full", 1); err != nil {
			t.Fatal(err)
		}
		if err := b.Client.Do(ctx, b.Client.B().Set().Key(keys.For(b.Prefix, "q", 0).Items("foreign")).Value("x").Build()).Error(); err != nil {
			t.Fatal(err)
		}
		closed := newProducer(t, b, producer.WithLinger(time.Millisecond, 10))
		if err := closed.Close(ctx); err != nil {
			t.Fatal(err)
		}
		var nilClient error
		if _, err := producer.New(nil); err != nil {
			nilClient = err
		}
		for _, c := range []struct {
			name string
			err  error
			want string // the whole message; "" checks the prefix only
		}{
			{"nil client", nilClient, "producer: nil client"},
			{"shards", newErr(producer.WithDefaultShards(0)), ""},
			{"max item bytes", newErr(producer.WithMaxItemBytes(0)), "producer: max item bytes must be positive, got 0"},
			{"max key items", newErr(producer.WithMaxKeyItems(-1)), ""},
			{"max key bytes", newErr(producer.WithMaxKeyBytes(-1)), ""},
			{"prefix", newErr(producer.WithPrefix("a{b")), ""},
			{"linger", newErr(producer.WithLinger(-1, 1)), "producer: linger wants 0 <= wait <= 1s and maxItems >= 1, got -1ns and 1"},
			{"logger", newErr(producer.WithLogger(nil)), "producer: nil logger"},
			{"flush policy", newErr(producer.WithFlushPolicy("q", producer.FlushPolicy{MaxAge: -1})), ""},
			{"flush policy queue", newErr(producer.WithFlushPolicy("a:b", producer.FlushPolicy{})), ""},
			{"queue name", p.Add(ctx, "a:b", "k", 1), ""},
			{"key", p.Add(ctx, "q", "", 1), ""},
			{"CheckQueue", producer.CheckQueue("a{b}"), ""},
			{"CheckKey", producer.CheckKey("a\nb"), ""},
			{"invalid JSON", p.AddRaw(ctx, "q", "k", json.RawMessage(`{`)), "producer: append to q/k: item 0: invalid JSON"},
			{"marshal", p.Add(ctx, "q", "k", make(chan int)), ""},
			{"too large", p.Add(ctx, "q", "k", strings.Repeat("x", 100)), "producer: append to q/k: item 0: item too large: 102 bytes, limit 64"},
			{"too deep", p.AddRaw(ctx, "q", "k", json.RawMessage(nestedArray(producer.MaxItemDepth+1))), ""},
			{"too many", p.Add(ctx, "q", "k", 1, 2), "producer: append to q/k: the items of one call pass the key's cap: 2 items, 5 bytes; cap 1 items, 67108864 bytes"},
			{"key full", p.Add(ctx, "q", "full", 2), "producer: append to q/full: key full: it holds 1 items and 3 bytes; adding 1 items would pass the cap of 1 items or 67108864 bytes"},
			{"not an array", p.Add(ctx, "q", "foreign", 1), ""},
			{"context", p.Add(canceled(), "q", "other", 1), "producer: append to q/other: context canceled"},
			{"closed", closed.Add(ctx, "q", "k", 1), "producer: append to q/k: producer closed"},
		} {
			if c.err == nil {
				t.Errorf("%s: no error", c.name)
				continue
			}
			msg := c.err.Error()
			if !strings.HasPrefix(msg, "producer: ") || strings.Count(msg, "producer:") != 1 || strings.Contains(msg, "batchq:") {
				t.Errorf("%s: %q does not start with \"producer: \" exactly once", c.name, msg)
			}
			if c.want != "" && msg != c.want {
				t.Errorf("%s:\n got %q\nwant %q", c.name, msg, c.want)
			}
		}
	})
}
