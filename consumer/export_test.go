package consumer

import "time"

// SetClock replaces the clock c takes "now" from (due times, lease deadlines,
// reaping), so that tests can move time without sleeping.
func SetClock(c *Consumer, now func() time.Time) { c.clock = now }
