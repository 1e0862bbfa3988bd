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
