package protocol

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// Clock is the Redis server's clock as a process knows it: its own clock
// plus the offset Sync last measured. Due times and lease deadlines are on
// the server's clock, so that processes whose clocks disagree neither steal
// each other's leases nor delay each other's items. It is safe for
// concurrent use.
type Clock struct {
	local  func() time.Time
	offset atomic.Int64 // the server's clock minus the local clock, in ns
	synced atomic.Int64 // when Sync last succeeded, on the local clock (Unix ns); 0: never
}

// NewClock returns a clock that reads local (time.Now when nil), unsynced.
func NewClock(local func() time.Time) *Clock {
	if local == nil {
		local = time.Now
	}
	return &Clock{local: local}
}

// Sync measures the offset of the server's clock from the local one, in
// one round trip: the server's time is taken to be read halfway through it.
func (k *Clock) Sync(ctx context.Context, c rueidis.Client) error {
	t0 := k.local()
	server, err := Time(ctx, c)
	t1 := k.local()
	if err != nil {
		return fmt.Errorf("sync clock: %w", err)
	}
	mid := t0.Add(t1.Sub(t0) / 2)
	k.offset.Store(int64(server.Sub(mid)))
	k.synced.Store(t1.UnixNano())
	return nil
}

// Now returns the server's time as the clock knows it.
func (k *Clock) Now() time.Time { return k.local().Add(time.Duration(k.offset.Load())) }

// NowMs returns Now in Unix milliseconds.
func (k *Clock) NowMs() int64 { return k.Now().UnixMilli() }

// Offset returns the server's clock minus the local clock, as last measured.
func (k *Clock) Offset() time.Duration { return time.Duration(k.offset.Load()) }

// SyncedWithin reports whether the clock was synced within d.
func (k *Clock) SyncedWithin(d time.Duration) bool {
	s := k.synced.Load()
	return s != 0 && k.local().Sub(time.Unix(0, s)) < d
}
