package batchq_test

// The master of a Sentinel setup killed under load: the README's
// at-least-once guarantee across a failover, with and without
// producer.WithReplicaAcks, every client built from the -redis value
// sentinel://MASTER@HOST:PORT,... through internal/redisaddr, as the
// examples and the CLI build theirs. The
// test starts its own master, replicas and three Sentinels on loopback
// (testredis.StartSentinels), so it runs on any machine with redis-server,
// and logs one "FAILOVER sentinel" line of figures per variant:
//
//	go test -race -count=3 -run TestMasterKilledOnSentinel -v .

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"go.uber.org/zap"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/redisaddr"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// I1 across the SIGKILL of a Sentinel setup's master: producers append from
// six goroutines and two workers handle the items, 1 ms each, with 1 s
// leases, each process on a client of its own built from the setup's
// sentinel:// address. The master is killed (SIGKILL: a crash, the
// realistic case); the three Sentinels agree that it is down, after a
// second without an answer, and promote a replica; the clients follow
// them to it. Then:
//
//   - replica_acks: a master and two replicas, appends with
//     WithReplicaAcks(1, 1s). Every item whose append returned nil is
//     handled. The Sentinels make the other replica replicate the promoted
//     one, so that appends are acknowledged again; until then they fail
//     with ErrReplicaAcks.
//   - no_acks: a master and one replica, the shape of the smallest
//     Sentinel setup. The items whose append returned nil and that the
//     replica had not received when the master died are lost: counted and
//     logged. Any other loss fails the test.
//
// Both: appends return nil again after the failover, every client (the
// producer's and both workers') works on the promoted master, both workers
// handle items stored there, the only items handled twice were appended
// before the kill (batches whose settle the replica had not received are
// delivered again), and no lease is left at the end.
func TestMasterKilledOnSentinel(t *testing.T) {
	t.Run("replica_acks", func(t *testing.T) { testMasterKilledOnSentinel(t, 2, 1) })
	t.Run("no_acks", func(t *testing.T) { testMasterKilledOnSentinel(t, 1, 0) })
}

func testMasterKilledOnSentinel(t *testing.T, nReplicas, acks int) {
	start, load := time.Now(), loadAvg()
	master := testredis.Start(t)
	var replicas []*testredis.Server
	for range nReplicas {
		replicas = append(replicas, testredis.StartReplica(t, master))
	}
	sentinels := testredis.StartSentinels(t, master, 3, testredis.SentinelOptions{Replicas: nReplicas})
	addr, err := redisaddr.Parse(sentinels.URL())
	must(t, err)
	// client is a client of the setup's master, as the -redis flag makes one.
	client := func() rueidis.Client {
		c, err := rueidis.NewClient(addr.Option)
		must(t, err)
		t.Cleanup(c.Close)
		return c
	}
	b := master.Backend(t) // for a fresh prefix
	b.Addr, b.Client = sentinels.URL(), client()
	ready := time.Since(start)

	// Times, as Unix ns; 0 until they happen. dead is when the master's
	// port closed: an append that began later can only have been stored on
	// the promoted master.
	var dead, firstStored, firstAccepted atomic.Int64
	var workerFirst [2]atomic.Int64 // each worker's first item stored after the kill

	// The feed numbers items in the order their appends begin: those from
	// postKill on began after the master died.
	var postKill atomic.Int64
	postKill.Store(1 << 62)
	var handled memCounts
	log, logs := observed(t, zap.IncreaseLevel(zap.InfoLevel))
	workerClients := make([]rueidis.Client, 2)
	for w := range workerClients {
		wb := b
		workerClients[w] = client()
		wb.Client = workerClients[w]
		wk := newWorker(t, wb, batchq.WithName(fmt.Sprintf("w%d", w)), batchq.WithConcurrency(8),
			batchq.WithLeaseTTL(time.Second), batchq.WithLogger(log))
		batchq.Handle(wk, crashQueue, func(ctx context.Context, it item) error {
			time.Sleep(time.Millisecond)
			handled.add(it.ID)
			if int64(it.ID) >= postKill.Load() {
				workerFirst[w].CompareAndSwap(0, time.Now().UnixNano())
			}
			return nil
		})
		runWorker(t, wk)
	}

	var ackErrs, otherErrs, acceptedAfter atomic.Int64
	observe := func(key string, first, n int, began time.Time, err error) {
		switch {
		case err == nil:
		case errors.Is(err, producer.ErrReplicaAcks):
			ackErrs.Add(1) // stored, not acknowledged
		default:
			otherErrs.Add(1)
			return
		}
		if d := dead.Load(); d == 0 || began.UnixNano() < d {
			return
		}
		// Stored on the promoted master.
		firstStored.CompareAndSwap(0, time.Now().UnixNano())
		if err == nil {
			firstAccepted.CompareAndSwap(0, time.Now().UnixNano())
			acceptedAfter.Add(1)
		}
	}
	opts := []producer.Option{producer.WithPrefix(b.Prefix)}
	if acks > 0 {
		opts = append(opts, producer.WithReplicaAcks(acks, time.Second))
	}
	producerClient := client()
	p, err := producer.New(producerClient, opts...)
	must(t, err)
	f := startFeed(t, p, feedSpec{keys: 200, goroutines: 6, perAdd: 2, every: 4 * time.Millisecond, timeout: 3 * time.Second, observe: observe})

	eventually(t, 30*time.Second, "items handled before the kill", func() bool {
		handled.mu.Lock()
		defer handled.mu.Unlock()
		return handled.total >= 1000
	})
	okBefore := f.ok.Load()

	killed := time.Now()
	master.Stop()
	dead.Store(time.Now().UnixNano())
	postKill.Store(f.next.Load())

	// The Sentinels promote a replica, and agree on it.
	var promoted *testredis.Server
	eventually(t, 30*time.Second, "a Sentinel to name a new master", func() bool {
		a, err := sentinels.Master(0)
		for _, r := range replicas {
			if err == nil && a == r.Addr {
				promoted = r
			}
		}
		return promoted != nil
	})
	promotedAfter := time.Since(killed)
	sentinels.WaitMaster(t, promoted.Addr, 30*time.Second)
	eventually(t, 30*time.Second, "an append returning nil after the failover", func() bool { return firstAccepted.Load() != 0 })

	// Every client works on the promoted master.
	eventually(t, 30*time.Second, "every client on the promoted master", func() bool {
		for _, c := range append([]rueidis.Client{producerClient}, workerClients...) {
			if _, ok := c.Nodes()[promoted.Addr]; !ok || len(c.Nodes()) != 1 {
				return false
			}
		}
		return true
	})
	// The load goes on until both workers handled items stored on the
	// promoted master: one that came back first may take them all for a
	// while.
	eventually(t, 30*time.Second, "200 appends returning nil after the failover, and both workers handling their items", func() bool {
		return acceptedAfter.Load() >= 200 && workerFirst[0].Load() != 0 && workerFirst[1].Load() != 0
	})
	f.stop()
	stored, _ := f.result()
	// Losses and duplicates the failover explains: items appended before
	// the master died.
	explained := func(id int) bool { return int64(id) < postKill.Load() }
	awaitFailover(t, &handled, stored, acks, explained, time.Minute)
	eventually(t, 30*time.Second, "no lease or pending key left", func() bool { return len(leftKeys(t, b)) == 0 })
	took := time.Since(start)

	lost, dups, lostOther, dupsOther := checkFailover(t, stored, handled.snapshot(), acks, explained, "appended after the kill")
	if role := infoField(t, promoted, "role"); role != "master" {
		t.Errorf("the promoted replica's role: %q", role)
	}
	replicated := "none"
	if acks > 0 {
		// The Sentinels made the other replica replicate the promoted one:
		// what let appends be acknowledged again.
		replicated = infoField(t, promoted, "connected_slaves")
		if replicated != "1" {
			t.Errorf("the promoted master has %s replicas, want 1", replicated)
		}
	}

	reaped, leaseLost := 0, 0
	for _, e := range logs.FilterMessage("returned the batches of expired leases").All() {
		n, _ := e.ContextMap()["leases"].(int64)
		reaped += int(n)
	}
	for _, e := range logs.FilterMessageSnippet("before the batch was settled").All() {
		n, _ := e.ContextMap()["items"].(int64)
		leaseLost += int(n)
	}
	sinceKill := func(at int64) string {
		if at == 0 {
			return "never"
		}
		return ms(time.Duration(at - killed.UnixNano()))
	}
	acked := "no replica acks"
	if acks > 0 {
		acked = fmt.Sprintf("WithReplicaAcks(%d, 1s)", acks)
	}
	// rueidis listens to the first Sentinel of its list for +switch-master.
	leader := "another"
	switch sentinels.Leader() {
	case 0:
		leader = "the one the clients listen to"
	case -1:
		leader = "none (?)"
	}
	t.Logf("FAILOVER sentinel %s: master, %d replicas, 3 Sentinels (down after %v), ready in %v; %d items stored (appends: %d returned nil, %d of them before the kill; "+
		"%d ErrReplicaAcks, %d other errors), 6 producers, 2 workers; the Sentinel that led the failover: %s; kill to: replica promoted %v, first append stored on it %s, "+
		"first append returning nil %s, first item stored on it handled by w0 %s, w1 %s; promoted master's replicas at the end: %s; "+
		"lost %d (%d appended after the kill), duplicates %d (%d appended after the kill), leases reaped %d, items of lease-lost batches %d; "+
		"all handled after %v; load avg %s -> %s",
		acked, nReplicas, testredis.SentinelDownAfter, ms(ready), len(stored), f.ok.Load(), okBefore,
		ackErrs.Load(), otherErrs.Load(), leader, ms(promotedAfter), sinceKill(firstStored.Load()),
		sinceKill(firstAccepted.Load()), sinceKill(workerFirst[0].Load()), sinceKill(workerFirst[1].Load()), replicated,
		len(lost), len(lostOther), len(dups), len(dupsOther), reaped, leaseLost,
		ms(took), load, loadAvg())
}

// infoField returns the value of field in the server's INFO replication.
func infoField(t testing.TB, s *testredis.Server, field string) string {
	t.Helper()
	info, err := s.Info("replication")
	must(t, err)
	for line := range strings.SplitSeq(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), field+":"); ok {
			return v
		}
	}
	return ""
}

// SECURITY.md: through a Sentinel, the documented ACL rule needs +role:
// rueidis asks the master the Sentinels name for its ROLE before it uses
// it (and after each failover), and without it the client is refused.
func TestSentinelACL(t *testing.T) {
	srv := testredis.Start(t)
	ctx := context.Background()
	const user, password, prefix = "app", "s3cret-app-password", "app"
	admin := srv.Backend(t).Client
	must(t, redisDo(ctx, admin, aclSetUser(user, password, prefix)...).Error())
	sentinels := testredis.StartSentinels(t, srv, 1, testredis.SentinelOptions{})
	addr, err := redisaddr.Parse(sentinels.URL())
	must(t, err)
	addr.Option.Username, addr.Option.Password = user, password

	if c, err := rueidis.NewClient(addr.Option); err == nil || !deniedText(err.Error()) || !strings.Contains(err.Error(), "role") {
		if c != nil {
			c.Close()
		}
		t.Fatalf("through the Sentinel without +role: %v, want ROLE denied", err)
	}
	must(t, redisDo(ctx, admin, "ACL", "SETUSER", user, "+role").Error())
	c, err := rueidis.NewClient(addr.Option)
	must(t, err)
	t.Cleanup(c.Close)
	u := testredis.Backend{Name: "sentinel", Addr: sentinels.URL(), Client: c, Prefix: prefix}
	p := newProducer(t, u)
	must(t, p.Add(ctx, crashQueue, "k", item{ID: 1}))
	w := newWorker(t, u)
	handled := make(chan int, 1)
	batchq.Handle(w, crashQueue, func(ctx context.Context, it item) error { handled <- it.ID; return nil })
	runWorker(t, w)
	select {
	case id := <-handled:
		if id != 1 {
			t.Errorf("handled item %d, want 1", id)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the item was not handled within 10s")
	}
	for _, e := range aclLog(t, admin) {
		if o := e["object"]; o != "role" && o != "config|get" && o != "client|setinfo" {
			t.Errorf("ACL denied the batchq user with +role: %v", e)
		}
	}
}
