package protocol

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/internal/keys"
)

// WorkerExpiry is how long a worker's announcement lasts: three times the
// 30 seconds between a worker's announcements, so that a worker that missed
// two (Redis was away) still counts as live. Older announcements are left
// out of ListWorkers, and pruned by the next worker's announcement.
const WorkerExpiry = 90 * time.Second

// WorkerInfo is what a worker announces about itself (inspect.Worker is its
// public twin: the same fields, converted).
type WorkerInfo struct {
	Name        string    `json:"name"`
	Host        string    `json:"host,omitempty"`
	PID         int       `json:"pid,omitempty"`
	Queues      []string  `json:"queues"`
	Concurrency int       `json:"concurrency"`
	Started     time.Time `json:"started"`
	LastSeen    time.Time `json:"last_seen"`
	// Corrupt marks an announcement whose stored form does not decode:
	// only Name and LastSeen are known.
	Corrupt bool `json:"corrupt,omitempty"`
}

// announcement is how WorkerInfo is stored in workerdata (times in Unix
// ms); LastSeen is the worker's score in the workers index.
type announcement struct {
	Name        string   `json:"name"`
	Host        string   `json:"host,omitempty"`
	PID         int      `json:"pid,omitempty"`
	Queues      []string `json:"queues"`
	Concurrency int      `json:"concurrency"`
	Started     int64    `json:"started"`
}

// Announce registers queues as Register does, and announces the consumer
// as a live worker of them, running concurrency handlers: its name, host,
// process id, queues and concurrency, when it first announced
// itself, and, on the server's clock, when it last did. It is one script
// call, register.lua's, with the registry: an announcement costs no round
// trip of its own. The same call prunes workers not seen for WorkerExpiry.
// A Worker announces itself at start and every 30 seconds, and retires when
// Run returns.
func (c *Consumer) Announce(ctx context.Context, concurrency int, qs ...Known) ([]int, error) {
	now := c.nowMs()
	c.started.CompareAndSwap(0, now)
	c.fixed(qs)
	host, _ := os.Hostname()
	queues := make([]string, len(qs))
	for i, q := range qs {
		queues[i] = q.Queue
	}
	desc, _ := json.Marshal(announcement{Name: c.name, Host: host, PID: os.Getpid(), Queues: queues,
		Concurrency: concurrency, Started: c.started.Load()}) // strings and numbers: it cannot fail
	recorded, err := register(ctx, c.c, []string{keys.Registry(c.prefix), keys.Workers(c.prefix), keys.WorkerData(c.prefix), keys.Grown(c.prefix)},
		append([]string{c.name, string(desc), strconv.FormatInt(WorkerExpiry.Milliseconds(), 10)}, knownArgs(qs)...))
	if err == nil {
		recorded, err = recordNew(ctx, c.c, c.prefix, &c.defaults, qs, recorded)
	}
	if err == nil {
		err = c.readGrown(ctx, queues, recorded)
	}
	if err != nil {
		return nil, fmt.Errorf("announce worker %q: %w", keys.Short(c.name), err)
	}
	return recorded, nil
}

// Retire takes the consumer out of the live workers Announce put it in: a
// Worker retires when Run returns. The data goes first, so that a failure
// between the two commands leaves an index entry, which expires, rather
// than data no index points to.
func (c *Consumer) Retire(ctx context.Context) error {
	for _, r := range c.c.DoMulti(ctx,
		c.c.B().Hdel().Key(keys.WorkerData(c.prefix)).Field(c.name).Build(),
		c.c.B().Zrem().Key(keys.Workers(c.prefix)).Member(c.name).Build()) {
		if err := r.Error(); err != nil {
			return fmt.Errorf("retire worker %q: %w", keys.Short(c.name), err)
		}
	}
	return nil
}

// ListWorkers returns the workers under prefix seen within WorkerExpiry of
// now (the server's clock), sorted by name, in one round trip.
func ListWorkers(ctx context.Context, c rueidis.Client, prefix string, now time.Time) ([]WorkerInfo, error) {
	cutoff := strconv.FormatInt(now.Add(-WorkerExpiry).UnixMilli(), 10)
	res := c.DoMulti(ctx,
		c.B().Zrangebyscore().Key(keys.Workers(prefix)).Min(cutoff).Max("+inf").Withscores().Build(),
		c.B().Hgetall().Key(keys.WorkerData(prefix)).Build())
	seen, err := res[0].AsZScores()
	if err != nil {
		return nil, err
	}
	data, err := res[1].AsStrMap()
	if err != nil {
		return nil, err
	}
	out := make([]WorkerInfo, 0, len(seen))
	for _, z := range seen {
		desc, ok := data[z.Member]
		if !ok {
			continue // retired meanwhile
		}
		w := WorkerInfo{Name: z.Member, LastSeen: time.UnixMilli(int64(z.Score))}
		var a announcement
		if err := json.Unmarshal([]byte(desc), &a); err != nil || a.Name != z.Member {
			w.Corrupt = true // written by another program: listed by what the index knows
		} else {
			w.Host, w.PID, w.Queues, w.Concurrency = a.Host, a.PID, a.Queues, a.Concurrency
			w.Started = time.UnixMilli(a.Started)
		}
		out = append(out, w)
	}
	slices.SortFunc(out, func(a, b WorkerInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}
