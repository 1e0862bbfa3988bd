package protocol

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
)

// Waiting is a retry on a shard's retry index, waiting for its next attempt
// (inspect.Retry is its public twin: the same fields, converted).
type Waiting struct {
	ID       string          `json:"id"`
	Queue    string          `json:"queue"`
	Shard    int             `json:"shard"`
	Key      string          `json:"key"`
	Item     json.RawMessage `json:"item"` // byte for byte as appended; the stored form, as a JSON string, when Corrupt
	Attempts int             `json:"attempts"`
	Error    string          `json:"error"`
	Due      time.Time       `json:"due"`
	// Behind counts the items an ordered key holds back behind this one,
	// to run after it.
	Behind int `json:"behind,omitempty"`
	// Corrupt marks a retry whose stored form does not decode (written by
	// another program): a worker moves it to dead letters when it is due.
	Corrupt bool `json:"corrupt,omitempty"`
}

// ListRetries returns the limit soonest due retries of the shards spaces of
// queue (spaces[i] is shard i), ties broken by id, and how many each shard
// holds, in two round trips: the indexes of every shard first, then the
// stored retries of the limit chosen among them (retries hold items, up to
// a MiB each: only those are read). Retries a worker claims meanwhile are
// left out. The result is soonest first.
func ListRetries(ctx context.Context, c rueidis.Client, queue string, spaces []keys.Space, limit int) ([]Waiting, []int64, error) {
	cmds := make(rueidis.Commands, 0, 2*len(spaces))
	top := strconv.Itoa(limit - 1)
	for _, sp := range spaces {
		cmds = append(cmds,
			c.B().Zcard().Key(sp.Retry()).Build(),
			c.B().Zrange().Key(sp.Retry()).Min("0").Max(top).Withscores().Build())
	}
	res := c.DoMulti(ctx, cmds...)
	counts := make([]int64, len(spaces))
	type indexed struct {
		shard int
		z     rueidis.ZScore
	}
	var soonest []indexed
	for i := range spaces {
		var err error
		if counts[i], err = res[2*i].AsInt64(); err != nil {
			return nil, nil, err
		}
		zs, err := res[2*i+1].AsZScores()
		if err != nil {
			return nil, nil, err
		}
		for _, z := range zs {
			soonest = append(soonest, indexed{i, z})
		}
	}
	slices.SortFunc(soonest, func(a, b indexed) int {
		return cmp.Or(cmp.Compare(a.z.Score, b.z.Score), strings.Compare(a.z.Member, b.z.Member))
	})
	soonest = soonest[:min(limit, len(soonest))]
	if len(soonest) == 0 {
		return nil, counts, nil
	}
	reads := make(rueidis.Commands, len(soonest))
	for j, x := range soonest {
		reads[j] = c.B().Hget().Key(spaces[x.shard].RetryData()).Field(x.z.Member).Build()
	}
	out := make([]Waiting, 0, len(soonest))
	for j, r := range c.DoMulti(ctx, reads...) {
		env, err := r.ToString()
		if rueidis.IsRedisNil(err) {
			continue // claimed meanwhile
		}
		if err != nil {
			return nil, nil, err
		}
		x := soonest[j]
		out = append(out, decodeWaiting(queue, x.shard, x.z.Member, time.UnixMilli(int64(x.z.Score)), env))
	}
	return out, counts, nil
}

// decodeWaiting returns the retry id of a shard, due at due, stored as env.
func decodeWaiting(queue string, shard int, id string, due time.Time, env string) Waiting {
	w := Waiting{ID: id, Queue: queue, Shard: shard, Due: due}
	var e retryEnvelope
	err := json.Unmarshal([]byte(env), &e)
	if err == nil && len(e.Item) == 0 {
		err = errors.New("no item")
	}
	if err != nil {
		w.Item, w.Corrupt, w.Error = JSONString(env), true, "the stored retry does not decode: "+err.Error()
		return w
	}
	w.Key, w.Item, w.Attempts, w.Error, w.Behind = e.Key, e.Item, e.Attempts, e.Error, len(e.Rest)
	return w
}
