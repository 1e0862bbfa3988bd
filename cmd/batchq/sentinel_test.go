package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/testredis"
)

// Through a Sentinel, the command reaches the master: it reads what the
// master holds, and after a failover it writes to the promoted replica.
func TestSentinel(t *testing.T) {
	master := testredis.Start(t)
	replica := testredis.StartReplica(t, master)
	sentinels := testredis.StartSentinels(t, master, 1, testredis.SentinelOptions{Replicas: 1})
	b := master.Backend(t)
	fixture(t, b, 1)
	// Replication is asynchronous: let the replica have it all before it
	// is promoted.
	if n, err := b.Client.Do(context.Background(), b.Client.B().Wait().Numreplicas(1).Timeout(5000).Build()).AsInt64(); err != nil || n != 1 {
		t.Fatalf("WAIT 1 5000: %d replicas (%v)", n, err)
	}
	via := b
	via.Addr = sentinels.URL()

	var direct, got []inspect.Stats
	decode(t, ok(t, b, "-json", "stats"), &direct)
	decode(t, ok(t, via, "-json", "stats"), &got)
	if len(got) != len(direct) {
		t.Fatalf("stats -json through the Sentinel: %+v\nwant what the master says: %+v", got, direct)
	}
	for i := range got {
		g, d := got[i], direct[i]
		if g.Queue != d.Queue || g.Shards != d.Shards || g.PendingItems != d.PendingItems || g.DeadLetters != d.DeadLetters {
			t.Errorf("stats -json through the Sentinel: %+v\nwant what the master says: %+v", g, d)
		}
	}
	var p struct {
		Array json.RawMessage `json:"array"`
	}
	decode(t, ok(t, via, "-json", "peek", "orders", "c"), &p)
	if string(p.Array) != array(itemsC) {
		t.Errorf("peek through the Sentinel: %s, want %s", p.Array, array(itemsC))
	}

	wrong := "sentinel://nope@" + sentinels.Nodes[0].Addr
	if r := cli(t, "-redis", wrong, "stats"); r.code != 1 || !strings.Contains(r.stderr, `Redis at `+wrong+` refused the connection: No such master with that name (the Sentinels monitor no master named "nope"`) {
		t.Errorf("a master name the Sentinel does not know: %+v", r)
	}

	sentinels.Failover(t)
	sentinels.WaitMaster(t, replica.Addr, 30*time.Second)
	// A write, which lands on the promoted replica: the old master may
	// still take writes until the Sentinel makes it a replica.
	ok(t, via, "queue", "create", "later", "3", "-yes")
	in, err := inspect.New(replica.Backend(t).Client, inspect.WithPrefix(b.Prefix))
	must(t, err)
	qs, err := in.Queues(context.Background())
	must(t, err)
	if len(qs) != 4 || qs[1] != (inspect.Queue{Name: "later", Shards: 3}) {
		t.Errorf("queues on the promoted replica: %+v, want emails, later (3 shards), orders, payments", qs)
	}
}

// The servers' password comes from $REDIS_PASSWORD (or -password), the
// Sentinels' own from $REDIS_SENTINEL_PASSWORD; without either, the refusal
// says which to set, and no password shows.
func TestSentinelPasswords(t *testing.T) {
	master := testredis.Start(t) // with --requirepass it would not answer the readiness PING
	admin := master.Backend(t).Client
	must(t, admin.Do(context.Background(), admin.B().ConfigSet().ParameterValue().ParameterValue("requirepass", "s3cret").Build()).Error())
	sentinels := testredis.StartSentinels(t, master, 1, testredis.SentinelOptions{Password: "s3ntinel", MasterPassword: "s3cret"})
	addr := sentinels.URL()

	noSecret := func(what string, r result) {
		t.Helper()
		if strings.Contains(r.stdout+r.stderr, "s3cret") || strings.Contains(r.stdout+r.stderr, "s3ntinel") {
			t.Errorf("%s: a password shows: %+v", what, r)
		}
	}
	r := cli(t, "-redis", addr, "stats")
	if r.code != 1 || !strings.Contains(r.stderr, "refused the connection") || !strings.Contains(r.stderr, "$REDIS_SENTINEL_PASSWORD") {
		t.Errorf("without passwords: %+v", r)
	}
	noSecret("without passwords", r)

	t.Setenv("REDIS_SENTINEL_PASSWORD", "s3ntinel")
	r = cli(t, "-redis", addr, "stats")
	if r.code != 1 || !strings.Contains(r.stderr, "Redis at "+addr+" refused the connection: ") || !strings.Contains(r.stderr, "$REDIS_PASSWORD") {
		t.Errorf("with the Sentinels' password only: %+v", r)
	}
	noSecret("with the Sentinels' password only", r)

	t.Setenv("REDIS_PASSWORD", "s3cret")
	if r := cli(t, "-redis", addr, "stats"); r.code != 0 || !strings.Contains(r.stdout, `no queue is registered under prefix "batchq"`) {
		t.Errorf("with both passwords: %+v", r)
	}
}
