package batchq_test

// A Redis Cluster slot moved between masters by hand, as redis-cli
// --cluster reshard moves one: appends that meet it wait for the end of the
// migration (TestAppendsWaitOutASlotMigration), and the ACL rule lets
// rueidis follow its ASK replies (TestACLOnAMigratingSlot, security_test.go).

import (
	"context"
	"encoding/json"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// A slotMigration is the slot of a queue shard on its way from the master
// src to the master dst of a private cluster.
type slotMigration struct {
	t                  *testing.T
	nodes              []*testredis.Server
	slot               int
	src, dst           *testredis.Server
	srcAdmin, dstAdmin rueidis.Client // the default user, on that node alone
}

// startMigration starts moving the slot of sp from its master to dst, or
// to another master when dst is nil: the new master imports it, the old one
// migrates it, and answers ASK for any of its keys it does not hold.
func startMigration(t *testing.T, nodes []*testredis.Server, sp keys.Space, dst *testredis.Server) *slotMigration {
	t.Helper()
	m := &slotMigration{t: t, nodes: nodes, slot: keys.Slot(sp.Tag()), dst: dst}
	owner := slotOwners(t, nodes[0].Backend(t))
	for _, n := range nodes {
		switch {
		case n.Addr == owner[m.slot]:
			m.src = n
		case m.dst == nil:
			m.dst = n
		}
	}
	if m.src == nil || m.src == m.dst {
		t.Fatalf("slot %d: no node owns it, or the new master does", m.slot)
	}
	m.srcAdmin, m.dstAdmin = m.admin(m.src), m.admin(m.dst)
	m.ok(m.dst, "CLUSTER", "SETSLOT", strconv.Itoa(m.slot), "IMPORTING", m.id(m.src))
	m.ok(m.src, "CLUSTER", "SETSLOT", strconv.Itoa(m.slot), "MIGRATING", m.id(m.dst))
	return m
}

// moveKeys moves every key of the slot to the new master.
func (m *slotMigration) moveKeys() {
	m.t.Helper()
	ks, err := redisDo(context.Background(), m.srcAdmin, "CLUSTER", "GETKEYSINSLOT", strconv.Itoa(m.slot), "1000").AsStrSlice()
	must(m.t, err)
	if len(ks) == 0 {
		m.t.Fatal("no key in the slot to move")
	}
	host, port, _ := strings.Cut(m.dst.Addr, ":")
	m.ok(m.src, append([]string{"MIGRATE", host, port, "", "0", "5000", "KEYS"}, ks...)...)
}

// end gives the slot to the new master, on every node: the new master
// first (it bumps its config epoch, so that its claim wins), then the old
// one, then the others, as the Redis Cluster specification orders it.
func (m *slotMigration) end() {
	m.t.Helper()
	order := []*testredis.Server{m.dst, m.src}
	for _, n := range m.nodes {
		if n != m.dst && n != m.src {
			order = append(order, n)
		}
	}
	id := m.id(m.dst)
	for _, n := range order {
		m.ok(n, "CLUSTER", "SETSLOT", strconv.Itoa(m.slot), "NODE", id)
	}
}

// admin connects to s alone as the default user, for the replies Command
// does not read (arrays) and values.
func (m *slotMigration) admin(s *testredis.Server) rueidis.Client {
	m.t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{s.Addr}, ForceSingleClient: true, DisableCache: true})
	must(m.t, err)
	m.t.Cleanup(c.Close)
	return c
}

// ok runs a command on s that answers OK.
func (m *slotMigration) ok(s *testredis.Server, args ...string) {
	m.t.Helper()
	if out, err := s.Command(args...); err != nil || out != "OK" {
		m.t.Fatalf("%s on %s: %q, %v", args[:2], s.Addr, out, err)
	}
}

// id returns the cluster node id of s.
func (m *slotMigration) id(s *testredis.Server) string {
	m.t.Helper()
	id, err := s.Command("CLUSTER", "MYID")
	must(m.t, err)
	return id
}

// ids returns the ids of the items key of sp holds on the new master,
// sorted.
func (m *slotMigration) ids(sp keys.Space, key string) []int {
	m.t.Helper()
	v, err := m.dstAdmin.Do(context.Background(), m.dstAdmin.B().Get().Key(sp.Items(key)).Build()).AsBytes()
	must(m.t, err)
	var items []item
	must(m.t, json.Unmarshal(v, &items))
	var ids []int
	for _, it := range items {
		ids = append(ids, it.ID)
	}
	slices.Sort(ids)
	return ids
}

// While a slot migrates, Redis answers an append, a script of several keys
// of which the new master holds only some, TRYAGAIN: nothing ran. The
// append waits, trying again, while its context lasts (5 s at most), and
// goes through once the migration ends; one whose context ends first
// fails, nothing stored. A lingering producer's call of several keys too.
func TestAppendsWaitOutASlotMigration(t *testing.T) {
	nodes := testredis.StartCluster(t)
	b := nodes[0].Backend(t)
	ctx := context.Background()
	const queue = "moving"
	sp := keys.For(b.Prefix, queue, 0)
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(1))
	must(t, err)
	// A wait, so that two appends make one call (mergemany.lua).
	lingering, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(1), producer.WithLinger(50*time.Millisecond, 100))
	must(t, err)
	t.Cleanup(func() { lingering.Close(ctx) })
	must(t, p.Add(ctx, queue, "k", item{ID: 1}))
	m := startMigration(t, nodes, sp, nil)
	m.moveKeys()

	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	err = p.Add(short, queue, "k", item{ID: 2})
	cancel()
	if err == nil || !strings.Contains(err.Error(), "TRYAGAIN") {
		t.Fatalf("append whose context ends during the migration: %v, want TRYAGAIN", err)
	}

	errs := make(chan error, 3)
	for _, add := range []func() error{
		func() error { return p.Add(ctx, queue, "k", item{ID: 3}) },
		func() error { return lingering.Add(ctx, queue, "k", item{ID: 4}) },
		func() error { return lingering.Add(ctx, queue, "k2", item{ID: 5}) },
	} {
		go func() { errs <- add() }()
	}
	select {
	case err := <-errs:
		t.Fatalf("an append returned before the migration ended: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	m.end()
	for range 3 {
		select {
		case err := <-errs:
			must(t, err)
		case <-time.After(10 * time.Second):
			t.Fatal("an append did not return after the migration ended")
		}
	}
	if ids := m.ids(sp, "k"); !slices.Equal(ids, []int{1, 3, 4}) {
		t.Fatalf("the new master holds items %v of k, want 1, 3 and 4 (2's append failed)", ids)
	}
	if ids := m.ids(sp, "k2"); !slices.Equal(ids, []int{5}) {
		t.Fatalf("the new master holds items %v of k2, want 5", ids)
	}
}
