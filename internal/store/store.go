// Package store wraps every Redis command and script batchq sends in a
// typed Go function, so that callers never build KEYS or ARGV slices. Times
// are Unix milliseconds taken from the caller's clock.
package store

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/luascripts"
)

// Scripts run through rueidis' script helper: EVALSHA, and EVAL after a
// NOSCRIPT reply (a restarted or flushed server). None of them is marked
// retryable: a write that may have been applied is never sent twice.
var (
	mergeScript   = rueidis.NewLuaScript(luascripts.Merge)
	claimScript   = rueidis.NewLuaScript(luascripts.Claim)
	settleScript  = rueidis.NewLuaScript(luascripts.Settle)
	reapScript    = rueidis.NewLuaScript(luascripts.Reap)
	requeueScript = rueidis.NewLuaScript(luascripts.Requeue)
)

// ErrNotArray reports that a key's items hold a value that is not a JSON
// array (written by something other than batchq).
var ErrNotArray = errors.New("the key holds a value that is not a JSON array")

func ms(n int64) string { return strconv.FormatInt(n, 10) }

// notArray turns the scripts' NOTARRAY error reply into ErrNotArray.
func notArray(err error) error {
	if re, ok := rueidis.IsRedisErr(err); ok && strings.HasPrefix(re.Error(), "NOTARRAY") {
		return fmt.Errorf("%w (%s)", ErrNotArray, strings.TrimPrefix(re.Error(), "NOTARRAY "))
	}
	return err
}

// Append splices items (valid JSON values joined by commas) onto key's array
// and makes the key ready, due at now if it was not ready yet. It returns the
// array's length in bytes before the append.
func Append(ctx context.Context, c rueidis.Client, sp keys.Space, key, items string, now int64) (int64, error) {
	n, err := mergeScript.Exec(ctx, c,
		[]string{sp.Items(key), sp.Ready(), sp.Wake()},
		[]string{items, ms(now), key}).AsInt64()
	return n, notArray(err)
}

// Claimed is what Claim took from a shard.
type Claimed struct {
	Keys    []string // due keys, now claimed until the claim deadline
	Retries []Entry  // due retries, now held under the retry lease token
	Next    int64    // earliest due time left on the ready or retry index; 0: none
}

// Entry is a stored envelope and its id.
type Entry struct {
	ID, Env string
}

// ClaimArgs are the arguments of Claim.
type ClaimArgs struct {
	Now           int64
	MaxKeys       int
	ClaimUntil    int64 // claimed keys are due again at this time unless drained
	MaxRetries    int
	RetryToken    string
	RetryDeadline int64
}

// Claim claims up to a.MaxKeys due keys and, when fewer were due, up to
// a.MaxRetries due retries, which it moves into a lease under a.RetryToken.
func Claim(ctx context.Context, c rueidis.Client, sp keys.Space, a ClaimArgs) (Claimed, error) {
	arr, err := claimScript.Exec(ctx, c,
		[]string{sp.Ready(), sp.Retry(), sp.RetryData(), sp.Leases(), sp.LeaseMeta(), sp.Lease(a.RetryToken)},
		[]string{ms(a.Now), strconv.Itoa(a.MaxKeys), ms(a.ClaimUntil), strconv.Itoa(a.MaxRetries), a.RetryToken, ms(a.RetryDeadline)},
	).ToArray()
	if err != nil {
		return Claimed{}, err
	}
	if len(arr) != 3 {
		return Claimed{}, fmt.Errorf("claim: unexpected reply of %d elements", len(arr))
	}
	var cl Claimed
	if cl.Keys, err = arr[0].AsStrSlice(); err != nil {
		return Claimed{}, err
	}
	flat, err := arr[1].AsStrSlice()
	if err != nil {
		return Claimed{}, err
	}
	for i := 0; i+1 < len(flat); i += 2 {
		cl.Retries = append(cl.Retries, Entry{ID: flat[i], Env: flat[i+1]})
	}
	if next, _ := arr[2].ToString(); next != "" {
		f, err := strconv.ParseFloat(next, 64)
		if err != nil {
			return Claimed{}, fmt.Errorf("claim: bad next due time %q", next)
		}
		cl.Next = int64(f)
	}
	return cl, nil
}

// Drained is one key's batch as a drain found it.
type Drained struct {
	Key       string
	Token     string // the lease token; "" when drained without a lease
	Data      []byte // the array, when the key held a string
	Missing   bool   // the key held nothing (drained by another worker)
	WrongType bool   // the key holds a Redis value that is not a string
}

// Drain moves each key's array into a lease with the given deadline, with
// one MULTI/EXEC per key, all keys in one round trip. Items appended after a
// key's EXEC start a fresh array. tokens[i] names the lease of keys[i].
func Drain(ctx context.Context, c rueidis.Client, sp keys.Space, keyNames, tokens []string, deadline int64) ([]Drained, error) {
	const per = 7 // MULTI, RENAME, ZREM, ZADD, HSET, GET, EXEC
	cmds := make(rueidis.Commands, 0, per*len(keyNames))
	for i, k := range keyNames {
		lk := sp.Lease(tokens[i])
		cmds = append(cmds,
			c.B().Multi().Build(),
			c.B().Rename().Key(sp.Items(k)).Newkey(lk).Build(),
			c.B().Zrem().Key(sp.Ready()).Member(k).Build(),
			c.B().Zadd().Key(sp.Leases()).ScoreMember().ScoreMember(float64(deadline), tokens[i]).Build(),
			c.B().Hset().Key(sp.LeaseMeta()).FieldValue().FieldValue(tokens[i], "d:"+k).Build(),
			c.B().Get().Key(lk).Build(),
			c.B().Exec().Build(),
		)
	}
	res := c.DoMulti(ctx, cmds...)
	out := make([]Drained, len(keyNames))
	var phantom []string
	var firstErr error
	for i, k := range keyNames {
		out[i] = Drained{Key: k, Token: tokens[i]}
		exec, err := res[i*per+per-1].ToArray()
		if err == nil && len(exec) != per-2 {
			err = fmt.Errorf("drain: EXEC returned %d replies", len(exec))
		}
		if err != nil {
			// The transaction's fate is unknown: if it ran, the lease is
			// reaped after its deadline and nothing is lost.
			out[i].Missing = true
			if firstErr == nil {
				firstErr = fmt.Errorf("drain %s: %w", k, err)
			}
			continue
		}
		if err := exec[0].Error(); err != nil {
			// RENAME found no key: another worker drained it first. The
			// lease entry written after it is empty; remove it now.
			out[i].Missing = true
			phantom = append(phantom, tokens[i])
			continue
		}
		data, err := exec[4].AsBytes()
		if err != nil {
			if re, ok := rueidis.IsRedisErr(err); ok && strings.HasPrefix(re.Error(), "WRONGTYPE") {
				out[i].WrongType = true
				continue
			}
			return nil, fmt.Errorf("drain %s: %w", k, err)
		}
		out[i].Data = data
	}
	if len(phantom) > 0 {
		r := c.DoMulti(ctx,
			c.B().Zrem().Key(sp.Leases()).Member(phantom...).Build(),
			c.B().Hdel().Key(sp.LeaseMeta()).Field(phantom...).Build())
		for _, x := range r {
			if err := x.Error(); err != nil && firstErr == nil {
				firstErr = fmt.Errorf("drain: remove empty leases: %w", err)
			}
		}
	}
	if firstErr != nil {
		// Report what was drained along with the error: those batches are
		// leased and must be handled or they wait for the reaper.
		return out, firstErr
	}
	return out, nil
}

// DrainOnce drains each key with the literal at-most-once pattern: one
// MULTI/EXEC of GETDEL and ZREM per key, no lease. A worker that dies after
// the EXEC loses the batch.
func DrainOnce(ctx context.Context, c rueidis.Client, sp keys.Space, keyNames []string) ([]Drained, error) {
	const per = 4 // MULTI, GETDEL, ZREM, EXEC
	cmds := make(rueidis.Commands, 0, per*len(keyNames))
	for _, k := range keyNames {
		cmds = append(cmds,
			c.B().Multi().Build(),
			c.B().Getdel().Key(sp.Items(k)).Build(),
			c.B().Zrem().Key(sp.Ready()).Member(k).Build(),
			c.B().Exec().Build(),
		)
	}
	res := c.DoMulti(ctx, cmds...)
	out := make([]Drained, len(keyNames))
	for i, k := range keyNames {
		out[i] = Drained{Key: k}
		exec, err := res[i*per+per-1].ToArray()
		if err == nil && len(exec) != per-2 {
			err = fmt.Errorf("EXEC returned %d replies", len(exec))
		}
		if err != nil {
			return out[:i], fmt.Errorf("drain %s: %w", k, err)
		}
		data, err := exec[0].AsBytes()
		switch {
		case rueidis.IsRedisNil(err):
			out[i].Missing = true
		case err != nil:
			if re, ok := rueidis.IsRedisErr(err); ok && strings.HasPrefix(re.Error(), "WRONGTYPE") {
				out[i].WrongType = true
				continue
			}
			return out[:i], fmt.Errorf("drain %s: %w", k, err)
		default:
			out[i].Data = data
		}
	}
	return out, nil
}

// Scheduled is a retry to store.
type Scheduled struct {
	ID  string
	Due int64
	Env string
}

// Settlement is the outcome of a batch, applied atomically by Settle.
type Settlement struct {
	Token      string // lease token; "" for a batch drained without a lease
	Key        string // the batch's key; "" for a retry batch
	Return     string // unfinished items to put back in front of Key's array, as a JSON array; "" for none
	Quarantine string // when not "", the id under which the batch's raw value is kept (a non-string value)
	Retries    []Scheduled
	Dead       []Entry
	DeadCap    int
	Now        int64
}

// Settle outcomes.
var (
	// ErrLeaseLost reports a settlement refused because the lease had
	// expired and been reaped: the batch's items are being redelivered.
	ErrLeaseLost = errors.New("lease expired before the batch was settled")
)

// Settle applies s: it releases the lease, puts unfinished items back in
// front of their key, and stores retries and dead letters, all at once.
// Nothing is changed when it returns an error.
func Settle(ctx context.Context, c rueidis.Client, sp keys.Space, s Settlement) error {
	src := sp.Lease(s.Token)
	items := src
	if s.Key != "" {
		items = sp.Items(s.Key)
		if s.Token == "" {
			src = items
		}
	}
	quarantine, qflag := src, "0"
	if s.Quarantine != "" {
		quarantine, qflag = sp.Quarantine(s.Quarantine), "1"
	}
	args := make([]string, 0, 9+3*len(s.Retries)+2*len(s.Dead))
	args = append(args, s.Token, ms(s.Now), s.Key, s.Return, strconv.Itoa(s.DeadCap), qflag,
		strconv.Itoa(len(s.Retries)))
	for _, r := range s.Retries {
		args = append(args, r.ID, ms(r.Due), r.Env)
	}
	args = append(args, strconv.Itoa(len(s.Dead)))
	for _, d := range s.Dead {
		args = append(args, d.ID, d.Env)
	}
	n, err := settleScript.Exec(ctx, c,
		[]string{sp.Leases(), sp.LeaseMeta(), src, items, sp.Ready(), sp.Wake(),
			sp.Retry(), sp.RetryData(), sp.Dead(), sp.DeadData(), quarantine},
		args).AsInt64()
	switch {
	case err != nil:
		return err
	case n == 0:
		return ErrLeaseLost
	case n < 0:
		return fmt.Errorf("put back unfinished items: %w", ErrNotArray)
	}
	return nil
}

// Extend moves the deadline of the given leases of one shard, in one
// command. Leases that were already reaped are not brought back.
func Extend(ctx context.Context, c rueidis.Client, sp keys.Space, tokens []string, deadline int64) error {
	if len(tokens) == 0 {
		return nil
	}
	cmd := c.B().Zadd().Key(sp.Leases()).Xx().ScoreMember()
	for _, t := range tokens {
		cmd = cmd.ScoreMember(float64(deadline), t)
	}
	return c.Do(ctx, cmd.Build()).Error()
}

// Reap returns the items of up to limit leases whose deadline has passed.
// A lease that cannot be returned yet gets retryAt as its new deadline.
func Reap(ctx context.Context, c rueidis.Client, sp keys.Space, now int64, limit int, retryAt int64) (int64, error) {
	return reapScript.Exec(ctx, c,
		[]string{sp.Leases(), sp.LeaseMeta(), sp.Ready(), sp.Wake(), sp.Retry(), sp.RetryData()},
		[]string{ms(now), strconv.Itoa(limit), sp.Lease(""), sp.ItemsPrefix(), ms(retryAt)},
	).AsInt64()
}

// Wait blocks until a producer signals new work on the shard or timeout
// passes (rounded up to a millisecond). It uses the server-side timeout of
// BLPOP, so a timeout does not close the connection.
func Wait(ctx context.Context, c rueidis.Client, sp keys.Space, timeout time.Duration) error {
	secs := max(timeout.Seconds(), 0.001)
	err := c.Do(ctx, c.B().Blpop().Key(sp.Wake()).Timeout(secs).Build()).Error()
	if rueidis.IsRedisNil(err) {
		return nil
	}
	return err
}

// Type returns the Redis type of the value at key.
func Type(ctx context.Context, c rueidis.Client, key string) (string, error) {
	return c.Do(ctx, c.B().Type().Key(key).Build()).ToString()
}

// ListDead returns the envelopes of up to limit dead letters of a shard,
// newest first, skipping the first offset.
func ListDead(ctx context.Context, c rueidis.Client, sp keys.Space, offset, limit int) ([]string, error) {
	ids, err := c.Do(ctx, c.B().Zrange().Key(sp.Dead()).Min(strconv.Itoa(offset)).Max(strconv.Itoa(offset+limit-1)).Rev().Build()).AsStrSlice()
	if err != nil || len(ids) == 0 {
		return nil, err
	}
	vals, err := c.Do(ctx, c.B().Hmget().Key(sp.DeadData()).Field(ids...).Build()).ToArray()
	if err != nil {
		return nil, err
	}
	envs := make([]string, 0, len(vals))
	for _, v := range vals {
		if s, err := v.ToString(); err == nil {
			envs = append(envs, s)
		}
	}
	return envs, nil
}

// CountDead returns the number of dead letters of a shard.
func CountDead(ctx context.Context, c rueidis.Client, sp keys.Space) (int64, error) {
	return c.Do(ctx, c.B().Zcard().Key(sp.Dead()).Build()).AsInt64()
}

// Requeue appends a dead letter's item to the end of its key and removes the
// dead letter, atomically. It reports false when the dead letter was gone.
func Requeue(ctx context.Context, c rueidis.Client, sp keys.Space, id, key, item string, now int64) (bool, error) {
	n, err := requeueScript.Exec(ctx, c,
		[]string{sp.Items(key), sp.Ready(), sp.Wake(), sp.Dead(), sp.DeadData()},
		[]string{id, item, ms(now), key}).AsInt64()
	return n == 1, notArray(err)
}

// PurgeDead deletes every dead letter of a shard and returns how many there were.
func PurgeDead(ctx context.Context, c rueidis.Client, sp keys.Space) (int64, error) {
	res := c.DoMulti(ctx,
		c.B().Multi().Build(),
		c.B().Zcard().Key(sp.Dead()).Build(),
		c.B().Del().Key(sp.Dead(), sp.DeadData()).Build(),
		c.B().Exec().Build())
	exec, err := res[3].ToArray()
	if err != nil {
		return 0, err
	}
	return exec[0].AsInt64()
}
