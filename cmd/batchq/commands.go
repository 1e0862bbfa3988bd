package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
)

// command is one command of the CLI.
type command struct {
	name     string // as typed: "stats", "dead list"
	synopsis string // its arguments and flags
	summary  string
	example  string // command lines, one a line, without the program name
	// queue says that the first argument is a queue name, key that the
	// second is a key, shards that the second is a shard count; minArgs and
	// maxArgs bound the arguments (maxArgs -1: any number, all queue names).
	queue, key, shards bool
	minArgs, maxArgs   int
	flags              func(fs *flag.FlagSet, o *options)
	check              func(o *options) error
	run                func(ctx context.Context, s *session, args []string) error
}

// commands are the commands, in the order the usage lists them.
var commands = []*command{
	{name: "stats", synopsis: "[QUEUE...]", maxArgs: -1, run: stats,
		summary: "per queue (every registered one by default): shards, ready keys, pending items,\nin flight (batches/items), retries, dead letters, and how long the oldest key has been due",
		example: "-redis 10.0.0.5:6379 stats\nstats orders emails -json"},
	{name: "keys", synopsis: "QUEUE [-by items|bytes|age] [-n 20]", queue: true, minArgs: 1, maxArgs: 1, run: topKeys,
		summary: "the top pending keys of a queue: most items, most bytes, or longest due",
		example: "keys orders -by age -n 5",
		flags: func(fs *flag.FlagSet, o *options) {
			fs.StringVar(&o.by, "by", string(inspect.ByItems), "order: `items`, bytes or age")
			fs.IntVar(&o.n, "n", 20, "how many keys")
		},
		check: func(o *options) error {
			if _, err := inspect.ParseSortBy(o.by); err != nil {
				return fmt.Errorf("-by: unknown order %q: want items, bytes or age", o.by) // not err: "inspect: " means nothing here
			}
			return positive("-n", o.n)
		}},
	{name: "peek", synopsis: "QUEUE KEY", queue: true, key: true, minArgs: 2, maxArgs: 2, run: peek,
		summary: "the pending items of a key, without taking them: its JSON array, pretty-printed\n(byte for byte as \"array\" with -json), and its items, bytes and due time",
		example: "peek orders customer-7\n-json peek orders customer-7 | jq '.array | length'"},
	{name: "retries list", synopsis: "QUEUE [-n 50] [-items]", queue: true, minArgs: 1, maxArgs: 1, run: retriesList,
		summary: "the retries of a queue, soonest due first: id, key, attempts, due time, last error;\ntheir payloads only with -items (they may be sensitive)",
		example: "retries list orders -n 10\n-json retries list orders -items | jq '.retries[].item'",
		flags:   listFlags("retries"), check: func(o *options) error { return positive("-n", o.n) }},
	{name: "dead list", synopsis: "QUEUE [-n 50] [-items]", queue: true, minArgs: 1, maxArgs: 1, run: deadList,
		summary: "the dead letters of a queue, newest first: id, key, attempts, time, error;\ntheir payloads only with -items (they may be sensitive)",
		example: "dead list orders -n 10",
		flags:   listFlags("dead letters"), check: func(o *options) error { return positive("-n", o.n) }},
	{name: "dead requeue", synopsis: "QUEUE (-n N | -all | -id ID...) [-yes]", queue: true, minArgs: 1, maxArgs: 1, run: deadRequeue,
		summary: "append dead letters' items to the end of their keys again, with no attempts: the\nnewest N, all, or those whose ids dead list shows (-id, as often as needed, oldest\nfirst); without -yes, only say what it would requeue",
		example: "dead requeue orders -all -yes\ndead requeue orders -id 2bvyrspclspei1i7a7fbc1mrf4-0000000 -yes",
		flags: func(fs *flag.FlagSet, o *options) {
			fs.IntVar(&o.n, "n", 0, "requeue the newest `N` dead letters")
			fs.BoolVar(&o.all, "all", false, "requeue every dead letter there is when it starts")
			fs.Var((*idList)(&o.ids), "id", "requeue the dead letter `ID` (repeat for more)")
			fs.BoolVar(&o.yes, "yes", false, "do it")
		},
		check: func(o *options) error {
			given := 0
			for _, g := range []bool{o.n != 0, o.all, len(o.ids) > 0} {
				if g {
					given++
				}
			}
			switch {
			case given > 1:
				return errors.New("give one of -n N, -all or -id ID")
			case given == 0:
				return errors.New("say which: -n N, -all or -id ID")
			case o.n != 0:
				return positive("-n", o.n)
			}
			return nil
		}},
	{name: "dead purge", synopsis: "QUEUE [-yes]", queue: true, minArgs: 1, maxArgs: 1, run: deadPurge,
		summary: "delete every dead letter of a queue, and the values kept in quarantine;\nwithout -yes, only say how many it would delete",
		example: "dead purge orders -yes",
		flags: func(fs *flag.FlagSet, o *options) {
			fs.BoolVar(&o.yes, "yes", false, "do it")
		}},
	{name: "queue forget", synopsis: "QUEUE [-yes]", queue: true, minArgs: 1, maxArgs: 1, run: queueForget,
		summary: "take a queue that holds nothing (no pending key, batch in flight, retry or dead letter)\nout of the registry, so that the tools no longer list it; without -yes, only check",
		example: "queue forget spam00001 -yes",
		flags: func(fs *flag.FlagSet, o *options) {
			fs.BoolVar(&o.yes, "yes", false, "do it")
		}},
	{name: "queue create", synopsis: "QUEUE SHARDS [-yes]", queue: true, shards: true, minArgs: 2, maxArgs: 2, run: queueCreate,
		summary: "record a new queue with SHARDS shards, before a producer or worker records the default\n(1 on a single server, two or more on every master of a Redis Cluster); without -yes, only check",
		example: "queue create orders 32 -yes",
		flags: func(fs *flag.FlagSet, o *options) {
			fs.BoolVar(&o.yes, "yes", false, "do it")
		}},
	{name: "queue shards", synopsis: "QUEUE SHARDS [-yes]", queue: true, shards: true, minArgs: 2, maxArgs: 2, run: queueShards,
		summary: "raise the shards of a queue, online: running producers and workers follow within seconds;\ncounts only grow; without -yes, only say what it would do",
		example: "queue shards orders 64 -yes",
		flags: func(fs *flag.FlagSet, o *options) {
			fs.BoolVar(&o.yes, "yes", false, "do it")
		}},
	{name: "workers", synopsis: "[QUEUE...]", maxArgs: -1, run: workers,
		summary: "the live workers (seen within the last 90s), by name: host, pid, queues,\nconcurrency, when each started and was last seen; those of the named queues only, if any",
		example: "workers\nworkers orders -json"},
}

// groups are the commands that take a subcommand, with what 'batchq help
// GROUP' says of them.
var groups = map[string]string{
	"retries": "The retries of a queue: items that failed and wait for their next attempt.",
	"dead":    "The dead letters of a queue: items that failed for good, and values found in a key\nthat were not items.",
	"queue":   "The registry of queues.",
}

// subcommands returns the commands of group, in the order of commands.
func subcommands(group string) []*command {
	var out []*command
	for _, c := range commands {
		if strings.HasPrefix(c.name, group+" ") {
			out = append(out, c)
		}
	}
	return out
}

// subcommandList names the subcommands of group as a usage error does:
// "list, requeue or purge".
func subcommandList(group string) string {
	var names []string
	for _, c := range subcommands(group) {
		names = append(names, strings.TrimPrefix(c.name, group+" "))
	}
	if len(names) < 2 {
		return strings.Join(names, "")
	}
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}

// idList is a flag that may be given many times, each adding an id.
type idList []string

func (l *idList) String() string { return strings.Join(*l, ",") }

func (l *idList) Set(v string) error {
	if v == "" {
		return errors.New("empty id")
	}
	*l = append(*l, v)
	return nil
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

// listFlags returns the flags of a command that lists what, newest or
// soonest first: -n and -items.
func listFlags(what string) func(*flag.FlagSet, *options) {
	return func(fs *flag.FlagSet, o *options) {
		fs.IntVar(&o.n, "n", 50, "how many "+what)
		fs.BoolVar(&o.items, "items", false, "show the items (payloads) too")
	}
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
		// A key stored before CheckKey refused control characters can
		// still be peeked at.
		return keys.CheckStoredKey(args[1])
	}
	if c.shards {
		if _, err := shardCount(args[1]); err != nil {
			return err
		}
	}
	return nil
}

// shardCount parses a shard count argument.
func shardCount(arg string) (int, error) {
	n, err := strconv.Atoi(arg)
	if err != nil || n < 1 || n > keys.MaxShards {
		return 0, fmt.Errorf("shards must be a number from 1 to %d, not %q", keys.MaxShards, arg)
	}
	return n, nil
}

// printUsage writes the usage of every command.
func printUsage(w io.Writer) {
	fmt.Fprint(w, `usage: batchq [flags] COMMAND [args]

batchq inspects the batchq queues on a Redis server, a Redis Cluster or the
master of a Sentinel setup. It only reads, except for dead requeue, dead
purge, queue create, queue shards and queue forget, which do nothing without
-yes.

Commands:
`)
	for _, c := range commands {
		fmt.Fprintf(w, "  %s %s\n%s\n", c.name, c.synopsis, indent(c.summary, "        "))
	}
	fmt.Fprint(w, `  help [COMMAND [SUBCOMMAND]]
        this text, or a command's usage, flags and examples

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
Run 'batchq help COMMAND' for a command's flags and examples.
`)
}

// printCommandUsage writes the usage of c: synopsis, summary, flags and
// examples.
func printCommandUsage(w io.Writer, c *command) {
	fmt.Fprintf(w, "usage: batchq [flags] %s %s\n\n%s\n", c.name, c.synopsis, c.summary)
	if c.flags != nil {
		fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
		c.flags(fs, &options{})
		fmt.Fprintln(w, "\nFlags:")
		fs.SetOutput(w)
		fs.PrintDefaults()
	}
	fmt.Fprintf(w, "\nExamples:\n%s\n", indent(c.example, "  batchq "))
	fmt.Fprintln(w, "\nThe global flags (see 'batchq help') may come before or after the command.")
}

// printGroupUsage writes the usage of a command that takes a subcommand:
// what it is about, and each subcommand's synopsis and summary.
func printGroupUsage(w io.Writer, group string) {
	fmt.Fprintf(w, "usage: batchq [flags] %s SUBCOMMAND [args]\n\n%s\n\nSubcommands:\n", group, groups[group])
	for _, c := range subcommands(group) {
		fmt.Fprintf(w, "  %s %s\n%s\n", strings.TrimPrefix(c.name, group+" "), c.synopsis, indent(c.summary, "        "))
	}
	fmt.Fprintf(w, "\nRun 'batchq help %s SUBCOMMAND' for its flags and examples.\n", group)
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
		due := stamp(k.Due)
		if k.Held {
			due = "held" // an ordered key waits for its batch out
		}
		t.row(cell(k.Key), num(int64(k.Shard)), num(k.Items), num(k.Bytes), due, lag)
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
	case p.Held:
		due = "held: it waits for its batch out, or its failed item's retry"
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

// retriesList prints retries of a queue.
func retriesList(ctx context.Context, s *session, args []string) error {
	queue := args[0]
	rs, err := s.in.Retries(ctx, queue, s.opts.n)
	if err != nil {
		return err
	}
	if s.cfg.json {
		out := struct {
			Queue   string      `json:"queue"`
			Total   int64       `json:"total"`
			Now     time.Time   `json:"now"`
			Retries []retryJSON `json:"retries"`
		}{Queue: queue, Total: rs.Total, Now: rs.Now, Retries: make([]retryJSON, len(rs.Retries))}
		for i, r := range rs.Retries {
			out.Retries[i].Retry = r
			if s.opts.items {
				out.Retries[i].Item = r.Item
			}
		}
		return writeJSON(s.out, out)
	}
	if len(rs.Retries) == 0 {
		_, err := fmt.Fprintf(s.out, "queue %s has no retries\n", cell(queue))
		return err
	}
	head := []string{"ID", "KEY", "ATTEMPTS", "DUE", "IN", "ERROR"}
	if s.opts.items {
		head = append(head, "ITEM")
	}
	t := newTable(s.out, head...)
	for _, r := range rs.Retries {
		e := cell(r.Error)
		switch {
		case r.Corrupt:
			e = cell("[corrupt, goes to dead letters when due] " + r.Error)
		case r.Error == "":
			e = "-"
		}
		in := age(r.Due.Sub(rs.Now))
		if !r.Due.After(rs.Now) {
			in = "overdue " + age(rs.Now.Sub(r.Due))
		}
		key := cell(r.Key)
		if r.Behind > 0 {
			key += fmt.Sprintf(" (+%d behind)", r.Behind)
		}
		row := []string{cell(r.ID), key, num(int64(r.Attempts)), stamp(r.Due), in, clip(e, maxErrorCell)}
		if s.opts.items {
			row = append(row, item(r.Item))
		}
		t.row(row...)
	}
	if err := t.flush(); err != nil {
		return err
	}
	_, err = fmt.Fprintf(s.out, "%d of %s of queue %s\n", len(rs.Retries), retries(rs.Total), cell(queue))
	return err
}

// retries returns "1 retry", "2 retries".
func retries(n int64) string {
	if n == 1 {
		return "1 retry"
	}
	return num(n) + " retries"
}

// retryJSON is a retry in -json output: its item only with -items.
type retryJSON struct {
	inspect.Retry
	Item json.RawMessage `json:"item,omitempty"`
}

// deadRequeue requeues the newest -n dead letters of a queue, all, or
// those named by -id.
func deadRequeue(ctx context.Context, s *session, args []string) error {
	queue := args[0]
	c, err := s.in.DeadLetters(ctx, queue)
	if err != nil {
		return err
	}
	if len(s.opts.ids) > 0 {
		return requeueByID(ctx, s, c, queue)
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

// maxIDsNamed bounds the ids a message names.
const maxIDsNamed = 5

// idNames names ids for a message: each quoted if it must be, and cut, the
// first maxIDsNamed of them.
func idNames(ids []string) string {
	names := make([]string, 0, min(len(ids), maxIDsNamed))
	for _, id := range ids[:min(len(ids), maxIDsNamed)] {
		names = append(names, clip(cell(id), maxIDCell))
	}
	list := strings.Join(names, ", ")
	if more := len(ids) - len(names); more > 0 {
		list += fmt.Sprintf(" and %d more", more)
	}
	return list
}

// requeueByID requeues the dead letters of queue that -id names, oldest
// first, so that the items of a key keep their order. Any id that names no
// letter, or a letter that holds a corrupt value, stops it before it
// requeues anything.
func requeueByID(ctx context.Context, s *session, c *deadletter.Client, queue string) error {
	letters, err := c.Get(ctx, queue, s.opts.ids...)
	if err != nil {
		return err
	}
	found := make(map[string]bool, len(letters))
	for _, d := range letters {
		found[d.ID] = true
	}
	var missing, corrupt []string
	for _, id := range s.opts.ids {
		if !found[id] && !slices.Contains(missing, id) {
			missing = append(missing, id)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("queue %s has no dead letter %s (requeued or purged already? dead list shows the ids)", cell(queue), idNames(missing))
	}
	ids := make([]string, len(letters))
	for i, d := range letters {
		ids[i] = d.ID
		if !d.Requeueable() {
			corrupt = append(corrupt, d.ID)
		}
	}
	switch {
	case len(corrupt) == 1:
		return fmt.Errorf("dead letter %s of queue %s holds a corrupt value, not an item: it cannot be requeued (dead purge deletes it)", idNames(corrupt), cell(queue))
	case len(corrupt) > 1:
		return fmt.Errorf("dead letters %s of queue %s hold corrupt values, not items: they cannot be requeued (dead purge deletes them)", idNames(corrupt), cell(queue))
	}
	if !s.opts.yes {
		return fmt.Errorf("would requeue %s of queue %s: %s; run again with -yes", plural(int64(len(letters)), "dead letter"), cell(queue), idNames(ids))
	}
	slices.SortStableFunc(letters, func(a, b deadletter.Letter) int {
		if n := a.FailedAt.Compare(b.FailedAt); n != 0 {
			return n
		}
		return strings.Compare(a.ID, b.ID)
	})
	n, err := c.Requeue(ctx, letters...)
	if err != nil {
		return fmt.Errorf("requeued %d, then: %w", n, err)
	}
	if s.cfg.json {
		return writeJSON(s.out, struct {
			Queue          string   `json:"queue"`
			Requeued       int64    `json:"requeued"`
			SkippedCorrupt int64    `json:"skipped_corrupt"`
			IDs            []string `json:"ids"`
		}{queue, int64(n), 0, ids})
	}
	if _, err := fmt.Fprintf(s.out, "requeued %s of queue %s\n", plural(int64(n), "dead letter"), cell(queue)); err != nil {
		return err
	}
	if gone := len(letters) - n; gone > 0 {
		_, err = fmt.Fprintf(s.out, "%d were requeued or purged by someone else meanwhile\n", gone)
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

// queueCreate records a new queue with a shard count. A queue that has
// that count already is no error: there is nothing to do, -yes or not.
func queueCreate(ctx context.Context, s *session, args []string) error {
	queue := args[0]
	n, _ := shardCount(args[1]) // checked by checkArgs
	q, err := s.in.Queue(ctx, queue)
	exists := err == nil
	switch {
	case err != nil && !errors.Is(err, inspect.ErrNoQueue) && !errors.Is(err, inspect.ErrBadCount):
		return err
	case errors.Is(err, inspect.ErrBadCount) && !s.opts.yes:
		return fmt.Errorf("would create queue %s with %s, replacing what the registry holds, which is not a count; run again with -yes", cell(queue), plural(int64(n), "shard"))
	case exists && q.Shards != n:
		return fmt.Errorf("queue %s exists with %s", cell(queue), plural(int64(q.Shards), "shard"))
	case !exists && !s.opts.yes:
		return fmt.Errorf("would create queue %s with %s; run again with -yes", cell(queue), plural(int64(n), "shard"))
	case !exists:
		if err := s.in.CreateQueue(ctx, queue, n); err != nil {
			return err
		}
	}
	if s.cfg.json {
		return writeJSON(s.out, struct {
			Queue   string `json:"queue"`
			Shards  int    `json:"shards"`
			Created bool   `json:"created"`
		}{queue, n, !exists})
	}
	if exists {
		_, err = fmt.Fprintf(s.out, "queue %s exists with %s already\n", cell(queue), plural(int64(n), "shard"))
	} else {
		_, err = fmt.Fprintf(s.out, "created queue %s with %s\n", cell(queue), plural(int64(n), "shard"))
	}
	return err
}

// queueShards raises the shard count of a queue. The count it has already
// is no error: there is nothing to do, -yes or not.
func queueShards(ctx context.Context, s *session, args []string) error {
	queue := args[0]
	n, _ := shardCount(args[1]) // checked by checkArgs
	var old int
	if !s.opts.yes {
		q, err := s.in.Queue(ctx, queue)
		switch {
		case errors.Is(err, inspect.ErrNoQueue):
			return s.noQueue(ctx, queue)
		case errors.Is(err, inspect.ErrBadCount):
			return fmt.Errorf("would give queue %s %s, replacing what the registry holds, which is not a count; run again with -yes", cell(queue), plural(int64(n), "shard"))
		case err != nil:
			return err
		case n < q.Shards:
			return fmt.Errorf("queue %s has %s: a queue's shards cannot shrink (the others may hold items)", cell(queue), plural(int64(q.Shards), "shard"))
		case n > q.Shards:
			return fmt.Errorf("would raise the shards of queue %s from %d to %d; run again with -yes", cell(queue), q.Shards, n)
		}
		old = n
	} else {
		var err error
		old, err = s.in.SetShards(ctx, queue, n)
		if errors.Is(err, inspect.ErrNoQueue) {
			return s.noQueue(ctx, queue)
		}
		if err != nil {
			return err
		}
	}
	if s.cfg.json {
		return writeJSON(s.out, struct {
			Queue  string `json:"queue"`
			Shards int    `json:"shards"`
			Was    int    `json:"was"`
		}{queue, n, old})
	}
	var err error
	if old == n {
		_, err = fmt.Fprintf(s.out, "queue %s has %s already\n", cell(queue), plural(int64(n), "shard"))
	} else {
		_, err = fmt.Fprintf(s.out, "queue %s has %d shards (was %d); producers and workers follow within seconds\n", cell(queue), n, old)
	}
	return err
}

// workers prints the live workers, or those of the named queues.
func workers(ctx context.Context, s *session, queues []string) error {
	lw, err := s.in.Workers(ctx)
	if err != nil {
		return err
	}
	if len(queues) > 0 {
		lw.Workers = slices.DeleteFunc(lw.Workers, func(w inspect.Worker) bool {
			return !slices.ContainsFunc(w.Queues, func(q string) bool { return slices.Contains(queues, q) })
		})
	}
	if s.cfg.json {
		lw.Workers = nonNil(lw.Workers)
		return writeJSON(s.out, lw)
	}
	if len(lw.Workers) == 0 {
		msg := fmt.Sprintf("no live worker under prefix %q", s.in.Prefix())
		if len(queues) > 0 {
			names := make([]string, len(queues))
			for i, q := range queues {
				names[i] = cell(q)
			}
			msg += " drains " + strings.Join(names, ", ")
		}
		_, err := fmt.Fprintln(s.out, escapeControls(msg))
		return err
	}
	t := newTable(s.out, "NAME", "HOST", "PID", "QUEUES", "CONCURRENCY", "STARTED", "LAST SEEN")
	for _, w := range lw.Workers {
		seen := age(max(lw.Now.Sub(w.LastSeen), 0)) + " ago"
		if w.Corrupt {
			t.row(clip(cell(w.Name), maxNameCell), "-", "-", "[announcement does not decode]", "-", "-", seen)
			continue
		}
		host, pid := "-", "-"
		if w.Host != "" {
			host = clip(cell(w.Host), maxNameCell)
		}
		if w.PID != 0 {
			pid = num(int64(w.PID))
		}
		t.row(clip(cell(w.Name), maxNameCell), host, pid, clip(cell(strings.Join(w.Queues, ",")), maxQueuesCell),
			num(int64(w.Concurrency)), stamp(w.Started), seen)
	}
	if err := t.flush(); err != nil {
		return err
	}
	_, err = fmt.Fprintf(s.out, "%s seen within %v\n", plural(int64(len(lw.Workers)), "worker"), inspect.WorkerExpiry)
	return err
}
