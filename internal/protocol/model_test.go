package protocol_test

// The reference model of the model test: where every item appended is, the
// model's side of each operation, and the checks that compare the whole
// Redis state of the queue shard with it. Its inputs come from the fuzz
// driver, model_fuzz_test.go.

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// The model test drives one producer and one consumer through a sequence of
// operations decoded from a byte string, on a fake consumer clock, and keeps
// an in-memory model of where every appended item is: pending in its key,
// held in a leased batch (by a live worker, or left by a crashed one),
// waiting as a retry, dead, purged, or done. After every operation it
// compares the whole Redis state of the queue shard with the model:
//
//   - k:<key> is exactly "[" + the model's pending items, in order, + "]"
//     (I3): batches put back (unfinished items, reaped leases) go in front,
//     appends and requeued dead letters at the end; n:<key> holds its count;
//   - the ready index holds exactly the keys with pending items (a key with
//     items that is not ready would never be drained: I1), due when the
//     model says, and the wake list holds them, in the order they fell due;
//   - the leases, their deadlines and their contents; the retry index, with
//     each retry's id and due time; the dead letters, with their items,
//     attempts and errors.
//
// Every Fetch is predicted: the batch of due retries first, with their
// attempts and last errors, then the keys first on the wake list, each
// drained batch's items, and Fetched.NextRetry. No item settled Done is ever
// delivered again (I5). A crashed worker's batch comes back after the lease
// TTL through Reap (I1), and the late Settle of a reaped batch is refused
// with ErrLeaseLost. At the end the model drains everything and checks that
// every item was handled Done exactly once by a settlement that took, or is
// dead (or purged); items handled more than once were all in a crashed batch
// or in a settlement refused because its lease was lost.
//
// With the configuration bit cfgOrdered the queue is ordered
// (Consumer.Order): the model keeps each key's hold, and predicts what
// ordered mode changes. A drain skips a popped key that is held and leaves
// it on the ready index at protocol.HeldDue (its items wait: an append to
// their array does not make it due, the end of the hold does); a settlement turns, per key, the first
// failed item (or, in a batch of retries, the first unfinished one) into one
// retry holding the key's later items that are not done or dead (its rest),
// or else puts the unfinished items back and ends the hold; a claim delivers
// a retry's rest after it; settle and reap end holds, making a key with items
// due. The exact comparison (O4: nothing lost, nothing delivered twice
// without a crash) takes in each key's hold, o:<key>, which must be the lease
// of the drain that set it. Besides, check and fetch assert what ordered mode
// guarantees, so that a mistake the model shared with the protocol would
// still show: on the holds and ready index read from Redis, on the model's
// leases and retries (which the comparison ties to Redis), and on each
// Fetch's batches:
//
//   - O1: at most one batch of a key is out (leased, by a live or a crashed
//     worker, or waiting as a retry), and no Fetch drains a key that has one;
//   - O2: a key's items are delivered in append order (a requeued dead letter
//     is appended again): within a batch, and across batches, since every item
//     appended before the first one a batch delivers is done or dead. Items
//     put back (unfinished, or a reaped lease) go in front, so they come again
//     first;
//   - O3: so a failed item holds back those after it: they come with it (its
//     rest) or after it, and the items appended meanwhile after them;
//   - O5: a key is held exactly while it has a batch out;
//   - I1: a key with pending items is due or held (else nothing would ever
//     drain it).

// Where an item is.
type mState uint8

const (
	sPending mState = iota // in pending[key]
	sHeld                  // in a leased batch
	sRetry                 // on the retry index
	sDead
	sPurged // purged, or dropped past the dead letter cap
	sDone
	sBehind // ordered: held back in the rest of a retry of an earlier item of its key
)

func (s mState) String() string {
	return [...]string{"pending", "held", "retry", "dead", "purged", "done", "behind"}[s]
}

type mItem struct {
	n        int
	key      string
	data     string
	state    mState
	attempts int    // failed attempts, as a retry or dead letter counts them
	lastErr  string // the last failed attempt's error
	retryID  string // sRetry: the retry's id and due time
	due      int64
	deadID   string // sDead: the dead letter's id and time
	deadAt   int64
	commits  int  // Done settlements that took
	handled  int  // times a handler finished it: Done settlements sent, and before crashes
	crashed  bool // it was in a crashed worker's batch
	lost     bool // it was in a settlement refused with ErrLeaseLost
	seq      int  // its place in its key's append order: every append, and every requeue, numbers its items anew
	// rest, for the head of an ordered retry (sRetry, or sHeld in a batch
	// of retries): the items of its key held back behind it, in order, each
	// sBehind with the head's retryID.
	rest []*mItem
}

type mBatch struct {
	b        *protocol.Batch
	token    string
	key      string // "" for retries
	items    []*mItem
	entryIDs []string // retries: the id each item was claimed under (ordered: a rest item's is its head's)
	deadline int64
	reaped   bool // the lease was reaped: the items are back, a Settle is refused
}

// readyAt is a key's score on the ready index: the server's clock for a key
// a producer (or a requeue) made due (unknown, but below every consumer
// reading), else the consumer's clock.
type readyAt struct {
	ms int64 // 0: made due by the server's clock
}

type model struct {
	t       *testing.T
	deadCap int // 0: none
	keyCap  int // 0: none
	ctx     context.Context
	b       testredis.Backend
	sp      keys.Space
	p       *producer.Producer
	c       *protocol.Consumer
	clock   *fakeClock
	startMs int64
	items   []*mItem
	byData  map[string]*mItem
	pending map[string][]*mItem
	ready   map[string]readyAt
	wake    []string           // the wake list, first to pop first
	held    []*mBatch          // batches a live worker holds, in fetch order
	settled []*mBatch          // the last batches settled
	leases  map[string]*mBatch // batches whose lease is in Redis, by token
	ordered bool               // the queue is ordered (cfgOrdered)
	holds   map[string]string  // ordered: held key -> the lease (its member of the leases index) of the drain that set the hold
	seq     int                // the last append sequence number (mItem.seq)
	errs    int
	dirty   bool // the dead letters changed since they were last compared
	log     []string
}

func (m *model) logf(format string, args ...any) {
	m.log = append(m.log, fmt.Sprintf("t+%dms ", m.now()-m.startMs)+fmt.Sprintf(format, args...))
}

func (m *model) fail(format string, args ...any) {
	m.t.Helper()
	m.t.Fatalf("%s\noperations:\n  %s", fmt.Sprintf(format, args...), strings.Join(m.log, "\n  "))
}

func (m *model) now() int64 { return m.clock.Now().UnixMilli() }

// itemData is the JSON of item n: distinct for every n, of several shapes.
func itemData(n int) string {
	switch n % 4 {
	case 0:
		return strconv.Itoa(n)
	case 1:
		return fmt.Sprintf(`"s-%d ✓"`, n)
	case 2:
		return fmt.Sprintf(`{"n":%d,"u":"\u00e9"}`, n)
	}
	return fmt.Sprintf(`[%d, {"z":null}]`, n)
}

// makeDue puts key on the ready index at ms (0: the server's clock) and at
// the end of the wake list, unless it is on the index already.
func (m *model) makeDue(key string, ms int64) {
	if _, ok := m.ready[key]; !ok {
		m.ready[key] = readyAt{ms: ms}
		m.wake = append(m.wake, key)
	}
}

func (m *model) describe(mb *mBatch) string {
	s := make([]string, len(mb.items))
	for i, it := range mb.items {
		s[i] = strconv.Itoa(it.n)
	}
	what := "key " + mb.key
	if mb.key == "" {
		what = "retries"
	}
	return fmt.Sprintf("batch %s %s [%s]", mb.token, what, strings.Join(s, " "))
}

// drop forgets a batch the worker held.
func (m *model) drop(mb *mBatch) {
	m.held = slices.DeleteFunc(m.held, func(x *mBatch) bool { return x == mb })
}

func (m *model) add(key string, n int) {
	n = min(n, modelMaxItems-len(m.items))
	if n == 0 {
		m.logf("append to %s: item cap reached", key)
		return
	}
	raws := make([]json.RawMessage, n)
	var ns []string
	for i := range raws {
		raws[i] = json.RawMessage(itemData(len(m.items) + i))
		ns = append(ns, strconv.Itoa(len(m.items)+i))
	}
	// Items put back (unfinished or reaped) count, and may take the key
	// past its cap. A refused append makes the key due (by the server's
	// clock), unless it is on the ready index already: an ordered key that
	// is held stays there, at HeldDue.
	full := m.keyCap > 0 && len(m.pending[key]) > 0 && len(m.pending[key])+n > m.keyCap
	m.logf("append to %s: %s (full: %v)", key, strings.Join(ns, " "), full)
	err := m.p.AddRaw(m.ctx, queue, key, raws...)
	if full {
		var fe *producer.KeyFullError
		if !errors.As(err, &fe) || fe.Items != int64(len(m.pending[key])) || fe.Adding != n {
			m.fail("AddRaw to a full key: got %v, want a KeyFullError of %d items adding %d", err, len(m.pending[key]), n)
		}
		m.makeDue(key, 0)
		return
	}
	if err != nil {
		m.fail("AddRaw: %v", err)
	}
	// Only a new array makes its key due: a key with items is due already,
	// unless it is an ordered key that is held, whose items wait for the
	// end of the hold.
	if len(m.pending[key]) == 0 {
		m.makeDue(key, 0)
	}
	for _, raw := range raws {
		m.seq++
		it := &mItem{n: len(m.items), key: key, data: string(raw), seq: m.seq}
		m.items = append(m.items, it)
		m.byData[it.data] = it
		m.pending[key] = append(m.pending[key], it)
	}
}

func (m *model) fetch(max int) []*mBatch {
	now := m.now()
	var due, later []*mItem // the retries (an ordered retry's head) due by now, and not yet
	for _, it := range m.items {
		if it.state == sRetry {
			if it.due <= now {
				due = append(due, it)
			} else {
				later = append(later, it)
			}
		}
	}
	slices.SortFunc(due, func(a, b *mItem) int {
		return cmp.Or(cmp.Compare(a.due, b.due), strings.Compare(a.retryID, b.retryID))
	})
	// A claim delivers each retry's rest right after it.
	var claimed []*mItem
	for _, it := range due {
		claimed = append(append(claimed, it), it.rest...)
	}
	wantRetries := len(due) > 0
	nkeys := max
	if wantRetries {
		nkeys--
	}
	popped := m.wake[:min(nkeys, len(m.wake))]
	// An ordered drain skips the popped keys that are held.
	var drained, skipped []string
	for _, k := range popped {
		if k == "" {
			continue // a hint: it takes a name's place in the pop, and drains nothing
		}
		if _, held := m.holds[k]; held {
			skipped = append(skipped, k)
		} else {
			drained = append(drained, k)
		}
	}
	out := m.outstanding()

	f, err := m.c.Fetch(m.ctx, queue, 0, max)
	if err != nil {
		m.fail("Fetch(%d): %v", max, err)
	}
	if len(f.Dead) > 0 {
		m.fail("Fetch(%d) found dead letters: %+v", max, f.Dead)
	}
	var got []*mBatch
	var retries *mBatch
	for _, b := range f.Batches {
		mb := &mBatch{b: b, token: protocol.BatchID(b), key: b.Key, deadline: now + modelTTL.Milliseconds()}
		if b.Queue != queue || b.Shard != 0 || mb.token == "" {
			m.fail("Fetch(%d): batch of queue %q shard %d token %q", max, b.Queue, b.Shard, mb.token)
		}
		if b.Ordered != m.ordered {
			m.fail("Fetch(%d): batch of key %q has Ordered %v on a queue whose ordered is %v", max, b.Key, b.Ordered, m.ordered)
		}
		if m.ordered && !b.Retry() && out[b.Key] > 0 {
			m.fail("O1: Fetch(%d) drained key %q, which has a batch out", max, b.Key)
		}
		for _, x := range b.Items {
			it := m.byData[string(x.Data)]
			if it == nil {
				m.fail("Fetch(%d): unknown item %s in batch of key %q", max, x.Data, b.Key)
			}
			if it.commits > 0 {
				m.fail("I5: item %d delivered again after a Done settlement took (key %q)", it.n, b.Key)
			}
			if x.Key != it.key {
				m.fail("Fetch(%d): item %d of key %q delivered with key %q", max, it.n, it.key, x.Key)
			}
			mb.items = append(mb.items, it)
			if b.Retry() {
				if !(it.state == sRetry && it.due <= now || it.state == sBehind) {
					m.fail("Fetch(%d): item %d delivered as a retry, but the model has it %v due %d (now %d)", max, it.n, it.state, it.due, now)
				}
				// A rest item comes with no attempts and no error. The
				// model keeps its own, which are none (only a retry's
				// head ever has any), so that a count the protocol lost
				// would show here.
				if x.Attempt != it.attempts || x.LastError != it.lastErr {
					m.fail("Fetch(%d): retry %d has attempt %d error %q, want %d %q", max, it.n, x.Attempt, x.LastError, it.attempts, it.lastErr)
				}
				mb.entryIDs = append(mb.entryIDs, it.retryID)
			} else if x.Attempt != 0 || x.LastError != "" {
				m.fail("Fetch(%d): item %d of key %q has attempt %d error %q", max, it.n, b.Key, x.Attempt, x.LastError)
			}
		}
		if m.ordered {
			m.checkOrder(mb)
		}
		if b.Retry() {
			if retries != nil || len(got) > 0 {
				m.fail("Fetch(%d): a second batch of retries, or one after keys", max)
			}
			retries = mb
			continue
		}
		if want := itemsString(m.pending[b.Key]); itemsString(mb.items) != want {
			m.fail("Fetch(%d): key %q drained %s, want %s", max, b.Key, itemsString(mb.items), want)
		}
		got = append(got, mb)
	}
	var gotKeys []string
	for _, mb := range got {
		gotKeys = append(gotKeys, mb.key)
	}
	if !slices.Equal(gotKeys, drained) || (retries != nil) != wantRetries {
		m.fail("Fetch(%d): keys %q and retries=%v, want keys %q (the first of the wake list %q, but the held %q) and retries=%v (%d due)",
			max, gotKeys, retries != nil, drained, m.wake, skipped, wantRetries, len(due))
	}
	if retries != nil {
		if want := itemsString(claimed); itemsString(retries.items) != want {
			m.fail("Fetch(%d): retries %s, want %s in due order, each retry's rest after it", max, itemsString(retries.items), want)
		}
	}
	// NextRetry: the earliest retry left; NextKey: none (no flush policy).
	left := later
	if retries == nil {
		left = append(left, due...)
	}
	if len(left) == 0 {
		if !f.NextRetry.IsZero() {
			m.fail("Fetch(%d): NextRetry %v with no retry left", max, f.NextRetry)
		}
	} else {
		want := slices.MinFunc(left, func(a, b *mItem) int { return cmp.Compare(a.due, b.due) }).due
		if f.NextRetry.UnixMilli() != want {
			m.fail("Fetch(%d): NextRetry %v (%d), want %d", max, f.NextRetry, f.NextRetry.UnixMilli(), want)
		}
	}
	if !f.NextKey.IsZero() {
		m.fail("Fetch(%d): NextKey %v with no key scheduled", max, f.NextKey)
	}

	m.wake = m.wake[len(popped):]
	for _, k := range skipped {
		if _, ok := m.ready[k]; ok {
			m.ready[k] = readyAt{ms: protocol.HeldDue} // its items wait for the end of the hold
		}
	}
	if retries != nil {
		got = append(got, retries)
	}
	var desc []string
	for _, mb := range got {
		for _, it := range mb.items {
			it.state = sHeld
		}
		if mb.key != "" {
			delete(m.pending, mb.key)
			delete(m.ready, mb.key)
			if m.ordered {
				m.holds[mb.key] = mb.member()
			}
		}
		m.held = append(m.held, mb)
		m.leases[mb.token] = mb
		desc = append(desc, m.describe(mb))
	}
	if len(skipped) > 0 {
		desc = append(desc, fmt.Sprintf("held, skipped: %q", skipped))
	}
	m.logf("fetch(%d): %s", max, strings.Join(desc, "; "))
	return got
}

// member is mb's lease as a member of the leases index.
func (mb *mBatch) member() string {
	return protocol.Lease{Token: mb.token, Owner: "model", Key: mb.key}.String()
}

// outstanding counts the batches of each key that are out: a leased batch
// of the key (its worker live or crashed), an envelope of the key in a
// leased batch of retries, or a retry waiting on the index. Ordered mode
// allows one per key (O1).
func (m *model) outstanding() map[string]int {
	out := map[string]int{}
	for _, mb := range m.leases {
		if mb.key != "" {
			out[mb.key]++
			continue
		}
		for i, it := range mb.items {
			if i == 0 || mb.entryIDs[i] != mb.entryIDs[i-1] { // a head: its rest follows it under its id
				out[it.key]++
			}
		}
	}
	for _, it := range m.items {
		if it.state == sRetry {
			out[it.key]++
		}
	}
	return out
}

// checkOrder checks, before a Fetch's batch mb changes the model, that it
// delivers each ordered key's items in append order (O2, O3): in increasing
// order within the batch, and with every item of the key appended before the
// first of them done, dead or purged. Items put back (unfinished, reaped)
// and held back (a retry's rest) keep their place, so this holds for them
// too.
func (m *model) checkOrder(mb *mBatch) {
	last := map[string]*mItem{}
	for _, it := range mb.items {
		p, seen := last[it.key]
		last[it.key] = it
		if seen {
			if it.seq <= p.seq {
				m.fail("O2: %s delivers item %d (appended #%d) after item %d (appended #%d) of key %q",
					m.describe(mb), it.n, it.seq, p.n, p.seq, it.key)
			}
			continue
		}
		for _, y := range m.items {
			if y.key == it.key && y.seq < it.seq && y.state != sDone && y.state != sDead && y.state != sPurged {
				m.fail("O2/O3: %s delivers item %d (appended #%d) of key %q while item %d (appended #%d) is %v",
					m.describe(mb), it.n, it.seq, it.key, y.n, y.seq, y.state)
			}
		}
	}
}

func itemsString(items []*mItem) string {
	s := make([]string, len(items))
	for i, it := range items {
		s[i] = it.data
	}
	return "[" + strings.Join(s, ",") + "]"
}

func (m *model) settle(mb *mBatch, outs []protocol.Outcome) {
	m.drop(mb)
	m.settled = append(m.settled, mb)
	if len(m.settled) > 8 {
		m.settled = m.settled[1:]
	}
	now := m.now()
	kinds := make([]string, len(mb.items))
	for i := range mb.items {
		kinds[i] = "unfinished"
		if i < len(outs) {
			kinds[i] = [...]string{"unfinished", "done", "retry", "dead"}[outs[i].Kind]
			if outs[i].Kind == protocol.Retry {
				kinds[i] += "+" + outs[i].Delay.String()
			}
		}
	}
	m.logf("settle %s: %s (lease reaped: %v)", m.describe(mb), strings.Join(kinds, " "), mb.reaped)
	err := m.c.Settle(m.ctx, mb.b, outs)
	if mb.reaped {
		if !errors.Is(err, protocol.ErrLeaseLost) {
			m.fail("Settle of a reaped batch: got %v, want ErrLeaseLost", err)
		}
		for i, it := range mb.items {
			if i < len(outs) && outs[i].Kind == protocol.Done {
				it.handled++
				it.lost = true
			}
		}
		return
	}
	if err != nil {
		m.fail("Settle: %v", err)
	}
	delete(m.leases, mb.token)
	for _, it := range mb.items {
		it.rest = nil // a head's rest, if any, is settled with it
	}
	if m.ordered {
		m.settleOrdered(mb, outs, now)
	} else {
		var back []*mItem
		soon := false // a retry is due before the next periodic claim
		for i, it := range mb.items {
			o := outcomeOf(outs, i)
			switch o.Kind {
			case protocol.Done:
				m.done(it)
			case protocol.Retry:
				m.retry(it, itemID(mb, i), now+o.Delay.Milliseconds(), o.Err)
				soon = soon || it.due < now+protocol.ClaimEvery.Milliseconds()
			case protocol.Dead:
				m.dead(it, itemID(mb, i), now, o.Err)
			case protocol.Unfinished:
				if mb.key == "" {
					it.state, it.retryID, it.due = sRetry, itemID(mb, i), now
					soon = true
				} else {
					it.state = sPending
					back = append(back, it)
				}
			}
		}
		m.putBack(mb.key, back, now)
		m.hint(soon)
	}
	if m.deadCap > 0 && slices.Contains(kindsOf(outs), protocol.Dead) {
		// Past the cap, the oldest dead letters are dropped: by time,
		// then id.
		dead := m.deadItems()
		slices.SortFunc(dead, func(a, b *mItem) int {
			return cmp.Or(cmp.Compare(a.deadAt, b.deadAt), strings.Compare(a.deadID, b.deadID))
		})
		for _, it := range dead[:max(0, len(dead)-m.deadCap)] {
			it.state = sPurged
			m.logf("dead letter of item %d dropped", it.n)
		}
	}
}

// outcomeOf returns outs[i]: Unfinished when it is missing.
func outcomeOf(outs []protocol.Outcome, i int) protocol.Outcome {
	if i < len(outs) {
		return outs[i]
	}
	return protocol.Outcome{Kind: protocol.Unfinished}
}

// itemID is the id of the retry or dead letter of mb's i-th item.
func itemID(mb *mBatch, i int) string { return fmt.Sprintf("%s-%07d", mb.token, i) }

func (m *model) done(it *mItem) {
	it.state = sDone
	it.commits++
	it.handled++
}

func (m *model) retry(it *mItem, id string, due int64, err error) {
	it.state, it.retryID, it.due = sRetry, id, due
	it.attempts++
	it.lastErr = err.Error()
}

func (m *model) dead(it *mItem, id string, now int64, err error) {
	m.dirty = true
	it.state, it.deadID, it.deadAt = sDead, id, now
	it.attempts++
	it.lastErr = err.Error()
}

// putBack puts back the unfinished items of a batch of key in front of its
// pending items, and makes it due.
func (m *model) putBack(key string, back []*mItem, now int64) {
	if len(back) > 0 {
		m.pending[key] = append(back, m.pending[key]...)
		m.makeDue(key, now)
	}
}

// settleOrdered is the model's side of the settlement of a batch of an
// ordered queue (the protocol's orderedSettlement), after the outcomes of
// outs: per key, in order of first appearance, done and dead items go as in
// any batch; the first failed item, or, in a batch of retries, the first
// unfinished one, becomes a retry (its head), and the key's later items
// that are not done or dead its rest, in order, and the hold stays. Without
// a head, the unfinished items go back in front of the key, and its hold
// ends. An item failed after an unfinished one of a drained batch goes back
// with it, unfinished, its failure not counted (a worker never reports
// one: it does not handle an item of a key after an unfinished one).
func (m *model) settleOrdered(mb *mBatch, outs []protocol.Outcome, now int64) {
	soon := false      // a retry is due before the next periodic claim
	var ended []string // keys whose hold ends, after the retries are stored
	var order []string
	group := map[string][]int{}
	for i, it := range mb.items {
		if _, ok := group[it.key]; !ok {
			order = append(order, it.key)
		}
		group[it.key] = append(group[it.key], i)
	}
	for _, key := range order {
		var head *mItem
		var back []*mItem
		for _, i := range group[key] {
			it, o := mb.items[i], outcomeOf(outs, i)
			switch {
			case o.Kind == protocol.Done:
				m.done(it)
			case o.Kind == protocol.Dead:
				m.dead(it, itemID(mb, i), now, o.Err)
			case head != nil:
				it.state, it.retryID = sBehind, head.retryID
				head.rest = append(head.rest, it)
			case back == nil && o.Kind == protocol.Retry:
				head = it
				m.retry(it, itemID(mb, i), now+o.Delay.Milliseconds(), o.Err)
				soon = soon || it.due < now+protocol.ClaimEvery.Milliseconds()
			case back == nil && mb.key == "":
				head = it
				it.state, it.retryID, it.due = sRetry, itemID(mb, i), now
				soon = true
			default:
				it.state = sPending
				back = append(back, it)
			}
		}
		m.putBack(key, back, now)
		if head == nil {
			ended = append(ended, key)
		}
	}
	m.hint(soon)
	for _, key := range ended {
		m.endHold(key, "", now)
	}
}

// hint pushes a hint (an empty name) on the wake list when soon: a settle
// that stores a retry due before the next periodic claim has a worker
// claim now.
func (m *model) hint(soon bool) {
	if soon {
		m.wake = append(m.wake, "")
	}
}

// endHold ends the hold of an ordered key (release_hold), if lease set it
// (any lease: ""), and makes the key due if it has items: they waited for
// the hold to end.
func (m *model) endHold(key, lease string, now int64) {
	if h, ok := m.holds[key]; !ok || lease != "" && h != lease {
		return
	}
	delete(m.holds, key)
	r, ok := m.ready[key]
	parked := ok && r.ms >= protocol.HeldDue
	switch {
	case len(m.pending[key]) > 0 && (!ok || parked):
		m.ready[key] = readyAt{ms: now}
		m.wake = append(m.wake, key)
	case len(m.pending[key]) == 0 && parked:
		delete(m.ready, key) // parked with no items: off the index
	}
}

func kindsOf(outs []protocol.Outcome) []protocol.OutcomeKind {
	k := make([]protocol.OutcomeKind, len(outs))
	for i, o := range outs {
		k[i] = o.Kind
	}
	return k
}

func (m *model) reap() {
	now := m.now()
	var expired []*mBatch
	for _, mb := range m.leases {
		if mb.deadline <= now {
			expired = append(expired, mb)
		}
	}
	// Store.Reap lists them by deadline (then token) and returns the
	// latest first, so that the earliest ends up in front.
	slices.SortFunc(expired, func(a, b *mBatch) int {
		return cmp.Or(cmp.Compare(a.deadline, b.deadline), strings.Compare(a.token, b.token))
	})
	var desc []string
	for _, mb := range expired {
		desc = append(desc, m.describe(mb))
	}
	m.logf("reap: %s", strings.Join(desc, "; "))
	n, err := m.c.Reap(m.ctx, queue, 0)
	if err != nil {
		m.fail("Reap: %v", err)
	}
	if n != len(expired) {
		m.fail("Reap returned %d, want %d", n, len(expired))
	}
	for _, mb := range slices.Backward(expired) {
		mb.reaped = true
		delete(m.leases, mb.token)
		if mb.key == "" {
			// The envelopes go back as they were: an ordered retry with
			// its rest (which shares its id), and its key's hold stays.
			for i, it := range mb.items {
				if i > 0 && mb.entryIDs[i] == mb.entryIDs[i-1] {
					it.state = sBehind
				} else {
					it.state, it.retryID, it.due = sRetry, mb.entryIDs[i], now
				}
			}
			continue
		}
		for _, it := range mb.items {
			it.state = sPending
		}
		m.putBack(mb.key, slices.Clone(mb.items), now)
		m.endHold(mb.key, mb.member(), now)
	}
}

func (m *model) extend(mask byte) {
	var sel []*mBatch
	var bs []*protocol.Batch
	var desc []string
	for i, mb := range m.held {
		if mask&0x7f == 0 || i < 7 && mask&(1<<i) != 0 {
			sel = append(sel, mb)
			bs = append(bs, mb.b)
			desc = append(desc, mb.token)
		}
	}
	if mask&0x80 != 0 {
		// Settled batches hold no lease: Extend must not bring one back.
		for _, mb := range m.settled {
			bs = append(bs, mb.b)
			desc = append(desc, mb.token+"(settled)")
		}
	}
	m.logf("extend: %s", strings.Join(desc, " "))
	if err := m.c.Extend(m.ctx, bs...); err != nil {
		m.fail("Extend: %v", err)
	}
	for _, mb := range sel {
		if !mb.reaped {
			mb.deadline = m.now() + modelTTL.Milliseconds()
		}
	}
}

func (m *model) deadItems() []*mItem {
	var dead []*mItem
	for _, it := range m.items {
		if it.state == sDead {
			dead = append(dead, it)
		}
	}
	return dead
}

func (m *model) requeue(mask byte, dup bool) {
	var sel []*mItem
	for i, it := range m.deadItems() {
		if mask == 0 || i < 8 && mask&(1<<i) != 0 {
			sel = append(sel, it)
		}
	}
	var desc []string
	for _, it := range sel {
		desc = append(desc, strconv.Itoa(it.n))
	}
	m.logf("requeue dead (twice the first: %v): %s", dup, strings.Join(desc, " "))
	if len(sel) == 0 {
		return
	}
	letters := map[string]deadletter.Letter{}
	for _, d := range m.deadLetters() {
		letters[d.ID] = d
	}
	var args []deadletter.Letter
	for _, it := range sel {
		d, ok := letters[it.deadID]
		if !ok {
			m.fail("dead letter %s of item %d not listed", it.deadID, it.n)
		}
		args = append(args, d)
	}
	if dup {
		args = append(args, args[0])
	}
	n, err := dl(m.c).Requeue(m.ctx, args...)
	if err != nil || n != len(sel) {
		m.fail("RequeueDead of %d letters: %d, %v; want %d", len(args), n, err, len(sel))
	}
	m.dirty = true
	for _, it := range sel {
		m.seq++
		it.state, it.attempts, it.lastErr, it.seq = sPending, 0, "", m.seq
		m.pending[it.key] = append(m.pending[it.key], it)
		m.makeDue(it.key, 0) // by the server's clock, even if held; a key due already keeps its time
	}
}

func (m *model) purge() {
	dead := m.deadItems()
	m.logf("purge: %d dead", len(dead))
	n, err := dl(m.c).Purge(m.ctx, queue)
	if err != nil || n != int64(len(dead)) {
		m.fail("PurgeDead: %d, %v; want %d", n, err, len(dead))
	}
	m.dirty = true
	for _, it := range dead {
		it.state = sPurged
	}
}

func (m *model) deadLetters() []deadletter.Letter {
	ds, err := dl(m.c).List(m.ctx, queue, 1000)
	if err != nil {
		m.fail("DeadLetters: %v", err)
	}
	return ds
}

// check compares the shard's whole Redis state with the model.
func (m *model) check() {
	m.t.Helper()
	c := m.b.Client
	var cmds rueidis.Commands
	for _, k := range modelKeys {
		cmds = append(cmds, c.B().Get().Key(m.sp.Items(k)).Build(), c.B().Get().Key(m.sp.Count(k)).Build())
	}
	cmds = append(cmds,
		c.B().Zrange().Key(m.sp.Ready()).Min("0").Max("-1").Withscores().Build(),
		c.B().Zrange().Key(m.sp.Leases()).Min("0").Max("-1").Withscores().Build(),
		c.B().Zrange().Key(m.sp.Retry()).Min("0").Max("-1").Withscores().Build(),
		c.B().Lrange().Key(m.sp.Wake()).Start(0).Stop(-1).Build(),
		c.B().Zcard().Key(m.sp.Dead()).Build(),
		c.B().Zcard().Key(m.sp.Later()).Build())
	tokens := slices.Sorted(maps.Keys(m.leases))
	for _, tok := range tokens {
		if m.leases[tok].key != "" {
			cmds = append(cmds, c.B().Get().Key(m.sp.Lease(tok)).Build(), c.B().Get().Key(m.sp.LeaseCount(tok)).Build())
		} else {
			cmds = append(cmds, c.B().Hgetall().Key(m.sp.Lease(tok)).Build())
		}
	}
	for _, k := range modelKeys {
		cmds = append(cmds, c.B().Get().Key(m.sp.Hold(k)).Build())
	}
	res := c.DoMulti(m.ctx, cmds...)
	str := func(r rueidis.RedisResult) (string, bool) {
		s, err := r.ToString()
		if rueidis.IsRedisNil(err) {
			return "", false
		}
		if err != nil {
			m.fail("check: %v", err)
		}
		return s, true
	}
	i := 0
	for _, k := range modelKeys {
		items, ok := str(res[i])
		count, okc := str(res[i+1])
		i += 2
		p := m.pending[k]
		if len(p) == 0 {
			if ok || okc {
				m.fail("I3: key %q holds %q (count %q), want nothing", k, items, count)
			}
			continue
		}
		if want := itemsString(p); items != want {
			m.fail("I3: key %q holds %s, want %s", k, items, want)
		}
		if !json.Valid([]byte(items)) {
			m.fail("I3: key %q holds invalid JSON %s", k, items)
		}
		if want := protocol.PackCount(int64(len(p)), int64(len(items))); count != strconv.FormatInt(want, 10) {
			m.fail("count of key %q is %q, want %d (%d items, %d bytes)", k, count, want, len(p), len(items))
		}
	}
	zset := func(r rueidis.RedisResult, what string) map[string]int64 {
		zs, err := r.AsZScores()
		if err != nil {
			m.fail("check %s: %v", what, err)
		}
		out := map[string]int64{}
		for _, z := range zs {
			out[z.Member] = int64(z.Score)
		}
		return out
	}
	ready := zset(res[i], "ready")
	if len(ready) != len(m.ready) {
		m.fail("ready index %v, want the keys %v", ready, m.ready)
	}
	for k, s := range m.ready {
		got, ok := ready[k]
		if !ok || s.ms == 0 && got >= m.startMs || s.ms != 0 && got != s.ms {
			m.fail("ready index %v, want key %q at %+v", ready, k, s)
		}
	}
	leases := zset(res[i+1], "leases")
	if len(leases) != len(m.leases) {
		m.fail("leases %v, want %d", leases, len(m.leases))
	}
	for tok, mb := range m.leases {
		member := protocol.Lease{Token: tok, Owner: "model", Key: mb.key}.String()
		if got, ok := leases[member]; !ok || got != mb.deadline {
			m.fail("leases %v, want %s at %d", leases, member, mb.deadline)
		}
	}
	retries := zset(res[i+2], "retries")
	nretry := 0
	for _, it := range m.items {
		if it.state == sRetry {
			nretry++
			if due, ok := retries[it.retryID]; !ok || due != it.due {
				m.fail("retry index %v, want item %d as %s due %d", retries, it.n, it.retryID, it.due)
			}
		}
	}
	if len(retries) != nretry {
		m.fail("retry index %v, want %d retries", retries, nretry)
	}
	wake, err := res[i+3].AsStrSlice()
	if err != nil || !slices.Equal(wake, m.wake) {
		m.fail("wake list %q (%v), want %q", wake, err, m.wake)
	}
	ndead, err := res[i+4].AsInt64()
	if err != nil {
		m.fail("ZCARD dead: %v", err)
	}
	if n, err := res[i+5].AsInt64(); err != nil || n != 0 {
		m.fail("later index holds %d keys (%v), want none", n, err)
	}
	i += 6
	for _, tok := range tokens {
		mb := m.leases[tok]
		if mb.key != "" {
			v, _ := str(res[i])
			n, _ := str(res[i+1])
			i += 2
			want := protocol.PackCount(int64(len(mb.items)), int64(len(itemsString(mb.items))))
			if v != itemsString(mb.items) || n != strconv.FormatInt(want, 10) {
				m.fail("lease %s holds %s (count %q), want %s", tok, v, n, itemsString(mb.items))
			}
			continue
		}
		h, err := res[i].AsStrMap()
		i++
		if n := len(slices.Compact(slices.Clone(mb.entryIDs))); err != nil || len(h) != n {
			m.fail("retry lease %s holds %v (%v), want %d retries", tok, h, err, n)
		}
		for j, id := range mb.entryIDs {
			if !strings.Contains(h[id], mb.items[j].data) {
				m.fail("retry lease %s: %s holds %q, want item %s", tok, id, h[id], mb.items[j].data)
			}
		}
	}
	m.checkHolds(res[i:], str, ready)
	dead := m.deadItems()
	if ndead != int64(len(dead)) {
		m.fail("%d dead letters, want %d", ndead, len(dead))
	}
	if m.dirty {
		m.checkDead(dead)
		m.dirty = false
	}
}

// checkHolds compares the holds of the model's keys (one GET reply each) with
// the model's, and checks what ordered mode guarantees of the holds and the
// ready index read from Redis: at most one batch of a key out (O1), a hold
// exactly while one is (O5), and a key with items due or held, and none
// parked at HeldDue without a hold (I1). A queue
// that is not ordered holds no key.
func (m *model) checkHolds(res []rueidis.RedisResult, str func(rueidis.RedisResult) (string, bool), ready map[string]int64) {
	out := m.outstanding()
	for j, k := range modelKeys {
		got, held := str(res[j])
		if want, ok := m.holds[k]; held != ok || got != want {
			m.fail("hold of key %q is %q (set: %v), want %q (set: %v)", k, got, held, want, ok)
		}
		if _, due := ready[k]; len(m.pending[k]) > 0 && !due && !held {
			m.fail("I1: key %q has items, and is neither due nor held", k)
		}
		if at, on := ready[k]; on && at >= protocol.HeldDue && !held {
			// Nothing would push it again: stranded.
			m.fail("I1: key %q waits on the ready index at HeldDue, and no hold holds it", k)
		}
		if !m.ordered {
			continue
		}
		if out[k] > 1 {
			m.fail("O1: %d batches of key %q are out at once", out[k], k)
		}
		if held != (out[k] == 1) {
			m.fail("O5: key %q is held: %v, with %d batches out", k, held, out[k])
		}
	}
}

func (m *model) checkDead(dead []*mItem) {
	letters := map[string]deadletter.Letter{}
	for _, d := range m.deadLetters() {
		letters[d.ID] = d
	}
	if len(letters) != len(dead) {
		m.fail("DeadLetters listed %d, want %d", len(letters), len(dead))
	}
	for _, it := range dead {
		d, ok := letters[it.deadID]
		if !ok || d.Queue != queue || d.Shard != 0 || d.Key != it.key || string(d.Item) != it.data ||
			d.Attempts != it.attempts || d.Error != it.lastErr || d.FailedAt.UnixMilli() != it.deadAt || d.Corrupt {
			m.fail("dead letter of item %d: %+v (listed: %v), want key %q item %s attempts %d error %q at %d",
				it.n, d, ok, it.key, it.data, it.attempts, it.lastErr, it.deadAt)
		}
	}
}

// drain forgets the batches still held (their workers stop), moves the clock
// past every lease and retry, and reaps, fetches and settles Done until
// nothing is left.
func (m *model) drain() {
	m.logf("drain: forget %d held batches", len(m.held))
	m.held = nil
	m.clock.Advance(time.Hour)
	for round := 0; ; round++ {
		if round > 200 {
			m.fail("drain did not end")
		}
		m.reap()
		m.check()
		got := m.fetch(3)
		m.check()
		if len(got) == 0 {
			break
		}
		for _, mb := range got {
			m.settle(mb, slices.Repeat([]protocol.Outcome{{Kind: protocol.Done}}, len(mb.items)))
			m.check()
		}
	}
}

// final checks every item's fate, and that nothing but dead letters is left.
func (m *model) final() {
	m.checkDead(m.deadItems())
	for _, it := range m.items {
		switch it.state {
		case sDone:
			if it.commits != 1 || it.handled < 1 {
				m.fail("item %d done with %d commits, handled %d times", it.n, it.commits, it.handled)
			}
		case sDead, sPurged:
			if it.commits != 0 {
				m.fail("item %d dead after a Done settlement took", it.n)
			}
		default:
			m.fail("I1: item %d left %v after the drain", it.n, it.state)
		}
		if it.handled > 1 && !it.crashed && !it.lost {
			m.fail("I2/I5: item %d handled %d times without a crash or a lost lease", it.n, it.handled)
		}
	}
	allowed := map[string]bool{m.sp.Wake(): true, keys.Registry(m.b.Prefix): true}
	if len(m.deadItems()) > 0 {
		allowed[m.sp.Dead()], allowed[m.sp.DeadData()] = true, true
	}
	for _, k := range testredis.Keys(m.t, m.b, m.b.Prefix+":*") {
		if !allowed[k] {
			m.fail("key %s left after the drain", k)
		}
	}
}
