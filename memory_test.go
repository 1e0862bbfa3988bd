package batchq_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// Tests of Redis under memory pressure: at maxmemory with noeviction, and
// with a policy that evicts. They run on real redis-server processes only:
// miniredis has no maxmemory.

// paddedItem is an item of about a kilobyte, to fill Redis' memory fast.
type paddedItem struct {
	ID  int    `json:"id"`
	Pad string `json:"pad"`
}

// With Redis at maxmemory under noeviction, appends fail with
// producer.ErrOutOfMemory and store nothing; a worker started then cannot
// drain (Redis refuses every command queued in a MULTI), says why in one
// line rather than one per refused round, handles nothing, and recovers by
// itself once memory is freed: every item whose append returned nil is
// handled exactly once, and no refused one.
func TestOutOfMemoryLosesNothing(t *testing.T) {
	srv := testredis.Start(t, "--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
	b := srv.Backend(t)
	ctx := context.Background()
	plain := newProducer(t, b)
	lingering, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithLinger(0, 64))
	must(t, err)
	t.Cleanup(func() { lingering.Close(ctx) })

	// Four appenders, two per producer (the merge script, and the
	// lingering producer's script of many keys), each until Redis refuses.
	pad := strings.Repeat("x", 1000)
	var (
		mu      sync.Mutex
		stored  = make(map[int]bool)
		refused []error
		wg      sync.WaitGroup
	)
	for a, p := range []*producer.Producer{plain, plain, lingering, lingering} {
		wg.Go(func() {
			for i := 0; i < 100_000; i++ {
				id := a*1_000_000 + i
				err := p.Add(ctx, "q", "k"+strconv.Itoa(id%100), paddedItem{ID: id, Pad: pad})
				mu.Lock()
				if err == nil {
					stored[id] = true
				} else {
					refused = append(refused, err)
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
			t.Errorf("appender %d: Redis took 100,000 items past its maxmemory of 3mb", a)
		})
	}
	wg.Wait()
	// Redis' used memory moves by kilobytes as its clients' buffers do:
	// lower maxmemory well under it, so that it stays full while the
	// worker runs.
	must(t, b.Client.Do(ctx, b.Client.B().ConfigSet().ParameterValue().ParameterValue("maxmemory", "1mb").Build()).Error())
	for _, err := range refused {
		if !errors.Is(err, producer.ErrOutOfMemory) || errors.Is(err, producer.ErrNotArray) ||
			!strings.Contains(err.Error(), "maxmemory") || !strings.Contains(err.Error(), "stored nothing") {
			t.Fatalf("an append refused at maxmemory failed with %q, want producer.ErrOutOfMemory", err)
		}
	}
	// A queue nobody recorded yet cannot be recorded either.
	if err := plain.Add(ctx, "fresh", "k", paddedItem{ID: -1}); !errors.Is(err, producer.ErrOutOfMemory) {
		t.Fatalf("the first append to a new queue at maxmemory: %v, want producer.ErrOutOfMemory", err)
	}

	log, logs := observed(t, zap.IncreaseLevel(zap.InfoLevel))
	w := newWorker(t, b, batchq.WithLogger(log))
	var handled sync.Map // id -> *atomic.Int32: times handled
	batchq.Handle(w, "q", func(ctx context.Context, it paddedItem) error {
		n, _ := handled.LoadOrStore(it.ID, new(atomic.Int32))
		n.(*atomic.Int32).Add(1)
		return nil
	})
	runWorker(t, w)
	eventually(t, 30*time.Second, "the worker's line that Redis is out of memory", func() bool {
		return logs.FilterMessageSnippet("draining keys").FilterFieldKey("error").Len() > 0
	})
	// The worker keeps trying: three more refused drains (a few a second;
	// the deadline only bounds a hang), and nothing handled meanwhile.
	before := serverStat(t, b, "errorstats", "errorstat_EXECABORT")
	eventually(t, 30*time.Second, "three more refused drains: the worker keeps trying", func() bool {
		return serverStat(t, b, "errorstats", "errorstat_EXECABORT")-before >= 3
	})
	refusedRounds := serverStat(t, b, "errorstats", "errorstat_EXECABORT") - before
	if n := count(&handled); n != 0 {
		t.Fatalf("%d items handled while Redis refused every drain", n)
	}
	// The start's registry warning (its script's write is refused too) and
	// the outage line, each once, each naming the cause: not a line per
	// refused round.
	var warns []string
	named := 0
	for _, e := range logs.FilterLevelExact(zapcore.WarnLevel).All() {
		warns = append(warns, e.Message)
		if strings.Contains(fmt.Sprint(e.ContextMap()["error"]), producer.ErrOutOfMemory.Error()) {
			named++
		}
	}
	if len(warns) > 2 || named != len(warns) {
		t.Fatalf("%d warn lines (%d naming the cause) for %d refused drains, want at most 2, each naming it: %q",
			len(warns), named, refusedRounds, warns)
	}

	// The operator frees memory: the worker recovers by itself.
	freed := time.Now()
	must(t, b.Client.Do(ctx, b.Client.B().ConfigSet().ParameterValue().ParameterValue("maxmemory", "0").Build()).Error())
	eventually(t, 30*time.Second, "every stored item handled", func() bool { return count(&handled) >= len(stored) })
	recovery := time.Since(freed)
	eventually(t, 30*time.Second, "the end of the outage in the log", func() bool {
		return logs.FilterMessage("Redis calls succeed again").Len() == 1
	})
	lost, twice, strays := 0, 0, 0
	for id := range stored {
		n, ok := handled.Load(id)
		switch {
		case !ok:
			lost++
		case n.(*atomic.Int32).Load() > 1:
			twice++
		}
	}
	handled.Range(func(id, _ any) bool {
		if !stored[id.(int)] {
			strays++
		}
		return true
	})
	if lost != 0 || twice != 0 || strays != 0 {
		t.Fatalf("of %d stored items, %d lost and %d handled twice; %d refused items handled", len(stored), lost, twice, strays)
	}
	t.Logf("MEMORY noeviction, maxmemory 3mb (1mb once full): %d items stored, %d appends refused with ErrOutOfMemory (none stored); "+
		"%d drains refused while it watched, in %d warn lines; every stored item handled once, %v after maxmemory was raised",
		len(stored), len(refused), refusedRounds, len(warns), recovery.Round(time.Millisecond))
}

// count returns how many entries m holds.
func count(m *sync.Map) int {
	n := 0
	m.Range(func(any, any) bool { n++; return true })
	return n
}

// A worker warns once at start when Redis may evict keys, naming the
// policy and the node, and says nothing under noeviction. (A producer's
// warning is tested in producer/memory_test.go.)
func TestWarnsAboutEviction(t *testing.T) {
	for _, policy := range []string{"allkeys-lru", "noeviction"} {
		t.Run(policy, func(t *testing.T) {
			srv := testredis.Start(t, "--maxmemory-policy", policy)
			b := srv.Backend(t)
			log, logs := observed(t, zap.IncreaseLevel(zap.WarnLevel))
			w, err := batchq.NewWorker(b.Client, batchq.WithPrefix(b.Prefix), batchq.WithLogger(log))
			must(t, err)
			batchq.Handle(w, "q", func(context.Context, item) error { return nil })
			stop := runWorker(t, w)
			if policy == "allkeys-lru" {
				eventually(t, 30*time.Second, "an eviction warning", func() bool {
					return logs.FilterField(zap.String("maxmemory_policy", "allkeys-lru")).Len() == 1
				})
			}
			eventually(t, 30*time.Second, "the worker's check", func() bool {
				return serverStat(t, b, "commandstats", "cmdstat_config|get") == 1
			})
			time.Sleep(100 * time.Millisecond) // room for a second line
			stop()
			checkEvictionWarnings(t, logs, policy, []string{srv.Addr}, 1)
		})
	}
}

// On Redis Cluster, workers and producers ask every node: one master that
// may evict is found and named, whichever node a keyless command would go
// to.
func TestWarnsAboutEvictionOnCluster(t *testing.T) {
	nodes := testredis.StartCluster(t)
	c := testredis.Client(t, nodes[0].Addr)
	lru := nodes[2]
	lc := c.Nodes()[lru.Addr] // a client of that node alone
	must(t, lc.Do(context.Background(), lc.B().ConfigSet().ParameterValue().ParameterValue("maxmemory-policy", "volatile-lru").Build()).Error())
	log, logs := observed(t, zap.IncreaseLevel(zap.WarnLevel))
	w, err := batchq.NewWorker(c, batchq.WithLogger(log))
	must(t, err)
	batchq.Handle(w, "q", func(context.Context, item) error { return nil })
	p, err := producer.New(c, producer.WithLogger(log))
	must(t, err)
	stop := runWorker(t, w)
	must(t, p.Add(context.Background(), "q", "k", item{ID: 1}))
	eventually(t, 30*time.Second, "a warning from the worker and one from the producer", func() bool {
		return logs.FilterMessage(protocol.EvictionWarning).Len() == 2
	})
	must(t, p.Close(context.Background()))
	stop()
	checkEvictionWarnings(t, logs, "volatile-lru", []string{lru.Addr}, 2)
}

// checkEvictionWarnings checks the warn lines logged under policy: want
// eviction warnings, each naming policy and nodes, and none when policy is
// noeviction; and no other warn line.
func checkEvictionWarnings(t *testing.T, logs *observer.ObservedLogs, policy string, nodes []string, want int) {
	t.Helper()
	if policy == "noeviction" {
		want = 0
	}
	warns := logs.FilterLevelExact(zapcore.WarnLevel).All()
	if len(warns) != want {
		t.Fatalf("%d warn lines under maxmemory-policy %s, want %d: %v", len(warns), policy, want, warns)
	}
	for _, e := range warns {
		f := e.ContextMap()
		if e.Message != protocol.EvictionWarning || f["maxmemory_policy"] != policy || fmt.Sprint(f["nodes"]) != fmt.Sprint(nodes) {
			t.Fatalf("warned %q %v, want the eviction warning naming %s on %v", e.Message, f, policy, nodes)
		}
	}
}
