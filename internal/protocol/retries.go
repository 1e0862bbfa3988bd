package protocol

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
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
	// Corrupt marks a retry whose stored form does not decode (written by
	// another program): a worker moves it to dead letters when it is due.
	Corrupt bool `json:"corrupt,omitempty"`
}

// ListRetries returns up to limit of the retries of the shards spaces of
// queue (spaces[i] is shard i), the soonest due of each shard, and how many
// each shard holds, in two round trips. Retries a worker claims meanwhile
// are left out. The result is in shard order, each shard's soonest first.
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
	due := make([][]rueidis.ZScore, len(spaces))
	var reads rueidis.Commands
	var shards []int
	for i, sp := range spaces {
		var err error
		if counts[i], err = res[2*i].AsInt64(); err != nil {
			return nil, nil, err
		}
		if due[i], err = res[2*i+1].AsZScores(); err != nil {
			return nil, nil, err
		}
		if len(due[i]) == 0 {
			continue
		}
		ids := make([]string, len(due[i]))
		for j, z := range due[i] {
			ids[j] = z.Member
		}
		reads = append(reads, c.B().Hmget().Key(sp.RetryData()).Field(ids...).Build())
		shards = append(shards, i)
	}
	var out []Waiting
	for j, r := range c.DoMulti(ctx, reads...) {
		vals, err := r.ToArray()
		if err != nil {
			return nil, nil, err
		}
		shard := shards[j]
		for k, v := range vals {
			env, err := v.ToString()
			if err != nil {
				continue // claimed meanwhile
			}
			z := due[shard][k]
			out = append(out, decodeWaiting(queue, shard, z.Member, time.UnixMilli(int64(z.Score)), env))
		}
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
	w.Key, w.Item, w.Attempts, w.Error = e.Key, e.Item, e.Attempts, e.Error
	return w
}
