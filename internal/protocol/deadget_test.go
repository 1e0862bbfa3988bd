package protocol_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// Get finds dead letters by id in whichever shard holds them, in the order
// asked, each once; ids that name none are left out; a letter found by id
// can be requeued.
func TestGetDeadByID(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		const shards = 3
		p := newProducer(t, b, producer.WithDefaultShards(shards))
		c := newConsumer(t, b, protocol.WithDefaultShards(shards))
		byKey := map[string]string{"a": `1`, "b": `2`, "c": `3`, "d": `4`}
		for k, it := range byKey {
			addRaw(t, p, k, it)
		}
		for shard := range shards {
			f, err := c.Fetch(ctx, queue, shard, 10)
			must(t, err)
			for _, bt := range f.Batches {
				settle(t, c, bt, protocol.Outcome{Kind: protocol.Dead, Err: errors.New("boom " + bt.Key)})
			}
		}
		all, err := dl(c).List(ctx, queue, 10)
		must(t, err)
		if len(all) != 4 {
			t.Fatalf("%d dead letters, want 4", len(all))
		}
		shardsUsed := map[int]bool{}
		for _, d := range all {
			shardsUsed[d.Shard] = true
		}
		if len(shardsUsed) < 2 {
			t.Fatalf("the letters are all in one shard: the test proves nothing: %+v", all)
		}
		// A stored form another program wrote, in the last shard.
		sp := keys.For(b.Prefix, queue, shards-1)
		must(t, b.Client.Do(ctx, b.Client.B().Hset().Key(sp.DeadData()).FieldValue().FieldValue("odd", "not json").Build()).Error())

		want := []deadletter.Letter{all[3], all[0], all[2]}
		got, err := dl(c).Get(ctx, queue, all[3].ID, "nosuch", all[0].ID, all[3].ID, all[2].ID, "odd")
		must(t, err)
		if len(got) != 4 || !got[3].Corrupt || got[3].ID != "odd" || got[3].Shard != shards-1 {
			t.Fatalf("Get: %+v", got)
		}
		for i, w := range want {
			if g := got[i]; g.ID != w.ID || g.Shard != w.Shard || g.Key != w.Key || string(g.Item) != string(w.Item) || g.Error != "boom "+w.Key || !g.FailedAt.Equal(w.FailedAt) {
				t.Errorf("Get [%d]: %+v, want %+v", i, g, w)
			}
		}
		if got, err := dl(c).Get(ctx, queue); err != nil || got != nil {
			t.Errorf("Get of no id: %v, %v", got, err)
		}

		if n, err := dl(c).Requeue(ctx, got[0]); err != nil || n != 1 {
			t.Fatalf("Requeue of a letter Get found: %d, %v", n, err)
		}
		if again, err := dl(c).Get(ctx, queue, got[0].ID); err != nil || len(again) != 0 {
			t.Errorf("Get after the requeue: %+v, %v", again, err)
		}
		k := got[0].Key
		f, err := c.Fetch(ctx, queue, keys.Shard(k, shards), 10)
		must(t, err)
		var items []string
		for _, bt := range f.Batches {
			for _, it := range bt.Items {
				items = append(items, string(it.Data))
			}
		}
		if !slices.Equal(items, []string{byKey[k]}) {
			t.Errorf("after the requeue key %s gave %q, want %q", k, items, byKey[k])
		}
	})
}
