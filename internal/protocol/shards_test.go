package protocol_test

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
)

// Slot agrees with CLUSTER KEYSLOT, on the tags of a queue's shards.
func TestSlot(t *testing.T) {
	b := testredis.Cluster(t)
	for _, tag := range []string{"", "a", "orders:0", "orders:11", "wide:3", "123456789", "ü:7"} {
		got, err := b.Client.Do(context.Background(), b.Client.B().ClusterKeyslot().Key("x{"+tag+"}y").Build()).AsInt64()
		if tag == "" {
			// An empty tag hashes the whole key; Slot("") is that of "".
			got, err = b.Client.Do(context.Background(), b.Client.B().ClusterKeyslot().Key("").Build()).AsInt64()
		}
		if err != nil {
			t.Fatal(err)
		}
		if keys.Slot(tag) != int(got) {
			t.Errorf("Slot(%q) = %d, CLUSTER KEYSLOT %d", tag, keys.Slot(tag), got)
		}
	}
	if tag := keys.For("p", "orders", 11).Tag(); tag != "orders:11" {
		t.Errorf("Tag: %q", tag)
	}
}

// The default count is 1 on a single server and, on a cluster, the fewest
// shards from twice the masters up that put two on every master.
func TestDefaultShards(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		single, err := protocol.ReadTopology(context.Background(), b.Client)
		if err != nil || single.Masters() != 1 || single.DefaultShards("orders") != 1 {
			t.Fatalf("single server: %v, %v", single, err)
		}
	})
	for _, masters := range []int{2, 3, 6} {
		topo := protocol.EvenTopology(masters)
		lo, hi := 1<<30, 0
		for i := range 200 {
			q := "q" + strconv.Itoa(i)
			n := topo.DefaultShards(q)
			per := make([]int, masters)
			for s := range n {
				per[ownerOf(masters, q, s)]++
			}
			for m, c := range per {
				if c < 2 {
					t.Fatalf("%d masters, queue %s: %d shards put %d on master %d", masters, q, n, c, m)
				}
			}
			if n < 2*masters {
				t.Fatalf("%d masters, queue %s: %d shards", masters, q, n)
			}
			lo, hi = min(lo, n), max(hi, n)
		}
		t.Logf("%d masters: default shards %d to %d over 200 queue names", masters, lo, hi)
	}
}

func ownerOf(masters int, queue string, shard int) int {
	return keys.Slot(keys.For("", queue, shard).Tag()) * masters / (1 << 14)
}

// On a real cluster ReadTopology finds its three masters.
func TestReadTopologyOnCluster(t *testing.T) {
	b := testredis.Cluster(t)
	topo, err := protocol.ReadTopology(context.Background(), b.Client)
	if err != nil || topo.Masters() != 3 {
		t.Fatalf("ReadTopology: %v masters, %v", topo, err)
	}
	n := topo.DefaultShards("orders")
	if n < 6 {
		t.Fatalf("default shards of orders: %d", n)
	}
	t.Logf("orders gets %d shards on the cluster", n)
}

// SetShards raises a count, refuses to lower it, and knows no unrecorded
// queue.
func TestSetShards(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		if _, err := protocol.SetShards(ctx, b.Client, b.Prefix, "q", 2); !errors.Is(err, protocol.ErrNoQueue) {
			t.Fatalf("SetShards of an unknown queue: %v", err)
		}
		if got, err := protocol.Register(ctx, b.Client, b.Prefix, protocol.Known{Queue: "q", Default: 2}); err != nil || got[0] != 2 {
			t.Fatalf("Register: %v, %v", got, err)
		}
		if old, err := protocol.SetShards(ctx, b.Client, b.Prefix, "q", 5); err != nil || old != 2 {
			t.Fatalf("SetShards 5: %d, %v", old, err)
		}
		var se *protocol.ShrinkError
		if _, err := protocol.SetShards(ctx, b.Client, b.Prefix, "q", 3); !errors.As(err, &se) || se.Recorded != 5 || se.Asked != 3 {
			t.Fatalf("SetShards 3: %v", err)
		}
		if _, err := protocol.SetShards(ctx, b.Client, b.Prefix, "q", 1025); err == nil {
			t.Fatal("SetShards 1025 worked")
		}
		got, err := protocol.ReadShards(ctx, b.Client, b.Prefix, "q", "none")
		if err != nil || got[0] != 5 || got[1] != 0 {
			t.Fatalf("ReadShards: %v, %v", got, err)
		}
		must(t, b.Client.Do(ctx, b.Client.B().Hset().Key(keys.Registry(b.Prefix)).FieldValue().FieldValue("bad", "x").Build()).Error())
		if _, err := protocol.ReadShards(ctx, b.Client, b.Prefix, "bad"); err == nil {
			t.Fatal("ReadShards of a corrupt count worked")
		}
	})
}

// A registry value that is not a count of 1 to 1024 (another program wrote
// it) counts as none: Register replaces it with the caller's count or the
// default, and SetShards with the new count, so that no caller routes by 0
// shards or starts thousands of fetch loops.
func TestCorruptShardCounts(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		reg := keys.Registry(b.Prefix)
		set := func(v string) {
			t.Helper()
			must(t, b.Client.Do(ctx, b.Client.B().Hset().Key(reg).FieldValue().FieldValue("q", v).Build()).Error())
		}
		for _, v := range []string{"0", "-2", "2000", "0x10", "1e3", " 5", "inf", "", "07"} {
			set(v)
			got, err := protocol.Register(ctx, b.Client, b.Prefix, protocol.Known{Queue: "q", Shards: 3})
			if err != nil || got[0] != 3 {
				t.Errorf("Register over %q with 3 known: %v, %v; want 3", v, got, err)
			}
			set(v)
			got, err = protocol.Register(ctx, b.Client, b.Prefix, protocol.Known{Queue: "q"})
			if err != nil || got[0] != 0 {
				t.Errorf("Register over %q with nothing known: %v, %v; want 0 (unrecorded)", v, got, err)
			}
			d := protocol.Defaults{Fixed: 4}
			got, err = protocol.RegisterNew(ctx, b.Client, b.Prefix, &d, protocol.Known{Queue: "q"})
			if err != nil || got[0] != 4 {
				t.Errorf("RegisterNew over %q: %v, %v; want the default, 4", v, got, err)
			}
			set(v)
			if old, err := protocol.SetShards(ctx, b.Client, b.Prefix, "q", 2); err != nil || old != 0 {
				t.Errorf("SetShards over %q: %d, %v; want it replaced", v, old, err)
			}
			if got, err := protocol.ReadShards(ctx, b.Client, b.Prefix, "q"); err != nil || got[0] != 2 {
				t.Errorf("after SetShards over %q: %v, %v", v, got, err)
			}
		}
	})
}

// RegisterNew records, with the default, only the queues nobody recorded,
// and returns every count in the order asked, new and recorded mixed.
func TestRegisterNewMixed(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		_, err := protocol.Register(ctx, b.Client, b.Prefix, protocol.Known{Queue: "a", Default: 2}, protocol.Known{Queue: "c", Default: 5})
		must(t, err)
		d := protocol.Defaults{Fixed: 7}
		got, err := protocol.RegisterNew(ctx, b.Client, b.Prefix, &d,
			protocol.Known{Queue: "a"}, protocol.Known{Queue: "b"}, protocol.Known{Queue: "c"}, protocol.Known{Queue: "d", Shards: 3})
		if err != nil || !slices.Equal(got, []int{2, 7, 5, 3}) {
			t.Fatalf("RegisterNew: %v, %v; want [2 7 5 3]", got, err)
		}
		if got, err := protocol.ReadShards(ctx, b.Client, b.Prefix, "a", "b", "c", "d"); err != nil || !slices.Equal(got, []int{2, 7, 5, 3}) {
			t.Fatalf("ReadShards: %v, %v", got, err)
		}
	})
}

// On Redis Cluster, an ACL that refuses CLUSTER SLOTS (a client that reads
// the topology with CLUSTER SHARDS, as on Redis 8) does not stop a first
// writer: the default falls back to four shards per node, and a recorded
// queue never needs the topology at all.
func TestDefaultsWithoutClusterSlots(t *testing.T) {
	b := testredis.Cluster(t)
	ctx := context.Background()
	user := "noslots" + strconv.Itoa(int(time.Now().UnixNano()%1e9))
	for addr, n := range b.Client.Nodes() {
		if err := n.Do(ctx, n.B().AclSetuser().Username(user).Rule("on", ">pw", "~*", "+@all", "-cluster|slots").Build()).Error(); err != nil {
			t.Fatalf("ACL SETUSER on %s: %v", addr, err)
		}
		t.Cleanup(func() { n.Do(context.Background(), n.B().AclDeluser().Username(user).Build()) })
	}
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{b.Addr}, Username: user, Password: "pw", DisableCache: true,
		ClusterOption: rueidis.ClusterOption{PreferClusterShards: true}})
	must(t, err)
	defer c.Close()
	if _, err := protocol.ReadTopology(ctx, c); err == nil || !strings.Contains(err.Error(), "NOPERM") {
		t.Fatalf("ReadTopology as %s: %v, want a NOPERM refusal", user, err)
	}
	var d protocol.Defaults
	got, err := protocol.RegisterNew(ctx, c, b.Prefix, &d, protocol.Known{Queue: "new"})
	if want := 4 * len(c.Nodes()); err != nil || got[0] != want {
		t.Fatalf("RegisterNew of a new queue: %v, %v; want the fallback, %d", got, err, want)
	}
	if _, err := protocol.Register(ctx, b.Client, b.Prefix, protocol.Known{Queue: "made", Default: 5}); err != nil {
		t.Fatal(err)
	}
	if got, err := protocol.RegisterNew(ctx, c, b.Prefix, &d, protocol.Known{Queue: "made"}); err != nil || got[0] != 5 {
		t.Fatalf("RegisterNew of a recorded queue: %v, %v; want its 5", got, err)
	}
}
