package protocol

import (
	"context"
	"encoding/json"
	"strconv"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
)

// DeadLetter is an item that failed for good, kept with its last error
// (deadletter.Letter is its public twin: the same fields, converted).
type DeadLetter struct {
	ID       string          `json:"id"`
	Queue    string          `json:"queue"`
	Shard    int             `json:"shard"`
	Key      string          `json:"key"`
	Item     json.RawMessage `json:"item"` // byte for byte as appended; null when Corrupt and not a string
	Attempts int             `json:"attempts"`
	Error    string          `json:"error"`
	FailedAt time.Time       `json:"failed_at"`
	// Corrupt marks a key's whole value that was not a JSON array; Item holds
	// it (as a JSON string when it was not JSON). It cannot be requeued.
	Corrupt bool `json:"corrupt,omitempty"`
}

// encode returns the stored form of a dead letter, its envelope.
func (d DeadLetter) encode() []byte {
	b := make([]byte, 0, len(d.Item)+len(d.Key)+len(d.Error)+96)
	b = append(b, `{"id":`...)
	b = appendString(b, d.ID)
	b = append(b, `,"queue":`...)
	b = appendString(b, d.Queue)
	b = append(b, `,"shard":`...)
	b = strconv.AppendInt(b, int64(d.Shard), 10)
	b = append(b, `,"key":`...)
	b = appendString(b, d.Key)
	b = append(b, `,"attempts":`...)
	b = strconv.AppendInt(b, int64(d.Attempts), 10)
	b = append(b, `,"error":`...)
	b = appendString(b, d.Error)
	b = append(b, `,"failed_at":`...)
	b = strconv.AppendInt(b, d.FailedAt.UnixMilli(), 10)
	if d.Corrupt {
		b = append(b, `,"corrupt":true`...)
	}
	b = append(b, `,"item":`...)
	if len(d.Item) == 0 {
		b = append(b, "null"...)
	} else {
		b = append(b, d.Item...)
	}
	return append(b, '}')
}

// DecodeDead returns the dead letter stored as the envelope env.
func DecodeDead(env string) (DeadLetter, error) {
	var s struct {
		DeadLetter
		FailedAt int64 `json:"failed_at"`
	}
	if err := json.Unmarshal([]byte(env), &s); err != nil {
		return DeadLetter{}, err
	}
	d := s.DeadLetter
	d.FailedAt = time.UnixMilli(s.FailedAt)
	return d, nil
}

// ListDead returns up to limit dead letters of a shard, newest first,
// skipping the first offset: their ids and envelopes (in the same order).
func ListDead(ctx context.Context, c rueidis.Client, sp keys.Space, offset, limit int) (ids, envs []string, err error) {
	ids, err = c.Do(ctx, c.B().Zrange().Key(sp.Dead()).Min(strconv.Itoa(offset)).Max(strconv.Itoa(offset+limit-1)).Rev().Build()).AsStrSlice()
	if err != nil || len(ids) == 0 {
		return nil, nil, err
	}
	vals, err := c.Do(ctx, c.B().Hmget().Key(sp.DeadData()).Field(ids...).Build()).ToArray()
	if err != nil {
		return nil, nil, err
	}
	out := ids[:0]
	for i, v := range vals {
		if s, err := v.ToString(); err == nil {
			out = append(out, ids[i])
			envs = append(envs, s)
		}
	}
	return out, envs, nil
}

// GetDead returns the envelopes of the dead letters ids in the shards
// spaces, in one round trip: envs[i][j] is that of ids[j] in spaces[i], ""
// when that shard has none.
func GetDead(ctx context.Context, c rueidis.Client, spaces []keys.Space, ids []string) (envs [][]string, err error) {
	cmds := make(rueidis.Commands, len(spaces))
	for i, sp := range spaces {
		cmds[i] = c.B().Hmget().Key(sp.DeadData()).Field(ids...).Build()
	}
	envs = make([][]string, len(spaces))
	for i, r := range c.DoMulti(ctx, cmds...) {
		vals, err := r.ToArray()
		if err != nil {
			return nil, err
		}
		envs[i] = make([]string, len(ids))
		for j, v := range vals {
			envs[i][j], _ = v.ToString() // "" for nil: no such letter
		}
	}
	return envs, nil
}

// CountDead returns the number of dead letters of a shard.
func CountDead(ctx context.Context, c rueidis.Client, sp keys.Space) (int64, error) {
	return c.Do(ctx, c.B().Zcard().Key(sp.Dead()).Build()).AsInt64()
}

// Requeued is a dead letter to requeue.
type Requeued struct {
	Space         keys.Space
	ID, Key, Item string
}

// RequeueMany appends each dead letter's item to the end of its key and
// removes the dead letter, atomically for each, all in one round trip
// (pipelined EVALSHAs, run in order); the keys are due at once. ok[i] is
// false when rs[i] was
// gone already; errs[i] is ErrNotArray when its key holds a value that is
// not batchq's array (nothing changed), or a Redis error.
func RequeueMany(ctx context.Context, c rueidis.Client, rs []Requeued) (ok []bool, errs []error) {
	calls := make([]scriptCall, len(rs))
	for i, r := range rs {
		sp := r.Space
		calls[i] = scriptCall{
			keys: []string{sp.Items(r.Key), sp.Count(r.Key), sp.Ready(), sp.Later(), sp.Wake(), sp.Dead(), sp.DeadData()},
			args: []string{r.ID, Payload(r.Item), r.Key},
		}
	}
	ok, errs = make([]bool, len(rs)), make([]error, len(rs))
	for i, res := range evalMany(ctx, c, requeueScript, calls) {
		n, err := res.AsInt64()
		ok[i], errs[i] = n == 1, appendError(err)
	}
	return ok, errs
}

// PurgeDead deletes every dead letter of a shard, and the values kept in
// quarantine, and returns how many dead letters there were: it reads the
// quarantine set, then one MULTI/EXEC counts the dead letters and deletes
// them, the quarantine keys it read, and their names in the set. A value a
// settle quarantines in between stays, its name in the set, for the next
// purge: a quarantine key is never left outside the set, through which
// alone a purge finds it. (The commands go through the client, which
// follows a Redis Cluster's MOVED and ASK replies.)
func PurgeDead(ctx context.Context, c rueidis.Client, sp keys.Space) (int64, error) {
	quarantined, err := c.Do(ctx, c.B().Smembers().Key(sp.Quarantined()).Build()).AsStrSlice()
	if err != nil {
		return 0, err
	}
	if purgeHook != nil {
		purgeHook()
	}
	cmds := rueidis.Commands{
		c.B().Multi().Build(),
		c.B().Zcard().Key(sp.Dead()).Build(),
		c.B().Del().Key(append([]string{sp.Dead(), sp.DeadData()}, quarantined...)...).Build(),
	}
	if len(quarantined) > 0 {
		cmds = append(cmds, c.B().Srem().Key(sp.Quarantined()).Member(quarantined...).Build())
	}
	cmds = append(cmds, c.B().Exec().Build())
	res := c.DoMulti(ctx, cmds...)
	exec, err := res[len(res)-1].ToArray()
	if err != nil {
		return 0, execError(res) // the refused command's own error, not EXECABORT's
	}
	return exec[0].AsInt64()
}

// purgeHook, when not nil, runs between a purge's read of the quarantine
// set and its delete (for tests).
var purgeHook func()
