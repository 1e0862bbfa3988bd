package main

import (
	"context"
	"encoding/json"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
)

// announce announces a worker called name of queues, as a running worker
// does, and returns its consumer.
func announce(t *testing.T, b testredis.Backend, name string, shards, concurrency int, queues ...string) *protocol.Consumer {
	qs := make([]protocol.Known, len(queues))
	for i, q := range queues {
		qs[i] = protocol.Known{Queue: q}
	}
	t.Helper()
	c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix), protocol.WithDefaultShards(shards), protocol.WithName(name))
	must(t, err)
	_, err = c.Announce(context.Background(), concurrency, qs...)
	must(t, err)
	return c
}

// forgeName renames the announced worker from to to, as a client with
// write access to Redis could.
func forgeName(t *testing.T, b testredis.Backend, from, to string) {
	t.Helper()
	ctx, c := context.Background(), b.Client
	data, idx := keys.WorkerData(b.Prefix), keys.Workers(b.Prefix)
	raw, err := c.Do(ctx, c.B().Hget().Key(data).Field(from).Build()).ToString()
	must(t, err)
	var desc map[string]any
	must(t, json.Unmarshal([]byte(raw), &desc))
	desc["name"] = to
	forged, err := json.Marshal(desc)
	must(t, err)
	seen, err := c.Do(ctx, c.B().Zscore().Key(idx).Member(from).Build()).AsFloat64()
	must(t, err)
	for _, r := range c.DoMulti(ctx,
		c.B().Hset().Key(data).FieldValue().FieldValue(to, string(forged)).Build(),
		c.B().Hdel().Key(data).Field(from).Build(),
		c.B().Zadd().Key(idx).ScoreMember().ScoreMember(seen, to).Build(),
		c.B().Zrem().Key(idx).Member(from).Build()) {
		must(t, r.Error())
	}
}

func TestWorkers(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) { testWorkers(t, b, 1) })
}

func testWorkers(t *testing.T, b testredis.Backend, shards int) {
	if out := ok(t, b, "workers"); out != `no live worker under prefix "`+b.Prefix+`"`+"\n" {
		t.Errorf("workers with none: %q", out)
	}
	w1 := announce(t, b, "w1", shards, 8, "orders", "emails")
	announce(t, b, "w2", shards, 2, "payments")
	// WithName refuses control characters, but anyone who can write to
	// Redis can forge a worker: rename one.
	evil := announce(t, b, "evil", shards, 1, "payments")
	forgeName(t, b, "evil", "evil\x1b[31m\nforged line")

	out := ok(t, b, "workers")
	if strings.Contains(out, "\x1b") || strings.Contains(out, "\nforged") {
		t.Errorf("workers printed a name raw:\n%q", out)
	}
	rs := rows(out)
	if got := strings.Join(rs[0], " "); got != "NAME HOST PID QUEUES CONCURRENCY STARTED LAST SEEN" {
		t.Errorf("workers header: %q", got)
	}
	if len(rs) != 5 || strings.Join(rs[4], " ") != "3 workers seen within "+inspect.WorkerExpiry.String() {
		t.Fatalf("workers: want 3 rows and a count\n%s", out)
	}
	host, _ := os.Hostname()
	pid := strconv.Itoa(os.Getpid())
	for i, want := range [][]string{
		{`"evil\x1b[31m\nforged`, `line"`, host, pid, "payments", "1"},
		{"w1", host, pid, "orders,emails", "8"},
		{"w2", host, pid, "payments", "2"},
	} {
		r := rs[i+1]
		if len(r) < len(want)+3 || !slices.Equal(r[:len(want)], want) {
			t.Errorf("workers row %d: %q, want it to start with %q\n%s", i, r, want, out)
			continue
		}
		if _, err := time.Parse(time.RFC3339, r[len(want)]); err != nil {
			t.Errorf("workers row %d: started %q: %v", i, r[len(want)], err)
		}
		if d, err := time.ParseDuration(r[len(want)+1]); err != nil || d > 10*time.Second || r[len(want)+2] != "ago" {
			t.Errorf("workers row %d: last seen %q", i, r[len(want)+1:])
		}
	}

	out = ok(t, b, "workers", "orders", "nosuch")
	if got := column(out, 0); !slices.Equal(got[:len(got)-1], []string{"w1"}) {
		t.Errorf("workers orders: %q\n%s", got, out)
	}
	var lw inspect.LiveWorkers
	decode(t, ok(t, b, "-json", "workers", "payments"), &lw)
	if len(lw.Workers) != 2 || lw.Workers[1].Name != "w2" || lw.Workers[1].Concurrency != 2 || lw.Workers[1].Host != host ||
		!slices.Equal(lw.Workers[1].Queues, []string{"payments"}) || lw.Now.IsZero() || lw.Workers[1].LastSeen.After(lw.Now.Add(time.Second)) {
		t.Errorf("workers -json payments: %+v", lw)
	}
	if out := ok(t, b, "workers", "nosuch"); out != `no live worker under prefix "`+b.Prefix+`" drains nosuch`+"\n" {
		t.Errorf("workers of a queue none drains: %q", out)
	}
	if out := ok(t, b, "-json", "workers", "nosuch"); !strings.HasPrefix(out, `{"workers":[],"now":`) {
		t.Errorf("workers -json of a queue none drains: %q", out)
	}

	// Retired workers are not listed.
	must(t, w1.Retire(context.Background()))
	forgeName(t, b, "evil\x1b[31m\nforged line", "evil")
	must(t, evil.Retire(context.Background()))
	if got := column(ok(t, b, "workers"), 0); !slices.Equal(got, []string{"w2", "1"}) {
		t.Errorf("workers after two retired: %q", got)
	}
}
