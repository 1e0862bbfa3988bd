package protocol

// This file wraps every Redis command and script batchq sends in a typed Go
// function, so that callers never build KEYS or ARGV slices. Times are Unix
// milliseconds taken from the caller's clock.

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
)

// ErrNotArray reports that a key's items hold a value that is not a JSON
// array (written by something other than batchq).
var ErrNotArray = errors.New("the key holds a value that is not a JSON array")

// FullError reports an append refused because it would take the key past
// one of its caps.
type FullError struct {
	Items int64 // items the key holds
	Bytes int64 // bytes the key holds
}

func (e *FullError) Error() string {
	return fmt.Sprintf("the key is full (it holds %d items, %d bytes)", e.Items, e.Bytes)
}

func ms(n int64) string { return strconv.FormatInt(n, 10) }

// appendError turns the scripts' NOTARRAY and FULL error replies into
// ErrNotArray and *FullError.
func appendError(err error) error {
	re, ok := rueidis.IsRedisErr(err)
	if !ok {
		return err
	}
	if e := scriptError(re.Error()); e != nil {
		return e
	}
	return err
}

// scriptError parses a NOTARRAY or FULL error text of the merge scripts; it
// returns nil for any other text.
func scriptError(msg string) error {
	if rest, ok := strings.CutPrefix(msg, "NOTARRAY "); ok {
		return fmt.Errorf("%w (%s)", ErrNotArray, rest)
	}
	if rest, ok := strings.CutPrefix(msg, "FULL "); ok {
		var fe FullError
		if _, err := fmt.Sscan(rest, &fe.Items, &fe.Bytes); err == nil {
			return &fe
		}
	}
	return nil
}

// A key's count (keys.Space.Count) holds two numbers in one integer, so
// that the merge script keeps both with one INCRBY: the key's items times
// countUnit, plus the length of its array minus one. Lua's numbers are
// doubles, exact up to 2^53: a key holds at most MaxKeyItems items.
const (
	countUnit   = 1 << 30 // past the largest string, 512 MiB
	MaxKeyItems = 1<<23 - 1
)

// UnpackCount returns the items and the array length (bytes) a count value
// records.
func UnpackCount(v int64) (items, bytes int64) { return v / countUnit, v%countUnit + 1 }

// PackCount returns the count value of an array of items items and bytes
// bytes.
func PackCount(items, bytes int64) int64 { return items*countUnit + bytes - 1 }

// Caps bound what one key may hold; 0 means no bound.
type Caps struct {
	Items int
	Bytes int
}

// Flush is a queue's flush policy, as the merge script takes it: when a key
// with pending items is due. The zero Flush makes a key due at once.
type Flush struct {
	MaxAge int64 // ms: due at most this long after the first pending item (0: at once)
	Quiet  int64 // ms: due once no item came for this long, up to MaxAge (0: none)
	Items  int   // due at once when the key holds this many items (0: no limit)
	Bytes  int   // due at once when the key's array is this long (0: no limit)
}

// Append splices n items (valid JSON values joined by commas) onto key's
// array and makes the key due as the flush policy says, by the server's
// clock. It returns the array's length in bytes before the append.
func Append(ctx context.Context, c rueidis.Client, sp keys.Space, key, items string, n int, caps Caps, f Flush) (int64, error) {
	l, err := mergeScript.Exec(ctx, c,
		[]string{sp.Items(key), sp.Count(key), sp.Ready(), sp.Wake(), sp.Cap(key)},
		[]string{items, strconv.Itoa(n), key, strconv.Itoa(caps.Items), strconv.Itoa(caps.Bytes),
			ms(f.MaxAge), ms(f.Quiet), strconv.Itoa(f.Items), strconv.Itoa(f.Bytes)}).AsInt64()
	return l, appendError(err)
}

// KeyItems is what AppendMany appends to one key.
type KeyItems struct {
	Key   string
	Items string // valid JSON values joined by commas
	N     int    // how many
}

// AppendMany appends to several keys of one queue shard in one script call,
// each as Append does (the caps and flush policy apply per key). errs[i] is
// the outcome of ks[i] (ErrNotArray or *FullError: nothing stored for that
// key) when the call itself succeeded; err is the call's own error, which
// leaves every key's outcome unknown.
func AppendMany(ctx context.Context, c rueidis.Client, sp keys.Space, ks []KeyItems, caps Caps, f Flush) (errs []error, err error) {
	kk := make([]string, 0, 2+3*len(ks))
	kk = append(kk, sp.Ready(), sp.Wake())
	args := make([]string, 0, 6+3*len(ks))
	args = append(args, strconv.Itoa(caps.Items), strconv.Itoa(caps.Bytes),
		ms(f.MaxAge), ms(f.Quiet), strconv.Itoa(f.Items), strconv.Itoa(f.Bytes))
	for _, k := range ks {
		kk = append(kk, sp.Items(k.Key), sp.Count(k.Key), sp.Cap(k.Key))
		args = append(args, k.Key, strconv.Itoa(k.N), k.Items)
	}
	res, err := mergeMany.Exec(ctx, c, kk, args).ToArray()
	if err != nil {
		return nil, err
	}
	if len(res) != len(ks) {
		return nil, fmt.Errorf("merge of %d keys returned %d replies", len(ks), len(res))
	}
	errs = make([]error, len(ks))
	for i, r := range res {
		if msg, err := r.ToString(); err == nil {
			if errs[i] = scriptError(msg); errs[i] == nil {
				errs[i] = errors.New(msg)
			}
		}
	}
	return errs, nil
}

// EvictionPolicy returns the server's maxmemory-policy.
func EvictionPolicy(ctx context.Context, c rueidis.Client) (string, error) {
	kv, err := c.Do(ctx, c.B().ConfigGet().Parameter("maxmemory-policy").Build()).AsStrMap()
	if err != nil {
		return "", err
	}
	p, ok := kv["maxmemory-policy"]
	if !ok {
		return "", errors.New("CONFIG GET maxmemory-policy returned nothing")
	}
	return p, nil
}

// Time returns the server's clock.
func Time(ctx context.Context, c rueidis.Client) (time.Time, error) {
	parts, err := c.Do(ctx, c.B().Time().Build()).AsIntSlice()
	if err != nil {
		return time.Time{}, err
	}
	if len(parts) != 2 {
		return time.Time{}, fmt.Errorf("TIME returned %d values", len(parts))
	}
	return time.Unix(parts[0], parts[1]*1000), nil
}

// Claimed is what Claim took from a shard.
type Claimed struct {
	Keys    []string // due keys, now claimed until the claim deadline
	Retries []Entry  // due retries, now held under the retry lease token
	Next    int64    // earliest due time left on the ready or retry index; 0: none
}

// Lease descriptions, stored in leasemeta: "d:<owner>:<key>" for a drained
// key, "r:<owner>" for a batch of retries. Owners hold no colon.

// KeyLease describes the lease of a drained key.
func KeyLease(owner, key string) string { return "d:" + owner + ":" + key }

// RetryLease describes the lease of a batch of retries.
func RetryLease(owner string) string { return "r:" + owner }

// ParseLease returns the owner and, for a drained key, the key of a lease
// description.
func ParseLease(meta string) (owner, key string, isKey bool) {
	kind, rest, _ := strings.Cut(meta, ":")
	owner, key, _ = strings.Cut(rest, ":")
	return owner, key, kind == "d"
}

// Entry is a stored envelope and its id.
type Entry struct {
	ID, Env string
}

// ClaimArgs are the arguments of Claim.
type ClaimArgs struct {
	Now           int64 // retries due by then are due
	KeysDueBy     int64 // keys due by then are due
	MaxKeys       int
	ClaimUntil    int64 // claimed keys are due again at this time unless drained
	MaxRetries    int
	RetryToken    string
	RetryDeadline int64
	Owner         string // the claiming consumer's name
}

// Claim claims up to a.MaxKeys due keys and, when fewer were due, up to
// a.MaxRetries due retries, which it moves into a lease under a.RetryToken.
func Claim(ctx context.Context, c rueidis.Client, sp keys.Space, a ClaimArgs) (Claimed, error) {
	arr, err := claimScript.Exec(ctx, c,
		[]string{sp.Ready(), sp.Retry(), sp.RetryData(), sp.Leases(), sp.LeaseMeta(), sp.Lease(a.RetryToken)},
		[]string{ms(a.Now), strconv.Itoa(a.MaxKeys), ms(a.ClaimUntil), strconv.Itoa(a.MaxRetries), a.RetryToken, ms(a.RetryDeadline), RetryLease(a.Owner), ms(a.KeysDueBy)},
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

// Drain moves each key's array (and its item count) into a lease with the
// given deadline, with one MULTI/EXEC per key, all keys in one round trip.
// Items appended after a key's EXEC start a fresh array. tokens[i] names the
// lease of keys[i]; owner is the draining consumer's name.
func Drain(ctx context.Context, c rueidis.Client, sp keys.Space, keyNames, tokens []string, deadline int64, owner string) ([]Drained, error) {
	const per = 8 // MULTI, RENAME, RENAME, ZREM, ZADD, HSET, GET, EXEC
	const get = 5 // the GET's place among the EXEC's replies
	cmds := make(rueidis.Commands, 0, per*len(keyNames))
	for i, k := range keyNames {
		lk := sp.Lease(tokens[i])
		cmds = append(cmds,
			c.B().Multi().Build(),
			c.B().Rename().Key(sp.Items(k)).Newkey(lk).Build(),
			c.B().Rename().Key(sp.Count(k)).Newkey(sp.LeaseCount(tokens[i])).Build(),
			c.B().Zrem().Key(sp.Ready()).Member(k).Build(),
			c.B().Zadd().Key(sp.Leases()).ScoreMember().ScoreMember(float64(deadline), tokens[i]).Build(),
			c.B().Hset().Key(sp.LeaseMeta()).FieldValue().FieldValue(tokens[i], KeyLease(owner, k)).Build(),
			c.B().Get().Key(lk).Build(),
			c.B().Exec().Build(),
		)
	}
	res := c.DoMulti(ctx, cmds...)
	out := make([]Drained, len(keyNames))
	var phantom []string
	var errs []error
	for i, k := range keyNames {
		out[i] = Drained{Key: k, Token: tokens[i]}
		exec, err := res[i*per+per-1].ToArray()
		if err == nil && len(exec) != per-2 {
			err = fmt.Errorf("EXEC returned %d replies", len(exec))
		}
		if err != nil {
			// The transaction's fate is unknown: if it ran, the lease is
			// reaped after its deadline and nothing is lost.
			out[i].Missing = true
			errs = append(errs, fmt.Errorf("drain %s: %w", k, err))
			continue
		}
		if err := exec[0].Error(); err != nil {
			// RENAME found no key: another worker drained it first. The
			// lease entry written after it is empty; remove it now.
			out[i].Missing = true
			phantom = append(phantom, tokens[i])
			continue
		}
		out[i].Data, out[i].WrongType, err = value(exec[get])
		if err != nil {
			// Leased but unreadable: the reaper returns it after the deadline.
			out[i].Missing = true
			errs = append(errs, fmt.Errorf("drain %s: %w", k, err))
		}
	}
	if len(phantom) > 0 {
		counts := make([]string, len(phantom))
		for i, t := range phantom {
			counts[i] = sp.LeaseCount(t)
		}
		r := c.DoMulti(ctx,
			c.B().Zrem().Key(sp.Leases()).Member(phantom...).Build(),
			c.B().Hdel().Key(sp.LeaseMeta()).Field(phantom...).Build(),
			c.B().Del().Key(counts...).Build())
		for _, x := range r {
			if err := x.Error(); err != nil {
				errs = append(errs, fmt.Errorf("drain: remove empty leases: %w", err))
			}
		}
	}
	// What was drained is returned along with any error: those batches are
	// leased and must be handled, or they wait for the reaper.
	return out, errors.Join(errs...)
}

// value reads a drained value: its bytes, or wrongType when it is a Redis
// value other than a string.
func value(m rueidis.RedisMessage) (data []byte, wrongType bool, err error) {
	data, err = m.AsBytes()
	if re, ok := rueidis.IsRedisErr(err); ok && strings.HasPrefix(re.Error(), "WRONGTYPE") {
		return nil, true, nil
	}
	return data, false, err
}

// DrainOnce drains each key with the literal at-most-once pattern: one
// MULTI/EXEC of GETDEL and ZREM per key, no lease. A worker that dies after
// the EXEC loses the batch.
func DrainOnce(ctx context.Context, c rueidis.Client, sp keys.Space, keyNames []string) ([]Drained, error) {
	const per = 5 // MULTI, GETDEL, DEL, ZREM, EXEC
	cmds := make(rueidis.Commands, 0, per*len(keyNames))
	for _, k := range keyNames {
		cmds = append(cmds,
			c.B().Multi().Build(),
			c.B().Getdel().Key(sp.Items(k)).Build(),
			c.B().Del().Key(sp.Count(k)).Build(),
			c.B().Zrem().Key(sp.Ready()).Member(k).Build(),
			c.B().Exec().Build(),
		)
	}
	res := c.DoMulti(ctx, cmds...)
	out := make([]Drained, len(keyNames))
	var errs []error
	for i, k := range keyNames {
		out[i] = Drained{Key: k}
		exec, err := res[i*per+per-1].ToArray()
		if err == nil && len(exec) != per-2 {
			err = fmt.Errorf("EXEC returned %d replies", len(exec))
		}
		if err == nil {
			out[i].Data, out[i].WrongType, err = value(exec[0])
		}
		switch {
		case rueidis.IsRedisNil(err):
			out[i].Missing = true
		case err != nil:
			// Without a lease, a batch that ran but could not be read is
			// lost: that is the at-most-once trade.
			out[i].Missing = true
			errs = append(errs, fmt.Errorf("drain %s: %w", k, err))
		}
	}
	return out, errors.Join(errs...)
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
	ID         string // the batch's id (the token when leased)
	Key        string // the batch's key; "" for a retry batch
	Return     string // unfinished items to put back in front of Key's array, as a JSON array; "" for none
	ReturnN    int    // how many items Return holds
	Quarantine bool   // keep the batch's raw value (not a string) under the quarantine key of ID
	MakeReady  bool   // make Key ready: its value needs a worker's look
	Retries    []Scheduled
	Dead       []Entry
	DeadCap    int
	Now        int64
}

// Errors of Settle. With any of them, nothing was changed.
var (
	// ErrLeaseLost reports a settlement refused because the lease had
	// expired and been reaped: the batch's items are being redelivered.
	ErrLeaseLost = errors.New("lease expired before the batch was settled")
	// ErrGone reports a value to quarantine that is no longer there.
	ErrGone = errors.New("the value to quarantine is gone")
)

// Settle applies s: it releases the lease, puts unfinished items back in
// front of their key, and stores retries and dead letters, all at once.
// Nothing is changed when it returns ErrLeaseLost, ErrNotArray (the
// unfinished items cannot go back: the key holds a value that is not an
// array) or ErrGone. A Redis or context error leaves the outcome unknown;
// settling again is safe: a leased batch is then refused with ErrLeaseLost,
// and one without a lease is applied once.
func Settle(ctx context.Context, c rueidis.Client, sp keys.Space, s Settlement) error {
	k, a := settleCall(sp, s)
	return settleResult(settleScript.Exec(ctx, c, k, a).AsInt64())
}

// SettleMany applies many settlements, ss[i] in the queue shard sps[i], in
// one round trip: one EVALSHA each, pipelined (on a Cluster, rueidis sends
// each to its shard's master). errs[i] is what Settle would return for
// ss[i]. Settlements that meet NOSCRIPT (a restarted or flushed server) are
// sent again once the script is loaded (see evalMany).
func SettleMany(ctx context.Context, c rueidis.Client, sps []keys.Space, ss []Settlement) []error {
	calls := make([]scriptCall, len(ss))
	for i, s := range ss {
		calls[i].keys, calls[i].args = settleCall(sps[i], s)
	}
	errs := make([]error, len(ss))
	for i, r := range evalMany(ctx, c, settleScript, calls) {
		errs[i] = settleResult(r.AsInt64())
	}
	return errs
}

// scriptCall is the KEYS and ARGV of one script call.
type scriptCall struct{ keys, args []string }

// evalMany runs script once per call, all in one round trip (pipelined
// EVALSHAs, run in order on each node), and returns the replies in order.
// Calls that met NOSCRIPT (a restarted or flushed server) go once more: the
// first through the script helper, which loads the script, the others
// pipelined again.
func evalMany(ctx context.Context, c rueidis.Client, script script, calls []scriptCall) []rueidis.RedisResult {
	send := func(idx []int) []rueidis.RedisResult {
		cmds := make(rueidis.Commands, len(idx))
		for j, i := range idx {
			cmds[j] = c.B().Evalsha().Sha1(script.sha).Numkeys(int64(len(calls[i].keys))).Key(calls[i].keys...).Arg(calls[i].args...).Build()
		}
		return c.DoMulti(ctx, cmds...)
	}
	all := make([]int, len(calls))
	for i := range all {
		all[i] = i
	}
	res := send(all)
	var again []int
	for i, r := range res {
		if re, ok := rueidis.IsRedisErr(r.Error()); ok && re.IsNoScript() {
			again = append(again, i)
		}
	}
	if len(again) == 0 {
		return res
	}
	res[again[0]] = script.Exec(ctx, c, calls[again[0]].keys, calls[again[0]].args)
	for j, r := range send(again[1:]) {
		res[again[1+j]] = r
	}
	return res
}

// settleCall returns the keys and args of the settle script for s.
func settleCall(sp keys.Space, s Settlement) (k, args []string) {
	src := sp.Lease(s.Token)
	items := src
	if s.Key != "" {
		items = sp.Items(s.Key)
		if s.Token == "" {
			src = items
		}
	}
	flags := ""
	if s.Quarantine {
		flags += "q"
	}
	if s.MakeReady {
		flags += "r"
	}
	args = make([]string, 0, 9+3*len(s.Retries)+2*len(s.Dead))
	args = append(args, s.Token, ms(s.Now), s.Key, s.Return, strconv.Itoa(s.ReturnN), strconv.Itoa(s.DeadCap), flags,
		strconv.Itoa(len(s.Retries)))
	for _, r := range s.Retries {
		args = append(args, r.ID, ms(r.Due), r.Env)
	}
	args = append(args, strconv.Itoa(len(s.Dead)))
	for _, d := range s.Dead {
		args = append(args, d.ID, d.Env)
	}
	count := sp.LeaseCount(s.ID) // unused for a batch of retries
	if s.Key != "" {
		count = sp.Count(s.Key)
	}
	return []string{sp.Leases(), sp.LeaseMeta(), src, items, sp.Ready(), sp.Wake(),
		sp.Retry(), sp.RetryData(), sp.Dead(), sp.DeadData(),
		sp.Quarantine(s.ID), sp.Quarantined(), sp.Settled(s.ID), count, sp.LeaseCount(s.ID)}, args
}

// settleResult turns the settle script's reply into Settle's error.
func settleResult(n int64, err error) error {
	switch {
	case err != nil:
		return err
	case n == 0:
		return ErrLeaseLost
	case n == -1:
		return fmt.Errorf("put back unfinished items: %w", ErrNotArray)
	case n == -2:
		return ErrGone
	}
	return nil
}

// Extend moves the deadline of the given leases, grouped by shard, to
// deadline: one command per shard, all in one round trip. Leases that were
// already reaped are not brought back (XX), and a deadline is never moved
// back (GT), even by an extend that Redis ran late.
func Extend(ctx context.Context, c rueidis.Client, leases map[keys.Space][]string, deadline int64) error {
	cmds := make(rueidis.Commands, 0, len(leases))
	for sp, tokens := range leases {
		if len(tokens) == 0 {
			continue
		}
		cmd := c.B().Zadd().Key(sp.Leases()).Xx().Gt().ScoreMember()
		for _, t := range tokens {
			cmd = cmd.ScoreMember(float64(deadline), t)
		}
		cmds = append(cmds, cmd.Build())
	}
	if len(cmds) == 0 {
		return nil
	}
	var errs []error
	for _, r := range c.DoMulti(ctx, cmds...) {
		if err := r.Error(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Reap returns the items of up to limit leases whose deadline has passed,
// and returns how many it reaped. A lease that cannot be returned yet gets
// retryAt as its new deadline. A lease script that runs more than maxLag ms
// after now on the server's clock (Redis stalled meanwhile) reaps nothing.
// When no lease has expired, as is usual, it costs one read.
func Reap(ctx context.Context, c rueidis.Client, sp keys.Space, now int64, limit int, retryAt, maxLag int64) (int, error) {
	toks, err := c.Do(ctx, c.B().Zrangebyscore().Key(sp.Leases()).Min("-inf").Max(ms(now)).Limit(0, int64(limit)).Build()).AsStrSlice()
	if err != nil || len(toks) == 0 {
		return 0, err
	}
	metas, err := c.Do(ctx, c.B().Hmget().Key(sp.LeaseMeta()).Field(toks...).Build()).ToArray()
	if err != nil {
		return 0, err
	}
	reaped := 0
	var errs []error
	// Latest deadline first: each batch goes back in front of the key, so
	// the oldest must go last to end up first. A lease that fails does not
	// hold up the others.
	for i := len(toks) - 1; i >= 0; i-- {
		tok := toks[i]
		meta, _ := metas[i].ToString()
		_, key, isKey := ParseLease(meta)
		items, count := sp.Lease(tok), sp.LeaseCount(tok)
		if isKey {
			items, count = sp.Items(key), sp.Count(key)
		} else {
			key = ""
		}
		n, err := reapScript.Exec(ctx, c,
			[]string{sp.Leases(), sp.LeaseMeta(), sp.Lease(tok), items, sp.Ready(), sp.Wake(),
				sp.Retry(), sp.RetryData(), count, sp.LeaseCount(tok)},
			[]string{tok, ms(now), meta, key, ms(retryAt), ms(maxLag)}).AsInt64()
		if err != nil {
			errs = append(errs, fmt.Errorf("lease %s: %w", tok, err))
			continue
		}
		reaped += int(n)
	}
	return reaped, errors.Join(errs...)
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

// Register records queues with the caller's shard count in the prefix's
// registry, for the inspector; a queue keeps the largest count recorded. It
// returns the recorded counts, in the order of queues.
func Register(ctx context.Context, c rueidis.Client, prefix string, shards int, queues ...string) ([]int, error) {
	res, err := registerScript.Exec(ctx, c, []string{keys.Registry(prefix)}, append([]string{strconv.Itoa(shards)}, queues...)).AsIntSlice()
	if err != nil {
		return nil, err
	}
	out := make([]int, len(res))
	for i, n := range res {
		out[i] = int(n)
	}
	return out, nil
}

// Type returns the Redis type of the value at key.
func Type(ctx context.Context, c rueidis.Client, key string) (string, error) {
	return c.Do(ctx, c.B().Type().Key(key).Build()).ToString()
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

// CountDead returns the number of dead letters of a shard.
func CountDead(ctx context.Context, c rueidis.Client, sp keys.Space) (int64, error) {
	return c.Do(ctx, c.B().Zcard().Key(sp.Dead()).Build()).AsInt64()
}

// Requeue appends a dead letter's item to the end of its key and removes the
// dead letter, atomically. It reports false when the dead letter was gone.
func Requeue(ctx context.Context, c rueidis.Client, sp keys.Space, id, key, item string) (bool, error) {
	ok, err := RequeueMany(ctx, c, []Requeued{{Space: sp, ID: id, Key: key, Item: item}})
	return ok[0], err[0]
}

// Requeued is a dead letter to requeue.
type Requeued struct {
	Space         keys.Space
	ID, Key, Item string
}

// RequeueMany requeues dead letters as Requeue does each, in one round trip
// (pipelined EVALSHAs, run in order); those that meet NOSCRIPT are sent again
// once the script is loaded (see evalMany). ok[i] and errs[i] are Requeue's
// answers for rs[i].
func RequeueMany(ctx context.Context, c rueidis.Client, rs []Requeued) (ok []bool, errs []error) {
	calls := make([]scriptCall, len(rs))
	for i, r := range rs {
		calls[i] = scriptCall{
			keys: []string{r.Space.Items(r.Key), r.Space.Ready(), r.Space.Wake(), r.Space.Dead(), r.Space.DeadData(), r.Space.Count(r.Key)},
			args: []string{r.ID, r.Item, r.Key},
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
// quarantine, and returns how many dead letters there were.
func PurgeDead(ctx context.Context, c rueidis.Client, sp keys.Space) (int64, error) {
	quarantined, err := c.Do(ctx, c.B().Smembers().Key(sp.Quarantined()).Build()).AsStrSlice()
	if err != nil {
		return 0, err
	}
	cmds := rueidis.Commands{
		c.B().Multi().Build(),
		c.B().Zcard().Key(sp.Dead()).Build(),
		c.B().Del().Key(append([]string{sp.Dead(), sp.DeadData(), sp.Quarantined()}, quarantined...)...).Build(),
		c.B().Exec().Build(),
	}
	exec, err := c.DoMulti(ctx, cmds...)[3].ToArray()
	if err != nil {
		return 0, err
	}
	return exec[0].AsInt64()
}
