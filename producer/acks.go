package producer

import (
	"errors"
	"fmt"
	"time"

	"github.com/batchq/batchq/internal/protocol"
)

// MaxReplicaAckTimeout is the longest wait WithReplicaAcks takes.
const MaxReplicaAckTimeout = time.Minute

// WithReplicaAcks makes every append wait, after the master stored it,
// until at least n replicas of that master have it too, for at most
// timeout (twice that for the first append to a restarted or promoted
// master: the WAIT behind its NOSCRIPT'd EVALSHA waits too, then the one
// behind the EVAL): an Add that returns nil then means the items survive the loss
// of the master, as long as one of those replicas is the one promoted. It
// is WAIT, sent on the append's connection behind the merge script, in the
// same round trip; on Redis Cluster it goes to the key's master. With
// WithLinger, one WAIT covers a whole gathering.
//
// When fewer replicas acknowledge in time, Add returns an error that
// matches ErrReplicaAcks (a *ReplicaAckError): the master stored the items,
// and they may or may not survive a failover; as with the other "unknown"
// outcomes, adding them again may store them twice.
//
// n == 0 turns it off (the default); otherwise timeout must be 1 ms to
// MaxReplicaAckTimeout. An append blocks a connection of the client's
// blocking pool (rueidis' BlockingPoolSize) while it waits. A server
// without replicas fails every append with ErrReplicaAcks once the timeout
// has passed; miniredis (package embedded) at once.
func WithReplicaAcks(n int, timeout time.Duration) Option {
	return func(p *Producer) error {
		switch {
		case n < 0:
			return fmt.Errorf("producer: replica acks must be 0 or more, got %d", n)
		case n > 0 && (timeout < time.Millisecond || timeout > MaxReplicaAckTimeout):
			return fmt.Errorf("producer: replica ack timeout must be 1ms-%v, got %v", MaxReplicaAckTimeout, timeout)
		}
		p.acks = protocol.Acks{Replicas: n, Timeout: timeout}
		return nil
	}
}

// ErrReplicaAcks matches the *ReplicaAckError of an append that fewer
// replicas acknowledged than WithReplicaAcks asks for.
var ErrReplicaAcks = errors.New("too few replicas acknowledged the append")

// ReplicaAckError reports an append that the master stored but fewer
// replicas than asked acknowledged in time (see WithReplicaAcks). Whether
// its items survive a failover is unknown.
type ReplicaAckError struct {
	Queue, Key string
	Adding     int           // items of the append
	Want       int           // replicas asked for
	Got        int           // replicas that acknowledged it; -1 when WAIT itself failed (see Err)
	Timeout    time.Duration // how long WAIT could wait (WithReplicaAcks)
	Err        error         // WAIT's own error, if it failed
}

func (e *ReplicaAckError) Error() string {
	got := fmt.Sprintf("%d of %d replicas acknowledged them within %v", e.Got, e.Want, e.Timeout)
	if e.Err != nil {
		got = fmt.Sprintf("waiting for %d replicas to acknowledge them failed (%v)", e.Want, e.Err)
	}
	items := "1 item"
	if e.Adding != 1 {
		items = fmt.Sprintf("%d items", e.Adding)
	}
	return fmt.Sprintf("producer: append to %s: %v: the master stored the %s, but %s; they may or may not survive a failover, and adding them again may store them twice",
		target(e.Queue, e.Key), ErrReplicaAcks, items, got)
}

// Is reports whether target is ErrReplicaAcks.
func (e *ReplicaAckError) Is(target error) bool { return target == ErrReplicaAcks }

// Unwrap returns WAIT's own error, if it failed.
func (e *ReplicaAckError) Unwrap() error { return e.Err }
