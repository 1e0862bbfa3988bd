package protocol_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
)

// ListRetries reads what a settle stored: key, attempts, last error, due
// time and the item byte for byte, soonest first; a stored form another
// program wrote is listed as corrupt.
func TestListRetries(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b)
		const item = `{"z": 1, "a":"é\/😀"}`
		addRaw(t, p, "k", item, `2`)
		bt := fetchOne(t, c)
		before := c.Now()
		settle(t, c, bt,
			protocol.Outcome{Kind: protocol.Retry, Err: errors.New("later"), Delay: time.Hour},
			protocol.Outcome{Kind: protocol.Retry, Err: errors.New("sooner"), Delay: time.Minute})
		sp := space(b)
		if err := b.Client.Do(ctx, b.Client.B().Zadd().Key(sp.Retry()).ScoreMember().ScoreMember(float64(before.Add(2*time.Hour).UnixMilli()), "odd").Build()).Error(); err != nil {
			t.Fatal(err)
		}
		if err := b.Client.Do(ctx, b.Client.B().Hset().Key(sp.RetryData()).FieldValue().FieldValue("odd", "not json").Build()).Error(); err != nil {
			t.Fatal(err)
		}

		ws, counts, err := protocol.ListRetries(ctx, b.Client, queue, []keys.Space{sp}, 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(counts) != 1 || counts[0] != 3 || len(ws) != 3 {
			t.Fatalf("ListRetries: %+v, counts %v", ws, counts)
		}
		sooner, later, odd := ws[0], ws[1], ws[2]
		if sooner.Key != "k" || string(sooner.Item) != `2` || sooner.Attempts != 1 || sooner.Error != "sooner" || sooner.Queue != queue {
			t.Errorf("first retry: %+v", sooner)
		}
		if string(later.Item) != item || later.Error != "later" || !later.Due.After(sooner.Due) {
			t.Errorf("second retry: %+v", later)
		}
		if d := sooner.Due.Sub(before.Truncate(time.Millisecond)); d < time.Minute || d > time.Minute+5*time.Second {
			t.Errorf("due %v after the settle, want a minute", d)
		}
		if !odd.Corrupt || odd.ID != "odd" || string(odd.Item) != `"not json"` {
			t.Errorf("a retry another program wrote: %+v", odd)
		}

		// The limit applies per shard; the count does not.
		ws, counts, err = protocol.ListRetries(ctx, b.Client, queue, []keys.Space{sp}, 1)
		if err != nil || len(ws) != 1 || ws[0].Error != "sooner" || counts[0] != 3 {
			t.Fatalf("ListRetries with limit 1: %+v, %v, %v", ws, counts, err)
		}
	})
}
