package batchq

import (
	"errors"
	"sync"
	"sync/atomic"

	"github.com/batchq/batchq/internal/protocol"
)

// A batchRun is the handling of one batch: the handler calls (steps) it
// takes, and their outcomes. Its owner claims steps one at a time, in
// order; while steps are left and slots are free, it recruits idle
// executors, each in a slot of its own, to claim steps too, so that the
// items of a busy key are handled at once, within the worker's
// concurrency. A helper leaves after its step when a fetcher waits for a
// slot, so that other keys are not starved by a big batch. The steps of an
// ordered batch are claimed by key: a key's run one after another, and
// those of different keys (a batch of retries) at once.
type batchRun struct {
	f     *fetcher
	b     *protocol.Batch
	out   []protocol.Outcome // out[i] is the outcome of b.Items[i]
	steps [][]int            // the items of each step; nil: step i is item i
	next  atomic.Int64       // the next step to claim (of an ordered batch, key)
	// helpers counts the helpers at work; the owner waits for them before
	// it settles the batch.
	helpers sync.WaitGroup
	// keys groups the steps of an ordered batch (WithOrderedKeys) by key:
	// each is claimed whole, and its steps run one after another (runKey).
	// nil for a batch that is not ordered.
	keys [][]int
}

func (br *batchRun) len() int {
	if br.steps == nil {
		return len(br.b.Items)
	}
	return len(br.steps)
}

// givesBack returns 1 when a helper of the batch gives its slot back
// after its step if a fetcher waits for one (it counts in runner.room),
// and 0 when it keeps it until its claim is done: a helper of an ordered
// batch runs a whole key, however many items wait behind its first.
func (br *batchRun) givesBack() int32 {
	if br.keys != nil {
		return 0
	}
	return 1
}

// claims returns how many claims the batch takes: a step each, or a key
// each for an ordered batch.
func (br *batchRun) claims() int {
	if br.keys != nil {
		return len(br.keys)
	}
	return br.len()
}

// byKey groups the steps of br by the key of their items, in order of first
// appearance.
func (br *batchRun) byKey() [][]int {
	firsts := make([]protocol.Item, br.len()) // the first item of each step
	for s := range firsts {
		firsts[s] = br.b.Items[br.items(s)[0]]
	}
	return protocol.ByKey(firsts)
}

// items returns the indexes of step s's items.
func (br *batchRun) items(s int) []int {
	if br.steps == nil {
		return []int{s}
	}
	return br.steps[s]
}

// itemErrors returns the errors of the n items of a batch handler's call
// that returned err, by index, and true, when err is or wraps a
// *BatchError: nil for an item that succeeded. A NoRetry or RetryAfter
// around the *BatchError applies to each failed item (a RetryAfter of the
// item's own comes first). It returns false, for every item to take err,
// when err is some other error, or a *BatchError with an index that is not
// one of the call's items: such a handler has miscounted, and no failure
// may be lost.
func itemErrors(err error, n int) (map[int]error, bool) {
	var be *BatchError
	if !errors.As(err, &be) {
		return nil, false
	}
	if be == nil { // a nil *BatchError fails nothing
		return nil, true
	}
	for k := range be.Failed {
		if k < 0 || k >= n {
			return nil, false
		}
	}
	if error(be) == err {
		return be.Failed, true
	}
	var nr *NoRetryError
	noRetry := errors.As(err, &nr)
	var ra *RetryAfterError
	retryAfter := errors.As(err, &ra)
	failed := make(map[int]error, len(be.Failed))
	for k, e := range be.Failed {
		if e == nil {
			continue
		}
		var own *RetryAfterError
		switch {
		case noRetry:
			e = NoRetry(e)
		case retryAfter && !errors.As(e, &own):
			e = RetryAfter(ra.Delay, e)
		}
		failed[k] = e
	}
	return failed, true
}

// plan returns the steps of a batch handler's batch b: the indexes of its
// items, grouped by key (in order of first appearance) and cut to the
// queue's batch bounds.
func (q *queue) plan(b *protocol.Batch) [][]int {
	groups := protocol.ByKey(b.Items)
	if q.maxItems == 0 && q.maxBytes == 0 {
		return groups
	}
	steps := make([][]int, 0, len(groups))
	for _, g := range groups {
		start, size := 0, 0
		for k, i := range g {
			n := len(b.Items[i].Data)
			if k > start && (q.maxItems > 0 && k-start == q.maxItems || q.maxBytes > 0 && size+n > q.maxBytes) {
				steps = append(steps, g[start:k:k])
				start, size = k, 0
			}
			size += n
		}
		steps = append(steps, g[start:])
	}
	return steps
}
