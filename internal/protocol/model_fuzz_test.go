package protocol_test

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
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
// Set BATCHQ_MODEL_LOG=1 to log the operations of every input that passes
// (a failure always shows them).

// An input is a configuration byte, then a sequence of operations: an opcode
// byte (taken modulo 16) and its argument bytes; missing bytes read as 0.

// Configuration bits.
const (
	cfgDeadCap = 1 // a dead letter cap of modelDeadCap: the oldest are dropped
	cfgKeyCap  = 2 // a cap of modelKeyCap items per key on appends
)

// The operations.
const (
	opAppend  = 0  // 0-3 + arg: append 1+(arg/3)%4 items to key arg%3
	opFetch   = 4  // 4-6 + arg: Fetch with max 1+arg%3
	opSettle  = 7  // 7-9 + idx + one outcome byte per item of the batch held at (idx&0x1f)%len(held); idx&0x20: outcomes for the first half only; idx&0x40: send the settlement twice
	opCrash   = 10 // + idx + h: the worker of held[idx] dies after handling its first h%(n+1) items
	opAdvance = 11 // + arg: advance the clock by modelAdvances[arg%8]
	opReap    = 12 // Reap
	opExtend  = 13 // + mask: Extend held batches (bit i: held[i], i < 7; mask&0x7f == 0: all), and with mask&0x80 the last batches settled
	opRequeue = 14 // + mask + dup: RequeueDead of dead items (bit i: the i-th oldest item; 0: all), dup&1: pass the first twice
	opPurge   = 15 // PurgeDead
)

// Outcome bytes: x%8 in 0-3 Done, 4-5 Retry after modelDelays[(x>>3)%4], 6
// Dead, 7 Unfinished.
const (
	oDone       = 0
	oRetry      = 4 // | delay index << 3
	oDead       = 6
	oUnfinished = 7
)

const (
	modelTTL      = time.Second
	modelMaxOps   = 80
	modelMaxItems = 90 // fewer than the 100 retries a Fetch claims and the 100 leases a Reap returns
	modelDeadCap  = 3
	modelKeyCap   = 4 // no less than an append's items: an empty key is never full
)

var (
	modelKeys     = []string{"a", "b:user:42", "c{é}"} // in byte order: ties on the ready index go by name
	modelAdvances = []time.Duration{time.Millisecond, 100 * time.Millisecond, 500 * time.Millisecond,
		999 * time.Millisecond, time.Second, 1001 * time.Millisecond, 2500 * time.Millisecond, 10 * time.Second}
	modelDelays = []time.Duration{0, 300 * time.Millisecond, time.Second, 3 * time.Second}
)

// modelSeed builds an input from readable operations, after a configuration
// byte.
type modelSeed []byte

func (s modelSeed) add(key, n int) modelSeed { return append(s, opAppend, byte(key+3*(n-1))) }
func (s modelSeed) fetch(max int) modelSeed  { return append(s, opFetch, byte(max-1)) }
func (s modelSeed) settle(idx int, outs ...byte) modelSeed {
	return append(append(s, opSettle, byte(idx)), outs...)
}
func (s modelSeed) settleHalf(idx int, outs ...byte) modelSeed {
	return append(append(s, opSettle, byte(idx)|0x20), outs...)
}
func (s modelSeed) settleTwice(idx int, outs ...byte) modelSeed {
	return append(append(s, opSettle, byte(idx)|0x40), outs...)
}
func (s modelSeed) crash(idx, handled int) modelSeed {
	return append(s, opCrash, byte(idx), byte(handled))
}
func (s modelSeed) advance(d time.Duration) modelSeed {
	i := slices.Index(modelAdvances, d)
	if i < 0 {
		panic(fmt.Sprintf("no advance of %v", d))
	}
	return append(s, opAdvance, byte(i))
}
func (s modelSeed) reap() modelSeed                  { return append(s, opReap) }
func (s modelSeed) extend(mask byte) modelSeed       { return append(s, opExtend, mask) }
func (s modelSeed) requeue(mask, dup byte) modelSeed { return append(s, opRequeue, mask, dup) }
func (s modelSeed) purge() modelSeed                 { return append(s, opPurge) }

func retryAfter(delay int) byte { return byte(oRetry | delay<<3) }

func modelSeeds() [][]byte {
	s, capped, full := modelSeed{0}, modelSeed{cfgDeadCap}, modelSeed{cfgKeyCap}
	d := func(n int) []byte { // n outcomes Done
		return slices.Repeat([]byte{oDone}, n)
	}
	return [][]byte{
		// Appends, one drain, all done.
		s.add(0, 3).add(0, 2).fetch(1).settle(0, d(5)...),
		// Every outcome in one batch; the unfinished item goes back in
		// front of the items appended meanwhile; a retry due at once
		// shares a Fetch of 3 with the key.
		s.add(0, 4).fetch(1).add(0, 2).settle(0, oDone, retryAfter(0), oDead, oUnfinished).
			fetch(3).settle(0, d(3)...).settle(0, oDone),
		// A crashed worker's batch comes back at the lease deadline, not
		// a millisecond before, in front of the items appended since.
		s.add(1, 3).fetch(1).crash(0, 1).add(1, 2).advance(999*time.Millisecond).reap().
			advance(time.Millisecond).reap().fetch(1).settle(0, d(5)...),
		// A lease reaped under a live worker: its settlement is refused
		// and the items are delivered again.
		s.add(0, 2).fetch(1).advance(1001*time.Millisecond).reap().settle(0, oDone, oDead).
			fetch(1).settle(0, oDone, oDone),
		// A lease past its deadline but not reaped yet still settles.
		s.add(2, 2).fetch(1).advance(2500*time.Millisecond).settle(0, oDone, oUnfinished).
			reap().fetch(1).settle(0, oDone),
		// A settlement sent twice is applied once; Extend does not bring
		// back the lease of a settled batch.
		s.add(0, 3).fetch(1).settleTwice(0, oUnfinished, retryAfter(0), oDead).extend(0x80).
			fetch(3).settleTwice(0, oDone).settleTwice(0, oUnfinished).extend(0x80).fetch(1).settle(0, oDone),
		// Extend keeps a lease past its first deadline; the unextended
		// one is reaped.
		s.add(0, 1).add(1, 1).fetch(2).advance(500*time.Millisecond).extend(1).
			advance(999*time.Millisecond).reap().settle(0, oDone).settle(0, oDone).fetch(3),
		// Retries wait for their delay, count attempts, and end dead.
		s.add(0, 2).fetch(1).settle(0, retryAfter(3), retryAfter(2)).fetch(3).
			advance(time.Second).fetch(3).settle(0, retryAfter(1)).advance(2500*time.Millisecond).
			fetch(3).settle(0, oDead, retryAfter(0)).fetch(1).settle(0, oDead),
		// A crashed batch of retries goes back to the retry index with its
		// attempt counts.
		s.add(1, 3).fetch(1).settle(0, retryAfter(0), retryAfter(0), oDone).fetch(1).crash(0, 2).
			advance(10*time.Second).reap().fetch(2).settle(0, oDone, oDead),
		// With max 1, a due retry goes before a due key, whichever waited
		// longer: keys always due cannot starve retries.
		s.add(0, 1).fetch(1).settle(0, retryAfter(1)).add(1, 1).fetch(1).settle(0, oUnfinished).
			advance(500*time.Millisecond).fetch(1).settle(0, oUnfinished).fetch(1).settle(0, oDone).
			fetch(1).settle(0, oDone).fetch(1),
		// A retry and a key due at the same millisecond: the retry goes
		// first.
		s.add(0, 1).fetch(1).settle(0, retryAfter(0)).add(1, 1).fetch(1).settle(0, oUnfinished).
			fetch(1).settle(0, oDone).fetch(1).settle(0, oDone),
		// Dead letters are listed with their attempts, requeued (once,
		// even when passed twice) at the end of their key, and delivered
		// again as fresh items.
		s.add(0, 3).add(2, 2).fetch(2).settle(0, oDead, oDone, oDead).settle(0, oDead, oDead).
			add(0, 1).requeue(0x05, 1).fetch(3).settle(0, oDone, oDone).settle(0, oDone).
			requeue(0, 0).fetch(3).settle(0, oDone).settle(0, oDone),
		// Purge drops every dead letter.
		s.add(1, 4).fetch(1).settle(0, oDead, oDead, oDone, retryAfter(1)).advance(time.Second).
			fetch(1).settle(0, oDead).purge().add(1, 1).fetch(1).settle(0, oDone),
		// Two crashed batches of one key with the same deadline are reaped
		// in one call: the one with the earlier token goes first.
		s.add(0, 2).fetch(1).crash(0, 0).add(0, 2).fetch(1).crash(0, 1).add(0, 1).
			advance(time.Second).reap().fetch(1).settle(0, d(5)...),
		// Two crashed batches of one key reaped by separate calls: each
		// goes in front of what the key holds.
		s.add(2, 2).fetch(1).crash(0, 0).advance(500*time.Millisecond).add(2, 1).fetch(1).crash(0, 0).
			advance(500*time.Millisecond).reap().advance(500*time.Millisecond).reap().fetch(1).settle(0, d(3)...),
		// Missing outcomes count as unfinished, for a key and for retries.
		s.add(0, 4).fetch(1).settleHalf(0, oDone, retryAfter(0), oDone, oDone).fetch(3).
			settleHalf(0, retryAfter(0), oDone).settleHalf(0, oDone).fetch(3).settle(0, oDone).settle(0, oDone, oDone),
		// Three keys, a Fetch of 2 leaves one for later; Fetch of 3 with
		// retries due takes two keys and the retries.
		s.add(0, 1).add(1, 2).add(2, 3).fetch(2).settle(0, retryAfter(0)).settle(0, oDone, oDone).
			add(0, 1).add(1, 1).fetch(3).settle(0, oDone).settle(0, oDone).settle(0, oDone),
		// A busy mix: crashes, lost leases, extends, retries and requeues.
		s.add(0, 2).add(1, 2).add(2, 2).fetch(3).crash(1, 1).settle(0, oUnfinished, retryAfter(1)).
			advance(500*time.Millisecond).extend(0).fetch(2).advance(999*time.Millisecond).reap().
			settle(0, oDead, oDone).add(1, 3).fetch(3).advance(2500*time.Millisecond).reap().
			settle(1, oDone).requeue(0, 1).fetch(3).settle(0, oDone).
			settle(2, oDead, oDone, retryAfter(2), oUnfinished, oDone),
		// With a dead letter cap of 3, the oldest dead letters are
		// dropped (by time, then id: in item order within a batch).
		capped.add(0, 4).fetch(1).settle(0, oDead, oDead, oDead, oDead).add(1, 2).fetch(1).
			advance(time.Millisecond).settle(0, oDead, oDone).requeue(0, 0).fetch(3).
			settle(0, oDone, oDone).settle(0, oDead),
		// With a cap of 4 items per key, appends past it are refused;
		// items put back may pass it; requeued dead letters ignore it.
		full.add(0, 3).add(0, 2).add(0, 1).fetch(1).add(0, 4).settle(0, oUnfinished, oDead, oUnfinished, oDone).
			add(0, 1).add(0, 1).requeue(0, 0).add(0, 1).fetch(1).settle(0, d(7)...),
	}
}

// FuzzModel runs each input against one miniredis, shared by the inputs and
// flushed before each. Its clock is frozen, so that the keys a producer makes
// ready tie and the claim order, like the rest of the run, depends only on the
// input. TestModelSeedsOnRealRedis replays the seeds on a real redis-server.
func FuzzModel(f *testing.F) {
	for _, s := range modelSeeds() {
		f.Add(s)
	}
	b := testredis.Mini(f)
	serverNow := time.Now().Truncate(time.Millisecond)
	b.Mini.SetTime(serverNow)
	f.Fuzz(func(t *testing.T, in []byte) {
		b.Mini.FlushAll()
		runModel(t, b, serverNow.Add(time.Hour), in)
	})
}

// TestModelSeedsOnRealRedis replays the seeds of FuzzModel, and the inputs
// kept under testdata/fuzz/FuzzModel, on a real redis-server, so that the
// real scripts are checked too.
func TestModelSeedsOnRealRedis(t *testing.T) {
	seeds := modelSeeds()
	names := make([]string, len(seeds))
	for i := range seeds {
		names[i] = fmt.Sprintf("seed#%d", i)
	}
	files, err := filepath.Glob(filepath.Join("testdata", "fuzz", "FuzzModel", "*"))
	if err != nil {
		t.Fatal(err)
	}
	for _, file := range files {
		in, err := readCorpusFile(file)
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		seeds = append(seeds, in)
		names = append(names, filepath.Base(file))
	}
	srv := testredis.Real(t)
	for i, in := range seeds {
		t.Run(names[i], func(t *testing.T) {
			b := srv
			b.Prefix = fmt.Sprintf("%s_%d", srv.Prefix, i)
			runModel(t, b, time.Now().Add(time.Hour).Truncate(time.Millisecond), in)
			if ks := testredis.Keys(t, b, b.Prefix+":*"); len(ks) > 0 {
				if err := b.Client.Do(context.Background(), b.Client.B().Del().Key(ks...).Build()).Error(); err != nil {
					t.Fatalf("delete the keys of the run: %v", err)
				}
			}
		})
	}
}

// readCorpusFile reads a one-[]byte input written by the go fuzzing tool.
func readCorpusFile(file string) ([]byte, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	if len(lines) != 2 || lines[0] != "go test fuzz v1" {
		return nil, errors.New("not a go test fuzz v1 file of one value")
	}
	lit, ok1 := strings.CutPrefix(lines[1], "[]byte(")
	lit, ok2 := strings.CutSuffix(lit, ")")
	if !ok1 || !ok2 {
		return nil, fmt.Errorf("not a []byte value: %s", lines[1])
	}
	s, err := strconv.Unquote(lit)
	return []byte(s), err
}

// Where an item is.
type mState uint8

const (
	sPending mState = iota // in pending[key]
	sHeld                  // in a leased batch
	sRetry                 // on the retry index
	sDead
	sPurged // purged, or dropped past the dead letter cap
	sDone
)

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
}

type mBatch struct {
	b        *protocol.Batch
	token    string
	key      string // "" for retries
	items    []*mItem
	entryIDs []string // retries: the id each item was claimed under
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
	errs    int
	dirty   bool // the dead letters changed since they were last compared
	log     []string
}

func runModel(t *testing.T, b testredis.Backend, start time.Time, in []byte) {
	var cfg byte
	if len(in) > 0 {
		cfg, in = in[0], in[1:]
	}
	keyCap := 0 // none
	if cfg&cfgKeyCap != 0 {
		keyCap = modelKeyCap
	}
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithMaxKeyItems(keyCap))
	if err != nil {
		t.Fatal(err)
	}
	deadCap := 0 // none
	if cfg&cfgDeadCap != 0 {
		deadCap = modelDeadCap
	}
	c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix), protocol.WithLeaseTTL(modelTTL),
		protocol.WithName("model"), protocol.WithDeadLetterCap(deadCap))
	if err != nil {
		t.Fatal(err)
	}
	clock := &fakeClock{now: start}
	protocol.SetClock(c, clock.Now)
	m := &model{
		t: t, ctx: context.Background(), b: b, sp: keys.For(b.Prefix, queue, 0), p: p, c: c,
		clock: clock, startMs: start.UnixMilli(), deadCap: deadCap, keyCap: keyCap,
		byData: map[string]*mItem{}, pending: map[string][]*mItem{}, ready: map[string]readyAt{},
		leases: map[string]*mBatch{},
	}
	pos := 0
	next := func() byte {
		if pos >= len(in) {
			return 0
		}
		pos++
		return in[pos-1]
	}
	for ops := 0; ops < modelMaxOps && pos < len(in); ops++ {
		m.step(next)
		m.check()
	}
	m.drain()
	m.final()
	if os.Getenv("BATCHQ_MODEL_LOG") != "" {
		t.Logf("operations:\n  %s", strings.Join(m.log, "\n  "))
	}
}

func (m *model) logf(format string, args ...any) {
	m.log = append(m.log, fmt.Sprintf("t+%dms ", m.now()-m.startMs)+fmt.Sprintf(format, args...))
}

func (m *model) fail(format string, args ...any) {
	m.t.Helper()
	m.t.Fatalf("%s\noperations:\n  %s", fmt.Sprintf(format, args...), strings.Join(m.log, "\n  "))
}

func (m *model) now() int64 { return m.clock.Now().UnixMilli() }

func (m *model) step(next func() byte) {
	op := next() % 16
	switch {
	case op < opFetch:
		arg := next()
		m.add(modelKeys[arg%3], 1+int(arg/3)%4)
	case op < opSettle:
		m.fetch(1 + int(next()%3))
	case op < opCrash:
		idx := next()
		if len(m.held) == 0 {
			m.logf("settle: nothing held")
			return
		}
		mb := m.held[int(idx&0x1f)%len(m.held)]
		outs := make([]protocol.Outcome, len(mb.items))
		for i := range outs {
			outs[i] = m.outcome(next())
		}
		if idx&0x20 != 0 {
			outs = outs[:len(outs)/2]
		}
		m.settle(mb, outs)
		if idx&0x40 != 0 {
			// A worker that did not hear the reply settles again: the
			// lease is gone, so nothing is applied twice.
			m.logf("settle %s again", mb.token)
			if err := m.c.Settle(m.ctx, mb.b, outs); !errors.Is(err, protocol.ErrLeaseLost) {
				m.fail("second Settle of a batch: got %v, want ErrLeaseLost", err)
			}
		}
	case op == opCrash:
		idx, h := next(), next()
		if len(m.held) == 0 {
			m.logf("crash: nothing held")
			return
		}
		mb := m.held[int(idx)%len(m.held)]
		m.drop(mb)
		h %= byte(len(mb.items) + 1)
		for i, it := range mb.items {
			it.crashed = true
			if i < int(h) {
				it.handled++
			}
		}
		m.logf("crash %s (handled %d of %d items)", m.describe(mb), h, len(mb.items))
	case op == opAdvance:
		d := modelAdvances[next()%8]
		m.clock.Advance(d)
		m.logf("advance %v", d)
	case op == opReap:
		m.reap()
	case op == opExtend:
		m.extend(next())
	case op == opRequeue:
		mask, dup := next(), next()
		m.requeue(mask, dup&1 == 1)
	case op == opPurge:
		m.purge()
	}
}

func (m *model) outcome(x byte) protocol.Outcome {
	switch x % 8 {
	case 4, 5:
		m.errs++
		return protocol.Outcome{Kind: protocol.Retry, Delay: modelDelays[(x>>3)%4], Err: fmt.Errorf(`fail #%d "é"`, m.errs)}
	case 6:
		m.errs++
		return protocol.Outcome{Kind: protocol.Dead, Err: fmt.Errorf("dead #%d\n", m.errs)}
	case 7:
		return protocol.Outcome{Kind: protocol.Unfinished}
	}
	return protocol.Outcome{Kind: protocol.Done}
}

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
	// past its cap; a key with items is always due, so a refused append
	// changes nothing.
	full := m.keyCap > 0 && len(m.pending[key]) > 0 && len(m.pending[key])+n > m.keyCap
	m.logf("append to %s: %s (full: %v)", key, strings.Join(ns, " "), full)
	err := m.p.AddRaw(m.ctx, queue, key, raws...)
	if full {
		var fe *producer.KeyFullError
		if !errors.As(err, &fe) || fe.Items != int64(len(m.pending[key])) || fe.Adding != n {
			m.fail("AddRaw to a full key: got %v, want a KeyFullError of %d items adding %d", err, len(m.pending[key]), n)
		}
		return
	}
	if err != nil {
		m.fail("AddRaw: %v", err)
	}
	for _, raw := range raws {
		it := &mItem{n: len(m.items), key: key, data: string(raw)}
		m.items = append(m.items, it)
		m.byData[it.data] = it
		m.pending[key] = append(m.pending[key], it)
	}
	m.makeDue(key, 0)
}

func (m *model) fetch(max int) []*mBatch {
	now := m.now()
	var due, later []*mItem
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
	wantRetries := len(due) > 0
	nkeys := max
	if wantRetries {
		nkeys--
	}
	popped := m.wake[:min(nkeys, len(m.wake))]

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
				if it.state != sRetry || it.due > now {
					m.fail("Fetch(%d): item %d delivered as a retry, but the model has it in state %d due %d (now %d)", max, it.n, it.state, it.due, now)
				}
				if x.Attempt != it.attempts || x.LastError != it.lastErr {
					m.fail("Fetch(%d): retry %d has attempt %d error %q, want %d %q", max, it.n, x.Attempt, x.LastError, it.attempts, it.lastErr)
				}
				mb.entryIDs = append(mb.entryIDs, it.retryID)
			} else if x.Attempt != 0 || x.LastError != "" {
				m.fail("Fetch(%d): item %d of key %q has attempt %d error %q", max, it.n, b.Key, x.Attempt, x.LastError)
			}
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
	if !slices.Equal(gotKeys, popped) || (retries != nil) != wantRetries {
		m.fail("Fetch(%d): keys %q and retries=%v, want keys %q (the first of the wake list %q) and retries=%v (%d due)",
			max, gotKeys, retries != nil, popped, m.wake, wantRetries, len(due))
	}
	if retries != nil {
		if want := itemsString(due); itemsString(retries.items) != want {
			m.fail("Fetch(%d): retries %s, want %s in due order", max, itemsString(retries.items), want)
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
		}
		m.held = append(m.held, mb)
		m.leases[mb.token] = mb
		desc = append(desc, m.describe(mb))
	}
	m.logf("fetch(%d): %s", max, strings.Join(desc, "; "))
	return got
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
	var back []*mItem
	for i, it := range mb.items {
		var o protocol.Outcome
		if i < len(outs) {
			o = outs[i]
		}
		id := fmt.Sprintf("%s-%07d", mb.token, i)
		switch o.Kind {
		case protocol.Done:
			it.state = sDone
			it.commits++
			it.handled++
		case protocol.Retry:
			it.state, it.retryID, it.due = sRetry, id, now+o.Delay.Milliseconds()
			it.attempts++
			it.lastErr = o.Err.Error()
		case protocol.Dead:
			m.dirty = true
			it.state, it.deadID, it.deadAt = sDead, id, now
			it.attempts++
			it.lastErr = o.Err.Error()
		case protocol.Unfinished:
			if mb.key == "" {
				it.state, it.retryID, it.due = sRetry, id, now
			} else {
				it.state = sPending
				back = append(back, it)
			}
		}
	}
	if len(back) > 0 {
		m.pending[mb.key] = append(back, m.pending[mb.key]...)
		m.makeDue(mb.key, now)
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
			for i, it := range mb.items {
				it.state, it.retryID, it.due = sRetry, mb.entryIDs[i], now
			}
			continue
		}
		for _, it := range mb.items {
			it.state = sPending
		}
		m.pending[mb.key] = append(slices.Clone(mb.items), m.pending[mb.key]...)
		m.makeDue(mb.key, now)
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
		it.state, it.attempts, it.lastErr = sPending, 0, ""
		m.pending[it.key] = append(m.pending[it.key], it)
		m.makeDue(it.key, 0) // by the server's clock; a key due already keeps its time
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
		if err != nil || len(h) != len(mb.items) {
			m.fail("retry lease %s holds %v (%v), want %d retries", tok, h, err, len(mb.items))
		}
		for j, id := range mb.entryIDs {
			if !strings.Contains(h[id], mb.items[j].data) {
				m.fail("retry lease %s: %s holds %q, want item %s", tok, id, h[id], mb.items[j].data)
			}
		}
	}
	dead := m.deadItems()
	if ndead != int64(len(dead)) {
		m.fail("%d dead letters, want %d", ndead, len(dead))
	}
	if m.dirty {
		m.checkDead(dead)
		m.dirty = false
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
			m.fail("I1: item %d left in state %d after the drain", it.n, it.state)
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
