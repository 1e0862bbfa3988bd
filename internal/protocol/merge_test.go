package protocol_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
)

// merge.lua writes out merge_key's path without a flush policy: the two
// scripts must agree on every reply and every write. The same random
// appends, caps and foreign writes go to one queue through Append (merge.lua)
// and to another through AppendMany (mergemany.lua, merge_key), and both
// queues must end up alike after each step.
func TestMergeScriptsAgree(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		one, many := keys.For(b.Prefix, "one", 0), keys.For(b.Prefix, "many", 0)
		rng := rand.New(rand.NewPCG(1, 2))
		keyNames := []string{"a", "b", "c"}
		const now = 1_700_000_000_000
		for step := range 1500 {
			key := keyNames[rng.IntN(len(keyNames))]
			// Now and then another program writes over a key, or its count,
			// or a worker drains it.
			switch rng.IntN(8) {
			case 0:
				for _, sp := range []keys.Space{one, many} {
					must(t, b.Client.Do(ctx, b.Client.B().Set().Key(sp.Items(key)).Value(`[1]]`).Build()).Error())
				}
			case 1:
				for _, sp := range []keys.Space{one, many} {
					must(t, b.Client.Do(ctx, b.Client.B().Set().Key(sp.Count(key)).Value("x").Build()).Error())
				}
			case 2:
				for _, sp := range []keys.Space{one, many} {
					must(t, b.Client.Do(ctx, b.Client.B().Del().Key(sp.Items(key), sp.Count(key)).Build()).Error())
					must(t, b.Client.Do(ctx, b.Client.B().Zrem().Key(sp.Ready()).Member(key).Build()).Error())
				}
			case 3:
				for _, sp := range []keys.Space{one, many} {
					must(t, b.Client.Do(ctx, b.Client.B().Zadd().Key(sp.Later()).ScoreMember().ScoreMember(now+5, key).Build()).Error())
				}
			}
			n := 1 + rng.IntN(3)
			items := make([]string, n)
			for i := range items {
				items[i] = fmt.Sprint(rng.IntN(1000))
			}
			payload := protocol.Payload(strings.Join(items, ","))
			caps := protocol.Caps{Items: rng.IntN(8), Bytes: rng.IntN(30)}
			if rng.IntN(3) == 0 {
				caps = protocol.Caps{} // none: the most there is
			}
			errOne := protocol.Append(ctx, b.Client, one, key, payload, n, caps, protocol.Flush{}, now+int64(step), protocol.Acks{})
			errsMany, err := protocol.AppendMany(ctx, b.Client, many, []protocol.KeyItems{{Key: key, Payload: payload, N: n}}, caps, protocol.Flush{}, now+int64(step), protocol.Acks{})
			must(t, err)
			if kind(errOne) != kind(errsMany[0]) || fmt.Sprint(errOne) != fmt.Sprint(errsMany[0]) {
				t.Fatalf("step %d: append of %s to %s with %+v: merge.lua says %v, mergemany.lua %v", step, payload, key, caps, errOne, errsMany[0])
			}
			if a, m := dumpSpace(t, b, one, keyNames), dumpSpace(t, b, many, keyNames); a != m {
				t.Fatalf("step %d: after an append of %s to %s with %+v (%v):\nmerge.lua:     %s\nmergemany.lua: %s", step, payload, key, caps, errOne, a, m)
			}
		}
	})
}

// kind names the class of an append's error.
func kind(err error) string {
	var full *protocol.FullError
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, protocol.ErrNotArray):
		return "notarray"
	case errors.As(err, &full):
		return "full"
	}
	return "other: " + err.Error()
}

// dumpSpace describes what a queue shard holds for keyNames: each key's
// items and count, and the ready, later and wake indexes.
func dumpSpace(t *testing.T, b testredis.Backend, sp keys.Space, keyNames []string) string {
	t.Helper()
	ctx := context.Background()
	c := b.Client
	var s strings.Builder
	for _, k := range keyNames {
		items, _ := c.Do(ctx, c.B().Get().Key(sp.Items(k)).Build()).ToString()
		count, _ := c.Do(ctx, c.B().Get().Key(sp.Count(k)).Build()).ToString()
		fmt.Fprintf(&s, "%s=%q/%q ", k, items, count)
	}
	for _, z := range []string{sp.Ready(), sp.Later()} {
		zs, err := c.Do(ctx, c.B().Zrange().Key(z).Min("0").Max("-1").Withscores().Build()).AsZScores()
		must(t, err)
		fmt.Fprintf(&s, "%v ", zs)
	}
	wake, err := c.Do(ctx, c.B().Lrange().Key(sp.Wake()).Start(0).Stop(-1).Build()).AsStrSlice()
	must(t, err)
	fmt.Fprintf(&s, "wake=%q", wake)
	return s.String()
}
