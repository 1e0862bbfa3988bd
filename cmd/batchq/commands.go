package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
)

// command is one command of the CLI.
type command struct {
	name     string // as typed: "stats", "dead list"
	synopsis string // its arguments and flags
	summary  string
	// queue says that the first argument is a queue name, key that the
	// second is a key; minArgs and maxArgs bound the arguments (maxArgs -1:
	// any number, all queue names).
	queue, key       bool
	minArgs, maxArgs int
	flags            func(fs *flag.FlagSet, o *options)
	check            func(o *options) error
	run              func(ctx context.Context, s *session, args []string) error
}

// commands are the commands, in the order the usage lists them.
var commands = []*command{
	{name: "stats", synopsis: "[QUEUE...]", maxArgs: -1, run: stats,
		summary: "per queue (every registered one by default): shards, ready keys, pending items,\nin flight (batches/items), retries, dead letters, and how long the oldest key has been due"},
	{name: "keys", synopsis: "QUEUE [-by items|bytes|age] [-n 20]", queue: true, minArgs: 1, maxArgs: 1, run: topKeys,
		summary: "the top pending keys of a queue: most items, most bytes, or longest due",
		flags: func(fs *flag.FlagSet, o *options) {
			fs.StringVar(&o.by, "by", string(inspect.ByItems), "order: `items`, bytes or age")
			fs.IntVar(&o.n, "n", 20, "how many keys")
		},
		check: func(o *options) error {
			if _, err := inspect.ParseSortBy(o.by); err != nil {
				return fmt.Errorf("-by: %w", err)
			}
			return positive("-n", o.n)
		}},
	{name: "peek", synopsis: "QUEUE KEY", queue: true, key: true, minArgs: 2, maxArgs: 2, run: peek,
		summary: "the pending items of a key, without taking them: its JSON array, pretty-printed\n(byte for byte as \"array\" with -json), and its items, bytes and due time"},
	{name: "dead list", synopsis: "QUEUE [-n 50] [-items]", queue: true, minArgs: 1, maxArgs: 1, run: deadList,
		summary: "the dead letters of a queue, newest first: id, key, attempts, time, error;\ntheir payloads only with -items (they may be sensitive)",
		flags: func(fs *flag.FlagSet, o *options) {
			fs.IntVar(&o.n, "n", 50, "how many dead letters")
			fs.BoolVar(&o.items, "items", false, "show the items (payloads) too")
		},
		check: func(o *options) error { return positive("-n", o.n) }},
	{name: "dead requeue", synopsis: "QUEUE (-n N | -all) [-yes]", queue: true, minArgs: 1, maxArgs: 1, run: deadRequeue,
		summary: "append dead letters' items to the end of their keys again, with no attempts,\nthe newest first; without -yes, only say how many it would requeue",
		flags: func(fs *flag.FlagSet, o *options) {
			fs.IntVar(&o.n, "n", 0, "requeue the newest `N` dead letters")
			fs.BoolVar(&o.all, "all", false, "requeue every dead letter there is when it starts")
			fs.BoolVar(&o.yes, "yes", false, "do it")
		},
		check: func(o *options) error {
			switch {
			case o.all && o.n != 0:
				return errors.New("give -n N or -all, not both")
			case o.all:
				return nil
			case o.n == 0:
				return errors.New("say how many: -n N or -all")
			}
			return positive("-n", o.n)
		}},
	{name: "dead purge", synopsis: "QUEUE [-yes]", queue: true, minArgs: 1, maxArgs: 1, run: deadPurge,
		summary: "delete every dead letter of a queue, and the values kept in quarantine;\nwithout -yes, only say how many it would delete",
		flags: func(fs *flag.FlagSet, o *options) {
			fs.BoolVar(&o.yes, "yes", false, "do it")
		}},
	{name: "queue forget", synopsis: "QUEUE [-yes]", queue: true, minArgs: 1, maxArgs: 1, run: queueForget,
		summary: "take a queue that holds nothing (no pending key, batch in flight, retry or dead letter)\nout of the registry, so that the tools no longer list it; without -yes, only check",
		flags: func(fs *flag.FlagSet, o *options) {
			fs.BoolVar(&o.yes, "yes", false, "do it")
		}},
}

// groups are the commands that take a subcommand, with their subcommands
// as the usage error names them.
var groups = map[string]string{
	"dead":  "list, requeue or purge",
	"queue": "forget",
}

// lookup returns the command called name, or nil.
func lookup(name string) *command {
	for _, c := range commands {
		if c.name == name {
			return c
		}
	}
	return nil
}

func positive(name string, n int) error {
	if n < 1 {
		return fmt.Errorf("%s must be at least 1, got %d", name, n)
	}
	return nil
}

// checkArgs checks the number of args, and the queue names and key among
// them.
func (c *command) checkArgs(args []string) error {
	switch {
	case len(args) < c.minArgs:
		return fmt.Errorf("missing %s", strings.Fields(c.synopsis)[len(args)])
	case c.maxArgs >= 0 && len(args) > c.maxArgs:
		return fmt.Errorf("unexpected argument %q", args[c.maxArgs])
	}
	queues := args // stats [QUEUE...]
	if c.maxArgs >= 0 {
		queues = nil
		if c.queue {
			queues = args[:1]
		}
	}
	for _, q := range queues {
		if err := keys.CheckQueue(q); err != nil {
			return err
		}
	}
	if c.key {
		return keys.CheckKey(args[1])
	}
	return nil
}

// printUsage writes the usage of every command (c nil) or of c.
func printUsage(w io.Writer, c *command) {
	if c != nil {
		fmt.Fprintf(w, "usage: batchq [flags] %s %s\n\n%s\n", c.name, c.synopsis, c.summary)
		if c.flags != nil {
			fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
			c.flags(fs, &options{})
			fmt.Fprintln(w, "\nFlags:")
			fs.SetOutput(w)
			fs.PrintDefaults()
		}
		fmt.Fprintln(w, "\nThe global flags (see 'batchq help') may come before or after the command.")
		return
	}
	fmt.Fprint(w, `usage: batchq [flags] COMMAND [args]

batchq inspects the batchq queues on a Redis server or Redis Cluster. It only
reads, except for dead requeue, dead purge and queue forget, which do nothing
without -yes.

Commands:
`)
	for _, c := range commands {
		fmt.Fprintf(w, "  %s %s\n%s\n", c.name, c.synopsis, indent(c.summary, "        "))
	}
	fmt.Fprint(w, `  help [COMMAND]
        this text, or one command's

Flags, before or after the command:
`)
	fs := flag.NewFlagSet("batchq", flag.ContinueOnError)
	cfg := config{prefix: keys.DefaultPrefix, timeout: defaultTimeout}
	cfg.bind(fs)
	fs.SetOutput(w)
	fs.PrintDefaults()
	fmt.Fprint(w, `
Exit status: 0 on success; 1 on an error (Redis unreachable, no such queue,
a destructive command without -yes, the timeout); 2 on a usage error.
`)
}

func indent(s, by string) string {
	return by + strings.ReplaceAll(s, "\n", "\n"+by)
}

// session is what a command runs with.
type session struct {
	cfg  config
	opts options
	in   *inspect.Inspector
	out  io.Writer
}

// maxKnownQueues bounds the queue names an error lists.
const maxKnownQueues = 20

// noQueue explains that queue is not registered, naming those that are
// (the first maxKnownQueues).
func (s *session) noQueue(ctx context.Context, queue string) error {
	msg := fmt.Sprintf("no queue %q under prefix %q", queue, s.in.Prefix())
	qs, err := s.in.Queues(ctx)
	switch {
	case err != nil:
		return fmt.Errorf("%s (listing the known queues failed: %w)", msg, err)
	case len(qs) == 0:
		return fmt.Errorf("%s; no queue is registered under it (is -prefix right?)", msg)
	}
	names := make([]string, 0, min(len(qs), maxKnownQueues))
	for _, q := range qs[:min(len(qs), maxKnownQueues)] {
		names = append(names, cell(q.Name))
	}
	list := strings.Join(names, ", ")
	if more := len(qs) - len(names); more > 0 {
		list += fmt.Sprintf(" and %d more (batchq stats lists them)", more)
	}
	return fmt.Errorf("%s; known queues: %s", msg, list)
}

// stats prints the state of the named queues, or of every registered one.
func stats(ctx context.Context, s *session, queues []string) error {
	var all []inspect.Stats
	if len(queues) == 0 {
		var err error
		if all, err = s.in.AllStats(ctx); err != nil {
			return err
		}
	}
	for _, q := range queues {
		st, err := s.in.Stats(ctx, q)
		if errors.Is(err, inspect.ErrNoQueue) {
			return s.noQueue(ctx, q)
		}
		if err != nil {
			return err
		}
		all = append(all, st)
	}
	if s.cfg.json {
		return writeJSON(s.out, nonNil(all))
	}
	if len(all) == 0 {
		_, err := fmt.Fprintf(s.out, "no queue is registered under prefix %q\n", s.in.Prefix())
		return err
	}
	t := newTable(s.out, "QUEUE", "SHARDS", "READY KEYS", "PENDING", "IN FLIGHT (B/I)", "RETRIES", "DEAD", "OLDEST")
	partial := false
	for _, st := range all {
		mark := ""
		if st.Partial {
			mark, partial = "+", true
		}
		oldest := "-"
		switch {
		case st.OldestDue.IsZero():
		case st.Lag > 0:
			oldest = age(st.Lag)
		default:
			oldest = "due in " + age(st.OldestDue.Sub(st.Now))
		}
		t.row(cell(st.Queue), num(int64(st.Shards)), num(st.ReadyKeys), num(st.PendingItems)+mark,
			fmt.Sprintf("%d/%d%s", st.InFlightBatches, st.InFlightItems, mark), num(st.Retries), num(st.DeadLetters), oldest)
	}
	if err := t.flush(); err != nil {
		return err
	}
	if partial {
		_, err := fmt.Fprintf(s.out, "+ at least: a shard has more than %d ready keys or leases, and only that many were counted\n", inspect.MaxKeysPerShard)
		return err
	}
	return nil
}

// topKeys prints the top pending keys of a queue.
func topKeys(ctx context.Context, s *session, args []string) error {
	by, _ := inspect.ParseSortBy(s.opts.by) // checked by parse
	ks, err := s.in.Keys(ctx, args[0], by, s.opts.n)
	if err != nil {
		return err
	}
	if s.cfg.json {
		return writeJSON(s.out, nonNil(ks))
	}
	if len(ks) == 0 {
		_, err := fmt.Fprintf(s.out, "queue %s has no pending keys\n", cell(args[0]))
		return err
	}
	t := newTable(s.out, "KEY", "SHARD", "ITEMS", "BYTES", "DUE", "LAG")
	for _, k := range ks {
		lag := "-"
		if k.Lag > 0 {
			lag = age(k.Lag)
		}
		t.row(cell(k.Key), num(int64(k.Shard)), num(k.Items), num(k.Bytes), stamp(k.Due), lag)
	}
	return t.flush()
}

// peek prints what a key holds.
func peek(ctx context.Context, s *session, args []string) error {
	queue, key := args[0], args[1]
	p, err := s.in.Peek(ctx, queue, key)
	if err != nil {
		return err
	}
	if s.cfg.json {
		return writePeekJSON(s.out, queue, p)
	}
	if p.Array == nil {
		_, err := fmt.Fprintf(s.out, "key %s of queue %s holds no pending items\n", cell(key), cell(queue))
		return err
	}
	due := "not on the ready index"
	switch {
	case p.Due.IsZero():
	case p.Lag > 0:
		due = fmt.Sprintf("due %s (%s ago)", stamp(p.Due), age(p.Lag))
	default:
		due = "due " + stamp(p.Due)
	}
	fmt.Fprintf(s.out, "key %s of queue %s (shard %d): %s, %s, %s\n",
		cell(key), cell(queue), p.Shard, plural(p.Items, "item"), plural(p.Bytes, "byte"), due)
	return writeArray(s.out, p.Array)
}

// deadList prints dead letters of a queue.
func deadList(ctx context.Context, s *session, args []string) error {
	queue := args[0]
	c, err := s.in.DeadLetters(ctx, queue)
	if err != nil {
		return err
	}
	total, err := c.Count(ctx, queue)
	if err != nil {
		return err
	}
	dl, err := c.List(ctx, queue, s.opts.n)
	if err != nil {
		return err
	}
	if s.cfg.json {
		out := struct {
			Queue       string     `json:"queue"`
			Total       int64      `json:"total"`
			DeadLetters []deadJSON `json:"dead_letters"`
		}{Queue: queue, Total: total, DeadLetters: make([]deadJSON, len(dl))}
		for i, d := range dl {
			out.DeadLetters[i].Letter = d
			if s.opts.items {
				out.DeadLetters[i].Item = d.Item
			}
		}
		return writeJSON(s.out, out)
	}
	if len(dl) == 0 {
		_, err := fmt.Fprintf(s.out, "queue %s has no dead letters\n", cell(queue))
		return err
	}
	head := []string{"ID", "KEY", "ATTEMPTS", "FAILED AT", "ERROR"}
	if s.opts.items {
		head = append(head, "ITEM")
	}
	t := newTable(s.out, head...)
	for _, d := range dl {
		e := d.Error
		if !d.Requeueable() {
			e = "[corrupt value, cannot be requeued] " + e
		}
		row := []string{cell(d.ID), cell(d.Key), num(int64(d.Attempts)), stamp(d.FailedAt), clip(cell(e), maxErrorCell)}
		if s.opts.items {
			row = append(row, item(d.Item))
		}
		t.row(row...)
	}
	if err := t.flush(); err != nil {
		return err
	}
	_, err = fmt.Fprintf(s.out, "%d of %s of queue %s\n", len(dl), plural(total, "dead letter"), cell(queue))
	return err
}

// deadJSON is a dead letter in -json output: its item only with -items.
type deadJSON struct {
	deadletter.Letter
	Item json.RawMessage `json:"item,omitempty"`
}

// requeuePage bounds the dead letters read at once by dead requeue -all.
const requeuePage = 1000

// deadRequeue requeues the newest -n dead letters of a queue, or all.
func deadRequeue(ctx context.Context, s *session, args []string) error {
	queue := args[0]
	c, err := s.in.DeadLetters(ctx, queue)
	if err != nil {
		return err
	}
	total, err := c.Count(ctx, queue)
	if err != nil {
		return err
	}
	want := total
	if !s.opts.all {
		want = min(int64(s.opts.n), total)
	}
	if !s.opts.yes {
		if want == 0 && !s.cfg.json {
			_, err := fmt.Fprintf(s.out, "queue %s has no dead letters\n", cell(queue))
			return err
		}
		if want > 0 {
			return fmt.Errorf("would requeue %s of queue %s; run again with -yes", plural(want, "dead letter"), cell(queue))
		}
	}
	// want is at most the count at the start, so that letters failing
	// again meanwhile are not requeued in a loop.
	var requeued, skipped int64
	if want > 0 {
		r, sk, err := c.RequeueNewest(ctx, queue, int(want))
		requeued, skipped = int64(r), int64(sk)
		if err != nil {
			return fmt.Errorf("requeued %d, then: %w", requeued, err)
		}
	}
	if s.cfg.json {
		return writeJSON(s.out, struct {
			Queue          string `json:"queue"`
			Requeued       int64  `json:"requeued"`
			SkippedCorrupt int64  `json:"skipped_corrupt"`
		}{queue, requeued, skipped})
	}
	if _, err := fmt.Fprintf(s.out, "requeued %s of queue %s\n", plural(requeued, "dead letter"), cell(queue)); err != nil {
		return err
	}
	if skipped > 0 {
		_, err = fmt.Fprintf(s.out, "skipped %d holding a key's corrupt value, not an item (dead purge deletes them)\n", skipped)
	}
	return err
}

// deadPurge deletes the dead letters of a queue.
func deadPurge(ctx context.Context, s *session, args []string) error {
	queue := args[0]
	c, err := s.in.DeadLetters(ctx, queue)
	if err != nil {
		return err
	}
	n, err := c.Count(ctx, queue)
	if err != nil {
		return err
	}
	if !s.opts.yes {
		if n == 0 && !s.cfg.json {
			_, err := fmt.Fprintf(s.out, "queue %s has no dead letters\n", cell(queue))
			return err
		}
		if n > 0 {
			return fmt.Errorf("would purge %s of queue %s (and the values kept in quarantine); run again with -yes", plural(n, "dead letter"), cell(queue))
		}
	}
	if s.opts.yes {
		// Purge even with none counted: quarantined values may be left.
		if n, err = c.Purge(ctx, queue); err != nil {
			return err
		}
	}
	if s.cfg.json {
		return writeJSON(s.out, struct {
			Queue  string `json:"queue"`
			Purged int64  `json:"purged"`
		}{queue, n})
	}
	_, err = fmt.Fprintf(s.out, "purged %s of queue %s\n", plural(n, "dead letter"), cell(queue))
	return err
}

// queueForget takes an empty queue out of the registry.
func queueForget(ctx context.Context, s *session, args []string) error {
	queue := args[0]
	if !s.opts.yes {
		st, err := s.in.Stats(ctx, queue)
		if err != nil {
			return err
		}
		if n := st.ReadyKeys + st.InFlightBatches + st.Retries + st.DeadLetters; n > 0 {
			return fmt.Errorf("queue %s holds items (%d pending keys, %d batches in flight, %d retries, %d dead letters): it cannot be forgotten",
				cell(queue), st.ReadyKeys, st.InFlightBatches, st.Retries, st.DeadLetters)
		}
		return fmt.Errorf("would forget queue %s, which holds nothing; run again with -yes", cell(queue))
	}
	if err := s.in.Forget(ctx, queue); err != nil {
		return err
	}
	if s.cfg.json {
		return writeJSON(s.out, struct {
			Queue     string `json:"queue"`
			Forgotten bool   `json:"forgotten"`
		}{queue, true})
	}
	_, err := fmt.Fprintf(s.out, "forgot queue %s\n", cell(queue))
	return err
}
