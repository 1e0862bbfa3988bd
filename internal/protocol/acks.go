package protocol

import (
	"context"
	"time"

	"github.com/redis/rueidis"
)

// Acks asks that a write be acknowledged by replicas of the master that
// applied it: WAIT, sent on the write's connection right behind it. The zero
// Acks asks for none.
type Acks struct {
	Replicas int
	Timeout  time.Duration // how long WAIT waits for them; rounded up to ms
}

// execAcked runs s as s.Exec does and, when acks asks for replicas, sends
// WAIT behind it in the same round trip. It returns the script's reply and,
// when that reply is not an error, ack: nil once enough replicas
// acknowledged, else an *AckError.
//
// WAIT counts the replicas that have what its connection wrote, so it must
// go on the script's connection: both go in one DoMulti, which rueidis
// sends whole on one connection of its blocking pool (WAIT blocks), taken
// with ctx. On Redis Cluster the pair goes on a dedicated connection to
// the node of the script's first key (SetSlot routes WAIT, which has no
// key): the client's own DoMulti follows a MOVED or ASK reply by sending
// the script alone to the new node, and the WAIT left on the old node
// would count replicas that have every write of its connection, an
// acknowledgement for an append no replica of the new node has. Here a
// redirection comes back as the script's reply, nothing having run, and
// the pair goes again, once, to the node it names, if the client knows it
// (after ASKING, for an ASK: during a slot's migration, where the new node
// mostly answers TRYAGAIN, as it does not hold every key the script names:
// see untilNotTryAgain).
func execAcked(ctx context.Context, c rueidis.Client, s script, keys, args []string, acks Acks) (res rueidis.RedisResult, ack error) {
	if acks.Replicas <= 0 {
		return s.Exec(ctx, c, keys, args), nil
	}
	var rs []rueidis.RedisResult
	if c.Mode() != rueidis.ClientModeCluster {
		rs = sendAcked(ctx, c, c.DoMulti, s, keys, args, acks, false)
	} else {
		rs = dedicatedAcked(ctx, c, s, keys, args, acks, false)
		if re, ok := rueidis.IsRedisErr(rs[0].Error()); ok {
			addr, moved := re.IsMoved()
			addr2, ask := re.IsAsk()
			if ask {
				addr = addr2
			}
			if moved || ask {
				// A node's own client sends the pair on one connection
				// of its blocking pool, taken with ctx.
				if node := c.Nodes()[addr]; node != nil {
					rs = sendAcked(ctx, node, node.DoMulti, s, keys, args, acks, ask)
				}
			}
		}
	}
	if rs[0].Error() != nil {
		return rs[0], nil
	}
	got, err := rs[1].AsInt64()
	switch {
	case err != nil:
		return rs[0], &AckError{Want: acks.Replicas, Got: -1, Timeout: acks.Timeout, Err: err}
	case got < int64(acks.Replicas):
		return rs[0], &AckError{Want: acks.Replicas, Got: int(got), Timeout: acks.Timeout}
	}
	return rs[0], nil
}

// dedicatedAcked sends the script and its WAIT on a dedicated connection
// of c (see sendAcked).
func dedicatedAcked(ctx context.Context, c rueidis.Client, s script, keys, args []string, acks Acks, asking bool) (rs []rueidis.RedisResult) {
	c.Dedicated(func(d rueidis.DedicatedClient) error {
		rs = sendAcked(ctx, c, d.DoMulti, s, keys, args, acks, asking)
		return nil
	})
	return rs
}

// sendAcked sends, through doMulti, the script (EVALSHA, then EVAL after a
// NOSCRIPT reply) and WAIT behind it, after ASKING when asking, and
// returns the replies of the script and of WAIT.
func sendAcked(ctx context.Context, c rueidis.Client, doMulti func(context.Context, ...rueidis.Completed) []rueidis.RedisResult,
	s script, keys, args []string, acks Acks, asking bool) []rueidis.RedisResult {
	// rueidis recycles a command once sent: build each pipeline afresh.
	send := func(call rueidis.Completed) []rueidis.RedisResult {
		ms := (acks.Timeout + time.Millisecond - 1) / time.Millisecond
		wait := c.B().Wait().Numreplicas(int64(acks.Replicas)).Timeout(int64(ms)).Build().SetSlot(keys[0])
		if asking {
			return doMulti(ctx, c.B().Asking().Build().SetSlot(keys[0]), call, wait)[1:]
		}
		return doMulti(ctx, call, wait)
	}
	rs := send(evalsha(c, s, keys, args))
	if noScript(rs[0]) {
		// A restarted or promoted server: EVAL loads the script, and the
		// WAIT behind it still follows the write.
		rs = send(eval(c, s, keys, args))
	}
	return rs
}

// untilNotTryAgain returns what try returns, trying again while Redis
// answers TRYAGAIN: a Redis Cluster slot is being migrated, and its new
// master does not hold every key the call names yet; nothing ran. It tries
// again after 10 ms, then twice as long each time up to 200 ms, while ctx
// lasts, and starts no try tryAgainFor after the first (one with replica
// acks may then take as long as its WAITs); then it returns the TRYAGAIN
// reply. try gets the time since the first try (ms), by which to advance
// the clock reading it sends.
func untilNotTryAgain(ctx context.Context, try func(since int64) (rueidis.RedisResult, error)) (res rueidis.RedisResult, ack error) {
	res, ack = try(0)
	if !tryAgain(res.Error()) {
		return res, ack
	}
	start := time.Now()
	for wait := 10 * time.Millisecond; time.Since(start)+wait <= tryAgainFor && sleep(ctx, wait); wait = min(2*wait, 200*time.Millisecond) {
		if res, ack = try(time.Since(start).Milliseconds()); !tryAgain(res.Error()) {
			break
		}
	}
	return res, ack
}

// tryAgainFor bounds how long untilNotTryAgain starts tries.
const tryAgainFor = 5 * time.Second

// tryAgain reports whether err is a TRYAGAIN reply.
func tryAgain(err error) bool {
	re, ok := rueidis.IsRedisErr(err)
	return ok && re.IsTryAgain()
}

// sleep waits for d, and reports false if ctx ended first.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
