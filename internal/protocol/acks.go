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
// go on the script's connection: both go in one DoMulti on a dedicated
// connection (WAIT blocks: a pooled one rather than the shared pipeline),
// to the node of the script's first key on Redis Cluster (SetSlot routes
// WAIT, which has no key). Not in the client's own DoMulti: on Redis
// Cluster that follows a MOVED or ASK reply (the slot moved since the
// client read the slots) by sending the script alone to the new node, and
// the WAIT left on the old node counts replicas that have every write of
// its connection: the append would be reported acknowledged with no
// replica of the new node having it. On a dedicated connection the
// redirection comes back as the script's reply: nothing was stored, and
// the client reads the slots again.
func execAcked(ctx context.Context, c rueidis.Client, s script, keys, args []string, acks Acks) (res rueidis.RedisResult, ack error) {
	if acks.Replicas <= 0 {
		return s.Exec(ctx, c, keys, args), nil
	}
	// rueidis recycles a command once sent: build each pipeline afresh.
	wait := func() rueidis.Completed {
		ms := (acks.Timeout + time.Millisecond - 1) / time.Millisecond
		return c.B().Wait().Numreplicas(int64(acks.Replicas)).Timeout(int64(ms)).Build().SetSlot(keys[0])
	}
	var rs []rueidis.RedisResult
	c.Dedicated(func(d rueidis.DedicatedClient) error {
		rs = d.DoMulti(ctx, evalsha(c, s, keys, args), wait())
		if noScript(rs[0]) {
			// A restarted or promoted server: EVAL loads the script, and
			// the WAIT behind it still follows the write.
			rs = d.DoMulti(ctx, eval(c, s, keys, args), wait())
		}
		return nil
	})
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
