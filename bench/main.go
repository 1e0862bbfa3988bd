// Command bench runs one workload on batchq and on asynq, against one
// private Redis server, and reports throughput, Redis commands and Redis
// CPU time per item, and latency.
//
//	go run .                        # starts its own redis-server
//	go run . -redis 127.0.0.1:6390  # or uses a private one
//	go run . -replica -systems batchq,batchq-acks,batchq-linger-acks  # its own, with a replica
//
// The systems: batchq (one item per producer.Add), batchq-linger (the same
// with producer.WithLinger(0, 1000): group commit), batchq-ordered (batchq
// with batchq.WithOrderedKeys), asynq-plain (one task per item) and
// asynq-group (one task per item in a group per key, aggregated into one
// task per group); and, only when asked for, batchq-acks and
// batchq-linger-acks (batchq and batchq-linger with
// producer.WithReplicaAcks(1, time.Second)), which need -replica: a
// redis-server that replicates the bench's own. The phases: append only,
// drain only, saturated, fixed rate, hot key and busy key (see README.md).
// Each phase runs on every system in turn (busy key on batchq and
// asynq-plain only), the whole sequence -runs times; the table and the JSON
// report the median of each figure over the runs.
//
// The bench empties the Redis database between phases (FLUSHDB), so it
// refuses a database that holds keys at start unless -force is given.
// Progress goes to stderr; stdout gets the table and, as its last line, one
// JSON object.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		stop()
		os.Exit(1)
	}
}

// config is the parsed command line.
type config struct {
	addr         string
	n            int // items of phases 1 to 3
	keys         int
	producers    int
	concurrency  int
	shards       int
	rate         int // items per second offered in phase 4
	rateItems    int // items of phase 4
	hotItems     int // items of phase 5
	busyItems    int // items of phase 6
	runs         int
	phaseTimeout time.Duration
	force        bool
	replica      bool // start a replica of the bench's own server too
	systems      []string
	phases       map[string]bool

	// asynq-group settings.
	groupMaxSize  int
	groupGrace    time.Duration
	groupMaxDelay time.Duration

	// Caps on the items of the slow asynq phases.
	groupHotItems   int // hot-key (and hot-and-cold) items for asynq-group
	hotColdItems    int // items of the hot-and-cold phase
	asynqPlainItems int // items of every phase but fixed-rate for asynq-plain

	cpuProfile string // file for a CPU profile of the whole run; "": none
}

// items returns the items a phase offers a system. Two systems get fewer
// where the phase's count would take minutes: asynq-group aggregates at
// most GroupMaxSize tasks of one group per aggregation check (one check a
// second at best), which caps the hot-key phase at 100 items/s; asynq-plain
// dequeues one task per round trip from one loop, a few thousand a second,
// with per-item figures that do not depend on the count.
func (c *config) items(phase, system string) int {
	var n int
	switch phase {
	case phaseRate:
		return c.rateItems
	case phaseHotKey:
		n = c.hotItems
		if system == sysAsynqGroup {
			n = min(n, c.groupHotItems)
		}
	case phaseHotCold:
		n = c.hotColdItems
		if system == sysAsynqGroup {
			n = min(n, c.groupHotItems) // its hot group drains at about 100 items/s
		}
	case phaseBusyKey:
		n = c.busyItems
	default:
		n = c.n
	}
	if system == sysAsynqPlain {
		n = min(n, c.asynqPlainItems)
	}
	return n
}

// parseFlags parses args into a config.
func parseFlags(args []string, stderr io.Writer) (*config, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	c := &config{}
	var systems, phases string
	var quick bool
	fs.StringVar(&c.addr, "redis", "", "address of a private Redis server (its database is flushed between phases); empty: start a redis-server on a free loopback port for the run")
	fs.IntVar(&c.n, "n", 100_000, "items of the append, drain and saturated phases")
	fs.IntVar(&c.keys, "keys", 1000, "keys the items are spread over (item i goes to key i%keys)")
	fs.IntVar(&c.producers, "producers", 32, "producer goroutines")
	fs.IntVar(&c.concurrency, "concurrency", 32, "worker concurrency (batchq: batches at once; asynq: tasks at once)")
	fs.IntVar(&c.shards, "shards", 1, "batchq shards of the queue: the WithDefaultShards of its producers and workers, recorded by the first (the database is flushed between phases)")
	fs.IntVar(&c.rate, "rate", 2000, "items per second offered in the fixed-rate phase, across all producers")
	fs.IntVar(&c.rateItems, "rate-items", 20_000, "items of the fixed-rate phase")
	fs.IntVar(&c.hotItems, "hot-items", 50_000, "items of the hot-key phase")
	fs.IntVar(&c.hotColdItems, "hot-cold-items", 20_000, "items of the hot-and-cold phase, offered at -rate, 9 in 10 to one key")
	fs.IntVar(&c.busyItems, "busy-items", 2000, "items of the busy-key phase (one key, a 1 ms handler: about 2s for one item at a time)")
	fs.IntVar(&c.groupHotItems, "group-hot-items", 1000, "asynq-group: items of the hot-key phase, at most -hot-items (it aggregates at most -group-max-size items of one group per check, about 100/s)")
	fs.IntVar(&c.asynqPlainItems, "asynq-plain-items", 20_000, "asynq-plain: items of every phase but fixed-rate, at most theirs (it handles a few thousand items/s)")
	fs.IntVar(&c.groupMaxSize, "group-max-size", 100, "asynq-group: GroupMaxSize")
	fs.DurationVar(&c.groupGrace, "group-grace", time.Second, "asynq-group: GroupGracePeriod (asynq's default is 1m, its minimum 1s; it is also the aggregation check interval when under 7s)")
	fs.DurationVar(&c.groupMaxDelay, "group-max-delay", 0, "asynq-group: GroupMaxDelay (0: none, asynq's default)")
	fs.IntVar(&c.runs, "runs", 3, "times the whole sequence runs; the report gives medians")
	fs.DurationVar(&c.phaseTimeout, "phase-timeout", 120*time.Second, "time limit of one phase on one system")
	fs.BoolVar(&c.force, "force", false, "run even if the database holds keys (they are flushed)")
	fs.BoolVar(&c.replica, "replica", false, "also start a redis-server that replicates the bench's own (not with -redis); needed by batchq-acks and batchq-linger-acks")
	fs.StringVar(&systems, "systems", strings.Join(defaultSystems, ","), "comma-separated systems to run (known: "+strings.Join(allSystems, ", ")+")")
	fs.StringVar(&phases, "phases", strings.Join(allPhases, ","), "comma-separated phases to run, by name or number (1-"+strconv.Itoa(len(allPhases))+")")
	fs.StringVar(&c.cpuProfile, "cpuprofile", "", "write a CPU profile of the bench process (producers, workers and the bench itself) to this file")
	fs.BoolVar(&quick, "quick", false, "smoke test: -n 10000 -rate-items 4000 -hot-items 10000 -hot-cold-items 4000 -group-hot-items 500 -runs 1, unless given")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if quick {
		set := make(map[string]bool)
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		for name, v := range map[string]int{"n": 10_000, "rate-items": 4000, "hot-items": 10_000, "hot-cold-items": 4000, "group-hot-items": 500, "runs": 1} {
			if !set[name] {
				_ = fs.Set(name, strconv.Itoa(v))
			}
		}
	}
	for name, v := range map[string]int{"n": c.n, "keys": c.keys, "producers": c.producers, "concurrency": c.concurrency,
		"shards": c.shards, "rate": c.rate, "rate-items": c.rateItems, "hot-items": c.hotItems, "busy-items": c.busyItems, "hot-cold-items": c.hotColdItems,
		"group-hot-items": c.groupHotItems, "asynq-plain-items": c.asynqPlainItems, "group-max-size": c.groupMaxSize, "runs": c.runs} {
		if v < 1 {
			return nil, fmt.Errorf("-%s must be at least 1, got %d", name, v)
		}
	}
	if c.phaseTimeout <= 0 {
		return nil, fmt.Errorf("-phase-timeout must be positive, got %v", c.phaseTimeout)
	}
	if c.groupGrace < time.Second {
		return nil, fmt.Errorf("-group-grace must be at least 1s (asynq's minimum), got %v", c.groupGrace)
	}
	var err error
	if c.systems, err = parseList(systems, allSystems, nil); err != nil {
		return nil, fmt.Errorf("-systems: %w", err)
	}
	if c.replica && c.addr != "" {
		return nil, errors.New("-replica starts a replica of the bench's own redis-server: it cannot be used with -redis")
	}
	for _, s := range []string{sysBatchqAcks, sysLingerAcks} {
		if slices.Contains(c.systems, s) && !c.replica {
			return nil, fmt.Errorf("-systems %s needs -replica: its appends wait for a replica to acknowledge them, and fail without one", s)
		}
	}
	ph, err := parseList(phases, allPhases, func(s string) string {
		if i, err := strconv.Atoi(s); err == nil && i >= 1 && i <= len(allPhases) {
			return allPhases[i-1]
		}
		return s
	})
	if err != nil {
		return nil, fmt.Errorf("-phases: %w", err)
	}
	c.phases = make(map[string]bool)
	for _, p := range ph {
		c.phases[p] = true
	}
	return c, nil
}

// parseList splits a comma-separated list of names from known (after
// alias, when not nil), and returns them in known's order.
func parseList(s string, known []string, alias func(string) string) ([]string, error) {
	want := make(map[string]bool)
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if alias != nil {
			f = alias(f)
		}
		if !slices.Contains(known, f) {
			return nil, fmt.Errorf("unknown %q (known: %s)", f, strings.Join(known, ", "))
		}
		want[f] = true
	}
	if len(want) == 0 {
		return nil, errors.New("empty list")
	}
	var out []string
	for _, k := range known {
		if want[k] {
			out = append(out, k)
		}
	}
	return out, nil
}

// run is the whole program: it parses args, runs the bench and writes the
// report to stdout, progress to stderr. It fails when a phase lost or
// duplicated items or timed out, after writing the report.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	if cfg.addr == "" {
		s, err := startServer()
		if err != nil {
			return err
		}
		defer s.stop()
		cfg.addr = s.addr
		fmt.Fprintf(stderr, "bench: started redis-server on %s\n", s.addr)
		if cfg.replica {
			r, err := startReplica(s)
			if err != nil {
				return err
			}
			defer r.stop() // before the master's
			fmt.Fprintf(stderr, "bench: started its replica on %s\n", r.addr)
		}
	}
	st, err := dialStats(cfg.addr)
	if err != nil {
		return err
	}
	defer st.Close()
	server, err := st.stats()
	if err != nil {
		return err
	}
	size, err := st.dbSize()
	if err != nil {
		return err
	}
	if size > 0 && !cfg.force {
		return fmt.Errorf("redis %s holds %d keys; the bench flushes its database between phases: use a private server, or -force", cfg.addr, size)
	}

	if cfg.cpuProfile != "" {
		f, err := os.Create(cfg.cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	b := &bench{ctx: ctx, cfg: cfg, stats: st}
	// The steps of one run: drain runs with append (it drains what append
	// left), so the pair is one step.
	var steps []string
	for _, p := range allPhases {
		switch {
		case p == phaseDrain: // runs within the append step
		case p == phaseAppend && (cfg.phases[phaseAppend] || cfg.phases[phaseDrain]):
			steps = append(steps, p)
		case cfg.phases[p]:
			steps = append(steps, p)
		}
	}
	results := make(map[string]map[string][]result) // phase → system → one per run
	for runNo := 1; runNo <= cfg.runs; runNo++ {
		for _, step := range steps {
			for _, name := range cfg.systems {
				if why := skipped(step, name); why != "" {
					if runNo == 1 {
						fmt.Fprintf(stderr, "%s %s: not run: %s\n", step, name, why)
					}
					continue
				}
				out, err := b.runPhase(step, name)
				if err != nil {
					return fmt.Errorf("run %d: %w", runNo, err)
				}
				for _, phase := range allPhases {
					r, ok := out[phase]
					if !ok {
						continue
					}
					if results[phase] == nil {
						results[phase] = make(map[string][]result)
					}
					results[phase][name] = append(results[phase][name], r)
					logResult(stderr, runNo, cfg.runs, phase, name, r)
				}
			}
		}
	}
	if err := st.flush(); err != nil {
		return err
	}
	rep := newReport(cfg, server.version, results)
	if err := rep.write(stdout); err != nil {
		return err
	}
	return rep.failure()
}

// logResult writes one line of progress.
func logResult(w io.Writer, runNo, runs int, phase, system string, r result) {
	c := float64(r.count(phase))
	fmt.Fprintf(w, "run %d/%d %-10s %-13s %9.0f items/s %7.2fs %6.2f cmds/item %5.2f trips/item %7.1f cpu-µs/item %7.1f client-µs/item",
		runNo, runs, phase, system, div(c, r.span(phase).Seconds()), r.elapsed.Seconds(),
		div(float64(r.commands), c), div(float64(r.trips), c), div(r.cpu*1e6, c), div(r.clientCPU*1e6, c))
	if phase == phaseAppend {
		fmt.Fprintf(w, " %5.0f B/item", div(float64(r.memory), c))
	}
	if phase == phaseBusyKey {
		fmt.Fprintf(w, " (items/s over %.2fs of handling)", r.handling.Seconds())
	}
	if len(r.latencies) > 0 {
		fmt.Fprintf(w, " p50 %s p99 %s", ms(percentile(r.latencies, 0.5)), ms(percentile(r.latencies, 0.99)))
	}
	if r.timeout {
		fmt.Fprint(w, " TIMEOUT")
	}
	if r.lost > 0 || r.duplicates > 0 {
		fmt.Fprintf(w, " lost %d duplicates %d", r.lost, r.duplicates)
	}
	if r.firstErr != nil {
		fmt.Fprintf(w, " (%d append errors, first: %v)", r.appendErrs, r.firstErr)
	}
	fmt.Fprintln(w)
}

// ms formats nanoseconds as milliseconds.
func ms(ns int64) string { return strconv.FormatFloat(float64(ns)/1e6, 'f', 1, 64) + "ms" }
