package protocol

import (
	"context"
	_ "embed"
	"fmt"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
)

//go:embed lua/state.lua
var stateLua string

// stateScript reads a shard's state; it is not in ScriptName's list, since
// only tests' helpers (batchqtest) run it.
var stateScript = newScript(withLib(libLua, stateLua))

// ShardState is what one queue shard holds, read at once (state.lua).
type ShardState struct {
	// Ready and Later count the keys with pending items, due and held
	// back by a flush policy; Wake the names on the wake list (hints
	// included); Leases the batches in flight; Retries and Dead the retries
	// and dead letters.
	Ready, Later, Wake, Leases, Retries, Dead int64
	// NextRetry is when the earliest retry is due (zero when there is
	// none); Now is the server's time of the read.
	NextRetry, Now time.Time
}

// ReadStates reads the state of each shard of spaces, each in one script
// call, so that no step of the protocol is seen half done, all in one
// round trip. It writes nothing.
func ReadStates(ctx context.Context, c rueidis.Client, spaces []keys.Space) ([]ShardState, error) {
	calls := make([]scriptCall, len(spaces))
	for i, sp := range spaces {
		calls[i] = scriptCall{keys: []string{sp.Ready(), sp.Later(), sp.Wake(), sp.Leases(), sp.Retry(), sp.Dead()}}
	}
	out := make([]ShardState, len(spaces))
	for i, r := range evalMany(ctx, c, stateScript, calls) {
		v, err := r.AsIntSlice()
		if err == nil && len(v) != 8 {
			err = fmt.Errorf("state: %d values", len(v))
		}
		if err != nil {
			return nil, fmt.Errorf("read the state of %s: %w", keys.Short(spaces[i].Ready()), err)
		}
		s := ShardState{Ready: v[0], Later: v[1], Wake: v[2], Leases: v[3], Retries: v[4], Dead: v[6], Now: time.UnixMilli(v[7])}
		if v[5] >= 0 {
			s.NextRetry = time.UnixMilli(v[5])
		}
		out[i] = s
	}
	return out, nil
}
