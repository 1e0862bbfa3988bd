package batchq_test

// The fault harness's producers, tallies and figures (see
// faultharness_test.go): feed, the handled counts, tally, the leases of a
// killed worker, and the numbers each fault test prints.

import (
	"context"
	"encoding/json"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// ---------------------------------------------------------------------------
// Producers and tallies.

// feed appends items with unique ids to random keys of crashQueue from
// several goroutines until stopped, and records the ids of the items whose
// append returned nil: those I1 promises.
type feed struct {
	next   atomic.Int64
	ok     atomic.Int64 // appends that returned nil
	failed atomic.Int64 // appends that returned an error
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	stored   []int
	firstErr error
}

type feedSpec struct {
	keys       int           // items go to key0..key<keys-1>
	goroutines int           // appending goroutines
	perAdd     int           // items per append
	every      time.Duration // each goroutine appends once per tick
	timeout    time.Duration // per append
	// observe, if set, is told of each append once it returned: its key,
	// its items' ids (first to first+n-1), when it began and its error. It
	// is called from the appending goroutines, concurrently.
	observe func(key string, first, n int, began time.Time, err error)
}

func startFeed(t testing.TB, p *producer.Producer, s feedSpec) *feed {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	f := &feed{cancel: cancel}
	for range s.goroutines {
		f.wg.Go(func() {
			tick := time.NewTicker(s.every)
			defer tick.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				first := int(f.next.Add(int64(s.perAdd))) - s.perAdd
				items := make([]any, s.perAdd)
				for i := range items {
					items[i] = item{ID: first + i}
				}
				key, began := "key"+strconv.Itoa(rand.IntN(s.keys)), time.Now()
				actx, acancel := context.WithTimeout(context.Background(), s.timeout)
				err := p.Add(actx, crashQueue, key, items...)
				acancel()
				if s.observe != nil {
					s.observe(key, first, s.perAdd, began, err)
				}
				if err != nil {
					f.failed.Add(1)
					f.mu.Lock()
					if f.firstErr == nil {
						f.firstErr = err
					}
					f.mu.Unlock()
					continue
				}
				f.mu.Lock()
				for i := range s.perAdd {
					f.stored = append(f.stored, first+i)
				}
				f.mu.Unlock()
				f.ok.Add(1)
			}
		})
	}
	t.Cleanup(f.stop)
	return f
}

// stop stops the appends and waits for those under way.
func (f *feed) stop() {
	f.cancel()
	f.wg.Wait()
}

// result returns the ids whose append returned nil and the first error.
func (f *feed) result() ([]int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.stored), f.firstErr
}

// tally compares handled counts with the ids that must be handled: lost are
// those never handled; dups are the ids handled more than once (any id).
func tally(want []int, counts map[int]int) (lost, dups []int) {
	for _, id := range want {
		if counts[id] == 0 {
			lost = append(lost, id)
		}
	}
	for id, n := range counts {
		if n > 1 {
			dups = append(dups, id)
		}
	}
	slices.Sort(dups)
	return lost, dups
}

// awaitFailover waits until every stored item is handled, but for those
// that, without replica acks (acks 0), the failover may have lost
// (mayLose): the wait for them ends 10 s after the others are in (a reaped
// lease comes back within 2 s), and checkFailover counts those still
// missing. wait bounds a hang.
func awaitFailover(t testing.TB, handled *memCounts, stored []int, acks int, mayLose func(id int) bool, wait time.Duration) {
	t.Helper()
	var owed, maybe []int
	for _, id := range stored {
		if acks == 0 && mayLose(id) {
			maybe = append(maybe, id)
		} else {
			owed = append(owed, id)
		}
	}
	eventually(t, wait, "every stored item handled", func() bool { return handled.handledAll(owed) })
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end) && !handled.handledAll(maybe); {
		time.Sleep(50 * time.Millisecond)
	}
}

// checkFailover tallies the stored items a failover lost or had handled
// twice, and fails t for any loss with replica acks (acks > 0), and for a
// loss or a duplicate that explained does not cover (the items the failover
// may touch; outside says which those others are, for the message).
// unexplainedLost and unexplainedDups are the latter.
func checkFailover(t testing.TB, stored []int, counted map[int]int, acks int, explained func(id int) bool, outside string) (lost, dups, unexplainedLost, unexplainedDups []int) {
	t.Helper()
	lost, dups = tally(stored, counted)
	for _, id := range lost {
		if !explained(id) {
			unexplainedLost = append(unexplainedLost, id)
		}
	}
	for _, id := range dups {
		if !explained(id) {
			unexplainedDups = append(unexplainedDups, id)
		}
	}
	if acks > 0 && len(lost) > 0 {
		t.Errorf("%d items whose append returned nil with replica acks were never handled, e.g. %v", len(lost), lost[:min(len(lost), 10)])
	}
	if len(unexplainedLost) > 0 {
		t.Errorf("%d items %s were lost, e.g. %v", len(unexplainedLost), outside, unexplainedLost[:min(len(unexplainedLost), 10)])
	}
	if len(unexplainedDups) > 0 {
		t.Errorf("%d items %s were handled more than once, e.g. %v", len(unexplainedDups), outside, unexplainedDups[:min(len(unexplainedDups), 10)])
	}
	return lost, dups, unexplainedLost, unexplainedDups
}

// handledCounts reads the hash the worker subprocesses count handled ids in.
func handledCounts(t testing.TB, b testredis.Backend) map[int]int {
	t.Helper()
	m, err := b.Client.Do(context.Background(), b.Client.B().Hgetall().Key(b.Prefix+":test:handled").Build()).AsStrMap()
	must(t, err)
	out := make(map[int]int, len(m))
	for k, v := range m {
		id, err1 := strconv.Atoi(k)
		n, err2 := strconv.Atoi(v)
		if err1 != nil || err2 != nil {
			t.Fatalf("handled hash holds %q: %q", k, v)
		}
		out[id] = n
	}
	return out
}

func handledLen(b testredis.Backend) int64 {
	n, _ := b.Client.Do(context.Background(), b.Client.B().Hlen().Key(b.Prefix+":test:handled").Build()).AsInt64()
	return n
}

// memCounts counts handled ids in memory, for workers in the test process.
type memCounts struct {
	mu     sync.Mutex
	counts map[int]int
	total  int
}

func (m *memCounts) add(id int) {
	m.mu.Lock()
	if m.counts == nil {
		m.counts = make(map[int]int)
	}
	m.counts[id]++
	m.total++
	m.mu.Unlock()
}

func (m *memCounts) snapshot() map[int]int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.counts)
}

// handledAll reports whether every id in ids was handled.
func (m *memCounts) handledAll(ids []int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, id := range ids {
		if m.counts[id] == 0 {
			return false
		}
	}
	return true
}

// leasesOf returns the leases owner holds on crashQueue (their members of
// the leases index), and the ids of the items those leases hold.
func leasesOf(t testing.TB, b testredis.Backend, owner string) (leases []string, ids []int) {
	t.Helper()
	ctx, c := context.Background(), b.Client
	sp := keys.For(b.Prefix, crashQueue, 0)
	members, err := c.Do(ctx, c.B().Zrange().Key(sp.Leases()).Min("0").Max("-1").Build()).AsStrSlice()
	must(t, err)
	for _, m := range members {
		l := protocol.ParseLease(m)
		if l.Owner != owner {
			continue
		}
		tok := l.Token
		leases = append(leases, m)
		isKey := l.Key != ""
		if isKey {
			v, err := c.Do(ctx, c.B().Get().Key(sp.Lease(tok)).Build()).AsBytes()
			if rueidis.IsRedisNil(err) {
				continue // a drain that found no key
			}
			must(t, err)
			var items []item
			must(t, json.Unmarshal(v, &items))
			for _, it := range items {
				ids = append(ids, it.ID)
			}
			continue
		}
		envs, err := c.Do(ctx, c.B().Hvals().Key(sp.Lease(tok)).Build()).AsStrSlice()
		must(t, err)
		for _, e := range envs {
			var env struct {
				Item item `json:"i"`
			}
			must(t, json.Unmarshal([]byte(e), &env))
			ids = append(ids, env.Item.ID)
		}
	}
	return leases, ids
}

// leasesGone reports whether none of leases is left in the shard's leases
// index.
func leasesGone(ctx context.Context, b testredis.Backend, leases []string) (bool, error) {
	sp := keys.For(b.Prefix, crashQueue, 0)
	arr, err := b.Client.Do(ctx, b.Client.B().Zmscore().Key(sp.Leases()).Member(leases...).Build()).ToArray()
	if err != nil {
		return false, err
	}
	for _, m := range arr {
		if !m.IsNil() {
			return false, nil
		}
	}
	return true, nil
}

// stats returns the median and the maximum of ds (zeros when empty).
func stats(ds []time.Duration) (median, maximum time.Duration) {
	if len(ds) == 0 {
		return 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2], s[len(s)-1]
}

func ms(d time.Duration) string { return d.Round(time.Millisecond).String() }

// loadAvg returns the 1-minute load average, for the figures' context (the
// timings of a 2-core box depend on what else runs), or "?" off Linux.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

// sleepRandom sleeps a random time in [lo, hi).
func sleepRandom(lo, hi time.Duration) { time.Sleep(lo + rand.N(hi-lo)) }

// serverStat returns the calls (or count) of one line of an INFO section,
// e.g. "cmdstat_eval:calls=3,..." or "errorstat_NOSCRIPT:count=2"; 0 when absent.
func serverStat(t testing.TB, b testredis.Backend, section, name string) int64 {
	t.Helper()
	info, err := b.Client.Do(context.Background(), b.Client.B().Info().Section(section).Build()).ToString()
	must(t, err)
	return infoStat(info, name)
}

// infoStat returns the calls (or count) of one line of an INFO reply, as
// serverStat does.
func infoStat(info, name string) int64 {
	for line := range strings.SplitSeq(info, "\n") {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), name+":")
		if !ok {
			continue
		}
		for field := range strings.SplitSeq(rest, ",") {
			k, v, _ := strings.Cut(field, "=")
			if k == "calls" || k == "count" {
				n, _ := strconv.ParseInt(v, 10, 64)
				return n
			}
		}
	}
	return 0
}
