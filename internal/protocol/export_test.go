package protocol

import (
	"time"

	"github.com/redis/rueidis"
)

// SetClock replaces the clock c takes "now" from (due times, lease deadlines,
// reaping), so that tests can move time without sleeping.
func SetClock(c *Consumer, now func() time.Time) { c.clock.local = now }

// ClientOf returns the Redis client c uses.
func ClientOf(c *Consumer) rueidis.Client { return c.c }

// EvenTopology returns the topology of a cluster of masters that split the
// hash slots evenly, in order, as redis-cli --cluster create does.
func EvenTopology(masters int) *Topology {
	t := &Topology{masters: masters, owner: make([]int, 1<<14)}
	for s := range t.owner {
		t.owner[s] = s * masters / (1 << 14)
	}
	return t
}

// Earlier returns the shards where items of key appended before those in
// shard may be, for a queue whose counts were counts (the current last).
func Earlier(c *Consumer, queue string, counts []int, shard int, key string) []int {
	c.grown.Store(queue, counts)
	return c.earlier(queue, shard, key)
}

// SetPurgeHook makes PurgeDead call fn between its read of the quarantine
// set and its delete, until the test ends.
func SetPurgeHook(t interface{ Cleanup(func()) }, fn func()) {
	purgeHook = fn
	t.Cleanup(func() { purgeHook = nil })
}
