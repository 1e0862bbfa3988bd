package protocol

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
)

func ms(n int64) string { return strconv.FormatInt(n, 10) }

// Caps bound what one key may hold; 0 means the most there is (MaxKeyItems
// items, 512 MiB).
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

// Payload returns the items of an append as the merge scripts take them,
// joined after a comma and before a closing bracket: ",a,b]".
func Payload(joined string) string { return "," + joined + "]" }

// Append appends n items, as Payload gives them, to key's array and makes
// the key due as the flush policy says; now is the server's time (ms), as
// the caller knows it; acks asks replicas to acknowledge the append. It
// returns ErrNotArray or a *FullError when the key refused them, and
// ErrOutOfMemory when Redis did (nothing stored), an *AckError when they
// were stored but too few replicas acknowledged them; any other error
// leaves it unknown whether they were stored.
func Append(ctx context.Context, c rueidis.Client, sp keys.Space, key, payload string, n int, caps Caps, f Flush, now int64, acks Acks) error {
	if f.MaxAge > 0 {
		// The merge script is the hot path of keys due at once; a flush
		// policy takes the general one.
		errs, err := AppendMany(ctx, c, sp, []KeyItems{{Key: key, Payload: payload, N: n}}, caps, f, now, acks)
		if err != nil {
			return err
		}
		return errs[0]
	}
	k := []string{sp.Items(key), sp.Count(key), sp.Ready(), sp.Wake(), sp.Later()}
	a := []string{payload, strconv.Itoa(n), key, ms(now), strconv.Itoa(caps.Items), strconv.Itoa(caps.Bytes)}
	res, ack := untilNotTryAgain(ctx, func(since int64) (rueidis.RedisResult, error) {
		if since > 0 {
			a[3] = ms(now + since)
		}
		return execAcked(ctx, c, mergeScript, k, a, acks)
	})
	if err := appendError(res.Error()); err != nil {
		return err
	}
	return ack
}

// KeyItems is what AppendMany appends to one key.
type KeyItems struct {
	Key     string
	Payload string // as Payload gives it
	N       int    // how many
}

// AppendMany appends to several keys of one queue shard in one script call,
// each as Append does (the caps and flush policy apply per key), with one
// acknowledgement by replicas for all of them. errs[i] is the outcome of
// ks[i] (ErrNotArray, *FullError or ErrOutOfMemory: nothing stored for
// that key; *AckError: stored, too few replicas acknowledged the call) when
// the call itself succeeded; err is the call's own error, which leaves
// every key's outcome unknown.
func AppendMany(ctx context.Context, c rueidis.Client, sp keys.Space, ks []KeyItems, caps Caps, f Flush, now int64, acks Acks) (errs []error, err error) {
	kk := make([]string, 0, 3+3*len(ks))
	kk = append(kk, sp.Ready(), sp.Wake(), sp.Later())
	args := make([]string, 0, 7+3*len(ks))
	args = append(args, strconv.Itoa(caps.Items), strconv.Itoa(caps.Bytes), ms(now),
		ms(f.MaxAge), ms(f.Quiet), strconv.Itoa(f.Items), strconv.Itoa(f.Bytes))
	for _, k := range ks {
		kk = append(kk, sp.Items(k.Key), sp.Count(k.Key), sp.Cap(k.Key))
		args = append(args, k.Key, strconv.Itoa(k.N), k.Payload)
	}
	reply, ack := untilNotTryAgain(ctx, func(since int64) (rueidis.RedisResult, error) {
		if since > 0 {
			args[2] = ms(now + since)
		}
		return execAcked(ctx, c, mergeMany, kk, args, acks)
	})
	res, err := reply.ToArray()
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
		} else {
			errs[i] = ack
		}
	}
	return errs, nil
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

// Type returns the Redis type of the value at key.
func Type(ctx context.Context, c rueidis.Client, key string) (string, error) {
	return c.Do(ctx, c.B().Type().Key(key).Build()).ToString()
}
