package batchq_test

// The fault suite: invariants I1 and I2 of DESIGN.md under the faults a
// deployment meets, on a real redis-server: workers killed with SIGKILL,
// workers restarted gracefully, Redis killed and restarted, connections cut
// mid-stream. Each test logs one line starting with "FAULT " with its
// figures (items, faults, lost, duplicates, recovery times), which
// RELIABILITY.md quotes.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// ---------------------------------------------------------------------------
// Worker subprocesses.

// workerEnv, when set, makes this test binary a worker process instead of a
// test run (see TestMain); it holds the worker's procConfig as JSON.
const workerEnv = "BATCHQ_TEST_WORKER"

// procConfig configures a worker subprocess.
type procConfig struct {
	Addr        string        `json:"addr"`
	Prefix      string        `json:"prefix"`
	Name        string        `json:"name,omitempty"`        // batchq.WithName; empty: the default name
	Concurrency int           `json:"concurrency,omitempty"` // 0: 8
	LeaseTTL    time.Duration `json:"lease_ttl,omitempty"`   // 0: the default (5s)
	Work        time.Duration `json:"work,omitempty"`        // the handler's time per item
	Shards      int           `json:"shards,omitempty"`      // batchq.WithShards; 0: 1
	// Items whose id is a multiple of SlowEvery (when above 0) take Slow to
	// 1.5 Slow instead of Work. A prime spreads them over the keys of a
	// producer that gives each key a run of consecutive ids.
	SlowEvery int           `json:"slow_every,omitempty"`
	Slow      time.Duration `json:"slow,omitempty"`
}

// workerMain is a worker process handling crashQueue: each item takes the
// configured time, then its id's count is incremented in the hash
// <prefix>:test:handled before the handler returns. It prints "ready" once
// SIGTERM would start a graceful shutdown, exits 0 after one, and exits at
// once when its stdin closes (the test process is gone).
func workerMain() int {
	var cfg procConfig
	if err := json.Unmarshal([]byte(os.Getenv(workerEnv)), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "worker config:", err)
		return 2
	}
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(3)
	}()
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{cfg.Addr}, DisableCache: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer rdb.Close()
	opts := []batchq.Option{batchq.WithPrefix(cfg.Prefix), batchq.WithConcurrency(orDefault(cfg.Concurrency, 8))}
	if cfg.Name != "" {
		opts = append(opts, batchq.WithName(cfg.Name))
	}
	if cfg.LeaseTTL > 0 {
		opts = append(opts, batchq.WithLeaseTTL(cfg.LeaseTTL))
	}
	if cfg.Shards > 0 {
		opts = append(opts, batchq.WithShards(cfg.Shards))
	}
	w, err := batchq.NewWorker(rdb, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	handled := cfg.Prefix + ":test:handled"
	batchq.Handle(w, crashQueue, func(ctx context.Context, it item) error {
		d := cfg.Work
		if cfg.SlowEvery > 0 && it.ID%cfg.SlowEvery == 0 {
			d = cfg.Slow + rand.N(cfg.Slow/2+1)
		}
		time.Sleep(d)
		return rdb.Do(ctx, rdb.B().Hincrby().Key(handled).Field(strconv.Itoa(it.ID)).Increment(1).Build()).Error()
	})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	fmt.Println("ready")
	if err := w.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func orDefault(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

// proc is a worker subprocess.
type proc struct {
	name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser // closing it ends the worker
	ready chan struct{}  // closed once the worker runs
	done  chan struct{}  // closed once the process has exited and been reaped
	// Set before done is closed.
	err    error // what cmd.Wait returned
	exited time.Time
}

// startProc starts a worker subprocess on b with cfg (Addr and Prefix are
// b's). It is killed and reaped when the test ends, if it has not exited.
func startProc(t testing.TB, b testredis.Backend, cfg procConfig) *proc {
	t.Helper()
	cfg.Addr, cfg.Prefix = b.Addr, b.Prefix
	conf, err := json.Marshal(cfg)
	must(t, err)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// Under -race a process sleeps a second on its way out (GORACE
	// atexit_sleep_ms); without that sleep, the time a worker takes to exit
	// is its own.
	gorace := strings.TrimSpace(os.Getenv("GORACE") + " atexit_sleep_ms=0")
	cmd.Env = append(os.Environ(), workerEnv+"="+string(conf), "GORACE="+gorace)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	must(t, err)
	stdout, err := cmd.StdoutPipe()
	must(t, err)
	must(t, cmd.Start())
	p := &proc{name: cfg.Name, cmd: cmd, stdin: stdin, ready: make(chan struct{}), done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stdout)
		ready := false
		for sc.Scan() {
			if sc.Text() == "ready" && !ready {
				ready = true
				close(p.ready)
			}
		}
		p.err = cmd.Wait() // after every read from stdout, as exec requires
		p.exited = time.Now()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stdin.Close()
		p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

// signal sends sig to the worker.
func (p *proc) signal(t testing.TB, sig os.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal worker %s: %v", p.name, err)
	}
}

// wait waits for the worker to exit and returns its exit status.
func (p *proc) wait(t testing.TB, timeout time.Duration) error {
	t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		t.Fatalf("worker %s still running %v later", p.name, timeout)
		return nil
	}
}

// waitReady waits until the worker runs (SIGTERM then shuts it down gracefully).
func (p *proc) waitReady(t testing.TB, timeout time.Duration) {
	t.Helper()
	select {
	case <-p.ready:
	case <-p.done:
		t.Fatalf("worker %s exited before it was ready: %v", p.name, p.err)
	case <-time.After(timeout):
		t.Fatalf("worker %s not ready after %v", p.name, timeout)
	}
}

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
				actx, acancel := context.WithTimeout(context.Background(), s.timeout)
				err := p.Add(actx, crashQueue, "key"+strconv.Itoa(rand.IntN(s.keys)), items...)
				acancel()
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

// quietLogger returns a logger for in-process workers that keeps warnings
// in memory and prints them only if the test fails: a fault test makes the
// workers log many expected failures.
func quietLogger(t testing.TB) (*zap.Logger, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zap.InfoLevel)
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		all := logs.All()
		t.Logf("the workers' last %d of %d log entries:", min(len(all), 200), len(all))
		for _, e := range all[max(len(all)-200, 0):] {
			t.Logf("%s %s %s %v", e.Time.Format("15:04:05.000"), e.Level, e.Message, e.ContextMap())
		}
	})
	return zap.New(core), logs
}

// ---------------------------------------------------------------------------
// 1. Workers killed with SIGKILL.

type killSpec struct {
	items, keys, rounds int           // items appended to keys in rounds, each round one append of items/(keys*rounds) per key
	spread              time.Duration // the rounds start evenly over about this long
	kills               int           // at least this many SIGKILLs, and on until the last round is appended
	worker              procConfig
	maxRedelivery       time.Duration
}

// I1 across SIGKILL: three worker processes, one killed at random moments
// and replaced at once, while a producer appends. Nothing is lost; the only
// items handled twice are those the killed workers held in their leases;
// their leases go back to their keys within the lease TTL and a reaper tick.
func TestFaultWorkerKills(t *testing.T) {
	t.Run("lease_ttl_5s", func(t *testing.T) {
		testWorkerKills(t, killSpec{
			items: 200_000, keys: 1000, rounds: 20, spread: 15 * time.Second, kills: 20,
			worker:        procConfig{Work: 100 * time.Microsecond},
			maxRedelivery: 10 * time.Second,
		})
	})
	// Handlers longer than the lease TTL: only heartbeats keep their leases.
	// A live worker's lease taken from it would show as a duplicate outside
	// the killed workers' leases.
	t.Run("lease_ttl_1s_slow_handlers", func(t *testing.T) {
		testWorkerKills(t, killSpec{
			items: 30_000, keys: 1000, rounds: 10, spread: 10 * time.Second, kills: 20,
			worker:        procConfig{LeaseTTL: time.Second, Work: 100 * time.Microsecond, SlowEvery: 499, Slow: 2 * time.Second},
			maxRedelivery: 3 * time.Second,
		})
	})
}

func testWorkerKills(t *testing.T, s killSpec) {
	b := testredis.Real(t)
	start, load := time.Now(), loadAvg()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()

	seq := 0
	spawn := func() *proc {
		seq++
		cfg := s.worker
		cfg.Name = "w" + strconv.Itoa(seq)
		return startProc(t, b, cfg)
	}
	live := []*proc{spawn(), spawn(), spawn()}

	// The producer: round r appends items r*keys*per ... to every key.
	p := newProducer(t, b)
	per := s.items / (s.keys * s.rounds)
	produced := make(chan error, 1)
	wg.Go(func() {
		errs := make(chan error, 1)
		for r := range s.rounds {
			select {
			case <-ctx.Done():
				produced <- ctx.Err()
				return
			case <-time.After(time.Until(start.Add(s.spread * time.Duration(r) / time.Duration(s.rounds)))):
			}
			var round sync.WaitGroup
			for g := range 8 {
				round.Go(func() {
					for k := g; k < s.keys; k += 8 {
						items := make([]any, per)
						for j := range items {
							items[j] = item{ID: (r*s.keys+k)*per + j}
						}
						if err := p.Add(ctx, crashQueue, "key"+strconv.Itoa(k), items...); err != nil {
							select {
							case errs <- err:
							default:
							}
							return
						}
					}
				})
			}
			round.Wait()
			select {
			case err := <-errs:
				produced <- err
				return
			default:
			}
		}
		produced <- nil
	})

	var mu sync.Mutex
	var redeliveries []time.Duration
	var slowRedeliveries []string
	killedHeld := make(map[int]bool)
	kills, leasesHeld, itemsHeld := 0, 0, 0
	producing := true
	for kills < s.kills || producing {
		sleepRandom(300*time.Millisecond, 1500*time.Millisecond)
		select {
		case err := <-produced:
			must(t, err)
			producing = false
		default:
		}
		i := rand.IntN(len(live))
		victim := live[i]
		killed := time.Now()
		victim.signal(t, syscall.SIGKILL)
		live[i] = spawn()
		victim.wait(t, 10*time.Second)
		kills++
		leases, ids := leasesOf(t, b, victim.name)
		leasesHeld += len(leases)
		itemsHeld += len(ids)
		for _, id := range ids {
			killedHeld[id] = true
		}
		if len(leases) == 0 {
			continue
		}
		wg.Go(func() {
			const limit = time.Minute
			for {
				gone, err := leasesGone(ctx, b, leases)
				took := time.Since(killed)
				switch {
				case gone:
					mu.Lock()
					redeliveries = append(redeliveries, took)
					mu.Unlock()
					return
				case ctx.Err() != nil:
					return
				case err != nil:
					t.Errorf("poll the leases of %s: %v", victim.name, err)
					return
				case took > limit:
					mu.Lock()
					slowRedeliveries = append(slowRedeliveries, fmt.Sprintf("%s (%d leases)", victim.name, len(leases)))
					mu.Unlock()
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
	killPhase := time.Since(start)

	eventually(t, 3*time.Minute, "every item handled", func() bool { return handledLen(b) >= int64(s.items) })
	eventually(t, 20*time.Second, "no lease or pending key left", func() bool { return len(leftKeys(t, b)) == 0 })
	took := time.Since(start)
	wg.Wait() // the pollers: with no lease left, each sees its tokens gone

	all := make([]int, s.items)
	for i := range all {
		all[i] = i
	}
	lost, dups := tally(all, handledCounts(t, b))
	unexplained := 0
	for _, id := range dups {
		if !killedHeld[id] {
			unexplained++
			if unexplained <= 10 {
				t.Errorf("item %d handled more than once but held by no killed worker", id)
			}
		}
	}
	if len(lost) > 0 {
		t.Errorf("%d items lost, e.g. %v", len(lost), lost[:min(len(lost), 10)])
	}
	if unexplained > 0 {
		t.Errorf("%d duplicates outside the killed workers' leases: a live worker's lease was taken", unexplained)
	}
	if len(slowRedeliveries) > 0 {
		t.Errorf("leases of killed workers not returned within a minute: %v", slowRedeliveries)
	}
	med, mx := stats(redeliveries)
	if mx > s.maxRedelivery {
		t.Errorf("kill-to-redelivery up to %v, want at most %v", mx, s.maxRedelivery)
	}
	ttl := s.worker.LeaseTTL
	if ttl == 0 {
		ttl = protocol.DefaultLeaseTTL
	}
	// A live worker extends its leases every third of the TTL, so a killed
	// one's run at least two thirds of it more: a quicker redelivery means
	// the poll does not see the leases it waits for.
	for _, d := range redeliveries {
		if d < ttl/2 {
			t.Errorf("a killed worker's leases gone %v after the kill, under half the lease TTL %v", d, ttl)
			break
		}
	}
	slow := ""
	if s.worker.SlowEvery > 0 {
		slow = fmt.Sprintf(", 1 item in %d taking %v-%v", s.worker.SlowEvery, s.worker.Slow, s.worker.Slow*3/2)
	}
	t.Logf("FAULT worker-kills lease_ttl=%v%s: %d items over %d keys, 3 worker processes, %d SIGKILLs in %v "+
		"(victims held %d leases, %d items): %d lost, %d duplicates (%d outside killed workers' leases), "+
		"kill-to-redelivery median %v max %v over %d kills with leases; all handled after %v; load avg %s -> %s",
		ttl, slow, s.items, s.keys, kills, ms(killPhase), leasesHeld, itemsHeld, len(lost), len(dups), unexplained,
		ms(med), ms(mx), len(redeliveries), ms(took), load, loadAvg())
}

// ---------------------------------------------------------------------------
// 2. Graceful restarts.

// I2 across graceful restarts: a random worker process gets SIGTERM and is
// replaced at once, 20 times, while producers append. Each exits 0, and
// every item is handled exactly once.
func TestFaultGracefulRestarts(t *testing.T) {
	b := testredis.Real(t)
	start, load := time.Now(), loadAvg()
	seq := 0
	spawn := func() *proc {
		seq++
		return startProc(t, b, procConfig{Name: "g" + strconv.Itoa(seq), Work: 200 * time.Microsecond})
	}
	live := []*proc{spawn(), spawn(), spawn()}
	f := startFeed(t, newProducer(t, b), feedSpec{keys: 500, goroutines: 4, perAdd: 5, every: 5 * time.Millisecond, timeout: 10 * time.Second})

	const restarts = 20
	type stopping struct {
		p  *proc
		at time.Time
	}
	var stopped []stopping
	for range restarts {
		sleepRandom(200*time.Millisecond, 800*time.Millisecond)
		i := rand.IntN(len(live))
		victim := live[i]
		victim.waitReady(t, 30*time.Second) // before, SIGTERM would kill it
		victim.signal(t, syscall.SIGTERM)
		stopped = append(stopped, stopping{victim, time.Now()})
		live[i] = spawn()
	}
	f.stop()
	var shutdowns []time.Duration
	for _, s := range stopped {
		if err := s.p.wait(t, time.Minute); err != nil {
			t.Errorf("worker %s after SIGTERM: %v, want exit status 0", s.p.name, err)
		}
		shutdowns = append(shutdowns, s.p.exited.Sub(s.at))
	}
	// An append that fails (a timeout on an overloaded box) may or may not
	// have stored its items: they are not counted as lost, but any of them
	// handled twice is a duplicate.
	stored, err := f.result()
	if err != nil {
		t.Logf("%d appends failed with Redis up, e.g. %v", f.failed.Load(), err)
	}
	eventually(t, 2*time.Minute, "every item handled", func() bool { return handledLen(b) >= int64(len(stored)) })
	eventually(t, 20*time.Second, "no lease or pending key left", func() bool { return len(leftKeys(t, b)) == 0 })
	took := time.Since(start)
	for _, p := range live {
		p.waitReady(t, 30*time.Second)
		p.signal(t, syscall.SIGTERM)
	}
	for _, p := range live {
		if err := p.wait(t, time.Minute); err != nil {
			t.Errorf("worker %s after SIGTERM: %v, want exit status 0", p.name, err)
		}
	}
	lost, dups := tally(stored, handledCounts(t, b))
	if len(lost) > 0 || len(dups) > 0 {
		t.Errorf("%d lost (e.g. %v), %d handled more than once (e.g. %v)", len(lost), lost[:min(len(lost), 10)], len(dups), dups[:min(len(dups), 10)])
	}
	med, mx := stats(shutdowns)
	t.Logf("FAULT graceful-restarts: %d items (%d appends failed), 3 worker processes, %d SIGTERMs (each replaced at once, all exit 0; "+
		"SIGTERM-to-exit median %v max %v): %d lost, %d duplicates; all handled after %v; load avg %s -> %s",
		len(stored), f.failed.Load(), restarts, ms(med), ms(mx), len(lost), len(dups), ms(took), load, loadAvg())
}

// ---------------------------------------------------------------------------
// 3. Redis killed and restarted.

// I1 across a Redis crash with appendfsync always: Redis is killed with
// SIGKILL while producers append and workers handle, stays down a second,
// and restarts from its AOF. Appends while it is down fail (never nil), the
// workers pick up within a second or two without help (EVALSHA finds no
// script and falls back to EVAL), and every item whose append returned nil
// is handled.
func TestFaultRedisRestart(t *testing.T) {
	srv := testredis.Start(t, "--appendonly", "yes", "--appendfsync", "always")
	b := srv.Backend(t)
	start, load := time.Now(), loadAvg()
	var handled memCounts
	var restartedAt, firstAfter atomic.Int64
	log, _ := quietLogger(t)
	for range 2 {
		wb := b
		wb.Client = testredis.Client(t, b.Addr)
		w := newWorker(t, wb, batchq.WithConcurrency(8), batchq.WithLogger(log))
		batchq.Handle(w, crashQueue, func(ctx context.Context, it item) error {
			time.Sleep(100 * time.Microsecond)
			handled.add(it.ID)
			if restartedAt.Load() != 0 {
				firstAfter.CompareAndSwap(0, time.Now().UnixNano())
			}
			return nil
		})
		run(t, w)
	}
	f := startFeed(t, newProducer(t, b), feedSpec{keys: 200, goroutines: 6, perAdd: 3, every: 2 * time.Millisecond, timeout: time.Second})
	eventually(t, 30*time.Second, "items handled before the crash", func() bool {
		handled.mu.Lock()
		defer handled.mu.Unlock()
		return handled.total >= 5000
	})

	failedUp := f.failed.Load()
	srv.Stop()
	time.Sleep(100 * time.Millisecond) // appends answered before the kill return
	okDown, failedDown := f.ok.Load(), f.failed.Load()
	time.Sleep(time.Second) // the outage
	if ok, failed := f.ok.Load(), f.failed.Load(); ok != okDown || failed == failedDown {
		t.Errorf("while Redis was down: %d appends returned nil, %d failed; want 0 nil and some failed", ok-okDown, failed-failedDown)
	}
	okBefore := f.ok.Load()
	restarting := time.Now()
	srv.Restart(t)
	up := time.Now()
	failedWhileDown := f.failed.Load() - failedUp
	restartedAt.Store(up.UnixNano())
	// Batches leased before the crash, back from the AOF: settled by their
	// workers' retries, or reaped.
	survived, err := b.Client.Do(context.Background(), b.Client.B().Zcard().Key(keys.For(b.Prefix, crashQueue, 0).Leases()).Build()).AsInt64()
	must(t, err)
	eventually(t, 30*time.Second, "appends to succeed after the restart", func() bool { return f.ok.Load() > okBefore })
	appendBack := time.Since(up)
	eventually(t, 30*time.Second, "an item handled after the restart", func() bool { return firstAfter.Load() != 0 })
	handleBack := time.Duration(firstAfter.Load() - up.UnixNano())
	okAfter := f.ok.Load()
	eventually(t, 30*time.Second, "appends to go on after the restart", func() bool { return f.ok.Load() >= okAfter+200 })
	f.stop()
	failedAfter := f.failed.Load() - failedUp - failedWhileDown
	stored, _ := f.result()
	eventually(t, time.Minute, "every stored item handled", func() bool { return handled.handledAll(stored) })
	eventually(t, 20*time.Second, "no lease or pending key left", func() bool { return len(leftKeys(t, b)) == 0 })
	took := time.Since(start)

	lost, dups := tally(stored, handled.snapshot())
	if len(lost) > 0 {
		t.Errorf("%d items whose append returned nil were never handled, e.g. %v", len(lost), lost[:min(len(lost), 10)])
	}
	// The restarted server ran the scripts without anyone loading them:
	// EVALSHA answered NOSCRIPT and the client sent EVAL.
	noscript, evals := serverStat(t, b, "errorstats", "errorstat_NOSCRIPT"), serverStat(t, b, "commandstats", "cmdstat_eval")
	if evals == 0 {
		t.Errorf("no EVAL since the restart (NOSCRIPT errors: %d): the scripts were not reloaded by EVAL", noscript)
	}
	// Allowed 2s on this noisy shared box; the worker's retry pause after a
	// failure tops out at 500ms.
	if handleBack > 2*time.Second {
		t.Errorf("first item handled %v after Redis was back, want at most 2s", handleBack)
	}
	t.Logf("FAULT redis-restart appendfsync=always: %d items stored by 6 producers, 2 workers, 1 SIGKILL of redis-server, down ~1.1s, "+
		"restart took %v, %d leases back from the AOF; appends failed: %d before, %d while down or restarting (none returned nil), %d after; back up: first append ok after %v, "+
		"first item handled after %v (EVALSHA NOSCRIPT %d, EVAL %d since); %d lost, %d duplicates; all handled after %v; load avg %s -> %s",
		len(stored), ms(up.Sub(restarting)), survived, failedUp, failedWhileDown, failedAfter, ms(appendBack),
		ms(handleBack), noscript, evals, len(lost), len(dups), ms(took), load, loadAvg())
}

// serverStat returns the calls (or count) of one line of an INFO section,
// e.g. "cmdstat_eval:calls=3,..." or "errorstat_NOSCRIPT:count=2"; 0 when absent.
func serverStat(t testing.TB, b testredis.Backend, section, name string) int64 {
	t.Helper()
	info, err := b.Client.Do(context.Background(), b.Client.B().Info().Section(section).Build()).ToString()
	must(t, err)
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

// ---------------------------------------------------------------------------
// 4. Connections cut mid-stream.

// cutProxy forwards loopback TCP connections to a server and cuts them on
// demand: both ends closed mid-stream, half of the time with a reset
// (SO_LINGER 0) rather than a FIN.
type cutProxy struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup

	mu     sync.Mutex
	conns  map[*proxyConn]struct{}
	closed bool
}

type proxyConn struct {
	client, server net.Conn
	once           sync.Once
}

func (pc *proxyConn) close(reset bool) {
	pc.once.Do(func() {
		if reset {
			pc.client.(*net.TCPConn).SetLinger(0)
			pc.server.(*net.TCPConn).SetLinger(0)
		}
		pc.client.Close()
		pc.server.Close()
	})
}

func startCutProxy(t testing.TB, target string) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	p := &cutProxy{ln: ln, target: target, conns: make(map[*proxyConn]struct{})}
	p.wg.Go(p.accept)
	t.Cleanup(p.close)
	return p
}

func (p *cutProxy) addr() string { return p.ln.Addr().String() }

func (p *cutProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		s, err := net.DialTimeout("tcp", p.target, time.Second)
		if err != nil {
			c.Close()
			continue
		}
		pc := &proxyConn{client: c, server: s}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			pc.close(false)
			return
		}
		p.conns[pc] = struct{}{}
		p.mu.Unlock()
		p.wg.Go(func() { io.Copy(s, c); p.drop(pc) })
		p.wg.Go(func() { io.Copy(c, s); p.drop(pc) })
	}
}

func (p *cutProxy) drop(pc *proxyConn) {
	pc.close(false)
	p.mu.Lock()
	delete(p.conns, pc)
	p.mu.Unlock()
}

// cut closes each live connection with probability frac, and returns how
// many it closed.
func (p *cutProxy) cut(frac float64) int {
	p.mu.Lock()
	var victims []*proxyConn
	for pc := range p.conns {
		if rand.Float64() < frac {
			victims = append(victims, pc)
		}
	}
	p.mu.Unlock()
	for _, pc := range victims {
		pc.close(rand.IntN(2) == 0)
	}
	return len(victims)
}

func (p *cutProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.cut(1)
	p.wg.Wait()
}

// I1 across lost connections: producers and two workers reach Redis through
// a proxy that cuts a random subset, or all, of its connections every
// 50-200ms for 9s. Every item whose append returned nil is handled.
func TestFaultBrokenConnections(t *testing.T) {
	b := testredis.Real(t)
	start, load := time.Now(), loadAvg()
	px := startCutProxy(t, b.Addr)
	via := b
	via.Addr = px.addr()
	via.Client = testredis.Client(t, via.Addr)

	log, logs := quietLogger(t)
	var handled memCounts
	for range 2 {
		wb := via
		wb.Client = testredis.Client(t, via.Addr)
		w := newWorker(t, wb, batchq.WithConcurrency(8), batchq.WithLogger(log))
		batchq.Handle(w, crashQueue, func(ctx context.Context, it item) error {
			time.Sleep(200 * time.Microsecond)
			handled.add(it.ID)
			return nil
		})
		run(t, w)
	}
	f := startFeed(t, newProducer(t, via), feedSpec{keys: 200, goroutines: 6, perAdd: 3, every: 2 * time.Millisecond, timeout: 2 * time.Second})

	const cutFor = 9 * time.Second
	rounds, cuts := 0, 0
	for end := time.Now().Add(cutFor); time.Now().Before(end); {
		sleepRandom(50*time.Millisecond, 200*time.Millisecond)
		frac := 0.5
		if rand.IntN(4) == 0 {
			frac = 1
		}
		cuts += px.cut(frac)
		rounds++
	}
	f.stop()
	cutEnd := time.Now()
	stored, _ := f.result()
	eventually(t, time.Minute, "every stored item handled", func() bool { return handled.handledAll(stored) })
	drained := time.Since(cutEnd)
	eventually(t, 30*time.Second, "no lease or pending key left", func() bool { return len(leftKeys(t, b)) == 0 })
	took := time.Since(start)

	lost, dups := tally(stored, handled.snapshot())
	if len(lost) > 0 {
		t.Errorf("%d items whose append returned nil were never handled, e.g. %v", len(lost), lost[:min(len(lost), 10)])
	}
	// A connection loss alone redelivers nothing: a lost reply to a drain
	// leaves a lease that the reaper returns unhandled, a lost reply to a
	// settle is settled again and refused, and no worker reaps while its own
	// Redis calls fail. An item runs twice only when a worker's heartbeats
	// failed for a whole lease TTL and another worker reaped its batch
	// meanwhile; the worker then learns at settle time that its lease was
	// lost, and logs it with the batch's size. So duplicates are bounded by
	// the items of the batches whose settle was refused (a settle refused
	// because its first try landed unseen counts too: the bound is loose).
	leaseLost := 0
	for _, e := range logs.FilterMessageSnippet("before the batch was settled").All() {
		n, _ := e.ContextMap()["items"].(int64)
		leaseLost += int(n)
	}
	if len(dups) > leaseLost {
		t.Errorf("%d items handled more than once, more than the %d items of batches whose lease was lost", len(dups), leaseLost)
	}
	t.Logf("FAULT broken-connections: %d items stored (%d appends failed), 2 workers and 6 producers through a proxy, "+
		"%d connections cut in %d rounds over %v; %d lost, %d duplicates (bound: %d items of lease-lost batches); "+
		"all handled %v after the cuts stopped, %v in all; load avg %s -> %s",
		len(stored), f.failed.Load(), cuts, rounds, cutFor, len(lost), len(dups), leaseLost, ms(drained), ms(took), load, loadAvg())
}
