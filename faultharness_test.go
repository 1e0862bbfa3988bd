package batchq_test

// The fault harness: the machinery of the fault suite (faultsuite_test.go),
// which puts workers and Redis through the faults a deployment meets.
//
//   - Worker processes (this file). To kill workers with SIGKILL or stop
//     them with SIGTERM, the suite runs them in processes of their own, by
//     re-executing this test binary: startProc runs os.Args[0] with
//     -test.run=^$ (no test) and workerEnv set to the worker's procConfig
//     as JSON. TestMain (helpers_test.go) sees workerEnv and runs workerMain
//     instead of the tests: a worker on crashQueue that counts each id it
//     handles in the hash <prefix>:test:handled, prints "ready" once SIGTERM
//     would shut it down gracefully, and exits when its stdin closes, so
//     that no worker outlives the test process. proc signals a worker and
//     waits for it. With procConfig.Ordered its queue has ordered keys
//     (WithOrderedKeys) of seqItems, and it also records the order it
//     handles each key's items in (ordered_crash_test.go).
//   - Producers and tallies (faulttally_test.go). feed appends items with
//     unique ids from several goroutines and records those whose append
//     returned nil (those I1 promises); handledCounts (workers in
//     processes) and memCounts (workers in the test process) count the ids
//     handled; tally finds the items lost and those handled twice; leasesOf
//     and leasesGone read the leases a killed worker held.
//   - Figures for each test's "FAULT " line (faulttally_test.go): stats,
//     ms, loadAvg, serverStat.
//   - cutProxy (faultproxy_test.go), a TCP proxy between the clients and
//     Redis that cuts its connections on demand, half of them with a reset
//     rather than a FIN.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/internal/testredis"
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
	Shards      int           `json:"shards,omitempty"`      // batchq.WithDefaultShards; 0: none
	// Items whose id is a multiple of SlowEvery (when above 0) take Slow to
	// 1.5 Slow instead of Work. A prime spreads them over the keys of a
	// producer that gives each key a run of consecutive ids.
	SlowEvery int           `json:"slow_every,omitempty"`
	Slow      time.Duration `json:"slow,omitempty"`
	// Ordered registers crashQueue with batchq.WithOrderedKeys, for items
	// of type seqItem (SlowEvery and Slow are ignored); see workerMain.
	Ordered bool `json:"ordered,omitempty"`
}

// workerMain is a worker process handling crashQueue: each item takes the
// configured time, then its id's count is incremented in the hash
// <prefix>:test:handled before the handler returns. With cfg.Ordered the
// queue's keys are ordered and its items seqItems: the field counted is
// "<key>:<seq>", and the handler also pushes the seq onto the list
// <prefix>:test:order:<key>, which thus holds the order the key's items
// were handled in. It prints "ready" once
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
		opts = append(opts, batchq.WithDefaultShards(cfg.Shards))
	}
	w, err := batchq.NewWorker(rdb, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	handled := cfg.Prefix + ":test:handled"
	if cfg.Ordered {
		batchq.Handle(w, crashQueue, func(ctx context.Context, it seqItem) error {
			time.Sleep(cfg.Work)
			seq := strconv.Itoa(it.Seq)
			for _, r := range rdb.DoMulti(ctx,
				rdb.B().Rpush().Key(cfg.Prefix+":test:order:"+it.Key).Element(seq).Build(),
				rdb.B().Hincrby().Key(handled).Field(it.Key+":"+seq).Increment(1).Build()) {
				if err := r.Error(); err != nil {
					return err
				}
			}
			return nil
		}, batchq.WithOrderedKeys())
	} else {
		batchq.Handle(w, crashQueue, func(ctx context.Context, it item) error {
			d := cfg.Work
			if cfg.SlowEvery > 0 && it.ID%cfg.SlowEvery == 0 {
				d = cfg.Slow + rand.N(cfg.Slow/2+1)
			}
			time.Sleep(d)
			return rdb.Do(ctx, rdb.B().Hincrby().Key(handled).Field(strconv.Itoa(it.ID)).Increment(1).Build()).Error()
		})
	}
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
