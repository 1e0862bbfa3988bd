package main

import (
	"testing"

	"github.com/batchq/batchq/internal/testredis"
)

// The end-to-end test with the binaries given a Sentinel setup as
// -redis sentinel://MASTER@HOST:PORT: they ask the Sentinel for the master
// and work on it, status page and metrics included.
func TestEndToEndOnSentinel(t *testing.T) {
	master := testredis.Start(t)
	sentinels := testredis.StartSentinels(t, master, 1, testredis.SentinelOptions{})
	b := master.Backend(t) // the test's own checks read the master directly
	b.Addr = sentinels.URL()
	testEndToEnd(t, b)
}
