package batchq

import (
	"math"
	"math/rand/v2"
	"time"
)

// Backoff decides how long a failed item waits before its next attempt.
// Delay is called with the number of attempts that have failed so far (1
// after the first failure). Implementations must be safe for concurrent use.
type Backoff interface {
	Delay(failed int) time.Duration
}

// BackoffFunc adapts a function to the Backoff interface.
type BackoffFunc func(failed int) time.Duration

// Delay returns f(failed).
func (f BackoffFunc) Delay(failed int) time.Duration { return f(failed) }

// Exponential is a Backoff whose delay grows by Factor with every failure,
// from Base after the first one, up to Max, spread by ±Jitter (a fraction)
// so that items that failed together do not retry together.
//
// The zero value is not useful; start from DefaultBackoff.
type Exponential struct {
	Base   time.Duration
	Max    time.Duration
	Factor float64
	Jitter float64 // 0 to 1
}

// DefaultBackoff is the backoff of a queue that sets none: 1s after the
// first failure, doubling up to 10 minutes, ±20% jitter. With the default 10
// attempts, an item that always fails waits 1+2+4+...+256s between them and
// is dead-lettered after about 8.5 minutes.
var DefaultBackoff = Exponential{Base: time.Second, Max: 10 * time.Minute, Factor: 2, Jitter: 0.2}

// Delay returns min(Max, Base*Factor^(failed-1)), times a random factor in
// [1-Jitter, 1+Jitter]. Max 0 means no cap short of the largest Duration.
func (e Exponential) Delay(failed int) time.Duration {
	if failed < 1 {
		failed = 1
	}
	limit := float64(math.MaxInt64)
	if e.Max > 0 {
		limit = float64(e.Max)
	}
	d := min(float64(e.Base)*math.Pow(e.Factor, float64(failed-1)), limit)
	if e.Jitter > 0 {
		d *= 1 + e.Jitter*(2*rand.Float64()-1)
	}
	if d >= math.MaxInt64 || math.IsNaN(d) {
		return math.MaxInt64
	}
	return max(time.Duration(d), 0)
}

// Constant is a Backoff that always waits the same time.
type Constant time.Duration

// Delay returns the constant.
func (c Constant) Delay(int) time.Duration { return time.Duration(c) }
