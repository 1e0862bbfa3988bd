package main

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

// The phases, by the names the -phases flag and the report use.
const (
	phaseAppend    = "append"       // 1: producers only
	phaseDrain     = "drain"        // 2: workers only, on what phase 1 appended
	phaseSaturated = "saturated"    // 3: producers and workers at once, flat out
	phaseRate      = "fixed-rate"   // 4: a fixed offered rate; latency
	phaseHotKey    = "hot-key"      // 5: every item to one key
	phaseBusyKey   = "busy-key"     // 6: every item to one key, appended up front, then drained by a 1 ms handler
	phaseHotCold   = "hot-and-cold" // 7: a fixed offered rate, 90% to one key; latency of the other keys
)

// allPhases lists the phases in the order they run.
var allPhases = []string{phaseAppend, phaseDrain, phaseSaturated, phaseRate, phaseHotKey, phaseBusyKey, phaseHotCold}

// hotKey is the one key of the hot-key phase, and the hot one of the
// hot-and-cold phase.
const hotKey = "hot"

// hotColdKey returns the key of item i in the hot-and-cold phase: nine
// items in ten to hotKey, the tenth spread over keys cold keys.
func hotColdKey(keys int) func(int64) string {
	return func(i int64) string {
		if !coldItem(int(i)) {
			return hotKey
		}
		return "k" + strconv.FormatInt(i/10%int64(keys), 10)
	}
}

// coldItem reports whether item i of the hot-and-cold phase goes to a cold key.
func coldItem(i int) bool { return i%10 == 0 }

// The busy-key phase: its one key, and the time its handler takes per item.
const (
	busyKey  = "busy"
	busyWork = time.Millisecond
)

// skipped returns why phase does not run on system, or "" when it does.
// Busy-key measures how a worker gets through one key's backlog: its
// append is set-up, outside the figures, so batchq-acks and batchq-linger
// (batchq's worker behind other producers) would only repeat batchq; and
// asynq-group drains one group at asynq's aggregation pace (at most
// -group-max-size tasks per -group-grace), as the hot-key phase shows,
// whatever its handler does.
func skipped(phase, system string) string {
	if phase != phaseBusyKey {
		return ""
	}
	switch system {
	case sysBatchqAcks, sysBatchqLinger, sysLingerAcks:
		return "its worker is batchq's, and the append is not measured"
	case sysAsynqGroup:
		return "one group drains at asynq's aggregation pace (-group-max-size tasks per -group-grace check, see hot-key), not its handler's"
	}
	return ""
}

// result is what one phase measured on one system in one run.
type result struct {
	items      int           // items the phase offers
	produced   int64         // appends that returned a nil error
	appendErrs int64         // appends that returned an error
	firstErr   error         // the first append error
	handled    int64         // distinct items handled
	duplicates int64         // handler calls beyond the first of an item
	lost       int64         // phase 1: items whose append failed; others: items appended, never handled
	elapsed    time.Duration // from the start of the phase until all were appended (phase 1) or handled
	handling   time.Duration // busy-key: from the first handler call until the last item's first call returned
	commands   int64         // commands the server processed during the phase
	cpu        float64       // server CPU time during the phase, in seconds
	cpuSys     float64       // of it, in the kernel
	trips      int64         // round trips the system's clients made during the phase
	clientCPU  float64       // CPU time of this process (producers, workers, and the bench's own tracking) during the phase, in seconds
	memory     int64         // phase 1: Redis memory the stored items take (used_memory after less before); 0 otherwise
	latencies  []int64       // sorted append-to-handler latencies in ns; nil where not measured
	timeout    bool          // the phase timeout cut the phase short
}

// count returns the items the phase's figures are per: the items appended
// for phase 1, the items handled otherwise.
func (r result) count(phase string) int64 {
	if phase == phaseAppend {
		return r.produced
	}
	return r.handled
}

// span returns the time the phase's items/s are over: from the first
// handler call to the last for busy-key (its figure is how fast the workers
// get through the key, start-up aside), the whole phase otherwise.
func (r result) span(phase string) time.Duration {
	if phase == phaseBusyKey {
		return r.handling
	}
	return r.elapsed
}

// bench runs phases against one Redis server.
type bench struct {
	ctx   context.Context // cancelled: stop at once
	cfg   *config
	stats *statsConn
	trips atomic.Int64 // round trips of the systems' clients (see newSystem)
}

// measure reads the server's counters, the clients' round trips and this
// process's CPU time right before and right after fn and stores their
// deltas and fn's duration in r. The INFO command sent before fn is left out
// of the command count (INFO counts a command once it is done, so the one
// after fn is not in its own reply).
func (b *bench) measure(r *result, fn func() error) error {
	before, err := b.stats.stats()
	if err != nil {
		return err
	}
	trips, cpu := b.trips.Load(), processCPU()
	start := time.Now()
	fnErr := fn()
	r.elapsed = time.Since(start)
	r.clientCPU = processCPU() - cpu
	r.trips = b.trips.Load() - trips
	after, err := b.stats.stats()
	if err != nil {
		return err
	}
	r.commands = after.commands - before.commands - 1
	r.cpu = after.cpu - before.cpu
	r.cpuSys = after.cpuSys - before.cpuSys
	r.memory = after.memory - before.memory
	return fnErr
}

// processCPU returns the user and system CPU time this process has used, in
// seconds.
func processCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// phaseContext bounds a phase by the phase timeout.
func (b *bench) phaseContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(b.ctx, b.cfg.phaseTimeout)
}

// spreadKey returns the key of item i: i modulo the number of keys.
func (b *bench) spreadKey(i int64) string {
	return "k" + strconv.FormatInt(i%int64(b.cfg.keys), 10)
}

// appendOnly runs phase 1: the producers append n items, no worker runs.
// The items stay in Redis for drainOnly. Its lost count is the items whose
// append failed.
func (b *bench) appendOnly(sys system, n int) (result, error) {
	if err := b.stats.flush(); err != nil {
		return result{}, err
	}
	add, closeProducer, err := sys.producer()
	if err != nil {
		return result{}, err
	}
	defer closeProducer()
	ctx, cancel := b.phaseContext()
	defer cancel()
	r := result{items: n}
	err = b.measure(&r, func() error {
		p := produce(ctx, n, b.cfg.producers, 0, b.spreadKey, add)
		r.produced, r.appendErrs, r.firstErr = p.ok, p.failed, p.err
		return nil
	})
	r.lost = int64(r.items) - r.produced
	r.timeout = r.produced+r.appendErrs < int64(r.items)
	return r, err
}

// drainOnly runs phase 2: workers start on the n items phase 1 offered
// (appended of them were stored) and run until all are handled.
func (b *bench) drainOnly(sys system, n int, appended int64) (result, error) {
	tr := newTracker(n)
	tr.expect(appended)
	start, stop, err := sys.worker(tr)
	if err != nil {
		return result{}, err
	}
	ctx, cancel := b.phaseContext()
	defer cancel()
	r := result{items: n, produced: appended}
	err = b.measure(&r, func() error {
		if err := start(); err != nil {
			return err
		}
		r.timeout = tr.wait(ctx) != nil
		return nil
	})
	stop()
	b.settle(&r, tr, false)
	return r, err
}

// concurrent runs phases 3 to 5 and 7: workers and producers start at
// once, the producers append n items (rate per second in all, when rate >
// 0) with key(i) the key of item i, and the phase ends when all are
// handled. Latencies are those of the items latency(i) selects, every item
// when it is nil.
func (b *bench) concurrent(sys system, n, rate int, key func(int64) string, latency func(int) bool) (result, error) {
	if err := b.stats.flush(); err != nil {
		return result{}, err
	}
	tr := newTracker(n)
	add, closeProducer, err := sys.producer()
	if err != nil {
		return result{}, err
	}
	defer closeProducer()
	start, stop, err := sys.worker(tr)
	if err != nil {
		return result{}, err
	}
	ctx, cancel := b.phaseContext()
	defer cancel()
	r := result{items: n}
	err = b.measure(&r, func() error {
		if err := start(); err != nil {
			return err
		}
		p := produce(ctx, n, b.cfg.producers, rate, key, add)
		r.produced, r.appendErrs, r.firstErr = p.ok, p.failed, p.err
		tr.expect(p.ok)
		r.timeout = tr.wait(ctx) != nil
		return nil
	})
	stop()
	b.settle(&r, tr, false)
	r.latencies = tr.latencies(latency)
	return r, err
}

// busy runs phase 6: the producers append n items to one key, outside the
// figures, then workers whose handler takes busyWork per item start on them
// and run until all are handled. The items are all there before the workers
// start, so the phase measures how fast a worker gets through one key's
// backlog: with items trickling in, a system that keeps up shows only the
// offered rate.
func (b *bench) busy(sys system, n int) (result, error) {
	if err := b.stats.flush(); err != nil {
		return result{}, err
	}
	ctx, cancel := b.phaseContext()
	defer cancel()
	add, closeProducer, err := sys.producer()
	if err != nil {
		return result{}, err
	}
	p := produce(ctx, n, b.cfg.producers, 0, func(int64) string { return busyKey }, add)
	closeProducer()
	r := result{items: n, produced: p.ok, appendErrs: p.failed, firstErr: p.err}
	r.timeout = p.ok+p.failed < int64(n)
	tr := newTracker(n)
	tr.work = busyWork
	tr.expect(p.ok)
	start, stop, err := sys.worker(tr)
	if err != nil {
		return result{}, err
	}
	err = b.measure(&r, func() error {
		if err := start(); err != nil {
			return err
		}
		r.timeout = tr.wait(ctx) != nil || r.timeout
		return nil
	})
	stop()
	b.settle(&r, tr, false)
	r.handling = tr.handling()
	return r, err
}

// settle copies the tracker's counts into r, after the workers stopped (so
// that late duplicates count too). Its lost count is the items appended
// successfully but never handled.
func (b *bench) settle(r *result, tr *tracker, latency bool) {
	r.handled = tr.distinct.Load()
	r.duplicates = tr.duplicates()
	r.lost = max(r.produced-r.handled, 0)
	if latency {
		r.latencies = tr.latencies(nil)
	}
}

// runPhase runs phase on the system named name and returns its results by
// phase name. Phase 2 needs phase 1's items, so drain runs right after
// append on the same system (append runs unreported when only drain was
// asked for); the caller passes phaseAppend for the pair.
func (b *bench) runPhase(phase, name string) (map[string]result, error) {
	sys, err := newSystem(name, b.cfg, &b.trips)
	if err != nil {
		return nil, err
	}
	out := make(map[string]result)
	n := b.cfg.items(phase, name)
	switch phase {
	case phaseAppend:
		r, err := b.appendOnly(sys, n)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", phaseAppend, name, err)
		}
		if b.cfg.phases[phaseAppend] {
			out[phaseAppend] = r
		}
		if b.cfg.phases[phaseDrain] && b.ctx.Err() == nil {
			d, err := b.drainOnly(sys, n, r.produced)
			if err != nil {
				return nil, fmt.Errorf("%s %s: %w", phaseDrain, name, err)
			}
			out[phaseDrain] = d
		}
	case phaseSaturated, phaseRate, phaseHotKey, phaseHotCold:
		rate, key := 0, b.spreadKey
		var latency func(int) bool
		switch phase {
		case phaseRate:
			rate = b.cfg.rate
		case phaseHotKey:
			key = func(int64) string { return hotKey }
		case phaseHotCold:
			rate, key, latency = b.cfg.rate, hotColdKey(b.cfg.keys), coldItem
		}
		r, err := b.concurrent(sys, n, rate, key, latency)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", phase, name, err)
		}
		out[phase] = r
	case phaseBusyKey:
		r, err := b.busy(sys, n)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", phase, name, err)
		}
		out[phase] = r
	default:
		return nil, fmt.Errorf("unknown phase %q", phase)
	}
	return out, b.ctx.Err()
}
