package protocol_test

import (
	"context"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
)

// A worker's announcement registers its queues, as Register does, and puts
// it among the live workers with what it said of itself; Retire takes it
// out, leaving no key behind.
func TestAnnounceAndRetire(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		c := newConsumer(t, b, protocol.WithDefaultShards(3), protocol.WithName("w1"))
		recorded, err := c.Announce(ctx, 16, protocol.Known{Queue: "orders"}, protocol.Known{Queue: "emails"})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(recorded, []int{3, 3}) {
			t.Fatalf("Announce recorded %v, want [3 3]", recorded)
		}
		reg, err := b.Client.Do(ctx, b.Client.B().Hgetall().Key(keys.Registry(b.Prefix)).Build()).AsStrMap()
		if err != nil || reg["orders"] != "3" || reg["emails"] != "3" || len(reg) != 2 {
			t.Fatalf("registry %v, %v", reg, err)
		}
		now, err := protocol.Time(ctx, b.Client)
		if err != nil {
			t.Fatal(err)
		}
		ws, err := protocol.ListWorkers(ctx, b.Client, b.Prefix, now)
		if err != nil {
			t.Fatal(err)
		}
		host, _ := os.Hostname()
		if len(ws) != 1 {
			t.Fatalf("ListWorkers: %+v, want w1", ws)
		}
		w := ws[0]
		if w.Name != "w1" || w.Host != host || w.PID != os.Getpid() || !slices.Equal(w.Queues, []string{"orders", "emails"}) ||
			w.Concurrency != 16 || w.Corrupt {
			t.Errorf("ListWorkers: %+v", w)
		}
		if d := now.Sub(w.LastSeen); d < 0 || d > 5*time.Second {
			t.Errorf("last seen %v, %v before now", w.LastSeen, d)
		}
		if d := w.LastSeen.Sub(w.Started); d < 0 || d > 5*time.Second {
			t.Errorf("started %v, last seen %v", w.Started, w.LastSeen)
		}

		// A second announcement keeps the start and moves last seen.
		time.Sleep(20 * time.Millisecond)
		if _, err := c.Announce(ctx, 16, protocol.Known{Queue: "orders"}, protocol.Known{Queue: "emails"}); err != nil {
			t.Fatal(err)
		}
		if ws, err = protocol.ListWorkers(ctx, b.Client, b.Prefix, now.Add(time.Second)); err != nil || len(ws) != 1 {
			t.Fatalf("ListWorkers: %+v, %v", ws, err)
		}
		if !ws[0].Started.Equal(w.Started) || !ws[0].LastSeen.After(w.LastSeen) {
			t.Errorf("after a second announcement: started %v (was %v), last seen %v (was %v)", ws[0].Started, w.Started, ws[0].LastSeen, w.LastSeen)
		}

		if err := c.Retire(ctx); err != nil {
			t.Fatal(err)
		}
		if ws, err = protocol.ListWorkers(ctx, b.Client, b.Prefix, now); err != nil || len(ws) != 0 {
			t.Fatalf("ListWorkers after Retire: %+v, %v", ws, err)
		}
		if ks := testredis.Keys(t, b, b.Prefix+":*"); !slices.Equal(ks, []string{keys.Registry(b.Prefix)}) {
			t.Errorf("keys after Retire: %v, want the registry only", ks)
		}
	})
}

// Workers not seen for WorkerExpiry are not listed, and the next
// announcement prunes them; a stored form another program wrote is listed
// as corrupt.
func TestStaleWorkersArePruned(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		now, err := protocol.Time(ctx, b.Client)
		if err != nil {
			t.Fatal(err)
		}
		c := b.Client
		put := func(name string, seen time.Time, desc string) {
			t.Helper()
			for _, r := range c.DoMulti(ctx,
				c.B().Zadd().Key(keys.Workers(b.Prefix)).ScoreMember().ScoreMember(float64(seen.UnixMilli()), name).Build(),
				c.B().Hset().Key(keys.WorkerData(b.Prefix)).FieldValue().FieldValue(name, desc).Build()) {
				if err := r.Error(); err != nil {
					t.Fatal(err)
				}
			}
		}
		old := now.Add(-protocol.WorkerExpiry - time.Second)
		for i := range 3 {
			put("gone"+strconv.Itoa(i), old, `{"name":"gone`+strconv.Itoa(i)+`","queues":["q"]}`)
		}
		put("odd", now, "not json")
		ws, err := protocol.ListWorkers(ctx, c, b.Prefix, now)
		if err != nil {
			t.Fatal(err)
		}
		if len(ws) != 1 || ws[0].Name != "odd" || !ws[0].Corrupt || ws[0].LastSeen.UnixMilli() != now.UnixMilli() {
			t.Fatalf("ListWorkers: %+v, want odd alone, corrupt", ws)
		}

		if _, err := newConsumer(t, b, protocol.WithName("live")).Announce(ctx, 1, protocol.Known{Queue: queue}); err != nil {
			t.Fatal(err)
		}
		names, err := c.Do(ctx, c.B().Zrange().Key(keys.Workers(b.Prefix)).Min("0").Max("-1").Build()).AsStrSlice()
		if err != nil {
			t.Fatal(err)
		}
		data, err := c.Do(ctx, c.B().Hkeys().Key(keys.WorkerData(b.Prefix)).Build()).AsStrSlice()
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(names)
		slices.Sort(data)
		if want := []string{"live", "odd"}; !slices.Equal(names, want) || !slices.Equal(data, want) {
			t.Errorf("after an announcement: workers %v, data %v; want %v in both", names, data, want)
		}
	})
}
