package protocol_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"go.uber.org/goleak"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const queue = "q"

func newConsumer(t *testing.T, b testredis.Backend, opts ...protocol.Option) *protocol.Consumer {
	t.Helper()
	c, err := protocol.NewConsumer(b.Client, append([]protocol.Option{protocol.WithPrefix(b.Prefix)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newProducer(t *testing.T, b testredis.Backend, opts ...producer.Option) *producer.Producer {
	t.Helper()
	p, err := producer.New(b.Client, append([]producer.Option{producer.WithPrefix(b.Prefix)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// fakeClock is a consumer clock that moves only when told to. It starts an
// hour ahead of the real clock, so that keys made ready by a producer (due at
// the producer's real "now") are always due for it.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func withFakeClock(c *protocol.Consumer) *fakeClock {
	fc := &fakeClock{now: time.Now().Add(time.Hour).Truncate(time.Millisecond)}
	protocol.SetClock(c, fc.Now)
	return fc
}

func (f *fakeClock) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *fakeClock) Advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = f.now.Add(d)
}

// eventually polls cond until it holds, failing the test after timeout.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		<-tick.C
	}
}

func addRaw(t *testing.T, p *producer.Producer, key string, items ...string) {
	t.Helper()
	raws := make([]json.RawMessage, len(items))
	for i, it := range items {
		raws[i] = json.RawMessage(it)
	}
	if err := p.AddRaw(context.Background(), queue, key, raws...); err != nil {
		t.Fatalf("AddRaw %s: %v", key, err)
	}
}

func fetch(t *testing.T, c *protocol.Consumer, max int) protocol.Fetched {
	t.Helper()
	f, err := c.Fetch(context.Background(), queue, 0, max)
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	return f
}

// fetchOne fetches and requires exactly one batch.
func fetchOne(t *testing.T, c *protocol.Consumer) *protocol.Batch {
	t.Helper()
	f := fetch(t, c, 10)
	if len(f.Batches) != 1 || len(f.Dead) != 0 {
		t.Fatalf("Fetch: got %d batches and %d dead (%s), want one batch", len(f.Batches), len(f.Dead), describe(f))
	}
	return f.Batches[0]
}

// fetchNone fetches and requires nothing.
func fetchNone(t *testing.T, c *protocol.Consumer) protocol.Fetched {
	t.Helper()
	f := fetch(t, c, 10)
	if len(f.Batches) != 0 || len(f.Dead) != 0 {
		t.Fatalf("Fetch: got %s, want nothing", describe(f))
	}
	return f
}

func describe(f protocol.Fetched) string {
	var parts []string
	for _, b := range f.Batches {
		parts = append(parts, "batch key="+b.Key+" items="+itemsOf(b))
	}
	for _, d := range f.Dead {
		parts = append(parts, "dead key="+d.Key+" error="+d.Error)
	}
	return "[" + strings.Join(parts, "; ") + "]"
}

// itemsOf returns a batch's items joined as a JSON array.
func itemsOf(b *protocol.Batch) string {
	s := make([]string, len(b.Items))
	for i, it := range b.Items {
		s[i] = string(it.Data)
	}
	return "[" + strings.Join(s, ",") + "]"
}

func all(n int, o protocol.Outcome) []protocol.Outcome {
	out := make([]protocol.Outcome, n)
	for i := range out {
		out[i] = o
	}
	return out
}

var done = protocol.Outcome{Kind: protocol.Done}

func settle(t *testing.T, c *protocol.Consumer, b *protocol.Batch, out ...protocol.Outcome) {
	t.Helper()
	if err := c.Settle(context.Background(), b, out); err != nil {
		t.Fatalf("Settle: %v", err)
	}
}

func space(b testredis.Backend) keys.Space { return keys.For(b.Prefix, queue, 0) }

// stored returns the raw value of key's items key.
func stored(t *testing.T, b testredis.Backend, key string) (string, bool) {
	t.Helper()
	ik := space(b).Items(key)
	v, err := b.Client.Do(context.Background(), b.Client.B().Get().Key(ik).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return "", false
	}
	if err != nil {
		t.Fatalf("GET %s: %v", ik, err)
	}
	return v, true
}

// ready reports whether key is on the ready index.
func ready(t *testing.T, b testredis.Backend, key string) bool {
	t.Helper()
	err := b.Client.Do(context.Background(), b.Client.B().Zscore().Key(space(b).Ready()).Member(key).Build()).Error()
	if rueidis.IsRedisNil(err) {
		return false
	}
	if err != nil {
		t.Fatalf("ZSCORE: %v", err)
	}
	return true
}

// leaseKeys returns every key of the test that has to do with leases.
func leaseKeys(t *testing.T, b testredis.Backend) []string {
	t.Helper()
	return testredis.Keys(t, b, b.Prefix+":*lease*")
}

func noLeases(t *testing.T, b testredis.Backend) {
	t.Helper()
	if ks := leaseKeys(t, b); len(ks) != 0 {
		t.Fatalf("lease keys left: %v", ks)
	}
}

func checkItems(t *testing.T, bt *protocol.Batch, want ...string) {
	t.Helper()
	if got, w := itemsOf(bt), "["+strings.Join(want, ",")+"]"; got != w {
		t.Fatalf("batch items\n got %s\nwant %s", got, w)
	}
}

// awkward JSON values that must survive byte for byte.
var awkward = []string{
	`9007199254740993`,
	`-123456789012345678901234`,
	`1.5e300`,
	`"héllo wörld ✓ 日本 😀"`,
	`"\u00e9\ud83d\ude00"`,
	`"a\/b"`,
	`"<tag> & 'q'"`,
	`[]`,
	`{}`,
	`null`,
	`{"z":1,"a":[null,true,false],"m":{"n":[1,2,{"p":null}]}}`,
	`{"id":"x", "spaced" : [ 1 , 2 ] }`,
	`""`,
	`0`,
}

func TestOptionsAreValidated(t *testing.T) {
	cases := []struct {
		name string
		opt  protocol.Option
		ok   bool
	}{
		{"prefix", protocol.WithPrefix("p"), true},
		{"empty prefix", protocol.WithPrefix(""), false},
		{"prefix with brace", protocol.WithPrefix("a{b"), false},
		{"shards 1", protocol.WithDefaultShards(1), true},
		{"shards 1024", protocol.WithDefaultShards(1024), true},
		{"shards 0", protocol.WithDefaultShards(0), false},
		{"shards 1025", protocol.WithDefaultShards(1025), false},
		{"lease 100ms", protocol.WithLeaseTTL(100 * time.Millisecond), true},
		{"lease 99ms", protocol.WithLeaseTTL(99 * time.Millisecond), false},
		{"dead cap 0", protocol.WithDeadLetterCap(0), true},
		{"dead cap -1", protocol.WithDeadLetterCap(-1), false},
	}
	for _, c := range cases {
		_, err := protocol.NewConsumer(nil, c.opt)
		if (err == nil) != c.ok {
			t.Errorf("%s: got error %v, want ok=%v", c.name, err, c.ok)
		}
	}
	c, err := protocol.NewConsumer(nil, protocol.WithDefaultShards(3), protocol.WithLeaseTTL(time.Second), protocol.WithAtMostOnce())
	if err != nil {
		t.Fatal(err)
	}
	if c.LeaseTTL() != time.Second || !c.AtMostOnce() {
		t.Fatalf("options not applied: lease %v, at most once %v", c.LeaseTTL(), c.AtMostOnce())
	}
	if _, err := c.Fetch(context.Background(), "a:b", 0, 1); !errors.Is(err, keys.ErrQueueName) {
		t.Fatalf("Fetch with a bad queue name: got %v, want ErrQueueName", err)
	}
}

// Fetch drains a key's whole array into one leased batch; settling it
// leaves nothing behind.
func TestFetchDrainsWholeKey(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		c := newConsumer(t, b)
		addRaw(t, p, "k", awkward[:4]...)
		addRaw(t, p, "k", awkward[4:]...)

		bt := fetchOne(t, c)
		if bt.Key != "k" || bt.Queue != queue || bt.Shard != 0 || bt.Retry() {
			t.Fatalf("batch key %q queue %q shard %d retry %v", bt.Key, bt.Queue, bt.Shard, bt.Retry())
		}
		checkItems(t, bt, awkward...)
		for i, it := range bt.Items {
			if it.Key != "k" || it.Attempt != 0 || it.LastError != "" {
				t.Fatalf("item %d: key %q attempt %d last error %q", i, it.Key, it.Attempt, it.LastError)
			}
		}
		if v, ok := stored(t, b, "k"); ok {
			t.Fatalf("items key still holds %s after the drain", v)
		}
		if ready(t, b, "k") {
			t.Fatal("key still on the ready index after the drain")
		}
		if ks := testredis.Keys(t, b, b.Prefix+":*:lease:*"); len(ks) != 1 {
			t.Fatalf("want one lease key while the batch is held, got %v", ks)
		}
		fetchNone(t, c)

		settle(t, c, bt, all(len(bt.Items), done)...)
		noLeases(t, b)
		// All that may remain is the wake-up list of idle workers, and the
		// registry of queues.
		for _, k := range testredis.Keys(t, b, b.Prefix+":*") {
			if k != space(b).Wake() && k != keys.Registry(b.Prefix) {
				t.Errorf("key left after settling: %s", k)
			}
		}
		fetchNone(t, c)
	})
}

// Unfinished items go back in front of their key at once; unfinished
// retries come back with their attempt count.
func TestUnfinishedGoBackAtOnce(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b) // default 5s lease: a redelivery here is no lease timeout
		addRaw(t, p, "k", `1`, `2`, `3`)
		bt := fetchOne(t, c)
		addRaw(t, p, "k", `4`)
		settle(t, c, bt, done, protocol.Outcome{}, protocol.Outcome{Kind: protocol.Unfinished})
		if v, _ := stored(t, b, "k"); v != `[2,3,4]` {
			t.Fatalf("key holds %s, want [2,3,4]", v)
		}
		if !ready(t, b, "k") {
			t.Fatal("key not ready after unfinished items were put back")
		}
		bt = fetchOne(t, c)
		checkItems(t, bt, `2`, `3`, `4`)

		// Missing outcomes count as unfinished; the key was empty meanwhile.
		settle(t, c, bt, done)
		if v, _ := stored(t, b, "k"); v != `[3,4]` {
			t.Fatalf("key holds %s, want [3,4]", v)
		}
		bt = fetchOne(t, c)
		checkItems(t, bt, `3`, `4`)
		boom := errors.New("boom")
		settle(t, c, bt, protocol.Outcome{Kind: protocol.Retry, Err: boom}, protocol.Outcome{Kind: protocol.Retry, Err: boom})
		noLeases(t, b)

		rb := fetchOne(t, c)
		if !rb.Retry() {
			t.Fatalf("want a retry batch, got key %q", rb.Key)
		}
		checkItems(t, rb, `3`, `4`)
		settle(t, c, rb, done, protocol.Outcome{Kind: protocol.Unfinished})
		noLeases(t, b)
		rb = fetchOne(t, c)
		checkItems(t, rb, `4`)
		if it := rb.Items[0]; !rb.Retry() || it.Attempt != 1 || it.LastError != "boom" || it.Key != "k" {
			t.Fatalf("unfinished retry came back as retry=%v attempt %d error %q key %q, want attempt 1 error boom key k",
				rb.Retry(), it.Attempt, it.LastError, it.Key)
		}
		settle(t, c, rb, done)
		noLeases(t, b)
		fetchNone(t, c)
		if n, err := dl(c).Count(ctx, queue); err != nil || n != 0 {
			t.Fatalf("CountDead: %d, %v", n, err)
		}
	})
}

// Unknown outcome kinds are refused and change nothing.
func TestSettleRejectsUnknownOutcome(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		c := newConsumer(t, b)
		addRaw(t, p, "k", `1`)
		bt := fetchOne(t, c)
		if err := c.Settle(context.Background(), bt, []protocol.Outcome{{Kind: 99}}); err == nil {
			t.Fatal("Settle accepted an unknown outcome kind")
		}
		if len(testredis.Keys(t, b, b.Prefix+":*:lease:*")) != 1 {
			t.Fatal("refused settlement released the lease")
		}
		settle(t, c, bt, done)
		noLeases(t, b)
	})
}

// A key's shard is the same for producer and consumer; each shard is
// drained on its own, and dead letters remember their shard.
func TestShards(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		const shards = 4
		p := newProducer(t, b, producer.WithDefaultShards(shards))
		c := newConsumer(t, b, protocol.WithDefaultShards(shards))
		want := map[string]bool{}
		for i := range 12 {
			k := "key" + string(rune('a'+i))
			want[k] = true
			addRaw(t, p, k, `"`+k+`"`)
		}
		got := map[string]bool{}
		var dead []*protocol.Batch
		for shard := range shards {
			f, err := c.Fetch(ctx, queue, shard, 100)
			if err != nil {
				t.Fatal(err)
			}
			for _, bt := range f.Batches {
				if bt.Shard != shard || keys.Shard(bt.Key, shards) != shard || got[bt.Key] {
					t.Fatalf("key %s (shard %d) fetched from shard %d, batch shard %d, twice=%v",
						bt.Key, keys.Shard(bt.Key, shards), shard, bt.Shard, got[bt.Key])
				}
				got[bt.Key] = true
				checkItems(t, bt, `"`+bt.Key+`"`)
				if len(dead) < 3 && (len(dead) == 0 || dead[len(dead)-1].Shard != shard) {
					dead = append(dead, bt)
					settle(t, c, bt, protocol.Outcome{Kind: protocol.Dead, Err: errors.New("x")})
				} else {
					settle(t, c, bt, done)
				}
			}
		}
		if len(got) != len(want) {
			t.Fatalf("fetched keys %v, want %v", got, want)
		}
		if len(dead) < 2 {
			t.Fatalf("keys fell into %d shard(s) only; pick other keys", len(dead))
		}
		letters, err := dl(c).List(ctx, queue, 100)
		if err != nil {
			t.Fatal(err)
		}
		if n, err := dl(c).Count(ctx, queue); err != nil || n != int64(len(dead)) || len(letters) != len(dead) {
			t.Fatalf("CountDead %d (%v), DeadLetters %d, want %d", n, err, len(letters), len(dead))
		}
		for _, d := range letters {
			if d.Shard != keys.Shard(d.Key, shards) {
				t.Fatalf("dead letter of %s has shard %d, want %d", d.Key, d.Shard, keys.Shard(d.Key, shards))
			}
		}
		if n, err := dl(c).Requeue(ctx, letters...); err != nil || n != len(letters) {
			t.Fatalf("RequeueDead: %d, %v", n, err)
		}
		for _, bt := range dead {
			f, err := c.Fetch(ctx, queue, bt.Shard, 100)
			if err != nil {
				t.Fatal(err)
			}
			var keysGot []string
			for _, x := range f.Batches {
				keysGot = append(keysGot, x.Key)
				settle(t, c, x, done)
			}
			if !slices.Contains(keysGot, bt.Key) {
				t.Fatalf("requeued key %s not fetched from shard %d (got %v)", bt.Key, bt.Shard, keysGot)
			}
		}
	})
}
