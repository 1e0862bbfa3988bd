package protocol

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
)

// Entry is a stored envelope and its id.
type Entry struct {
	ID, Env string
}

// ClaimArgs are the arguments of Claim.
type ClaimArgs struct {
	Now           int64 // retries and scheduled keys due by then are due
	Grace         int64 // ms: a due key on no wake list for this long is stranded
	MaxRetries    int   // 0: claim no retries
	RetryLease    Lease // the lease of the retries claimed
	RetryDeadline int64
}

// Claimed is what Claim did on a shard.
type Claimed struct {
	Retries   []Entry // due retries, now held under the retry lease
	NextKey   int64   // earliest due time of a scheduled key (ms); 0: none
	NextRetry int64   // earliest due time of a retry (ms); 0: none
	Pushed    int     // keys it pushed on the wake list: promoted or stranded
}

// Claim runs the periodic work of a worker on a shard (claim.lua): it
// promotes due scheduled keys, pushes stranded keys again, and moves up to
// a.MaxRetries due retries into a lease.
func Claim(ctx context.Context, c rueidis.Client, sp keys.Space, a ClaimArgs) (Claimed, error) {
	arr, err := claimScript.Exec(ctx, c,
		[]string{sp.Ready(), sp.Later(), sp.Wake(), sp.Retry(), sp.RetryData(), sp.Leases(), sp.Lease(a.RetryLease.Token)},
		[]string{ms(a.Now), ms(a.Grace), strconv.Itoa(a.MaxRetries), a.RetryLease.String(), ms(a.RetryDeadline)},
	).ToArray()
	if err != nil {
		return Claimed{}, memoryError(err)
	}
	if len(arr) != 4 {
		return Claimed{}, fmt.Errorf("claim: unexpected reply of %d elements", len(arr))
	}
	var cl Claimed
	flat, err := arr[0].AsStrSlice()
	if err != nil {
		return Claimed{}, err
	}
	for i := 0; i+1 < len(flat); i += 2 {
		cl.Retries = append(cl.Retries, Entry{ID: flat[i], Env: flat[i+1]})
	}
	if cl.NextKey, err = dueTime(arr[1]); err != nil {
		return Claimed{}, err
	}
	if cl.NextRetry, err = dueTime(arr[2]); err != nil {
		return Claimed{}, err
	}
	pushed, err := arr[3].AsInt64()
	cl.Pushed = int(pushed)
	return cl, err
}

// dueTime parses a due time the claim script returns ("" for none: 0).
func dueTime(m rueidis.RedisMessage) (int64, error) {
	s, err := m.ToString()
	if err != nil || s == "" {
		return 0, err
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, fmt.Errorf("claim: bad due time %q", keys.Short(s))
	}
	return int64(f), nil
}

// Popper pops due keys from wake lists. On Redis 7 it pops several with one
// BLMPOP; on servers without BLMPOP (miniredis, Redis 6.2) one key per
// BLPOP. It is safe for concurrent use.
type Popper struct {
	noBLMPOP atomic.Bool
}

// Pop pops up to max keys from the shard's wake list, blocking up to
// timeout (at least a millisecond) while it is empty; no keys means the
// timeout passed. It uses the server-side timeout, so a timeout does not
// close the connection. Hints (empty strings: the schedule changed) are
// among the keys.
func (p *Popper) Pop(ctx context.Context, c rueidis.Client, sp keys.Space, max int, timeout time.Duration) ([]string, error) {
	secs := max0(timeout.Seconds(), 0.001)
	if !p.noBLMPOP.Load() {
		r := c.Do(ctx, c.B().Blmpop().Timeout(secs).Numkeys(1).Key(sp.Wake()).Left().Count(int64(max)).Build().UnblockOnCancel())
		arr, err := r.ToArray()
		switch {
		case rueidis.IsRedisNil(err):
			return nil, nil
		case err == nil && len(arr) == 2:
			return arr[1].AsStrSlice()
		case err == nil:
			return nil, fmt.Errorf("BLMPOP returned %d values", len(arr))
		case !unknownCommand(err):
			return nil, err
		}
		p.noBLMPOP.Store(true)
	}
	kv, err := c.Do(ctx, c.B().Blpop().Key(sp.Wake()).Timeout(secs).Build().UnblockOnCancel()).AsStrSlice()
	if rueidis.IsRedisNil(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if len(kv) != 2 {
		return nil, fmt.Errorf("BLPOP returned %d values", len(kv))
	}
	return kv[1:], nil
}

// NoBLMPOP makes p pop one key per BLPOP, as on servers without BLMPOP.
func (p *Popper) NoBLMPOP() { p.noBLMPOP.Store(true) }

func max0(a, b float64) float64 {
	if a > b {
		return a
	}
	return b
}

func unknownCommand(err error) bool {
	re, ok := rueidis.IsRedisErr(err)
	return ok && strings.Contains(strings.ToLower(re.Error()), "unknown command")
}

// Unpop puts keys popped from a shard's wake list back on it, for another
// worker: those a worker will not drain after all (it shuts down).
func Unpop(ctx context.Context, c rueidis.Client, sp keys.Space, popped []string) error {
	if len(popped) == 0 {
		return nil
	}
	return c.Do(ctx, c.B().Rpush().Key(sp.Wake()).Element(popped...).Build()).Error()
}

// Drained is one key's batch as a drain found it.
type Drained struct {
	Key       string
	Lease     Lease  // its lease; zero when drained without a lease
	Data      []byte // the array, when the key held a string
	Missing   bool   // the key held nothing (drained by another worker)
	WrongType bool   // the key holds a Redis value that is not a string
}

// A drain moves each key's array (and its count) into a lease with the
// given deadline, and reads it: one MULTI/EXEC for all the keys of a pop.
// Items appended after the EXEC start a fresh array. Without leases
// (at-most-once), each key's array is read and deleted with GETDEL.
type drain struct {
	sp     keys.Space
	keys   []string
	leases []Lease // leases[i] is that of keys[i]; nil: at-most-once
	hold   bool    // an ordered queue's: each key's hold is set to its lease
	extra  int     // replies the EXEC holds after those of the keys
}

// per is how many commands the MULTI holds per key.
func (d drain) per() int {
	switch {
	case d.leases == nil:
		return 3 // GETDEL, DEL, ZREM
	case d.hold:
		return 6 // and SET hold
	}
	return 5 // RENAME, RENAME, ZREM, ZADD, GET
}

// cmds returns the drain's commands: MULTI, per key's, EXEC.
func (d drain) cmds(c rueidis.Client, deadline int64) rueidis.Commands {
	cmds := make(rueidis.Commands, 0, 2+d.per()*len(d.keys))
	cmds = append(cmds, c.B().Multi().Build())
	cmds = d.body(c.B(), cmds, deadline)
	return append(cmds, c.B().Exec().Build())
}

// body appends the commands of each key to cmds.
func (d drain) body(b rueidis.Builder, cmds rueidis.Commands, deadline int64) rueidis.Commands {
	sp := d.sp
	for i, k := range d.keys {
		if d.leases == nil {
			cmds = append(cmds,
				b.Getdel().Key(sp.Items(k)).Build(),
				b.Del().Key(sp.Count(k)).Build(),
				b.Zrem().Key(sp.Ready()).Member(k).Build())
			continue
		}
		l := d.leases[i]
		lk := sp.Lease(l.Token)
		cmds = append(cmds,
			b.Rename().Key(sp.Items(k)).Newkey(lk).Build(),
			b.Rename().Key(sp.Count(k)).Newkey(sp.LeaseCount(l.Token)).Build(),
			b.Zrem().Key(sp.Ready()).Member(k).Build(),
			b.Zadd().Key(sp.Leases()).ScoreMember().ScoreMember(float64(deadline), l.String()).Build(),
			b.Get().Key(lk).Build())
		if d.hold {
			cmds = append(cmds, b.Set().Key(sp.Hold(k)).Value(l.String()).Build())
		}
	}
	return cmds
}

// results reads the replies to the transaction of cmds, MULTI to EXEC. A
// key another worker drained first (its name was on the wake list twice) is
// Missing, and its lease, written anyway, is returned in phantom, to be
// removed. An error leaves what was drained unknown: leases are reaped after
// their deadline, and nothing is lost; batches drained without a lease are
// lost (the at-most-once trade). A transaction Redis refused (EXECABORT)
// drained nothing, and its error is the refusal's cause (see execError).
func (d drain) results(tx []rueidis.RedisResult) (out []Drained, phantom []Lease, err error) {
	out = make([]Drained, len(d.keys))
	for i, k := range d.keys {
		out[i] = Drained{Key: k, Missing: true}
		if d.leases != nil {
			out[i].Lease = d.leases[i]
		}
	}
	arr, err := tx[len(tx)-1].ToArray()
	if err != nil {
		err = execError(tx)
	} else if len(arr) != d.per()*len(d.keys)+d.extra {
		err = fmt.Errorf("EXEC returned %d replies for %d keys", len(arr), len(d.keys))
	}
	if err != nil {
		return out, nil, fmt.Errorf("drain: %w", err)
	}
	var errs []error
	for i, k := range d.keys {
		r := arr[i*d.per() : (i+1)*d.per()]
		v := r[0] // GETDEL
		if d.leases != nil {
			if r[0].Error() != nil { // RENAME found no key
				phantom = append(phantom, d.leases[i])
				continue
			}
			v = r[4] // GET
		}
		data, wrongType, err := value(v)
		switch {
		case rueidis.IsRedisNil(err):
		case err != nil:
			// Leased but unreadable: the reaper returns it after the deadline.
			errs = append(errs, fmt.Errorf("drain %q: %w", keys.Short(k), err))
		default:
			out[i].Data, out[i].WrongType, out[i].Missing = data, wrongType, false
		}
	}
	return out, phantom, errors.Join(errs...)
}

// removePhantoms removes the empty leases a drain wrote for keys another
// worker drained first.
func removePhantoms(ctx context.Context, c rueidis.Client, sp keys.Space, phantom []Lease) error {
	if len(phantom) == 0 {
		return nil
	}
	members := make([]string, len(phantom))
	counts := make([]string, len(phantom))
	for i, l := range phantom {
		members[i], counts[i] = l.String(), sp.LeaseCount(l.Token)
	}
	var errs []error
	for _, x := range c.DoMulti(ctx,
		c.B().Zrem().Key(sp.Leases()).Member(members...).Build(),
		c.B().Del().Key(counts...).Build()) {
		if err := x.Error(); err != nil {
			errs = append(errs, fmt.Errorf("drain: remove empty leases: %w", err))
		}
	}
	return errors.Join(errs...)
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

// lpopCmd pops up to max keys from a shard's wake list without waiting.
func lpopCmd(c rueidis.Client, sp keys.Space, max int) rueidis.Completed {
	return c.B().Lpop().Key(sp.Wake()).Count(int64(max)).Build()
}

// poppedKeys reads the reply to an LPOP with a count: none when the list was
// empty.
func poppedKeys(r rueidis.RedisResult) ([]string, error) {
	ks, err := r.AsStrSlice()
	if rueidis.IsRedisNil(err) {
		return nil, nil
	}
	return ks, err
}

// HeldDue is the due time (ms, 2^53) of a key of an ordered queue that
// waits on the ready index for its hold to end: no claim, sweep or drain
// takes it; the end of the hold makes it due (release_hold in lua/lib.lua,
// which holds the same number).
const HeldDue = 1 << 53

// maxHoldReads bounds how many times an ordered drain reads its keys'
// holds again after a hold changed under its WATCH; then it gives up with
// errHoldsChanging.
const maxHoldReads = 8

// errHoldsChanging reports an ordered drain whose keys' holds changed under
// each of its maxHoldReads WATCHes: busy keys, not a failing Redis. Their
// names go back on the wake list.
var errHoldsChanging = errors.New("the holds of the keys kept changing")

// A Conn is a connection of one fetch loop's own, for the drains of an
// ordered queue's shard: a WATCH holds for its connection only. The zero
// Conn is ready: it takes a connection from the client's pool of dedicated
// ones at first use, and a new one after an error. Close it when the loop
// ends. It is not safe for concurrent use.
type Conn struct {
	dc rueidis.DedicatedClient
}

func (cn *Conn) get(c rueidis.Client) rueidis.DedicatedClient {
	if cn.dc == nil {
		cn.dc, _ = c.Dedicate()
	}
	return cn.dc
}

// Close closes the connection. It is closed rather than given back to the
// pool, since rueidis would send it a DISCARD and UNSUBSCRIBE commands
// there, which batchq's ACL rule does not grant.
func (cn *Conn) Close() {
	if cn.dc != nil {
		cn.dc.Close()
		cn.dc = nil
	}
}

// orderedDrain drains the popped keys of an ordered queue's shard
// (docs/PROTOCOL.md, "Ordered keys"). On conn, it WATCHes the keys' holds
// and reads them; then one MULTI/EXEC drains each key that is not held, as
// a drain does, and sets its hold to its lease, and leaves each key that is
// held on the ready index at HeldDue, where nothing takes it: the end of the
// hold makes it due again. The
// EXEC applies nothing if a hold changed meanwhile (a batch of the key was
// settled): then it reads them again, up to maxHoldReads times. With
// popMax, its first round trip also pops the next keys, returned in next.
// It returns what the drain found, and the leases of keys found missing
// (drained by another worker first), whose holds must end.
func orderedDrain(ctx context.Context, c rueidis.Client, conn *Conn, sp keys.Space, popped []string, leases []Lease, deadline int64, popMax int) (out []Drained, phantom []Lease, next []string, err error) {
	holds := make([]string, len(popped))
	for i, k := range popped {
		holds[i] = sp.Hold(k)
	}
	dc := conn.get(c)
	defer func() {
		if err != nil && !errors.Is(err, errHoldsChanging) {
			conn.Close() // its state is unknown: the next drain takes a new one
		}
	}()
	b := dc.B()
	for try := 1; ; try++ {
		cmds := rueidis.Commands{b.Watch().Key(holds...).Build(), b.Mget().Key(holds...).Build()}
		if popMax > 0 && try == 1 {
			cmds = append(cmds, b.Lpop().Key(sp.Wake()).Count(int64(popMax)).Build())
		}
		res := dc.DoMulti(ctx, cmds...)
		if popMax > 0 && try == 1 {
			if next, err = poppedKeys(res[2]); err != nil {
				return nil, nil, nil, err
			}
		}
		vals, err := res[1].ToArray()
		if err == nil {
			err = res[0].Error()
		}
		if err == nil && len(vals) != len(popped) {
			err = fmt.Errorf("MGET returned %d values for %d holds", len(vals), len(popped))
		}
		if err != nil {
			return nil, nil, next, err
		}
		d := drain{sp: sp, hold: true}
		var held []string
		for i, v := range vals {
			if v.IsNil() {
				d.keys, d.leases = append(d.keys, popped[i]), append(d.leases, leases[i])
			} else {
				held = append(held, popped[i])
			}
		}
		multi := make(rueidis.Commands, 0, 2+d.per()*len(d.keys)+len(held))
		multi = append(multi, b.Multi().Build())
		multi = d.body(b, multi, deadline)
		for _, k := range held {
			multi = append(multi, b.Zadd().Key(sp.Ready()).Xx().ScoreMember().ScoreMember(HeldDue, k).Build())
		}
		multi = append(multi, b.Exec().Build())
		res = dc.DoMulti(ctx, multi...)
		exec := res[len(res)-1]
		if rueidis.IsRedisNil(exec.Error()) { // a hold changed: read them again
			if try == maxHoldReads {
				return nil, nil, next, errHoldsChanging
			}
			continue
		}
		d.extra = len(held) // the replies of the held keys' ZADDs come last
		out, phantom, err = d.results(res)
		return out, phantom, next, err
	}
}
