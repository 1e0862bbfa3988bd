package protocol_test

// The fuzz driver of the model test: the input's format (a configuration
// byte and opcodes), readable seeds, FuzzModel and the replay of its seeds
// and corpus on a real redis-server, and runModel, which decodes an input
// into the operations of the reference model (model_test.go) and checks the
// model against Redis after each.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// Set BATCHQ_MODEL_LOG=1 to log the operations of every input that passes
// (a failure always shows them).

// An input is a configuration byte, then a sequence of operations: an opcode
// byte (taken modulo 16) and its argument bytes; missing bytes read as 0.

// Configuration bits.
const (
	cfgDeadCap = 1 // a dead letter cap of modelDeadCap: the oldest are dropped
	cfgKeyCap  = 2 // a cap of modelKeyCap items per key on appends
	cfgOrdered = 4 // the queue is ordered (Consumer.Order): one batch of a key out at a time
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
	ord, ordFull := modelSeed{cfgOrdered}, modelSeed{cfgOrdered | cfgKeyCap}
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

		// Ordered (cfgOrdered). A failed item in the middle of a batch
		// becomes one retry holding the unfinished items after it; the
		// key stays held: a drain of it gets nothing, and takes it off the
		// ready index, so that the next append does not make it due. The
		// retry comes with its rest; its settlement ends the hold, making
		// the key due. A crashed batch is reaped in front of the key, and
		// its hold ends.
		ord.add(0, 4).fetch(1).settle(0, oDone, retryAfter(1), oUnfinished, oUnfinished).add(0, 2).fetch(3).
			add(0, 1).advance(500*time.Millisecond).fetch(3).settle(0, d(3)...).fetch(1).crash(0, 1).
			advance(time.Second).reap().add(0, 1).fetch(1).settle(0, d(4)...),
		// Ordered: retries of two keys in one batch. A failure after the
		// head goes into its rest uncounted; the key whose items are all
		// done is released and drained, the other stays held until its
		// head is dead.
		ord.add(0, 2).add(1, 2).fetch(2).settle(0, retryAfter(0), oUnfinished).settle(0, oDone, retryAfter(1)).
			add(0, 1).add(1, 1).advance(500*time.Millisecond).fetch(3).settle(0, retryAfter(2), retryAfter(0), oDone).
			fetch(3).settle(0, oDone).advance(time.Second).fetch(3).settle(0, oDead, oDone).fetch(1).settle(0, oDone),
		// Ordered: a crashed batch of retries goes back with its rest, and
		// the key stays held; in a batch of retries, the first unfinished
		// item becomes the head, its attempts unchanged.
		ord.add(2, 3).fetch(1).settle(0, oDone, retryAfter(0), oUnfinished).add(2, 1).fetch(1).crash(0, 1).
			fetch(3).advance(time.Second).reap().fetch(3).settleHalf(0, oDone, oDone).fetch(1).settle(0, oDone).
			fetch(1).settle(0, oDone),
		// Ordered: a lease reaped under a live worker ends the hold; the
		// redelivery sets a new one, and the late settlement changes
		// nothing.
		ord.add(0, 2).fetch(1).advance(1001*time.Millisecond).reap().add(0, 1).fetch(1).
			settle(0, retryAfter(0), oDone).settle(0, oDone, retryAfter(0), oUnfinished).fetch(1).settle(0, oDone, oDone),
		// Ordered: unfinished items go back in front, a failure after one
		// with them, and the hold ends; a dead letter requeued to a held
		// key waits behind the retry's rest.
		ord.add(1, 4).fetch(1).settle(0, oUnfinished, retryAfter(0), oDead, oDone).fetch(1).
			settle(0, retryAfter(1), oUnfinished).requeue(0, 0).fetch(1).advance(500*time.Millisecond).fetch(3).
			settle(0, oDone, oDone).fetch(1).settle(0, oDone),
		// Ordered, with a cap of 4 items per key: an append refused for
		// the cap makes a held key due again; the drain skips it again.
		ordFull.add(0, 3).fetch(1).settle(0, retryAfter(3), oUnfinished, oUnfinished).add(0, 3).fetch(1).add(0, 2).
			fetch(1).advance(10*time.Second).fetch(3).settle(0, d(3)...).fetch(1).settle(0, d(3)...),
		// Ordered: the busy mix, with a retry holding its key.
		ord.add(0, 2).add(1, 2).add(2, 2).fetch(3).crash(1, 1).settle(0, retryAfter(1), oUnfinished).
			advance(500*time.Millisecond).extend(0).fetch(2).advance(999*time.Millisecond).reap().
			settle(0, oDead, oDone).add(1, 3).fetch(3).advance(2500*time.Millisecond).reap().
			settle(1, oDone).requeue(0, 1).fetch(3).settle(0, oDone).
			settle(2, oDead, oDone, retryAfter(2), oUnfinished, oDone),
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
	ordered := cfg&cfgOrdered != 0
	if ordered {
		c.Order(queue)
	}
	clock := &fakeClock{now: start}
	protocol.SetClock(c, clock.Now)
	m := &model{
		t: t, ctx: context.Background(), b: b, sp: keys.For(b.Prefix, queue, 0), p: p, c: c,
		clock: clock, startMs: start.UnixMilli(), deadCap: deadCap, keyCap: keyCap,
		byData: map[string]*mItem{}, pending: map[string][]*mItem{}, ready: map[string]readyAt{},
		leases: map[string]*mBatch{}, ordered: ordered, holds: map[string]string{},
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
