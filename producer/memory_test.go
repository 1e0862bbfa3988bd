package producer_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// Tests of the producer under memory pressure. They run on real
// redis-server processes only: miniredis has no maxmemory.

// At maxmemory under noeviction, Redis refuses the merge scripts' first
// write: every way of appending fails with ErrOutOfMemory, which says so,
// stores nothing and makes no key due (the scripts used to take the refusal
// for a count that is not an integer: ErrNotArray, with the key made due
// all the same). Once memory is freed, appends work again.
func TestOutOfMemory(t *testing.T) {
	pad := strings.Repeat("x", 1000)
	for _, c := range []struct {
		name  string
		flush bool // keys are scheduled (on the later index), not due
		opts  []producer.Option
	}{
		{"merge", false, nil},
		{"flush policy", true, []producer.Option{producer.WithFlushPolicy("q", producer.FlushPolicy{MaxAge: time.Hour})}},
		{"linger", false, []producer.Option{producer.WithLinger(0, 64)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv := testredis.Start(t, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
			b := srv.Backend(t)
			ctx := context.Background()
			p := newProducer(t, b, c.opts...)
			t.Cleanup(func() { p.Close(ctx) })

			// Eight appenders over ten keys, each until Redis refuses (a
			// lingering producer gathers their calls: several keys a call).
			var (
				mu      sync.Mutex
				stored  = make(map[string][]int) // the ids acknowledged, by key
				n       int
				refused []error
				wg      sync.WaitGroup
			)
			for a := range 8 {
				wg.Go(func() {
					for i := range 100_000 {
						id := a*1_000_000 + i
						key := "k" + strconv.Itoa(id%10)
						err := p.AddRaw(ctx, "q", key, json.RawMessage(fmt.Sprintf(`{"id":%d,"pad":%q}`, id, pad)))
						mu.Lock()
						if err == nil {
							stored[key] = append(stored[key], id)
							n++
						} else {
							refused = append(refused, err)
						}
						mu.Unlock()
						if err != nil {
							return
						}
					}
					t.Errorf("appender %d: Redis took 100,000 items past its maxmemory of 2mb", a)
				})
			}
			wg.Wait()
			// Redis' used memory moves by kilobytes as its clients' buffers
			// do: lower maxmemory well under it, so that it stays full. It
			// goes on refusing, and so does a new queue's first append,
			// which must record the queue.
			must(t, b.Client.Do(ctx, b.Client.B().ConfigSet().ParameterValue().ParameterValue("maxmemory", "1mb").Build()).Error())
			refused = append(refused, p.Add(ctx, "q", "k0", 0), p.Add(ctx, "q", "new", 0), p.Add(ctx, "other", "k", 0))
			for _, err := range refused {
				if !errors.Is(err, producer.ErrOutOfMemory) || errors.Is(err, producer.ErrNotArray) ||
					!strings.HasPrefix(err.Error(), "producer: append to ") ||
					!strings.Contains(err.Error(), "used memory is past maxmemory, and maxmemory-policy is noeviction") ||
					!strings.HasSuffix(err.Error(), "stored nothing") {
					t.Fatalf("an append at maxmemory failed with %q, want ErrOutOfMemory saying so", err)
				}
			}

			// What is stored is what was acknowledged, and no other key is
			// due, scheduled or woken for.
			var withItems []string
			for k := range 10 {
				key := "k" + strconv.Itoa(k)
				var items []struct{ ID int }
				if v, ok := get(t, b, "q", key); ok {
					withItems = append(withItems, key)
					if err := json.Unmarshal([]byte(v), &items); err != nil {
						t.Fatalf("%s holds %.60s...: %v", key, v, err)
					}
				}
				var ids []int
				for _, it := range items {
					ids = append(ids, it.ID)
				}
				slices.Sort(ids)
				slices.Sort(stored[key])
				if !slices.Equal(ids, stored[key]) {
					t.Fatalf("%s holds %d items, not the %d acknowledged", key, len(ids), len(stored[key]))
				}
			}
			sp := keys.For(b.Prefix, "q", 0)
			ready, later, wake := members(t, b, sp.Ready()), members(t, b, sp.Later()), list(t, b, sp.Wake())
			if c.flush {
				ready, later = later, ready
			}
			if !slices.Equal(ready, withItems) || len(later) > 0 ||
				slices.ContainsFunc(wake, func(k string) bool { return k != "" && !slices.Contains(withItems, k) }) {
				t.Fatalf("keys with items %v; due or scheduled as they should be %v, the other way %v; on the wake list %v",
					withItems, ready, later, wake)
			}

			must(t, b.Client.Do(ctx, b.Client.B().ConfigSet().ParameterValue().ParameterValue("maxmemory", "0").Build()).Error())
			must(t, p.Add(ctx, "q", "k0", 1))
			must(t, p.Add(ctx, "other", "k", 1))
			t.Logf("%d items stored, then %d appends refused, each with ErrOutOfMemory", n, len(refused))
		})
	}
}

// members returns the members of a sorted set, sorted by name.
func members(t *testing.T, b testredis.Backend, zset string) []string {
	t.Helper()
	ms, err := b.Client.Do(context.Background(), b.Client.B().Zrange().Key(zset).Min("0").Max("-1").Build()).AsStrSlice()
	must(t, err)
	slices.Sort(ms)
	return ms
}

// list returns the elements of a list.
func list(t *testing.T, b testredis.Backend, l string) []string {
	t.Helper()
	ms, err := b.Client.Do(context.Background(), b.Client.B().Lrange().Key(l).Start(0).Stop(-1).Build()).AsStrSlice()
	must(t, err)
	return ms
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// A producer with a logger warns once when Redis may evict keys, naming the
// policy and the node, and never under noeviction: whatever the appends, a
// lingering producer as well as a direct one, and with one CONFIG GET per
// producer, not per append. A producer without a logger asks nothing.
func TestWarnsAboutEviction(t *testing.T) {
	for _, policy := range []string{"allkeys-lru", "noeviction"} {
		t.Run(policy, func(t *testing.T) {
			srv := testredis.Start(t, "--maxmemory-policy", policy)
			b := srv.Backend(t)
			ctx := context.Background()
			core, logs := observer.New(zapcore.DebugLevel)
			log := zap.New(core)
			silent := newProducer(t, b)
			direct := newProducer(t, b, producer.WithLogger(log))
			lingering := newProducer(t, b, producer.WithLogger(log), producer.WithLinger(0, 10))
			for i := range 20 {
				for _, p := range []*producer.Producer{silent, direct, lingering} {
					must(t, p.Add(ctx, "q", "k"+strconv.Itoa(i%3), i))
				}
			}
			waitFor(t, "both checks", func() bool { return commandCalls(t, b, "config|get") == 2 })
			for _, p := range []*producer.Producer{silent, direct, lingering} {
				must(t, p.Close(ctx)) // waits for its check
			}
			if n := commandCalls(t, b, "config|get"); n != 2 {
				t.Fatalf("%d CONFIG GET for two producers with a logger, 60 appends", n)
			}
			want := 2
			if policy == "noeviction" {
				want = 0
			}
			all := logs.All()
			if len(all) != want {
				t.Fatalf("%d lines under maxmemory-policy %s, want %d: %v", len(all), policy, want, all)
			}
			for _, e := range all {
				f := e.ContextMap()
				if e.Level != zapcore.WarnLevel || e.LoggerName != "producer" || e.Message != protocol.EvictionWarning ||
					f["maxmemory_policy"] != policy || fmt.Sprint(f["nodes"]) != fmt.Sprint([]string{srv.Addr}) {
					t.Fatalf("logged %s %s %q %v, want the eviction warning naming %s on %s", e.Level, e.LoggerName, e.Message, f, policy, srv.Addr)
				}
			}
		})
	}
}

// Close cancels an eviction check still on its way and waits for it, and
// no check begins after Close: no goroutine of the producer is left.
func TestCloseEndsTheEvictionCheck(t *testing.T) {
	b := testredis.Mini(t)
	ctx := context.Background()
	before := runningNow(t, b)
	asked := make(chan struct{}, 1)
	p, err := producer.New(stuckConfig{b.Client, asked}, producer.WithPrefix(b.Prefix), producer.WithLogger(zap.NewNop()))
	must(t, err)
	must(t, p.Add(ctx, "q", "k", 1))
	select {
	case <-asked:
	case <-time.After(10 * time.Second):
		t.Fatal("no eviction check after the first append")
	}
	// Uncancelled, the check would wait for its own timeout (10 s): half
	// of it tells the two apart on a loaded machine too.
	start := time.Now()
	must(t, p.Close(ctx))
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Close took %v with the check's CONFIG GET unanswered: it did not cancel the check", d)
	}
	goleak.VerifyNone(t, before)
}

// stuckConfig is a client whose nodes never answer CONFIG: the call
// returns when its context ends. It signals asked at each.
type stuckConfig struct {
	rueidis.Client
	asked chan struct{}
}

func (c stuckConfig) Nodes() map[string]rueidis.Client {
	nodes := make(map[string]rueidis.Client)
	for addr, n := range c.Client.Nodes() {
		nodes[addr] = stuckConfig{n, c.asked}
	}
	return nodes
}

func (c stuckConfig) Do(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResult {
	if cmd.Commands()[0] != "CONFIG" {
		return c.Client.Do(ctx, cmd)
	}
	select {
	case c.asked <- struct{}{}:
	default:
	}
	<-ctx.Done()
	return rueidis.NewErrorResult(ctx.Err())
}
