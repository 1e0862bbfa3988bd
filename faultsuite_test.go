package batchq_test

// The fault suite: the README's first two guarantees (at-least-once, and
// exactly-once without crashes) under the faults a deployment meets, on a
// real redis-server: workers killed with SIGKILL, workers restarted
// gracefully, Redis killed and restarted, connections cut mid-stream. Each test logs one line starting with "FAULT " with its
// figures (items, faults, lost, duplicates, recovery times), which
// RELIABILITY.md quotes.
//
// The machinery the tests share is in faultharness_test.go: worker
// processes (this test binary re-executed, see TestMain), the feeds and
// tallies, and the proxy that cuts connections.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
)

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
	log, _ := observed(t, zap.IncreaseLevel(zap.InfoLevel))
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
		runWorker(t, w)
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

// ---------------------------------------------------------------------------
// 4. Connections cut mid-stream.

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

	log, logs := observed(t, zap.IncreaseLevel(zap.InfoLevel))
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
		runWorker(t, w)
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
