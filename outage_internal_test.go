package batchq

import (
	"errors"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// When part of Redis is down (one node of a cluster), failed calls and
// calls that succeed interleave: the outage is logged when it starts and
// every outageLogEvery, and ends only once calls succeed for outageQuiet.
func TestPartialOutageIsLoggedOnce(t *testing.T) {
	defer func(every, quiet time.Duration) { outageLogEvery, outageQuiet = every, quiet }(outageLogEvery, outageQuiet)
	outageLogEvery, outageQuiet = 300*time.Millisecond, 100*time.Millisecond
	// A bare observer, not the root tests' observed (helpers_test.go): that
	// helper is in package batchq_test, which this internal test cannot
	// import, and giving it to both packages would mean exporting a test
	// helper from package batchq.
	core, logs := observer.New(zap.InfoLevel)
	r := &runner{w: &Worker{log: zap.New(core)}}
	down := errors.New("dial tcp: connection refused")

	start := time.Now()
	var lastFailure time.Time
	for time.Since(start) < 700*time.Millisecond {
		lastFailure = time.Now()
		r.redisFailed("popping due keys", down)
		r.redisOK()
		time.Sleep(10 * time.Millisecond)
	}
	if n := logs.FilterMessageSnippet("Redis call failed").Len(); n != 1 {
		t.Errorf("%d lines for the start of one outage, want 1", n)
	}
	if n := logs.FilterMessageSnippet("still failing").Len(); n < 1 || n > 2 {
		t.Errorf("%d lines for an outage of 700ms logged every 300ms, want 1 or 2", n)
	}
	if n := logs.FilterMessage("Redis calls succeed again").Len(); n != 0 {
		t.Errorf("the outage ended %d times while calls kept failing", n)
	}
	for end := time.Now().Add(time.Second); logs.FilterMessage("Redis calls succeed again").Len() == 0 && time.Now().Before(end); {
		r.redisOK()
		time.Sleep(10 * time.Millisecond)
	}
	ends := logs.FilterMessage("Redis calls succeed again").All()
	if len(ends) != 1 {
		t.Fatalf("%d lines for the end of the outage, want 1", len(ends))
	}
	if quiet := ends[0].Time.Sub(lastFailure); quiet < outageQuiet {
		t.Errorf("the outage ended %v after its last failure, before %v of calls without one", quiet, outageQuiet)
	}
	if n := ends[0].ContextMap()["failures"].(int64); n < 30 {
		t.Errorf("the outage counts %d failures, want one per failed call", n)
	}
}
