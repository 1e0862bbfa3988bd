package batchq_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"maps"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// aclCommands is every command batchq sends, directly or from its Lua
// scripts (Redis checks script commands against the caller's ACL too), in
// the order of SECURITY.md. CONFIG GET is left out on purpose: the worker
// only reads maxmemory-policy with it, to warn, and is silent when denied.
var aclCommands = []string{
	"evalsha", "eval", // the scripts, through rueidis' script helper
	"watch", "multi", "exec", // the drain transactions (WATCH: ordered queues), a purge
	"get", "mget", "set", "getdel", "strlen", "getrange", "setrange", "incrby", "decrby", // items arrays and counts (MGET: the inspector)
	"del", "exists", "rename", "type", // leases, quarantine, cleanup
	"zadd", "zrem", "zscore", "zcard", "zrange", "zrangebyscore", "zremrangebyrank", // ready, leases, retry, dead
	"hset", "hget", "hmget", "hgetall", "hdel", "hexists", // retrydata, deaddata, retry leases, the registry
	"rpush", "lpop", "blmpop", "blpop", "llen", // wake lists (BLPOP: servers without BLMPOP)
	"sadd", "smembers", "srem", // quarantined
	"wait",           // producers with replica acks: WAIT behind each append
	"asking",         // Redis Cluster: a command sent again to the node a moving slot goes to
	"time",           // the server's clock
	"ping",           // rueidis' keepalive on idle connections
	"client|unblock", // a blocking pop cut short by shutdown, so that its connection is kept
}

// aclSetUser is the ACL SETUSER command that gives user exactly what batchq
// needs under prefix.
func aclSetUser(user, password, prefix string) []string {
	return aclGrant(user, password, prefix, aclCommands)
}

// aclGrant is the ACL SETUSER command that gives user the commands cmds on
// the keys under prefix, and nothing else.
func aclGrant(user, password, prefix string, cmds []string) []string {
	args := []string{"ACL", "SETUSER", user, "reset", "on", ">" + password, "~" + prefix + ":*", "resetchannels", "-@all"}
	for _, c := range cmds {
		args = append(args, "+"+c)
	}
	return args
}

// SECURITY.md gives the same rule the tests check.
func TestACLRuleIsDocumented(t *testing.T) {
	doc, err := os.ReadFile("SECURITY.md")
	if err != nil {
		t.Fatal(err)
	}
	line := strings.Join(aclSetUser("batchq", "CHANGE-ME", "batchq"), " ")
	if !strings.Contains(string(doc), line) {
		t.Fatalf("SECURITY.md does not hold the tested ACL rule:\n%s", line)
	}
}

// redisDo sends one arbitrary command.
func redisDo(ctx context.Context, c rueidis.Client, args ...string) rueidis.RedisResult {
	return c.Do(ctx, c.B().Arbitrary(args...).Build())
}

// userClient connects to addr as user, closed when the test ends.
func userClient(t testing.TB, addr, user, password string) rueidis.Client {
	t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, Username: user, Password: password, DisableCache: true})
	if err != nil {
		t.Fatalf("connect to %s as %s: %v", addr, user, err)
	}
	t.Cleanup(c.Close)
	return c
}

// entryText is a log entry's message and fields, as text.
func entryText(e observer.LoggedEntry) string {
	return e.Message + " " + fmt.Sprint(e.ContextMap())
}

// deniedText reports whether text holds a Redis permission error: NOPERM
// for a command the client sends, or, on Redis 7.0, "The user executing the
// script can't run this command or subcommand" (or access a key) for a
// command a script calls.
func deniedText(text string) bool {
	l := strings.ToLower(text)
	return strings.Contains(l, "noperm") || strings.Contains(l, "permission") ||
		strings.Contains(l, "user executing the script") || strings.Contains(l, "acl failure")
}

// payloadMarker is in every item of the ACL test: no log above debug level
// may show it.
const payloadMarker = "payload-secret-5c1e"

type secretItem struct {
	ID    int    `json:"id"`
	Token string `json:"token"`
}

// callLog records handler calls per queue and item id.
type callLog struct {
	mu    sync.Mutex
	calls map[string]map[int]int
}

func (s *callLog) add(queue string, id int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.calls == nil {
		s.calls = make(map[string]map[int]int)
	}
	if s.calls[queue] == nil {
		s.calls[queue] = make(map[int]int)
	}
	s.calls[queue][id]++
	return s.calls[queue][id]
}

// get returns how many times each item of queue was handled.
func (s *callLog) get(queue string) map[int]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.calls[queue])
}

// commandStats returns the commands the server ran (calls > 0) since its
// stats were last reset, by INFO commandstats name ("get", "config|get").
func commandStats(t testing.TB, c rueidis.Client) map[string]bool {
	t.Helper()
	info, err := redisDo(context.Background(), c, "INFO", "commandstats").ToString()
	must(t, err)
	used := make(map[string]bool)
	for line := range strings.Lines(info) {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":")
		name, isCmd := strings.CutPrefix(name, "cmdstat_")
		if !ok || !isCmd {
			continue
		}
		for kv := range strings.SplitSeq(rest, ",") {
			if v, ok := strings.CutPrefix(kv, "calls="); ok && v != "0" {
				used[name] = true
			}
		}
	}
	return used
}

// aclLog returns the server's ACL LOG entries as maps.
func aclLog(t testing.TB, c rueidis.Client) []map[string]string {
	t.Helper()
	entries, err := redisDo(context.Background(), c, "ACL", "LOG").ToArray()
	must(t, err)
	var out []map[string]string
	for _, e := range entries {
		m, err := e.AsStrMap()
		must(t, err)
		out = append(out, m)
	}
	return out
}

// On Redis Cluster, a master whose slot is migrating answers ASK for the
// keys it no longer holds, and rueidis sends the command again to the
// importing master behind ASKING: a user holding the documented rule reads
// through it, one without +asking cannot (see migration_test.go).
func TestACLOnAMigratingSlot(t *testing.T) {
	nodes := testredis.StartCluster(t)
	ctx := context.Background()
	const user, password, prefix, queue = "app", "s3cret-app-password", "app", "moving"
	sp := keys.For(prefix, queue, 0)
	// The client of a cluster reads the slot map: CLUSTER SLOTS (Redis 7)
	// or SHARDS (Redis 8), optional in SECURITY.md, granted to cluster users.
	grant := func(cmds []string) {
		t.Helper()
		for _, n := range nodes {
			if out, err := n.Command(aclGrant(user, password, prefix, append(slices.Clone(cmds), "cluster|slots", "cluster|shards"))...); err != nil || out != "OK" {
				t.Fatalf("ACL SETUSER on %s: %q, %v", n.Addr, out, err)
			}
		}
	}
	grant(aclCommands)
	c := userClient(t, nodes[0].Addr, user, password)
	p, err := producer.New(c, producer.WithPrefix(prefix), producer.WithDefaultShards(1))
	must(t, err)
	must(t, p.Add(ctx, queue, "k", item{ID: 1}))
	in, err := inspect.New(c, inspect.WithPrefix(prefix))
	must(t, err)
	m := startMigration(t, nodes, sp, nil)
	m.moveKeys()

	peek := func() (inspect.Peeked, error) {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		return in.Peek(pctx, queue, "k")
	}
	grant(slices.DeleteFunc(slices.Clone(aclCommands), func(c string) bool { return c == "asking" }))
	if _, err := peek(); err == nil {
		t.Fatal("a read through ASK succeeded without +asking: the test does not reach the migrating slot")
	}
	if !slices.ContainsFunc(aclLog(t, m.dstAdmin), func(e map[string]string) bool { return e["object"] == "asking" }) {
		t.Fatalf("the read without +asking failed, but the importing master logged no denied ASKING: %v", aclLog(t, m.dstAdmin))
	}
	grant(aclCommands)
	if pk, err := peek(); err != nil || pk.Items != 1 {
		t.Fatalf("peek through ASK with the documented rule: %+v, %v; want the one item", pk.KeyStats, err)
	}
	m.end()
	must(t, p.Add(ctx, queue, "k", item{ID: 2}))
	if pk, err := peek(); err != nil || pk.Items != 2 {
		t.Fatalf("peek after the migration: %+v, %v; want both items", pk.KeyStats, err)
	}
}

// A user holding only the documented rule runs every path of batchq:
// append, drain, handle, retry, dead letters, requeue, purge, reaping an
// abandoned lease (of a key and of a batch of retries), corrupt keys to dead
// letters (with quarantine), at-most-once draining with a capped dead letter
// set, and shutdown with unfinished items. Nothing is denied but the
// optional CONFIG GET, which the worker does not log; the server ran every
// command of the rule and no other; and the user is denied everything
// outside its prefix.
func TestACL(t *testing.T) {
	srv := testredis.Start(t)
	ctx := context.Background()
	const user, password, prefix = "app", "s3cret-app-password", "app"
	admin := srv.Backend(t) // the default user
	admin.Prefix = prefix
	ac := admin.Client
	must(t, redisDo(ctx, ac, aclSetUser(user, password, prefix)...).Error())

	// Keys written by something other than batchq: a string that is not an
	// array, and a hash.
	corrupt := keys.For(prefix, "corrupt", 0)
	must(t, ac.Do(ctx, ac.B().Set().Key(corrupt.Items("garbage")).Value("garbage "+payloadMarker).Build()).Error())
	must(t, ac.Do(ctx, ac.B().Hset().Key(corrupt.Items("hashed")).FieldValue().FieldValue("f", payloadMarker).Build()).Error())
	must(t, ac.Do(ctx, ac.B().Zadd().Key(corrupt.Ready()).ScoreMember().ScoreMember(0, "garbage").ScoreMember(0, "hashed").Build()).Error())
	// From here on the stats count what the user runs (and the admin's
	// keepalive PINGs and stats reads, left out below).
	must(t, redisDo(ctx, ac, "CONFIG", "RESETSTAT").Error())
	must(t, redisDo(ctx, ac, "ACL", "LOG", "RESET").Error())

	uc := userClient(t, srv.Addr, user, password)
	u := testredis.Backend{Name: "redis", Addr: srv.Addr, Client: uc, Prefix: prefix}
	p := newProducer(t, u)
	cons := newDeadLetters(t, u)
	add := func(queue, key string, ids ...int) {
		t.Helper()
		items := make([]any, len(ids))
		for i, id := range ids {
			items[i] = secretItem{ID: id, Token: payloadMarker}
		}
		must(t, p.Add(ctx, queue, key, items...))
	}

	// A consumer takes a key's batch and a batch of retries and dies
	// holding both: the worker's reaper must return them.
	ghost, err := protocol.NewConsumer(uc, protocol.WithPrefix(prefix), protocol.WithLeaseTTL(200*time.Millisecond), protocol.WithName("ghost"))
	must(t, err)
	add("orphan", "k1", 1)
	f, err := ghost.Fetch(ctx, "orphan", 0, 10)
	must(t, err)
	if len(f.Batches) != 1 {
		t.Fatalf("ghost fetched %d batches, want 1", len(f.Batches))
	}
	must(t, ghost.Settle(ctx, f.Batches[0], []protocol.Outcome{{Kind: protocol.Retry, Err: errors.New("ghost"), Delay: 0}}))
	add("orphan", "k2", 2)
	f, err = ghost.Fetch(ctx, "orphan", 0, 10)
	must(t, err)
	if len(f.Batches) != 2 || f.Batches[0].Retry() == f.Batches[1].Retry() {
		t.Fatalf("ghost fetched %d batches, want a key's and one of retries", len(f.Batches))
	}

	// Appended before the workers run; "a" twice, so the second append
	// splices onto a stored array.
	add("ok", "a", 1, 2)
	add("ok", "a", 3)
	add("ok", "b", 4)
	add("flaky", "f", 1, 2, 3)
	add("poison", "p", 1, 2)
	add("once", "o", 1, 2, 3)
	add("ordered", "o", 1, 2, 3)

	// A producer with a cap, group-commit linger and a flush policy with a
	// quiet period: an append the cap refuses takes its count back (DECRBY),
	// the first item of a key sets its latest due time (SET PX).
	capped, err := producer.New(uc, producer.WithPrefix(prefix), producer.WithMaxKeyItems(2), producer.WithLinger(0, 100),
		producer.WithFlushPolicy("capped", producer.FlushPolicy{MaxAge: 50 * time.Millisecond, Quiet: 10 * time.Millisecond}))
	must(t, err)
	must(t, capped.Add(ctx, "capped", "c", secretItem{ID: 1, Token: payloadMarker}, secretItem{ID: 2, Token: payloadMarker}))
	if err := capped.Add(ctx, "capped", "c", secretItem{ID: 3, Token: payloadMarker}); !errors.Is(err, producer.ErrKeyFull) {
		t.Fatalf("append past the cap: %v, want ErrKeyFull", err)
	}
	// A producer that waits for replicas: this server has none, so WAIT
	// answers 0, and the items are stored.
	acked, err := producer.New(uc, producer.WithPrefix(prefix), producer.WithReplicaAcks(1, 10*time.Millisecond))
	must(t, err)
	var ackErr *producer.ReplicaAckError
	if err := acked.Add(ctx, "acked", "a", secretItem{ID: 1, Token: payloadMarker}); !errors.As(err, &ackErr) || ackErr.Err != nil || ackErr.Got != 0 {
		t.Fatalf("append with replica acks: %v, want WAIT to answer 0 replicas", err)
	}

	var s callLog
	log, logs := observed(t)
	w := newWorker(t, u, batchq.WithLogger(log), batchq.WithShutdownTimeout(100*time.Millisecond), batchq.WithConcurrency(8))
	record := func(queue string) func(context.Context, secretItem) error {
		return func(ctx context.Context, it secretItem) error { s.add(queue, it.ID); return nil }
	}
	batchq.Handle(w, "ok", record("ok"))
	batchq.Handle(w, "orphan", record("orphan"))
	batchq.Handle(w, "capped", record("capped"))
	batchq.Handle(w, "acked", record("acked"))
	batchq.Handle(w, "corrupt", record("corrupt"))
	batchq.Handle(w, "flaky", func(ctx context.Context, it secretItem) error {
		if s.add("flaky", it.ID) == 1 {
			return errors.New("transient failure")
		}
		return nil
	}, batchq.WithBackoff(batchq.Constant(10*time.Millisecond)))
	batchq.Handle(w, "ordered", func(ctx context.Context, it secretItem) error {
		if s.add("ordered", it.ID) == 1 && it.ID == 2 {
			return errors.New("transient failure") // holds the key, with item 3 behind it
		}
		return nil
	}, batchq.WithOrderedKeys(), batchq.WithBackoff(batchq.Constant(10*time.Millisecond)))
	batchq.Handle(w, "poison", func(ctx context.Context, it secretItem) error {
		if s.add("poison", it.ID) == 1 {
			return batchq.NoRetry(errors.New("permanent failure"))
		}
		return nil
	})
	started := make(chan struct{}, 10)
	batchq.Handle(w, "slow", func(ctx context.Context, it secretItem) error {
		started <- struct{}{}
		<-ctx.Done() // runs until the shutdown timeout cancels it
		return ctx.Err()
	})
	stop := runWorker(t, w)

	// At-most-once draining (GETDEL), with one dead letter kept per shard.
	once := newWorker(t, u, batchq.WithLogger(log), batchq.WithAtMostOnce(), batchq.WithDeadLetterCap(1))
	batchq.Handle(once, "once", func(ctx context.Context, it secretItem) error {
		s.add("once", it.ID)
		if it.ID < 3 {
			return batchq.NoRetry(errors.New("permanent failure"))
		}
		return nil
	})
	stopOnce := runWorker(t, once)

	count := func(queue string) int64 {
		n, err := cons.Count(ctx, queue)
		must(t, err)
		return n
	}
	// A denied command shows as a permission error in the logs: fail at once.
	denied := func() {
		t.Helper()
		if e := logs.Filter(func(e observer.LoggedEntry) bool { return deniedText(entryText(e)) }).All(); len(e) > 0 {
			t.Fatalf("the batchq user was denied: %s", entryText(e[0]))
		}
	}
	eventually(t, 15*time.Second, "every path done", func() bool {
		denied()
		return maps.Equal(s.get("ok"), map[int]int{1: 1, 2: 1, 3: 1, 4: 1}) &&
			maps.Equal(s.get("flaky"), map[int]int{1: 2, 2: 2, 3: 2}) &&
			maps.Equal(s.get("orphan"), map[int]int{1: 1, 2: 1}) &&
			maps.Equal(s.get("capped"), map[int]int{1: 1, 2: 1}) &&
			maps.Equal(s.get("acked"), map[int]int{1: 1}) &&
			maps.Equal(s.get("once"), map[int]int{1: 1, 2: 1, 3: 1}) &&
			maps.Equal(s.get("ordered"), map[int]int{1: 1, 2: 2, 3: 1}) &&
			count("poison") == 2 && count("corrupt") == 2 && count("once") == 1
	})
	if got := s.get("corrupt"); len(got) != 0 {
		t.Errorf("corrupt keys reached the handler: %v", got)
	}

	// Requeue the dead letters: handled the second time.
	dl, err := cons.List(ctx, "poison", 10)
	must(t, err)
	n, err := cons.Requeue(ctx, dl...)
	must(t, err)
	if n != 2 {
		t.Fatalf("requeued %d dead letters, want 2", n)
	}
	eventually(t, 10*time.Second, "requeued items handled", func() bool {
		denied()
		return maps.Equal(s.get("poison"), map[int]int{1: 2, 2: 2})
	})
	if c := count("poison"); c != 0 {
		t.Errorf("%d dead letters left after requeue", c)
	}
	// Purge the corrupt keys' dead letters and the quarantined hash.
	if n, err := cons.Purge(ctx, "corrupt"); err != nil || n != 2 {
		t.Fatalf("PurgeDead = %d, %v; want 2", n, err)
	}

	// Shutdown with unfinished items: they go back to their key.
	add("slow", "s", 1, 2, 3)
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("slow handler did not start")
	}
	stop()
	stopOnce()

	// Denied: only the optional commands. The worker reads CONFIG GET
	// maxmemory-policy to warn; rueidis' NewClient probes CLUSTER SLOTS
	// (CLUSTER SHARDS from Redis 8) and falls back to a single-server client
	// when refused, and sends CLIENT SETINFO (Redis 7.2+), ignoring a refusal.
	optional := map[string]bool{"config|get": true, "cluster|slots": true, "cluster|shards": true, "client|setinfo": true}
	configDenied := false
	for _, e := range aclLog(t, ac) {
		if e["reason"] != "command" || !optional[e["object"]] {
			t.Errorf("ACL denied the batchq user: %v", e)
		}
		configDenied = configDenied || e["object"] == "config|get"
	}
	if !configDenied {
		t.Error("no worker asked CONFIG GET: the test of its silent refusal proves nothing")
	}
	// The inspector (metrics, status page, CLI) reads every queue as the
	// same user.
	in, err := inspect.New(uc, inspect.WithPrefix(prefix))
	must(t, err)
	all, err := in.AllStats(ctx)
	must(t, err)
	if len(all) == 0 {
		t.Error("the inspector found no queue")
	}
	if _, err := in.Keys(ctx, "slow", inspect.ByItems, 10); err != nil {
		t.Errorf("inspector Keys: %v", err)
	}
	if _, err := in.Peek(ctx, "slow", "s"); err != nil {
		t.Errorf("inspector Peek: %v", err)
	}
	if _, err := in.Retries(ctx, "flaky", 10); err != nil {
		t.Errorf("inspector Retries: %v", err)
	}
	if lw, err := in.Workers(ctx); err != nil || len(lw.Workers) != 0 {
		t.Errorf("inspector Workers after both workers stopped: %+v, %v", lw, err)
	}

	// The server ran exactly the rule's commands for the user.
	used := commandStats(t, ac)
	for _, c := range []string{"hello", "ping", "info", "config|resetstat", "acl|log", "client|setinfo"} {
		delete(used, c) // the handshake, keepalives and the admin's calls
	}
	for _, c := range aclCommands {
		if c == "ping" || c == "blpop" || c == "client|unblock" || c == "asking" {
			// Sent only by idle connections; only to servers without
			// BLMPOP; only when a shutdown cuts a pop short; only to a
			// Redis Cluster whose slot is moving.
			delete(used, c)
			continue
		}
		if !used[c] {
			t.Errorf("the rule grants %s, which batchq never ran", c)
		}
		delete(used, c)
	}
	for c := range used {
		t.Errorf("batchq ran %s, which the rule does not grant", c)
	}

	// The state the admin sees (read after the stats: KEYS is no batchq command).
	if left := pending(t, admin, "slow", []string{"s"}); !slices.Equal(left, []int{1, 2, 3}) {
		t.Errorf("after shutdown key s holds %v, want [1 2 3]", left)
	}
	if ks := testredis.Keys(t, admin, prefix+":*lease*"); len(ks) != 0 {
		t.Errorf("leases left after shutdown: %v", ks)
	}
	if ks := testredis.Keys(t, admin, prefix+":*quarantine*"); len(ks) != 0 {
		t.Errorf("quarantine left after purge: %v", ks)
	}

	// The logs: no permission error, nothing about CONFIG, no payload above
	// debug level, and no warning but the expected ones.
	expectedWarn := map[string]bool{
		"item moved to dead letters":            true,
		"batch failed":                          true,
		"moved a corrupt value to dead letters": true,
	}
	for _, e := range logs.All() {
		text := entryText(e)
		if deniedText(text) || strings.Contains(strings.ToLower(text), "config") || strings.Contains(text, "maxmemory") {
			t.Errorf("log entry about permissions or CONFIG: %s", text)
		}
		if e.Level > zapcore.DebugLevel && strings.Contains(text, payloadMarker) {
			t.Errorf("payload logged at %s: %s", e.Level, text)
		}
		if e.Level >= zapcore.WarnLevel && !expectedWarn[e.Message] {
			t.Errorf("unexpected %s: %s", e.Level, text)
		}
	}
	if logs.FilterMessage("returned the batches of expired leases").Len() == 0 {
		t.Error("the reaper logged no returned lease")
	}

	t.Run("denied outside its prefix", func(t *testing.T) {
		must(t, redisDo(ctx, ac, "SET", "other:secret", "x").Error())
		other, err := producer.New(uc, producer.WithPrefix("other"))
		must(t, err)
		err = other.Add(ctx, "ok", "a", item{ID: 1})
		if err == nil || !strings.Contains(err.Error(), "NOPERM") {
			t.Errorf("Add under another prefix: %v, want a NOPERM error", err)
		}
		oc, err := deadletter.New(uc, deadletter.WithPrefix("other"))
		must(t, err)
		if _, err := oc.Count(ctx, "ok"); err == nil || !strings.Contains(err.Error(), "NOPERM") {
			t.Errorf("CountDead under another prefix: %v, want a NOPERM error", err)
		}
		for _, cmd := range [][]string{
			{"GET", "other:secret"},
			{"KEYS", "*"},
			{"FLUSHALL"},
			{"CONFIG", "SET", "maxmemory-policy", "allkeys-lru"},
			{"PUBLISH", prefix + ":ch", "x"},
			{"SCRIPT", "FLUSH"},
			{"ACL", "LIST"},
		} {
			err := redisDo(ctx, uc, cmd...).Error()
			if err == nil || !strings.Contains(err.Error(), "NOPERM") {
				t.Errorf("%s: %v, want a NOPERM error", strings.Join(cmd, " "), err)
			}
		}
		// Admin's own key is untouched.
		if v, err := ac.Do(ctx, ac.B().Get().Key("other:secret").Build()).ToString(); err != nil || v != "x" {
			t.Errorf("other:secret = %q, %v", v, err)
		}
	})
}

// A wrong password fails the connection with a clear WRONGPASS error,
// whether the user exists or not.
func TestWrongPassword(t *testing.T) {
	srv := testredis.Start(t)
	ctx := context.Background()
	admin := srv.Backend(t)
	must(t, redisDo(ctx, admin.Client, aclSetUser("app", "right", "app")...).Error())
	for _, user := range []string{"app", "nobody"} {
		start := time.Now()
		c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}, Username: user, Password: "wrong", DisableCache: true})
		if err == nil {
			// A client that connects lazily fails on its first command.
			err = c.Do(ctx, c.B().Ping().Build()).Error()
			c.Close()
		}
		if err == nil || !strings.Contains(err.Error(), "WRONGPASS") {
			t.Errorf("user %s with a wrong password: %v, want a WRONGPASS error", user, err)
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("user %s: the refusal took %v", user, took)
		}
	}
	// The right password works.
	c := userClient(t, srv.Addr, "app", "right")
	p, err := producer.New(c, producer.WithPrefix("app"))
	must(t, err)
	must(t, p.Add(ctx, "q", "k", item{ID: 1}))
}

// writeTLSFiles writes a CA and a server certificate for 127.0.0.1 and
// localhost, signed by the CA, into dir, and returns their paths and the CA.
func writeTLSFiles(t testing.TB, dir string) (certFile, keyFile, caFile string, ca *x509.Certificate) {
	t.Helper()
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "batchq test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	must(t, err)
	ca, err = x509.ParseCertificate(caDER)
	must(t, err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "batchq test redis"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	must(t, err)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	must(t, err)
	write := func(name, typ string, b []byte) string {
		path := filepath.Join(dir, name)
		must(t, os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600))
		return path
	}
	return write("redis.crt", "CERTIFICATE", der), write("redis.key", "PRIVATE KEY", keyDER), write("ca.crt", "CERTIFICATE", caDER), ca
}

// A producer and a worker run end to end over TLS, trusting the CA; a
// client that does not trust it, and a plain connection, are refused.
func TestTLS(t *testing.T) {
	certFile, keyFile, caFile, ca := writeTLSFiles(t, t.TempDir())
	srv := testredis.StartTLS(t, certFile, keyFile, caFile)
	ctx := context.Background()
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	c, err := rueidis.NewClient(rueidis.ClientOption{
		InitAddress:  []string{srv.Addr},
		TLSConfig:    &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
		DisableCache: true,
	})
	must(t, err)
	t.Cleanup(c.Close)
	b := testredis.Backend{Name: "redis-tls", Addr: srv.Addr, Client: c, Prefix: "tls"}

	var mu sync.Mutex
	handled := make(map[int]int)
	w := newWorker(t, b)
	batchq.Handle(w, "q", func(ctx context.Context, it item) error {
		mu.Lock()
		defer mu.Unlock()
		handled[it.ID]++
		return nil
	})
	runWorker(t, w)
	p := newProducer(t, b)
	const n = 50
	for i := range n {
		must(t, p.Add(ctx, "q", "key"+strconv.Itoa(i%5), item{ID: i}))
	}
	eventually(t, 10*time.Second, "every item handled over TLS", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(handled) == n
	})
	mu.Lock()
	for id, k := range handled {
		if k != 1 {
			t.Errorf("item %d handled %d times", id, k)
		}
	}
	mu.Unlock()

	// A client that does not trust the CA is refused by its own check.
	_, err = rueidis.NewClient(rueidis.ClientOption{
		InitAddress:  []string{srv.Addr},
		TLSConfig:    &tls.Config{RootCAs: x509.NewCertPool()},
		DisableCache: true,
	})
	var unknown x509.UnknownAuthorityError
	if !errors.As(err, &unknown) {
		t.Errorf("client without the CA: %v, want an unknown authority error", err)
	}
	// The server takes no plain connection.
	plain, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr}, DisableCache: true,
		Dialer: net.Dialer{Timeout: time.Second}, ConnWriteTimeout: time.Second})
	if err == nil {
		plain.Close()
		t.Error("a plain connection to the TLS port was accepted")
	}
}

// Two apps with different prefixes on one Redis, using the same queue and
// key names, never see each other's items or dead letters. B's prefix
// starts with A's ("<A>:b"): key names still never meet, though an ACL
// pattern ~<A>:* would cover both (see SECURITY.md).
func TestNamespaces(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		apps := []testredis.Backend{b, b}
		apps[1].Prefix = b.Prefix + ":b"
		type app struct {
			mu      sync.Mutex
			handled map[int]int
		}
		state := []*app{{handled: map[int]int{}}, {handled: map[int]int{}}}
		base := []int{0, 1000}
		const n = 40
		for i, a := range apps {
			w := newWorker(t, a)
			batchq.Handle(w, "shared", func(ctx context.Context, it item) error {
				st := state[i]
				st.mu.Lock()
				st.handled[it.ID]++
				st.mu.Unlock()
				if it.ID%10 == 0 {
					return batchq.NoRetry(errors.New("dead on purpose"))
				}
				return nil
			})
			runWorker(t, w)
		}
		var wg sync.WaitGroup
		for i, a := range apps {
			p := newProducer(t, a)
			wg.Go(func() {
				for j := range n {
					if err := p.Add(ctx, "shared", "key"+strconv.Itoa(j%4), item{ID: base[i] + j}); err != nil {
						t.Errorf("Add: %v", err)
						return
					}
				}
			})
		}
		wg.Wait()
		conss := []*deadletter.Client{newDeadLetters(t, apps[0]), newDeadLetters(t, apps[1])}
		eventually(t, 20*time.Second, "both apps' items handled", func() bool {
			for i := range apps {
				st := state[i]
				st.mu.Lock()
				k := len(st.handled)
				st.mu.Unlock()
				if d, err := conss[i].Count(ctx, "shared"); k < n || err != nil || d < n/10 {
					return false
				}
			}
			return true
		})
		time.Sleep(50 * time.Millisecond) // room for a wrong delivery
		for i := range apps {
			st := state[i]
			st.mu.Lock()
			want := make(map[int]int)
			for j := range n {
				want[base[i]+j] = 1
			}
			if !maps.Equal(st.handled, want) {
				t.Errorf("app %d handled %v, want each of its own %d items once", i, st.handled, n)
			}
			st.mu.Unlock()
			dl, err := conss[i].List(ctx, "shared", 100)
			must(t, err)
			var ids []int
			for _, d := range dl {
				var it item
				must(t, json.Unmarshal(d.Item, &it))
				ids = append(ids, it.ID)
			}
			slices.Sort(ids)
			wantDead := []int{base[i], base[i] + 10, base[i] + 20, base[i] + 30}
			if !slices.Equal(ids, wantDead) {
				t.Errorf("app %d dead letters %v, want %v", i, ids, wantDead)
			}
		}
		// Purging A's dead letters leaves B's.
		if m, err := conss[0].Purge(ctx, "shared"); err != nil || m != n/10 {
			t.Fatalf("purge A: %d, %v", m, err)
		}
		if m, err := conss[1].Count(ctx, "shared"); err != nil || m != n/10 {
			t.Errorf("B has %d dead letters after A's purge (%v), want %d", m, err, n/10)
		}
	})
}
