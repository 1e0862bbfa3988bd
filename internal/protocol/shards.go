package protocol

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
)

// A queue's shard count lives in the registry of its prefix
// (docs/PROTOCOL.md, "Shards"): the first producer, worker or operator to
// write the queue records it, every process reads it from there, and it
// can only grow. A key's shard is keys.Shard(key, count), so a key's items
// may sit in any shard below the largest count a producer routed by; since
// counts never shrink, workers that drain every shard below the current
// count drain them all.

// ShardsEvery is how often producers and workers read the shard counts of
// their queues again: they route by, and drain, a count raised meanwhile
// within about this long.
const ShardsEvery = 2 * time.Second

// Known is a queue as a caller of Register knows it.
type Known struct {
	Queue   string
	Shards  int // the shards the caller already routes or drains it by; 0: none yet
	Default int // the count to record if the registry does not hold the queue; 0: none
}

// Register records queues in the prefix's registry and returns their shard
// counts, in the order of qs. A queue the registry does not hold gets its
// Default, or its Shards when that is larger, or stays unrecorded, with a
// count of 0, when both are 0; Shards larger than the recorded count raise
// it (see register.lua).
func Register(ctx context.Context, c rueidis.Client, prefix string, qs ...Known) ([]int, error) {
	return register(ctx, c, []string{keys.Registry(prefix), keys.Grown(prefix)}, knownArgs(qs))
}

// RegisterNew is Register, but a queue that neither the registry nor qs
// gives a count gets d's default, in a second call: the deployment's
// topology is read only for queues nobody recorded yet.
func RegisterNew(ctx context.Context, c rueidis.Client, prefix string, d *Defaults, qs ...Known) ([]int, error) {
	got, err := Register(ctx, c, prefix, qs...)
	if err != nil {
		return nil, err
	}
	return recordNew(ctx, c, prefix, d, qs, got)
}

// recordNew records, with d's default, the queues of qs that got a count
// of 0 from register.lua, and returns got completed.
func recordNew(ctx context.Context, c rueidis.Client, prefix string, d *Defaults, qs []Known, got []int) ([]int, error) {
	var missing []Known
	for i, n := range got {
		if n == 0 {
			def, err := d.For(ctx, c, qs[i].Queue)
			if err != nil {
				return nil, err
			}
			missing = append(missing, Known{Queue: qs[i].Queue, Default: def})
		}
	}
	if len(missing) == 0 {
		return got, nil
	}
	again, err := Register(ctx, c, prefix, missing...)
	if err != nil {
		return nil, err
	}
	for i, j := 0, 0; i < len(got); i++ {
		if got[i] == 0 {
			got[i], j = again[j], j+1
		}
	}
	return got, nil
}

func knownArgs(qs []Known) []string {
	args := make([]string, 0, 3*len(qs))
	for _, q := range qs {
		args = append(args, q.Queue, strconv.Itoa(q.Shards), strconv.Itoa(q.Default))
	}
	return args
}

// register runs register.lua with KEYS ks and ARGV args (see its header),
// and returns the shard counts it recorded. Past maxmemory, Redis refuses
// the script when it has something to write, a queue to record or a worker
// to announce (ErrOutOfMemory).
func register(ctx context.Context, c rueidis.Client, ks, args []string) ([]int, error) {
	res, err := registerScript.Exec(ctx, c, ks, args).AsIntSlice()
	if err != nil {
		return nil, memoryError(err)
	}
	out := make([]int, len(res))
	for i, n := range res {
		if n < 0 || n > keys.MaxShards {
			return nil, fmt.Errorf("register returned a count of %d shards", n)
		}
		out[i] = int(n)
	}
	return out, nil
}

// Defaults picks the shard count of a queue its caller is the first to
// record: Fixed when set (WithDefaultShards), else the Topology's
// DefaultShards, read once per Producer or Worker. When an ACL refuses
// CLUSTER SLOTS (NOPERM), it falls back to four shards per node the client
// knows, replicas included, for a minute before it asks again; any other
// failure to read the topology is an error.
type Defaults struct {
	Fixed   int
	topo    atomic.Pointer[Topology]
	refused atomic.Pointer[time.Time] // when CLUSTER SLOTS was last refused
}

// refusedFor is how long Defaults takes a refused CLUSTER SLOTS as the
// answer before it asks again.
const refusedFor = time.Minute

// Cheap returns the default shard count of queue when it costs no round
// trip (WithDefaultShards, a single server, or a topology read already),
// and 0 otherwise: the Default to pass to RegisterNew, which then reads
// the topology only if the queue turns out to be new.
func (d *Defaults) Cheap(c rueidis.Client, queue string) int {
	switch {
	case d.Fixed > 0:
		return d.Fixed
	case c.Mode() != rueidis.ClientModeCluster:
		return 1
	}
	if t := d.topo.Load(); t != nil {
		return t.DefaultShards(queue)
	}
	return 0
}

// For returns the default shard count of queue: Cheap's, or the
// topology's, read now.
func (d *Defaults) For(ctx context.Context, c rueidis.Client, queue string) (int, error) {
	if n := d.Cheap(c, queue); n > 0 {
		return n, nil
	}
	fallback := min(keys.MaxShards, max(1, 4*len(c.Nodes())))
	if at := d.refused.Load(); at != nil && time.Since(*at) < refusedFor {
		return fallback, nil
	}
	t, err := ReadTopology(ctx, c)
	if re := (*rueidis.RedisError)(nil); errors.As(err, &re) && strings.HasPrefix(re.Error(), "NOPERM") {
		now := time.Now()
		d.refused.Store(&now)
		return fallback, nil
	}
	if err != nil {
		return 0, err
	}
	d.topo.Store(t)
	return t.DefaultShards(queue), nil
}

// ReadShards returns the recorded shard counts of queues, in their order:
// 0 for a queue the registry does not hold. It is one HMGET.
func ReadShards(ctx context.Context, c rueidis.Client, prefix string, queues ...string) ([]int, error) {
	vals, err := c.Do(ctx, c.B().Hmget().Key(keys.Registry(prefix)).Field(queues...).Build()).ToArray()
	if err != nil {
		return nil, err
	}
	if len(vals) != len(queues) {
		return nil, fmt.Errorf("HMGET of %d queues returned %d values", len(queues), len(vals))
	}
	out := make([]int, len(vals))
	for i, v := range vals {
		s, err := v.ToString()
		if rueidis.IsRedisNil(err) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if out[i], err = ParseShards(s); err != nil {
			return nil, fmt.Errorf("queue %s: %w", keys.Short(queues[i]), err)
		}
	}
	return out, nil
}

// ParseShards parses a shard count as the registry holds it: 1 to 1024, in
// decimal without a sign or leading zeros (what register.lua takes for one).
func ParseShards(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > keys.MaxShards || strconv.Itoa(n) != s {
		return 0, fmt.Errorf("%w: %q is not a count of 1-%d", ErrBadCount, keys.Short(s), keys.MaxShards)
	}
	return n, nil
}

// SetShards raises a recorded queue's shard count to n and returns the
// count it had. It fails with ErrNoQueue for a queue the registry does not
// hold, and with a *ShrinkError for n below the recorded count. Producers
// route by the new count, and workers drain the new shards, within
// ShardsEvery.
func SetShards(ctx context.Context, c rueidis.Client, prefix, queue string, n int) (int, error) {
	if n < 1 || n > keys.MaxShards {
		return 0, fmt.Errorf("shards must be 1-%d, got %d", keys.MaxShards, n)
	}
	old, err := shardsScript.Exec(ctx, c, []string{keys.Registry(prefix), keys.Grown(prefix)}, []string{queue, strconv.Itoa(n)}).AsInt64()
	if err != nil {
		return 0, shardsError(err, n)
	}
	return int(old), nil
}

// Topology is what DefaultShards needs to know of a Redis deployment: its
// masters, and which serves each hash slot.
type Topology struct {
	masters int
	owner   []int // hash slot -> master index; nil on a single server
}

// ReadTopology reads the masters of c's deployment: CLUSTER SLOTS on Redis
// Cluster, nothing on a single server.
func ReadTopology(ctx context.Context, c rueidis.Client) (*Topology, error) {
	if c.Mode() != rueidis.ClientModeCluster {
		return &Topology{masters: 1}, nil
	}
	ranges, err := c.Do(ctx, c.B().ClusterSlots().Build()).ToArray()
	if err != nil {
		return nil, fmt.Errorf("read the cluster's slots: %w", err)
	}
	t := &Topology{owner: make([]int, 1<<14)}
	for i := range t.owner {
		t.owner[i] = -1
	}
	index := map[string]int{}
	for _, r := range ranges {
		f, err := r.ToArray()
		if err != nil || len(f) < 3 {
			return nil, fmt.Errorf("read the cluster's slots: an entry of %d fields (%v)", len(f), err)
		}
		from, err1 := f[0].AsInt64()
		to, err2 := f[1].AsInt64()
		node, err3 := f[2].ToArray()
		if err := errors.Join(err1, err2, err3); err != nil || len(node) < 2 || from < 0 || to >= 1<<14 || from > to {
			return nil, fmt.Errorf("read the cluster's slots: a malformed entry (%v)", err)
		}
		host, _ := node[0].ToString()
		port, _ := node[1].AsInt64()
		id := host + ":" + strconv.FormatInt(port, 10)
		if len(node) > 2 {
			if s, err := node[2].ToString(); err == nil && s != "" {
				id = s
			}
		}
		m, ok := index[id]
		if !ok {
			m = len(index)
			index[id] = m
		}
		for s := from; s <= to; s++ {
			t.owner[s] = int(m)
		}
	}
	t.masters = len(index)
	if t.masters == 0 {
		return nil, errors.New("read the cluster's slots: no master serves a slot")
	}
	return t, nil
}

// Masters returns the number of masters.
func (t *Topology) Masters() int { return t.masters }

// DefaultShards returns the shard count a queue gets when its first writer
// was given none: 1 on a single server. On Redis Cluster it is the fewest
// shards, at least twice the masters, that put at least two of the queue's
// shards on every master (each shard is one hash slot, so where a shard
// lands follows from the queue's name), or 16 per master where no count
// up to that does.
func (t *Topology) DefaultShards(queue string) int {
	if t.masters <= 1 || t.owner == nil {
		return 1
	}
	limit := min(keys.MaxShards, 16*t.masters)
	per := make([]int, t.masters)
	short := t.masters // masters with fewer than 2 shards
	for n := 1; n <= limit; n++ {
		if m := t.owner[keys.Slot(keys.For("", queue, n-1).Tag())]; m >= 0 {
			if per[m]++; per[m] == 2 {
				short--
			}
		}
		if n >= 2*t.masters && short == 0 {
			return n
		}
	}
	return limit
}
