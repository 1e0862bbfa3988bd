package batchq_test

// The fault harness: the machinery of the fault suite (faultsuite_test.go),
// which puts workers and Redis through the faults a deployment meets.
//
//   - Worker processes. To kill workers with SIGKILL or stop them with
//     SIGTERM, the suite runs them in processes of their own, by re-executing
//     this test binary: startProc runs os.Args[0] with -test.run=^$ (no test)
//     and workerEnv set to the worker's procConfig as JSON. TestMain
//     (helpers_test.go) sees workerEnv and runs workerMain instead of the
//     tests: a worker on crashQueue that counts each id it handles in the
//     hash <prefix>:test:handled, prints "ready" once SIGTERM would shut it
//     down gracefully, and exits when its stdin closes, so that no worker
//     outlives the test process. proc signals a worker and waits for it.
//   - Producers and tallies. feed appends items with unique ids from several
//     goroutines and records those whose append returned nil (those I1
//     promises); handledCounts (workers in processes) and memCounts (workers
//     in the test process) count the ids handled; tally finds the items lost
//     and those handled twice; leasesOf and leasesGone read the leases a
//     killed worker held.
//   - Figures for each test's "FAULT " line: stats, ms, loadAvg, serverStat.
//   - cutProxy, a TCP proxy between the clients and Redis that cuts its
//     connections on demand, half of them with a reset rather than a FIN.

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
// A proxy that cuts connections.

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
