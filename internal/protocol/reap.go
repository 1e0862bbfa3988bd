package protocol

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
)

// Extend moves the deadline of the given leases, grouped by shard, to
// deadline: one command per shard, all in one round trip. Leases that were
// already reaped are not brought back (XX), and a deadline is never moved
// back (GT), even by an extend that Redis ran late. It returns the leases
// that are gone (reaped, or settled meanwhile): when a shard's command
// changed fewer deadlines than it was given (CH), a second round trip reads
// that shard's leases (ZSCORE) to tell which.
func Extend(ctx context.Context, c rueidis.Client, leases map[keys.Space][]Lease, deadline int64) (gone []Lease, err error) {
	cmds := make(rueidis.Commands, 0, len(leases))
	spaces := make([]keys.Space, 0, len(leases))
	for sp, ls := range leases {
		if len(ls) == 0 {
			continue
		}
		cmd := c.B().Zadd().Key(sp.Leases()).Xx().Gt().Ch().ScoreMember()
		for _, l := range ls {
			cmd = cmd.ScoreMember(float64(deadline), l.String())
		}
		cmds, spaces = append(cmds, cmd.Build()), append(spaces, sp)
	}
	if len(cmds) == 0 {
		return nil, nil
	}
	var errs []error
	var check rueidis.Commands
	var checked []Lease
	for i, r := range c.DoMulti(ctx, cmds...) {
		n, err := r.AsInt64()
		if err != nil {
			// Past maxmemory Redis refuses ZADD: once, not once per shard.
			if err = memoryError(err); !slices.Contains(errs, err) {
				errs = append(errs, err)
			}
			continue
		}
		if ls := leases[spaces[i]]; int(n) < len(ls) {
			for _, l := range ls {
				check = append(check, c.B().Zscore().Key(spaces[i].Leases()).Member(l.String()).Build())
				checked = append(checked, l)
			}
		}
	}
	if len(check) > 0 {
		for i, r := range c.DoMulti(ctx, check...) {
			switch err := r.Error(); {
			case rueidis.IsRedisNil(err):
				gone = append(gone, checked[i])
			case err != nil:
				errs = append(errs, err)
			}
		}
	}
	return gone, errors.Join(errs...)
}

// Reap returns the items of up to limit leases whose deadline has passed,
// and returns how many it reaped. A lease that cannot be returned yet gets
// retryAt as its new deadline. A lease script that runs more than maxLag ms
// after now on the server's clock (Redis stalled meanwhile) reaps nothing.
// When no lease has expired, as is usual, it costs one read.
func Reap(ctx context.Context, c rueidis.Client, sp keys.Space, now int64, limit int, retryAt, maxLag int64) (int, error) {
	members, err := c.Do(ctx, c.B().Zrangebyscore().Key(sp.Leases()).Min("-inf").Max(ms(now)).Limit(0, int64(limit)).Build()).AsStrSlice()
	if err != nil || len(members) == 0 {
		return 0, err
	}
	reaped := 0
	var errs []error
	// Latest deadline first: each batch goes back in front of the key, so
	// the oldest must go last to end up first. A lease that fails does not
	// hold up the others.
	for i := len(members) - 1; i >= 0; i-- {
		l := ParseLease(members[i])
		items, count, hold := sp.Lease(l.Token), sp.LeaseCount(l.Token), sp.Lease(l.Token)
		if l.Key != "" {
			items, count, hold = sp.Items(l.Key), sp.Count(l.Key), sp.Hold(l.Key)
		}
		n, err := reapScript.Exec(ctx, c,
			[]string{sp.Leases(), sp.Lease(l.Token), items, count, sp.LeaseCount(l.Token), sp.Ready(), sp.Later(), sp.Wake(),
				sp.Retry(), sp.RetryData(), hold},
			[]string{members[i], ms(now), l.Key, ms(retryAt), ms(maxLag)}).AsInt64()
		if err = memoryError(err); errors.Is(err, ErrOutOfMemory) {
			// Redis refuses the others' first writes as well.
			return reaped, errors.Join(append(errs, err)...)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("lease %s: %w", l.Token, err))
			continue
		}
		reaped += int(n)
	}
	return reaped, errors.Join(errs...)
}
