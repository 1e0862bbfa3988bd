package main

import (
	"context"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// item is the payload of every system: about 100 bytes of JSON, such as
// {"id":12345,"t":1764201600123456789,"pad":"xxx…"}.
type item struct {
	ID  int64  `json:"id"`
	T   int64  `json:"t"` // when it was appended, in Unix nanoseconds
	Pad string `json:"pad"`
}

// pad brings an encoded item to about 100 bytes (exactly 100 for a
// five-digit id).
var pad = strings.Repeat("x", 55)

// appendFunc appends one item to key.
type appendFunc func(ctx context.Context, key string, it item) error

// produced is the outcome of the producers of one phase.
type produced struct {
	ok     int64 // items appended with a nil error
	failed int64 // items whose append returned an error
	err    error // the first error
}

// produce appends the items 0..n-1 from the given number of goroutines,
// item i to key(i), and returns once all are appended or ctx is done. With
// a positive rate it offers rate items per second in all: item i is
// appended no sooner than start + i/rate. A failed append is counted, never
// retried (it might have been stored). Each item's T is read just before
// its append.
func produce(ctx context.Context, n, producers, rate int, key func(i int64) string, add appendFunc) produced {
	var (
		next      atomic.Int64
		ok, fails atomic.Int64
		once      sync.Once
		first     error
		wg        sync.WaitGroup
	)
	start := time.Now()
	for range producers {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := next.Add(1) - 1
				if i >= int64(n) {
					return
				}
				if rate > 0 {
					due := start.Add(time.Duration(i) * time.Second / time.Duration(rate))
					if !sleep(ctx, time.Until(due)) {
						return
					}
				}
				it := item{ID: i, T: time.Now().UnixNano(), Pad: pad}
				if err := add(ctx, key(i), it); err != nil {
					fails.Add(1)
					once.Do(func() { first = err })
					continue
				}
				ok.Add(1)
			}
		})
	}
	wg.Wait()
	return produced{ok: ok.Load(), failed: fails.Load(), err: first}
}

// sleep waits for d, and reports false if ctx ended first.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// tracker counts the items handlers see, by id, their latency from
// append to handler, and when handling began and ended. It is safe for
// concurrent use; set work before the handlers run. It times handling only
// where work > 0, so that the other phases pay nothing for it.
type tracker struct {
	work time.Duration // what each item takes in handle: a sleep, so that handlers running at once overlap

	seen     []atomic.Int32 // handler calls per id
	latency  []atomic.Int64 // ns from append to the first handler call, per id
	calls    atomic.Int64   // handler calls
	distinct atomic.Int64   // ids seen at least once
	bad      atomic.Int64   // calls for ids out of range (never expected: the database is flushed before each phase)

	base  time.Time    // when the tracker was made; first and last are ns since, 0 until set (and where work is 0)
	first atomic.Int64 // the start of the first handle call
	last  atomic.Int64 // the latest return of an item's first handle call

	want atomic.Int64 // done closes once distinct reaches it
	once sync.Once
	done chan struct{}
}

// newTracker returns a tracker for the ids 0..n-1 that expects all of them.
func newTracker(n int) *tracker {
	t := &tracker{seen: make([]atomic.Int32, n), latency: make([]atomic.Int64, n), done: make(chan struct{}), base: time.Now()}
	t.want.Store(int64(n))
	return t
}

// handle is the work of a handler on one item: it notes the first call,
// sleeps for work (time.Sleep, as a handler waiting on I/O would), then
// records it. Handlers call it once per item, one item after the other
// within an aggregated task.
func (t *tracker) handle(it item) {
	if t.work > 0 {
		if t.first.Load() == 0 {
			t.first.CompareAndSwap(0, t.now())
		}
		time.Sleep(t.work)
	}
	t.record(it)
}

// now returns the time since t.base in ns, at least 1.
func (t *tracker) now() int64 { return max(int64(time.Since(t.base)), 1) }

// handling returns the time from the start of the first handle call to the
// return of the last item's first: how long handling took, start-up aside.
func (t *tracker) handling() time.Duration {
	first, last := t.first.Load(), t.last.Load()
	if first == 0 || last < first {
		return 0
	}
	return time.Duration(last - first)
}

// record notes that a handler got it, now.
func (t *tracker) record(it item) {
	lat := time.Now().UnixNano() - it.T
	t.calls.Add(1)
	if it.ID < 0 || it.ID >= int64(len(t.seen)) {
		t.bad.Add(1)
		return
	}
	if t.seen[it.ID].Add(1) != 1 {
		return // a duplicate
	}
	t.latency[it.ID].Store(lat)
	for now := t.now(); t.work > 0; {
		if l := t.last.Load(); l >= now || t.last.CompareAndSwap(l, now) {
			break
		}
	}
	if t.distinct.Add(1) >= t.want.Load() {
		t.once.Do(func() { close(t.done) })
	}
}

// expect lowers the number of ids to wait for, to those whose append
// succeeded.
func (t *tracker) expect(n int64) {
	t.want.Store(n)
	if t.distinct.Load() >= n {
		t.once.Do(func() { close(t.done) })
	}
}

// wait blocks until every expected id was seen or ctx is done.
func (t *tracker) wait(ctx context.Context) error {
	select {
	case <-t.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// duplicates returns the handler calls beyond the first of each id.
func (t *tracker) duplicates() int64 {
	return t.calls.Load() - t.distinct.Load() - t.bad.Load()
}

// latencies returns the sorted latencies of the ids seen that only
// selects (every id seen when only is nil), in nanoseconds.
func (t *tracker) latencies(only func(id int) bool) []int64 {
	out := make([]int64, 0, t.distinct.Load())
	for i := range t.seen {
		if t.seen[i].Load() > 0 && (only == nil || only(i)) {
			out = append(out, t.latency[i].Load())
		}
	}
	slices.Sort(out)
	return out
}

// percentile returns the nearest-rank p-th percentile (0 < p <= 1) of
// sorted values.
func percentile(sorted []int64, p float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(float64(len(sorted))*p)) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}
