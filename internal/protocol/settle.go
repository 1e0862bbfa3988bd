package protocol

import (
	"context"
	"strconv"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
)

// Scheduled is a retry to store.
type Scheduled struct {
	ID  string
	Due int64
	Env string
	key string // the key of an ordered retry, which keeps it held
}

// Settlement is the outcome of a batch, applied atomically by Settle.
type Settlement struct {
	Lease      Lease  // the batch's lease; zero for a batch drained without a lease
	ID         string // the batch's id (its lease's token when leased)
	Key        string // the batch's key; "" for a retry batch
	Return     string // unfinished items to put back in front of Key's array, as a JSON array; "" for none
	ReturnN    int    // how many items Return holds
	Quarantine bool   // keep the batch's raw value (not a string) under the quarantine key of ID
	MakeReady  bool   // make Key due: its value needs a worker's look
	Hint       bool   // push a hint on the wake list: a retry is due before the next periodic claim
	Retries    []Scheduled
	Dead       []Entry
	Holds      []string // keys of an ordered queue whose holds end (see Consumer.Order)
	DeadCap    int
	Now        int64
}

// leased reports whether s releases a lease.
func (s *Settlement) leased() bool { return s.Lease.Token != "" }

// done reports whether s only releases a lease: every item of the batch
// succeeded. Such a settlement needs no script.
func (s *Settlement) done() bool {
	return s.Return == "" && !s.Quarantine && !s.MakeReady && len(s.Retries) == 0 && len(s.Dead) == 0 && len(s.Holds) == 0
}

// Settle applies s: it releases the lease, puts unfinished items back in
// front of their key, and stores retries and dead letters, all at once.
// Nothing is changed when it returns ErrLeaseLost, ErrNotArray (the
// unfinished items cannot go back: the key holds a value that is not
// batchq's array) or ErrGone. A Redis or context error leaves the outcome
// unknown; settling again is safe: a leased batch is then refused with
// ErrLeaseLost, and one without a lease is applied once.
func Settle(ctx context.Context, c rueidis.Client, sp keys.Space, s Settlement) error {
	return SettleMany(ctx, c, []keys.Space{sp}, []Settlement{s})[0]
}

// SettleMany applies many settlements, ss[i] in the queue shard sps[i], in
// one round trip, and returns what Settle would for each. A batch whose
// items all succeeded is released by DEL of its lease and ZREM of it from
// the leases index (the DEL first: a reaper that comes between them finds
// an empty lease and only removes it); the others by the settle script,
// one EVALSHA each, pipelined (on a Cluster, rueidis sends each command to
// its shard's master). A batch drained without a lease whose items all
// succeeded needs nothing. Settlements that meet NOSCRIPT (a restarted or
// flushed server) are sent again once the script is loaded.
func SettleMany(ctx context.Context, c rueidis.Client, sps []keys.Space, ss []Settlement) []error {
	errs := make([]error, len(ss))
	var cmds rueidis.Commands
	at := make([]int, len(ss)) // the index in cmds of ss[i]'s deciding reply; -1: none
	var scripted []int         // indexes in ss of the settlements sent as scripts
	var calls []scriptCall
	for i := range ss {
		s := &ss[i]
		switch {
		case s.done() && !s.leased():
			at[i] = -1
		case s.done():
			cmds = append(cmds, releaseCmds(c, sps[i], s.Lease)...)
			at[i] = len(cmds) - 1
		default:
			k, a := settleCall(sps[i], *s)
			calls = append(calls, scriptCall{k, a})
			scripted = append(scripted, i)
			cmds = append(cmds, evalsha(c, settleScript, k, a))
			at[i] = len(cmds) - 1
		}
	}
	if len(cmds) == 0 {
		return errs
	}
	res := c.DoMulti(ctx, cmds...)
	var again []int // indexes in calls that met NOSCRIPT
	for j, i := range scripted {
		if noScript(res[at[i]]) {
			again = append(again, j)
		}
	}
	if len(again) > 0 {
		retry := make([]scriptCall, len(again))
		for n, j := range again {
			retry[n] = calls[j]
		}
		for n, r := range evalMany(ctx, c, settleScript, retry) {
			res[at[scripted[again[n]]]] = r
		}
	}
	for i := range ss {
		switch {
		case at[i] < 0:
		case ss[i].done():
			errs[i] = released(res[at[i]])
		default:
			errs[i] = settleResult(res[at[i]].AsInt64())
		}
	}
	return errs
}

// releaseCmds returns the commands that release lease l of a batch whose
// items all succeeded: DEL of its batch and count, then ZREM of it from the
// leases index. The DEL goes first: a reaper that comes between them finds
// an empty lease and only removes it. The reply to the ZREM says whether
// the lease was still held (see released).
func releaseCmds(c rueidis.Client, sp keys.Space, l Lease) rueidis.Commands {
	return rueidis.Commands{
		c.B().Del().Key(sp.Lease(l.Token), sp.LeaseCount(l.Token)).Build(),
		c.B().Zrem().Key(sp.Leases()).Member(l.String()).Build(),
	}
}

// released reads the reply to the ZREM of releaseCmds: ErrLeaseLost when
// the lease was gone (reaped: the batch is delivered again, unless the
// reaper came between the DEL and the ZREM, and found nothing to put back).
func released(zrem rueidis.RedisResult) error {
	n, err := zrem.AsInt64()
	if err == nil && n == 0 {
		err = ErrLeaseLost
	}
	return err
}

// settleCall returns the keys and args of the settle script for s.
func settleCall(sp keys.Space, s Settlement) (k, args []string) {
	src := sp.Lease(s.Lease.Token)
	items, count := src, sp.LeaseCount(s.ID) // unused for a batch of retries
	if s.Key != "" {
		items, count = sp.Items(s.Key), sp.Count(s.Key)
		if !s.leased() {
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
	if s.Hint {
		flags += "w"
	}
	member := ""
	if s.leased() {
		member = s.Lease.String()
	}
	args = make([]string, 0, 10+3*len(s.Retries)+2*len(s.Dead)+len(s.Holds))
	args = append(args, member, ms(s.Now), s.Key, s.Return, strconv.Itoa(s.ReturnN), strconv.Itoa(s.DeadCap), flags,
		strconv.Itoa(len(s.Retries)))
	for _, r := range s.Retries {
		args = append(args, r.ID, ms(r.Due), r.Env)
	}
	args = append(args, strconv.Itoa(len(s.Dead)))
	for _, d := range s.Dead {
		args = append(args, d.ID, d.Env)
	}
	k = make([]string, 0, 15+2*len(s.Holds))
	k = append(k, sp.Leases(), src, items, count, sp.LeaseCount(s.Lease.Token), sp.Ready(), sp.Later(), sp.Wake(),
		sp.Retry(), sp.RetryData(), sp.Dead(), sp.DeadData(), sp.Quarantine(s.ID), sp.Quarantined(), sp.Settled(s.ID))
	args = append(args, strconv.Itoa(len(s.Holds)))
	for _, h := range s.Holds {
		k = append(k, sp.Hold(h), sp.Items(h))
		args = append(args, h)
	}
	return k, args
}
