package producer_test

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/rtcount"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

func TestReplicaAcksOptionChecks(t *testing.T) {
	c := testredis.Mini(t).Client
	for _, tc := range []struct {
		n       int
		timeout time.Duration
		ok      bool
	}{
		{0, 0, true}, // off
		{1, time.Millisecond, true},
		{2, producer.MaxReplicaAckTimeout, true},
		{-1, time.Second, false},
		{1, 0, false},
		{1, time.Microsecond, false},
		{1, producer.MaxReplicaAckTimeout + time.Millisecond, false},
	} {
		_, err := producer.New(c, producer.WithReplicaAcks(tc.n, tc.timeout))
		if (err == nil) != tc.ok {
			t.Errorf("WithReplicaAcks(%d, %v): err %v, want ok %v", tc.n, tc.timeout, err, tc.ok)
		}
	}
}

// replicated is a master with one replica, and clients of both.
type replicated struct {
	master, replica *testredis.Server
	b               testredis.Backend // on the master
	rc              rueidis.Client    // of the replica
}

func startReplicated(t *testing.T) replicated {
	t.Helper()
	m := testredis.Start(t)
	r := testredis.StartReplica(t, m)
	return replicated{master: m, replica: r, b: m.Backend(t), rc: testredis.Client(t, r.Addr)}
}

// onReplica returns what the replica holds at a key of queue "q" (one
// shard), "" for nothing.
func (s replicated) onReplica(t *testing.T, key string) string {
	t.Helper()
	v, err := s.rc.Do(context.Background(), s.rc.B().Get().Key(keys.For(s.b.Prefix, "q", 0).Items(key)).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// pause stops the replica (SIGSTOP) until the test resumes it or ends: it
// keeps its link to the master but acknowledges nothing.
func (s replicated) pause(t *testing.T) {
	t.Helper()
	s.replica.Pause(t)
	resumed := false
	t.Cleanup(func() {
		if !resumed {
			s.replica.Resume(t)
		}
	})
}

// An append with replica acks returns nil only once the replica has it:
// WAIT rides behind the merge in the same round trip, on its connection.
// With the replica stopped, the append fails with ErrReplicaAcks and says
// how many acknowledged, while the master keeps the items; that outcome
// is what proves the WAIT counts the merge's own write, for a WAIT sent on
// any other connection would count a write the replica already had.
func TestReplicaAcks(t *testing.T) {
	s := startReplicated(t)
	ctx := context.Background()
	var trips [][][]string
	var mu sync.Mutex
	c := rtcount.Wrap(s.b.Client, func(cmds [][]string, _ []rueidis.RedisResult) {
		mu.Lock()
		trips = append(trips, cmds)
		mu.Unlock()
	})
	p, err := producer.New(c, producer.WithPrefix(s.b.Prefix), producer.WithReplicaAcks(1, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Add(ctx, "q", "warm", 0); err != nil { // records the queue and reads the clock
		t.Fatal(err)
	}
	for i := range 100 {
		before := c.Trips()
		if err := p.Add(ctx, "q", "k", i); err != nil {
			t.Fatal(err)
		}
		if n := c.Trips() - before; n != 1 {
			t.Fatalf("an append with replica acks took %d round trips, want 1", n)
		}
		if got, want := s.onReplica(t, "k"), strconv.Itoa(i)+"]"; !strings.HasSuffix(got, want) {
			t.Fatalf("append %d returned nil, but the replica holds %q", i, got)
		}
	}
	mu.Lock()
	last := trips[len(trips)-1]
	mu.Unlock()
	if len(last) != 2 || last[0][0] != "EVALSHA" || strings.Join(last[1], " ") != "WAIT 1 10000" {
		t.Fatalf("an append sent %q, want EVALSHA then WAIT 1 10000", last)
	}

	s.pause(t)
	p2, err := producer.New(s.b.Client, producer.WithPrefix(s.b.Prefix), producer.WithReplicaAcks(1, 100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	err = p2.Add(ctx, "q", "k", "unacked", "too")
	var ae *producer.ReplicaAckError
	if !errors.As(err, &ae) || !errors.Is(err, producer.ErrReplicaAcks) {
		t.Fatalf("append with the replica stopped: %v, want a *ReplicaAckError", err)
	}
	if ae.Want != 1 || ae.Got != 0 || ae.Adding != 2 || ae.Timeout != 100*time.Millisecond || ae.Queue != "q" || ae.Key != "k" {
		t.Fatalf("ReplicaAckError %+v", *ae)
	}
	for _, want := range []string{"0 of 1 replicas", "master stored the 2 items", "may or may not survive a failover"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if v, _ := get(t, s.b, "q", "k"); !strings.HasSuffix(v, `99,"unacked","too"]`) {
		t.Fatalf("the master holds %q, want the unacknowledged items stored", v)
	}
}

// A restarted master has lost its scripts: the append goes again as EVAL,
// with its WAIT behind it, still one connection.
func TestReplicaAcksAfterScriptFlush(t *testing.T) {
	s := startReplicated(t)
	ctx := context.Background()
	// A timeout far longer than a replica takes, on a busy machine too;
	// short where it must pass.
	p := newProducer(t, s.b, producer.WithReplicaAcks(1, 10*time.Second))
	short := newProducer(t, s.b, producer.WithReplicaAcks(1, 100*time.Millisecond))
	if err := p.Add(ctx, "q", "k", 1); err != nil {
		t.Fatal(err)
	}
	flush := func() {
		if err := s.b.Client.Do(ctx, s.b.Client.B().ScriptFlush().Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	flush()
	if err := p.Add(ctx, "q", "k", 2); err != nil {
		t.Fatal(err)
	}
	if got := s.onReplica(t, "k"); got != "[1,2]" {
		t.Fatalf("the replica holds %q, want [1,2]", got)
	}
	flush()
	s.pause(t)
	if err := short.Add(ctx, "q", "k", 3); !errors.Is(err, producer.ErrReplicaAcks) {
		t.Fatalf("append after SCRIPT FLUSH with the replica stopped: %v, want ErrReplicaAcks", err)
	}
}

// With WithLinger, one WAIT covers each gathering: its callers all learn
// its outcome.
func TestReplicaAcksWithLinger(t *testing.T) {
	s := startReplicated(t)
	ctx := context.Background()
	// A linger far longer than the test: only maxItems sends a call.
	p := newProducer(t, s.b, producer.WithLinger(time.Second, 8), producer.WithReplicaAcks(1, 10*time.Second))
	short := newProducer(t, s.b, producer.WithLinger(time.Second, 8), producer.WithReplicaAcks(1, 100*time.Millisecond))
	// Warm up: the registry, the clock, and the scripts (a call's first
	// EVALSHA meets NOSCRIPT, and its WAIT is sent again behind the EVAL).
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			if err := p.Add(ctx, "q", "warm"+strconv.Itoa(i%2), i); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	add := func(p *producer.Producer, base int) []error {
		var wg sync.WaitGroup
		errs := make([]error, 32)
		for c := range errs {
			wg.Go(func() { errs[c] = p.Add(ctx, "q", "k"+strconv.Itoa(c%4), base+c) })
		}
		wg.Wait()
		return errs
	}
	calls0, waits0 := commandCalls(t, s.b, "evalsha"), commandCalls(t, s.b, "wait")
	for _, err := range add(p, 0) {
		if err != nil {
			t.Fatal(err)
		}
	}
	calls, waits := commandCalls(t, s.b, "evalsha")-calls0, commandCalls(t, s.b, "wait")-waits0
	if calls != 4 || waits != 4 {
		t.Fatalf("32 appends with maxItems 8 took %d merge calls and %d WAITs, want 4 and 4", calls, waits)
	}
	for k := range 4 {
		if v := s.onReplica(t, "k"+strconv.Itoa(k)); strings.Count(v, ",") != 7 {
			t.Fatalf("the replica holds %q at k%d, want 8 items", v, k)
		}
	}

	s.pause(t)
	for c, err := range add(short, 100) {
		var ae *producer.ReplicaAckError
		if !errors.As(err, &ae) || ae.Key != "k"+strconv.Itoa(c%4) || ae.Adding != 1 {
			t.Fatalf("caller %d with the replica stopped: %v, want its own *ReplicaAckError", c, err)
		}
	}
}

// commandCalls returns how many times redis-server ran a command (INFO
// commandstats).
func commandCalls(t *testing.T, b testredis.Backend, cmd string) int {
	t.Helper()
	info, err := b.Client.Do(context.Background(), b.Client.B().Info().Section("commandstats").Build()).ToString()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(info, "\r\n") {
		if rest, ok := strings.CutPrefix(line, "cmdstat_"+cmd+":calls="); ok {
			n, _ := strconv.Atoi(rest[:strings.IndexByte(rest, ',')])
			return n
		}
	}
	return 0
}

// A server without replicas, miniredis here, acknowledges nothing: every
// append fails with ErrReplicaAcks, and is stored.
func TestReplicaAcksWithoutReplicas(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b, producer.WithReplicaAcks(1, 20*time.Millisecond))
		err := p.Add(ctx, "q", "k", 1)
		var ae *producer.ReplicaAckError
		if !errors.As(err, &ae) || ae.Got != 0 {
			t.Fatalf("append without replicas: %v, want a *ReplicaAckError with Got 0", err)
		}
		if v, _ := get(t, b, "q", "k"); v != "[1]" {
			t.Fatalf("the key holds %q, want [1]", v)
		}
	})
}
