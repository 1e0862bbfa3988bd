package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// run closes its client before it returns: nothing of it may linger. A
// client whose connection fails can leave a delayed topology refresh
// behind for up to half a second.
func TestMain(m *testing.M) {
	// The tests give every address and password they mean.
	os.Unsetenv("REDIS_ADDR")
	os.Unsetenv("REDIS_PASSWORD")
	os.Unsetenv("REDIS_SENTINEL_PASSWORD")
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*call).DelayDo.func1"))
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// result is what one run of the command printed and returned.
type result struct {
	code           int
	stdout, stderr string
}

// cli runs the command line args.
func cli(t *testing.T, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(context.Background(), args, &out, &errOut)
	return result{code, out.String(), errOut.String()}
}

// on runs a command against b: -redis and -prefix come first.
func on(t *testing.T, b testredis.Backend, args ...string) result {
	t.Helper()
	return cli(t, append([]string{"-redis", b.Addr, "-prefix", b.Prefix}, args...)...)
}

// ok runs a command against b and fails the test unless it exits 0.
func ok(t *testing.T, b testredis.Backend, args ...string) string {
	t.Helper()
	r := on(t, b, args...)
	if r.code != 0 {
		t.Fatalf("batchq %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// decode decodes the one JSON document of out into v.
func decode(t *testing.T, out string, v any) {
	t.Helper()
	d := json.NewDecoder(strings.NewReader(out))
	if err := d.Decode(v); err != nil {
		t.Fatalf("decode %q: %v", out, err)
	}
	if d.More() {
		t.Fatalf("more than one JSON document: %q", out)
	}
}

// The items the fixture appends, byte for byte as the producer stores them.
var (
	itemsA = []string{`1`, `2`, `3`}
	itemsB = []string{`"` + strings.Repeat("x", 100) + `"`}
	// Whitespace, HTML characters, an escaped slash, unicode and an
	// integer past 2^64: all kept as they are.
	itemsC = []string{`{ "note": "<b>&amp;</b> \/ é", "n": 123456789012345678901234 }`, `[ 1 , 2 ]`}
	// Payloads of the items that end as dead letters.
	secrets = []string{`{"card":"4111-secret-1"}`, `{"card":"4111-secret-2"}`, `{"card":"4111-secret-3"}`}
)

// array is the JSON array holding items.
func array(items []string) string { return "[" + strings.Join(items, ",") + "]" }

// fixture fills b with queues in real states, by a real producer and
// consumer: orders has keys a (3 items), b (1 long item) and c (2 items);
// emails has key u (1 item); payments has 3 dead letters (keys p1 and
// p2), the last with a long error of two lines, and nothing pending.
func fixture(t *testing.T, b testredis.Backend, shards int) {
	t.Helper()
	ctx := context.Background()
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(shards))
	must(t, err)
	add := func(queue, key string, items []string) {
		raws := make([]json.RawMessage, len(items))
		for i, it := range items {
			raws[i] = json.RawMessage(it)
		}
		must(t, p.AddRaw(ctx, queue, key, raws...))
	}
	add("orders", "a", itemsA)
	add("orders", "b", itemsB)
	add("orders", "c", itemsC)
	must(t, p.Add(ctx, "emails", "u", map[string]int{"id": 1}))
	add("payments", "p1", secrets[:2])
	add("payments", "p2", secrets[2:])
	if n := kill(t, b, "payments", shards); n != 3 {
		t.Fatalf("%d dead letters, want 3", n)
	}
}

// longError is the error of the last dead letter of a key.
var longError = "card declined\n" + strings.Repeat("detail ", 30)

// kill fetches every due key of a queue and settles each item as dead, with
// the error "boom" (longError for the last item of a key), and returns the
// queue's dead letters.
func kill(t *testing.T, b testredis.Backend, queue string, shards int) int64 {
	t.Helper()
	ctx := context.Background()
	c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix), protocol.WithDefaultShards(shards))
	must(t, err)
	must(t, c.Sync(ctx))
	for shard := range shards {
		f, err := c.Fetch(ctx, queue, shard, 10)
		must(t, err)
		for _, bt := range f.Batches {
			out := make([]protocol.Outcome, len(bt.Items))
			for i := range out {
				out[i] = protocol.Outcome{Kind: protocol.Dead, Err: errors.New("boom")}
			}
			out[len(out)-1].Err = errors.New(longError)
			must(t, c.Settle(ctx, bt, out))
		}
	}
	return countDead(t, b, queue, shards)
}

// countDead returns the dead letters of a queue, read without the CLI.
func countDead(t *testing.T, b testredis.Backend, queue string, shards int) int64 {
	t.Helper()
	c, err := deadletter.New(b.Client, deadletter.WithPrefix(b.Prefix))
	must(t, err)
	n, err := c.Count(context.Background(), queue)
	must(t, err)
	return n
}

// rows returns the rows of a table (header first), each split into its
// columns (columns hold no spaces in these tests, but "IN FLIGHT (B/I)").
func rows(out string) [][]string {
	var rs [][]string
	for line := range strings.Lines(out) {
		rs = append(rs, strings.Fields(line))
	}
	return rs
}

// column returns column i of the rows of a table after its header.
func column(out string, i int) []string {
	var col []string
	for _, r := range rows(out)[1:] {
		col = append(col, r[i])
	}
	return col
}

func TestStats(t *testing.T) {
	b := testredis.Real(t)
	fixture(t, b, 1)

	var all []inspect.Stats
	decode(t, ok(t, b, "-json", "stats"), &all)
	if len(all) != 3 {
		t.Fatalf("stats -json: %+v", all)
	}
	want := map[string][6]int64{ // shards, ready keys, pending items, in flight, retries, dead
		"emails":   {1, 1, 1, 0, 0, 0},
		"orders":   {1, 3, 6, 0, 0, 0},
		"payments": {1, 0, 0, 0, 0, 3},
	}
	for _, st := range all {
		got := [6]int64{int64(st.Shards), st.ReadyKeys, st.PendingItems, st.InFlightBatches, st.Retries, st.DeadLetters}
		if got != want[st.Queue] {
			t.Errorf("stats -json of %s: %v, want %v", st.Queue, got, want[st.Queue])
		}
	}

	out := ok(t, b, "stats")
	// QUEUE SHARDS READY KEYS PENDING IN FLIGHT (B/I) RETRIES DEAD OLDEST
	rs := rows(out)
	if got := strings.Join(rs[0], " "); got != "QUEUE SHARDS READY KEYS PENDING IN FLIGHT (B/I) RETRIES DEAD OLDEST" {
		t.Fatalf("stats header: %q\n%s", got, out)
	}
	wantRows := [][]string{
		{"emails", "1", "1", "1", "0/0", "0", "0"},
		{"orders", "1", "3", "6", "0/0", "0", "0"},
		{"payments", "1", "0", "0", "0/0", "0", "3", "-"},
	}
	if len(rs) != 4 {
		t.Fatalf("stats: %d rows\n%s", len(rs), out)
	}
	for i, w := range wantRows {
		if got := rs[i+1][:len(w)]; !slices.Equal(got, w) {
			t.Errorf("stats row %d: %q, want %q\n%s", i, got, w, out)
		}
		if _, err := time.ParseDuration(rs[i+1][7]); i < 2 && err != nil {
			t.Errorf("stats row %d: oldest %q is not a duration", i, rs[i+1][7])
		}
	}

	// Named queues only, and the flags after the command.
	decode(t, ok(t, b, "stats", "payments", "-json"), &all)
	if len(all) != 1 || all[0].Queue != "payments" || all[0].DeadLetters != 3 {
		t.Fatalf("stats payments -json: %+v", all)
	}

	// A key not yet due under a flush policy.
	lp, err := producer.New(b.Client, producer.WithPrefix(b.Prefix),
		producer.WithFlushPolicy("later", producer.FlushPolicy{MaxAge: time.Hour}))
	must(t, err)
	must(t, lp.Add(context.Background(), "later", "k", 1))
	out = ok(t, b, "stats", "later")
	if rs := rows(out); len(rs) != 2 || len(rs[1]) != 10 || rs[1][7]+" "+rs[1][8] != "due in" {
		t.Errorf("stats of a key due in an hour:\n%s", out)
	} else if d, err := time.ParseDuration(rs[1][9]); err != nil || d < 50*time.Minute || d > time.Hour {
		t.Errorf("stats of a key due in an hour: due in %q", rs[1][9])
	}

	// Nothing under another prefix.
	r := cli(t, "-redis", b.Addr, "-prefix", b.Prefix+"_empty", "stats")
	if r.code != 0 || !strings.Contains(r.stdout, "no queue is registered under prefix") {
		t.Fatalf("stats of an empty prefix: %+v", r)
	}
	r = cli(t, "-redis", b.Addr, "-prefix", b.Prefix+"_empty", "-json", "stats")
	if r.code != 0 || r.stdout != "[]\n" {
		t.Fatalf("stats -json of an empty prefix: %+v", r)
	}
}

func TestKeys(t *testing.T) {
	b := testredis.Real(t)
	fixture(t, b, 1)

	out := ok(t, b, "keys", "orders")
	if got := column(out, 0); !slices.Equal(got, []string{"a", "c", "b"}) {
		t.Errorf("keys by items (default): %q\n%s", got, out)
	}
	if got := strings.Join(rows(out)[0], " "); got != "KEY SHARD ITEMS BYTES DUE LAG" {
		t.Errorf("keys header: %q", got)
	}
	if got := rows(out)[1][2:4]; !slices.Equal(got, []string{"3", strconv.Itoa(len(array(itemsA)))}) {
		t.Errorf("keys: items and bytes of a: %q\n%s", got, out)
	}
	out = ok(t, b, "keys", "orders", "-by", "bytes", "-n", "2")
	if got := column(out, 0); !slices.Equal(got, []string{"b", "c"}) {
		t.Errorf("keys -by bytes -n 2: %q\n%s", got, out)
	}

	var ks []inspect.KeyStats
	decode(t, ok(t, b, "-json", "keys", "orders", "-by", "age"), &ks)
	if len(ks) != 3 {
		t.Fatalf("keys -by age -json: %+v", ks)
	}
	for i, k := range ks {
		if i > 0 && k.Due.Before(ks[i-1].Due) {
			t.Errorf("keys -by age: %s due before %s: %+v", k.Key, ks[i-1].Key, ks)
		}
	}
	decode(t, ok(t, b, "-json", "keys", "orders", "-by", "bytes"), &ks)
	wantBytes := map[string]int64{"a": int64(len(array(itemsA))), "b": int64(len(array(itemsB))), "c": int64(len(array(itemsC)))}
	if len(ks) != 3 || ks[0].Key != "b" {
		t.Fatalf("keys -by bytes -json: %+v", ks)
	}
	for _, k := range ks {
		if k.Bytes != wantBytes[k.Key] {
			t.Errorf("keys -json: key %s has %d bytes, want %d", k.Key, k.Bytes, wantBytes[k.Key])
		}
	}

	r := on(t, b, "keys", "payments")
	if r.code != 0 || r.stdout != "queue payments has no pending keys\n" {
		t.Errorf("keys of a queue with none: %+v", r)
	}
	r = on(t, b, "-json", "keys", "payments")
	if r.code != 0 || r.stdout != "[]\n" {
		t.Errorf("keys -json of a queue with none: %+v", r)
	}
}

func TestPeek(t *testing.T) {
	b := testredis.Real(t)
	fixture(t, b, 1)

	var p struct {
		Queue string          `json:"queue"`
		Key   string          `json:"key"`
		Items int64           `json:"items"`
		Bytes int64           `json:"bytes"`
		Due   time.Time       `json:"due"`
		Array json.RawMessage `json:"array"`
	}
	decode(t, ok(t, b, "-json", "peek", "orders", "c"), &p)
	if want := array(itemsC); string(p.Array) != want {
		t.Errorf("peek -json array:\n got %s\nwant %s", p.Array, want)
	}
	if p.Queue != "orders" || p.Key != "c" || p.Items != 2 || p.Bytes != int64(len(array(itemsC))) || p.Due.IsZero() {
		t.Errorf("peek -json: %+v", p)
	}

	out := ok(t, b, "peek", "orders", "c")
	var pretty bytes.Buffer
	must(t, json.Indent(&pretty, []byte(array(itemsC)), "", "  "))
	head, body, _ := strings.Cut(out, "\n")
	if body != pretty.String()+"\n" {
		t.Errorf("peek: body\n%s\nwant\n%s", body, pretty.String())
	}
	if want := "key c of queue orders (shard 0): 2 items, " + strconv.Itoa(len(array(itemsC))) + " bytes, due "; !strings.HasPrefix(head, want) {
		t.Errorf("peek: head %q, want it to start with %q", head, want)
	}

	// An empty key; a key holding a string that is not JSON; a hash.
	if out := ok(t, b, "peek", "orders", "nothing"); out != "key nothing of queue orders holds no pending items\n" {
		t.Errorf("peek of an empty key: %q", out)
	}
	ctx := context.Background()
	sp := keys.For(b.Prefix, "orders", 0)
	must(t, b.Client.Do(ctx, b.Client.B().Set().Key(sp.Items("bad")).Value("not\x1b json").Build()).Error())
	if out := ok(t, b, "peek", "orders", "bad"); !strings.Contains(out, `(not JSON, shown quoted)`+"\n"+`"not\x1b json"`) {
		t.Errorf("peek of a key that is not JSON: %q", out)
	}
	var bad struct {
		Array     json.RawMessage `json:"array"`
		ArrayText string          `json:"array_text"`
	}
	decode(t, ok(t, b, "-json", "peek", "orders", "bad"), &bad)
	if string(bad.Array) != "null" || bad.ArrayText != "not\x1b json" {
		t.Errorf("peek -json of a key that is not JSON: %+v", bad)
	}
	must(t, b.Client.Do(ctx, b.Client.B().Hset().Key(sp.Items("h")).FieldValue().FieldValue("f", "v").Build()).Error())
	if r := on(t, b, "peek", "orders", "h"); r.code != 1 || !strings.Contains(r.stderr, "holds a Redis hash") {
		t.Errorf("peek of a hash: %+v", r)
	}
}

// A key of an ordered queue whose batch is out waits for it, held: keys and
// peek say so, and their JSON gives it no due time until the batch is
// settled.
func TestHeldKey(t *testing.T) {
	b := testredis.Real(t)
	ctx := context.Background()
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix))
	must(t, err)
	must(t, p.Add(ctx, "ord", "k", 1))
	c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix))
	must(t, err)
	c.Order("ord")
	must(t, c.Sync(ctx))
	out, err := c.Fetch(ctx, "ord", 0, 10)
	must(t, err)
	if len(out.Batches) != 1 {
		t.Fatalf("fetched %d batches, want 1", len(out.Batches))
	}
	// An item appended while the batch is out waits: a pop leaves it held.
	must(t, p.Add(ctx, "ord", "k", 2))
	if f, err := c.Fetch(ctx, "ord", 0, 10); err != nil || len(f.Batches) != 0 {
		t.Fatalf("fetched %+v, %v from a held key", f.Batches, err)
	}

	type key struct {
		Key  string     `json:"key"`
		Due  *time.Time `json:"due"`
		Held bool       `json:"held"`
	}
	if got := rows(ok(t, b, "keys", "ord")); len(got) != 2 || !slices.Equal(got[1], []string{"k", "0", "1", "3", "held", "-"}) {
		t.Errorf("keys of a held key: %q", got)
	}
	var ks []key
	decode(t, ok(t, b, "-json", "keys", "ord"), &ks)
	if len(ks) != 1 || !ks[0].Held || ks[0].Due != nil {
		t.Errorf("keys -json of a held key: %+v, want held with no due time", ks)
	}
	head, _, _ := strings.Cut(ok(t, b, "peek", "ord", "k"), "\n")
	if want := "key k of queue ord (shard 0): 1 item, 3 bytes, held: it waits for its batch out, or its failed item's retry"; head != want {
		t.Errorf("peek of a held key: %q, want %q", head, want)
	}
	var pk key
	decode(t, ok(t, b, "-json", "peek", "ord", "k"), &pk)
	if pk.Key != "k" || !pk.Held || pk.Due != nil {
		t.Errorf("peek -json of a held key: %+v, want held with no due time", pk)
	}
	pk = key{}
	decode(t, ok(t, b, "-json", "peek", "ord", "none"), &pk)
	if pk.Key != "none" || pk.Held || pk.Due != nil {
		t.Errorf("peek -json of a key on no index: %+v, want no due time", pk)
	}

	// Settled, the batch ends the hold: the key is due again.
	must(t, c.Settle(ctx, out.Batches[0], []protocol.Outcome{{Kind: protocol.Done}}))
	ks = nil
	decode(t, ok(t, b, "-json", "keys", "ord"), &ks)
	if len(ks) != 1 || ks[0].Held || ks[0].Due == nil || ks[0].Due.IsZero() {
		t.Errorf("keys -json once the hold ended: %+v, want k due", ks)
	}
	if got := rows(ok(t, b, "keys", "ord")); len(got) != 2 || got[1][4] == "held" {
		t.Errorf("keys once the hold ended: %q", got)
	}
}

func TestDeadList(t *testing.T) {
	b := testredis.Real(t)
	fixture(t, b, 1)

	out := ok(t, b, "dead", "list", "payments")
	if strings.Contains(out, "secret") {
		t.Errorf("dead list shows payloads without -items:\n%s", out)
	}
	rs := rows(out)
	if got := strings.Join(rs[0], " "); got != "ID KEY ATTEMPTS FAILED AT ERROR" {
		t.Errorf("dead list header: %q", got)
	}
	if len(rs) != 5 || strings.Join(rs[4], " ") != "3 of 3 dead letters of queue payments" {
		t.Fatalf("dead list: want 3 rows and a count\n%s", out)
	}
	var keysSeen []string
	for _, r := range rs[1:4] {
		keysSeen = append(keysSeen, r[1])
		if r[2] != "1" {
			t.Errorf("dead list: attempts %q, want 1", r[2])
		}
		if _, err := time.Parse(time.RFC3339, r[3]); err != nil {
			t.Errorf("dead list: failed at %q: %v", r[3], err)
		}
	}
	slices.Sort(keysSeen)
	if !slices.Equal(keysSeen, []string{"p1", "p1", "p2"}) {
		t.Errorf("dead list keys: %q", keysSeen)
	}
	if !strings.Contains(out, " boom\n") {
		t.Errorf("dead list: no error boom\n%s", out)
	}
	// The long error, quoted for its newline and cut.
	long := strconv.Quote(longError)
	if !strings.Contains(out, long[:maxErrorCell-3]+"...\n") || strings.Contains(out, long[:maxErrorCell]) {
		t.Errorf("dead list: long error not quoted and cut to %d:\n%s", maxErrorCell, out)
	}

	out = ok(t, b, "dead", "list", "payments", "-items", "-n", "2")
	if got := strings.Count(out, "secret"); got != 2 {
		t.Errorf("dead list -items -n 2: %d payloads\n%s", got, out)
	}
	if !strings.HasSuffix(out, "2 of 3 dead letters of queue payments\n") {
		t.Errorf("dead list -n 2: no count\n%s", out)
	}

	var doc struct {
		Queue       string            `json:"queue"`
		Total       int64             `json:"total"`
		DeadLetters []json.RawMessage `json:"dead_letters"`
	}
	decode(t, ok(t, b, "-json", "dead", "list", "payments"), &doc)
	if doc.Queue != "payments" || doc.Total != 3 || len(doc.DeadLetters) != 3 {
		t.Fatalf("dead list -json: %+v", doc)
	}
	for _, raw := range doc.DeadLetters {
		var d deadletter.Letter
		must(t, json.Unmarshal(raw, &d))
		if strings.Contains(string(raw), "secret") || d.Item != nil || d.ID == "" || d.Attempts != 1 || d.FailedAt.IsZero() {
			t.Errorf("dead list -json without -items: %s", raw)
		}
		if d.Error != "boom" && d.Error != longError {
			t.Errorf("dead list -json: error %q", d.Error)
		}
	}
	decode(t, ok(t, b, "-json", "dead", "list", "payments", "-items"), &doc)
	var items []string
	for _, raw := range doc.DeadLetters {
		var d deadletter.Letter
		must(t, json.Unmarshal(raw, &d))
		items = append(items, string(d.Item))
	}
	slices.Sort(items)
	if !slices.Equal(items, secrets) {
		t.Errorf("dead list -json -items: items %q, want %q", items, secrets)
	}
}

// Requeue and purge change nothing without -yes; with it they do what
// they said.
func TestDeadRequeueAndPurge(t *testing.T) {
	b := testredis.Real(t)
	fixture(t, b, 1)
	testRequeueAndPurge(t, b, 1)
}

func testRequeueAndPurge(t *testing.T, b testredis.Backend, shards int) {
	r := on(t, b, "dead", "requeue", "payments", "-all")
	if r.code != 1 || r.stdout != "" || r.stderr != "batchq: would requeue 3 dead letters of queue payments; run again with -yes\n" {
		t.Errorf("dead requeue without -yes: %+v", r)
	}
	r = on(t, b, "dead", "requeue", "payments", "-n", "2")
	if r.code != 1 || !strings.Contains(r.stderr, "would requeue 2 dead letters of queue payments; run again with -yes") {
		t.Errorf("dead requeue -n 2 without -yes: %+v", r)
	}
	if n := countDead(t, b, "payments", shards); n != 3 {
		t.Fatalf("after requeue without -yes: %d dead letters, want 3", n)
	}

	if out := ok(t, b, "dead", "requeue", "payments", "-n", "1", "-yes"); out != "requeued 1 dead letter of queue payments\n" {
		t.Errorf("dead requeue -n 1 -yes: %q", out)
	}
	if n := countDead(t, b, "payments", shards); n != 2 {
		t.Fatalf("after requeue -n 1: %d dead letters, want 2", n)
	}
	var done struct {
		Requeued int64 `json:"requeued"`
	}
	decode(t, ok(t, b, "-json", "dead", "requeue", "payments", "-all", "-yes"), &done)
	if done.Requeued != 2 {
		t.Errorf("dead requeue -all -yes -json: %+v", done)
	}
	if n := countDead(t, b, "payments", shards); n != 0 {
		t.Fatalf("after requeue -all: %d dead letters, want 0", n)
	}
	// The keys hold their items again.
	var got []string
	for _, key := range []string{"p1", "p2"} {
		var p struct {
			Array []json.RawMessage `json:"array"`
		}
		decode(t, ok(t, b, "-json", "peek", "payments", key), &p)
		for _, it := range p.Array {
			got = append(got, string(it))
		}
	}
	slices.Sort(got)
	if !slices.Equal(got, secrets) {
		t.Errorf("items after requeue: %q, want %q", got, secrets)
	}
	if out := ok(t, b, "dead", "requeue", "payments", "-all"); out != "queue payments has no dead letters\n" {
		t.Errorf("dead requeue with none: %q", out)
	}

	// They fail again; purge.
	if n := kill(t, b, "payments", shards); n != 3 {
		t.Fatalf("%d dead letters, want 3", n)
	}
	r = on(t, b, "dead", "purge", "payments")
	if r.code != 1 || !strings.Contains(r.stderr, "would purge 3 dead letters of queue payments") || !strings.Contains(r.stderr, "run again with -yes") {
		t.Errorf("dead purge without -yes: %+v", r)
	}
	if n := countDead(t, b, "payments", shards); n != 3 {
		t.Fatalf("after purge without -yes: %d dead letters, want 3", n)
	}
	if out := ok(t, b, "dead", "purge", "payments", "-yes"); out != "purged 3 dead letters of queue payments\n" {
		t.Errorf("dead purge -yes: %q", out)
	}
	if n := countDead(t, b, "payments", shards); n != 0 {
		t.Fatalf("after purge: %d dead letters, want 0", n)
	}
	if out := ok(t, b, "dead", "list", "payments"); out != "queue payments has no dead letters\n" {
		t.Errorf("dead list after purge: %q", out)
	}
}

// dead requeue -id requeues the letters named, oldest first, and only with
// -yes; an id that names none, or a corrupt letter, stops it before it
// requeues anything.
func TestDeadRequeueByID(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		fixture(t, b, 1)
		testRequeueByID(t, b, 1)

		// A key's corrupt value, named by its id.
		ctx := context.Background()
		sp := keys.For(b.Prefix, "payments", 0)
		must(t, b.Client.Do(ctx, b.Client.B().Set().Key(sp.Items("bad")).Value("not json").Build()).Error())
		must(t, b.Client.Do(ctx, b.Client.B().Zadd().Key(sp.Ready()).ScoreMember().ScoreMember(0, "bad").Build()).Error())
		c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix))
		must(t, err)
		must(t, c.Sync(ctx))
		f, err := c.Fetch(ctx, "payments", 0, 10)
		must(t, err)
		if len(f.Dead) != 1 {
			t.Fatalf("fetch of a corrupt key: %+v", f)
		}
		r := on(t, b, "dead", "requeue", "payments", "-id", f.Dead[0].ID, "-yes")
		if r.code != 1 || !strings.Contains(r.stderr, "holds a corrupt value, not an item: it cannot be requeued (dead purge deletes it)") {
			t.Errorf("dead requeue -id of a corrupt value: %+v", r)
		}
	})
}

// deadIDs returns the ids of a queue's dead letters by key, oldest first,
// read with dead list -json.
func deadIDs(t *testing.T, b testredis.Backend, queue string) map[string][]string {
	t.Helper()
	var doc struct {
		DeadLetters []deadletter.Letter `json:"dead_letters"`
	}
	decode(t, ok(t, b, "-json", "dead", "list", queue), &doc)
	ids := map[string][]string{}
	for _, d := range slices.Backward(doc.DeadLetters) {
		ids[d.Key] = append(ids[d.Key], d.ID)
	}
	return ids
}

func testRequeueByID(t *testing.T, b testredis.Backend, shards int) {
	ids := deadIDs(t, b, "payments")
	if len(ids["p1"]) != 2 || len(ids["p2"]) != 1 {
		t.Fatalf("dead letters by key: %v", ids)
	}
	// dead list shows the ids.
	out := ok(t, b, "dead", "list", "payments")
	for _, id := range append(ids["p1"], ids["p2"]...) {
		if !slices.Contains(column(out, 0), id) {
			t.Errorf("dead list does not show id %s:\n%s", id, out)
		}
	}

	p1 := ids["p1"]
	r := on(t, b, "dead", "requeue", "payments", "-id", p1[1], "-id", p1[0])
	if want := "batchq: would requeue 2 dead letters of queue payments: " + p1[1] + ", " + p1[0] + "; run again with -yes\n"; r.code != 1 || r.stdout != "" || r.stderr != want {
		t.Errorf("dead requeue -id without -yes: %+v, want stderr %q", r, want)
	}
	r = on(t, b, "dead", "requeue", "payments", "-id", p1[0], "-id", "nosuch", "-yes")
	if r.code != 1 || !strings.Contains(r.stderr, "queue payments has no dead letter nosuch (requeued or purged already?") {
		t.Errorf("dead requeue -id of a missing letter: %+v", r)
	}
	if n := countDead(t, b, "payments", shards); n != 3 {
		t.Fatalf("after refusals: %d dead letters, want 3", n)
	}

	// Named newest first, requeued oldest first: p1 gets its items back in
	// their order.
	if out := ok(t, b, "dead", "requeue", "payments", "-id", p1[1], "-id", p1[0], "-yes"); out != "requeued 2 dead letters of queue payments\n" {
		t.Errorf("dead requeue -id -id -yes: %q", out)
	}
	var p struct {
		Array []json.RawMessage `json:"array"`
	}
	decode(t, ok(t, b, "-json", "peek", "payments", "p1"), &p)
	if len(p.Array) != 2 || string(p.Array[0]) != secrets[0] || string(p.Array[1]) != secrets[1] {
		t.Errorf("p1 after the requeue: %s, want %q in order", p.Array, secrets[:2])
	}
	var done struct {
		Queue    string   `json:"queue"`
		Requeued int64    `json:"requeued"`
		IDs      []string `json:"ids"`
	}
	decode(t, ok(t, b, "-json", "dead", "requeue", "payments", "-id", ids["p2"][0], "-yes"), &done)
	if done.Queue != "payments" || done.Requeued != 1 || !slices.Equal(done.IDs, ids["p2"]) {
		t.Errorf("dead requeue -id -yes -json: %+v", done)
	}
	if n := countDead(t, b, "payments", shards); n != 0 {
		t.Errorf("after requeuing all by id: %d dead letters, want 0", n)
	}
	r = on(t, b, "dead", "requeue", "payments", "-id", ids["p2"][0], "-yes")
	if r.code != 1 || !strings.Contains(r.stderr, "has no dead letter") {
		t.Errorf("dead requeue -id of a letter requeued already: %+v", r)
	}
	if n := kill(t, b, "payments", shards); n != 3 {
		t.Fatalf("%d dead letters after they fail again, want 3", n)
	}
}

// A key's corrupt value in dead letters cannot be requeued: requeue -all
// skips it, says so, and requeues the others.
func TestDeadRequeueSkipsCorrupt(t *testing.T) {
	b := testredis.Real(t)
	fixture(t, b, 1)
	ctx := context.Background()
	sp := keys.For(b.Prefix, "payments", 0)
	must(t, b.Client.Do(ctx, b.Client.B().Set().Key(sp.Items("bad")).Value("not json").Build()).Error())
	must(t, b.Client.Do(ctx, b.Client.B().Zadd().Key(sp.Ready()).ScoreMember().ScoreMember(0, "bad").Build()).Error())
	c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix))
	must(t, err)
	must(t, c.Sync(ctx))
	f, err := c.Fetch(ctx, "payments", 0, 10)
	must(t, err)
	if len(f.Dead) != 1 || len(f.Batches) != 0 {
		t.Fatalf("fetch of a corrupt key: %+v", f)
	}
	if out := ok(t, b, "dead", "list", "payments"); !strings.Contains(out, "[corrupt value, cannot be requeued]") {
		t.Errorf("dead list does not mark the corrupt value:\n%s", out)
	}
	out := ok(t, b, "dead", "requeue", "payments", "-all", "-yes")
	if out != "requeued 3 dead letters of queue payments\nskipped 1 holding a key's corrupt value, not an item (dead purge deletes them)\n" {
		t.Errorf("dead requeue -all with a corrupt one: %q", out)
	}
	if n := countDead(t, b, "payments", 1); n != 1 {
		t.Errorf("after requeue: %d dead letters, want the corrupt one", n)
	}
}

func TestCluster(t *testing.T) {
	b := testredis.Cluster(t)
	const shards = 4
	fixture(t, b, shards)

	var all []inspect.Stats
	decode(t, ok(t, b, "-json", "stats"), &all)
	if len(all) != 3 || all[1].Queue != "orders" || all[1].Shards != shards || all[1].ReadyKeys != 3 || all[1].PendingItems != 6 ||
		all[2].DeadLetters != 3 {
		t.Fatalf("stats -json on a cluster: %+v", all)
	}
	if got := column(ok(t, b, "keys", "orders"), 0); !slices.Equal(got, []string{"a", "c", "b"}) {
		t.Errorf("keys on a cluster: %q", got)
	}
	var p struct {
		Shard int             `json:"shard"`
		Array json.RawMessage `json:"array"`
	}
	decode(t, ok(t, b, "-json", "peek", "orders", "c"), &p)
	if string(p.Array) != array(itemsC) || p.Shard != keys.Shard("c", shards) {
		t.Errorf("peek on a cluster: %+v", p)
	}
	if out := ok(t, b, "dead", "list", "payments"); !strings.HasSuffix(out, "3 of 3 dead letters of queue payments\n") {
		t.Errorf("dead list on a cluster:\n%s", out)
	}
	testRequeueByID(t, b, shards)
	testRequeueAndPurge(t, b, shards)
	retried(t, b, shards)
	testRetriesList(t, b)
	testWorkers(t, b, shards)
}

func TestErrors(t *testing.T) {
	b := testredis.Real(t)
	fixture(t, b, 1)
	unused := "127.0.0.1:" + strconv.Itoa(testredis.FreePort(t))

	for _, tc := range []struct {
		name string
		args []string
		code int
		want []string // in stderr
	}{
		{"unreachable", []string{"-redis", unused, "stats"}, 1, []string{"batchq: cannot reach Redis at " + unused + ": "}},
		{"bad address", []string{"-redis", "localhost", "stats"}, 2, []string{`-redis: invalid Redis address "localhost": missing port in address; want HOST:PORT, redis://`}},
		{"bad port", []string{"-redis", "localhost:0", "stats"}, 2, []string{`-redis: invalid Redis address "localhost:0": bad port "0"`}},
		{"sentinel without a master name", []string{"-redis", "sentinel://127.0.0.1:26379", "stats"}, 2,
			[]string{`invalid Redis address "sentinel://127.0.0.1:26379": no master name; want sentinel://MASTER@HOST:PORT[,HOST:PORT...]`}},
		{"password twice", []string{"-redis", "redis://:s3cret@" + unused, "-password", "other", "stats"}, 2,
			[]string{"-redis holds a password: give it there or with -password, not both"}},
		{"user twice", []string{"-redis", "redis://app@" + unused, "-user", "other", "stats"}, 2,
			[]string{"-redis holds a user name: give it there or with -user, not both"}},
		{"unreachable URL", []string{"-redis", "redis://app:s3cret@" + unused, "stats"}, 1, []string{"batchq: cannot reach Redis at redis://app:xxxxx@" + unused + ": "}},
		{"bad prefix", []string{"-redis", b.Addr, "-prefix", "a{b}", "stats"}, 2, []string{`batchq: invalid prefix "a{b}"`}},
		{"missing queue", []string{"-redis", b.Addr, "-prefix", b.Prefix, "keys", "nope"}, 1,
			[]string{`batchq: no queue "nope" under prefix "` + b.Prefix + `"; known queues: emails, orders, payments` + "\n"}},
		{"missing queue in dead", []string{"-redis", b.Addr, "-prefix", b.Prefix, "dead", "purge", "nope", "-yes"}, 1,
			[]string{`no queue "nope" under prefix "` + b.Prefix + `"; known queues: emails, orders, payments`}},
		{"missing queue in stats", []string{"-redis", b.Addr, "-prefix", b.Prefix, "stats", "orders", "nope"}, 1,
			[]string{`no queue "nope" under prefix "` + b.Prefix + `"; known queues: emails, orders, payments`}},
		{"no queue at all", []string{"-redis", b.Addr, "-prefix", "elsewhere", "peek", "orders", "a"}, 1,
			[]string{`no queue "orders" under prefix "elsewhere"; no queue is registered under it (is -prefix right?)`}},
		{"bad queue name", []string{"keys", "a:b"}, 2, []string{`invalid queue name "a:b"`}},
		{"unknown command", []string{"frobnicate"}, 2, []string{`batchq: unknown command "frobnicate"`, "batchq help"}},
		{"unknown dead command", []string{"dead", "resurrect", "q"}, 2, []string{`unknown command "dead resurrect"`}},
		{"dead alone", []string{"dead"}, 2, []string{"dead needs a subcommand: list, requeue or purge"}},
		{"unknown flag", []string{"-verbose", "stats"}, 2, []string{"flag provided but not defined: -verbose"}},
		{"unknown command flag", []string{"keys", "orders", "-size", "3"}, 2, []string{"keys: flag provided but not defined: -size", "usage: batchq [flags] keys QUEUE"}},
		{"missing queue arg", []string{"keys"}, 2, []string{"keys: missing QUEUE"}},
		{"missing key arg", []string{"peek", "orders"}, 2, []string{"peek: missing KEY"}},
		{"extra arg", []string{"peek", "orders", "a", "b"}, 2, []string{`peek: unexpected argument "b"`}},
		{"bad order", []string{"keys", "orders", "-by", "size"}, 2, []string{`keys: -by: unknown order "size"`}},
		{"bad count", []string{"dead", "list", "orders", "-n", "0"}, 2, []string{"-n must be at least 1, got 0"}},
		{"requeue how many", []string{"dead", "requeue", "orders"}, 2, []string{"say which: -n N, -all or -id ID"}},
		{"requeue both", []string{"dead", "requeue", "orders", "-n", "3", "-all"}, 2, []string{"give one of -n N, -all or -id ID"}},
		{"requeue by id and all", []string{"dead", "requeue", "orders", "-id", "x", "-all"}, 2, []string{"give one of -n N, -all or -id ID"}},
		{"requeue empty id", []string{"dead", "requeue", "orders", "-id", ""}, 2, []string{`invalid value "" for flag -id: empty id`}},
		{"retries alone", []string{"retries"}, 2, []string{"retries needs a subcommand: list", "batchq help retries"}},
		{"unknown retries command", []string{"retries", "drop", "q"}, 2, []string{`unknown command "retries drop"`, "batchq help retries"}},
		{"retries count", []string{"retries", "list", "orders", "-n", "0"}, 2, []string{"-n must be at least 1, got 0"}},
		{"workers bad queue name", []string{"workers", "a:b"}, 2, []string{`invalid queue name "a:b"`}},
		{"help unknown", []string{"help", "frobnicate"}, 2, []string{`help: unknown command "frobnicate"`}},
		{"help unknown subcommand", []string{"help", "dead", "resurrect"}, 2, []string{`help: unknown command "dead resurrect"`}},
		{"bad timeout", []string{"-timeout", "0s", "stats"}, 2, []string{"-timeout must be positive"}},
		{"no command", nil, 2, []string{"usage: batchq [flags] COMMAND [args]"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := cli(t, tc.args...)
			if r.code != tc.code {
				t.Errorf("exit %d, want %d\nstderr: %s", r.code, tc.code, r.stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(r.stderr, w) {
					t.Errorf("stderr %q, want it to hold %q", r.stderr, w)
				}
			}
			if r.stdout != "" {
				t.Errorf("stdout %q, want nothing", r.stdout)
			}
			if strings.Contains(r.stderr, ": batchq: ") {
				t.Errorf("stderr %q names the program twice", r.stderr)
			}
			if strings.Contains(r.stderr, "s3cret") {
				t.Errorf("stderr %q shows the password", r.stderr)
			}
		})
	}
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"-h"}} {
		r := cli(t, args...)
		if r.code != 0 || r.stderr != "" {
			t.Errorf("%q: %+v", args, r)
		}
		for _, c := range commands {
			if !strings.Contains(r.stdout, "  "+c.name+" "+c.synopsis+"\n") {
				t.Errorf("%q does not list %s:\n%s", args, c.name, r.stdout)
			}
		}
	}
	// The package doc lists them too.
	doc, err := os.ReadFile("main.go")
	must(t, err)
	for _, c := range commands {
		line := []byte("//\t" + c.name + " " + c.synopsis)
		if !bytes.Contains(doc, append(line, ' ')) && !bytes.Contains(doc, append(line, '\n')) {
			t.Errorf("the package doc does not list %s %s", c.name, c.synopsis)
		}
	}
	for _, args := range [][]string{{"help", "dead", "requeue"}, {"dead", "requeue", "-h"}} {
		r := cli(t, args...)
		if r.code != 0 || !strings.HasPrefix(r.stdout, "usage: batchq [flags] dead requeue QUEUE (-n N | -all | -id ID...) [-yes]\n") ||
			!strings.Contains(r.stdout, "-yes") || !strings.Contains(r.stdout, "\n  -id ID\n") {
			t.Errorf("%q: %+v", args, r)
		}
	}
	if r := cli(t, "help", "help"); r.code != 0 || !strings.HasPrefix(r.stdout, "usage: batchq [flags] COMMAND [args]\n") {
		t.Errorf("help help: %+v", r)
	}
}

// 'batchq help NAME' prints the usage of every command and subcommand:
// its synopsis, summary, flags and examples, each of which parses; that of
// a command that takes a subcommand lists them, as NAME -h does.
func TestHelpOfEachCommand(t *testing.T) {
	for _, c := range commands {
		r := cli(t, append([]string{"help"}, strings.Fields(c.name)...)...)
		if r.code != 0 || r.stderr != "" || !strings.HasPrefix(r.stdout, "usage: batchq [flags] "+c.name+" "+c.synopsis+"\n\n"+c.summary+"\n") {
			t.Errorf("help %s: %+v", c.name, r)
			continue
		}
		if c.flags != nil && !strings.Contains(r.stdout, "\nFlags:\n") {
			t.Errorf("help %s lists no flags:\n%s", c.name, r.stdout)
		}
		_, examples, ok := strings.Cut(r.stdout, "\nExamples:\n")
		examples, _, _ = strings.Cut(examples, "\n\n")
		if !ok || c.example == "" {
			t.Errorf("help %s shows no example:\n%s", c.name, r.stdout)
			continue
		}
		for line := range strings.Lines(examples) {
			args, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "  batchq ")
			if !ok {
				t.Errorf("help %s: example %q does not start with batchq", c.name, line)
				continue
			}
			args, _, _ = strings.Cut(args, " | ") // a pipe to jq
			inv, err := parse(strings.Fields(args), func(string) string { return "" })
			if err != nil || inv.cmd != c {
				t.Errorf("help %s: example %q: %v", c.name, args, err)
			}
		}
	}
	for group := range groups {
		for _, args := range [][]string{{"help", group}, {group, "-h"}, {group, "--help"}} {
			r := cli(t, args...)
			if r.code != 0 || r.stderr != "" || !strings.HasPrefix(r.stdout, "usage: batchq [flags] "+group+" SUBCOMMAND [args]\n") ||
				!strings.Contains(r.stdout, "batchq help "+group+" SUBCOMMAND") {
				t.Errorf("%q: %+v", args, r)
				continue
			}
			subs := subcommands(group)
			if len(subs) == 0 {
				t.Errorf("group %s has no subcommand", group)
			}
			for _, c := range subs {
				if want := "\n  " + strings.TrimPrefix(c.name, group+" ") + " " + c.synopsis + "\n"; !strings.Contains(r.stdout, want) {
					t.Errorf("%q does not list %s:\n%s", args, c.name, r.stdout)
				}
			}
		}
	}
	// Every command is either one of a group or on its own, and the
	// general usage points to the help of each.
	for _, c := range commands {
		if first, _, sub := strings.Cut(c.name, " "); sub && groups[first] == "" {
			t.Errorf("command %s is in no group", c.name)
		}
	}
	if r := cli(t, "help"); !strings.Contains(r.stdout, "Run 'batchq help COMMAND' for a command's flags and examples.") {
		t.Errorf("help does not point to the help of each command:\n%s", r.stdout)
	}
	// The workers summary states the expiry it filters by.
	if c := lookup("workers"); !strings.Contains(c.summary, strconv.Itoa(int(inspect.WorkerExpiry.Seconds()))+"s") {
		t.Errorf("workers summary %q does not say %v", c.summary, inspect.WorkerExpiry)
	}
}

// The password comes from $REDIS_PASSWORD, -password or a URL; without it
// the server's refusal is explained.
func TestPassword(t *testing.T) {
	srv := testredis.Start(t) // with --requirepass it would not answer the readiness PING
	admin := srv.Backend(t).Client
	must(t, admin.Do(context.Background(), admin.B().ConfigSet().ParameterValue().ParameterValue("requirepass", "s3cret").Build()).Error())
	r := cli(t, "-redis", srv.Addr, "stats")
	if r.code != 1 || !strings.Contains(r.stderr, "Redis at "+srv.Addr+" refused the connection: ") || !strings.Contains(r.stderr, "$REDIS_PASSWORD") {
		t.Errorf("without a password: %+v", r)
	}
	if r := cli(t, "-redis", "redis://:s3cret@"+srv.Addr, "stats"); r.code != 0 || !strings.Contains(r.stdout, `no queue is registered under prefix "batchq"`) {
		t.Errorf("with the password in a URL: %+v", r)
	}
	t.Setenv("REDIS_PASSWORD", "s3cret")
	if r := cli(t, "-redis", srv.Addr, "stats"); r.code != 0 || !strings.Contains(r.stdout, `no queue is registered under prefix "batchq"`) {
		t.Errorf("with $REDIS_PASSWORD: %+v", r)
	}
	if r := cli(t, "-redis", "redis://default@"+srv.Addr, "stats"); r.code != 0 {
		t.Errorf("with the user in a URL and $REDIS_PASSWORD: %+v", r)
	}
	if r := cli(t, "-redis", srv.Addr, "-password", "wrong", "stats"); r.code != 1 || !strings.Contains(r.stderr, "WRONGPASS") {
		t.Errorf("with a wrong -password: %+v", r)
	}
}

// A server that answers nothing costs the -timeout, then a clear error.
func TestTimeout(t *testing.T) {
	srv := testredis.Start(t)
	srv.Pause(t)
	t.Cleanup(func() { srv.Resume(t) })
	r := cli(t, "-redis", srv.Addr, "-timeout", "300ms", "stats")
	if r.code != 1 || !strings.Contains(r.stderr, "cannot reach Redis at "+srv.Addr) {
		t.Errorf("a paused server: %+v", r)
	}
}

// -tls-ca trusts a private CA.
func TestTLS(t *testing.T) {
	certFile, keyFile, caFile := writeTLSFiles(t, t.TempDir())
	srv := testredis.StartTLS(t, certFile, keyFile, caFile)
	if r := cli(t, "-redis", srv.Addr, "-tls-ca", caFile, "stats"); r.code != 0 || !strings.Contains(r.stdout, "no queue is registered") {
		t.Errorf("-tls-ca: %+v", r)
	}
	// The system's roots do not know the CA.
	if r := cli(t, "-redis", srv.Addr, "-tls", "stats"); r.code != 1 || !strings.Contains(r.stderr, "certificate") {
		t.Errorf("-tls without the CA: %+v", r)
	}
}

// writeTLSFiles writes a CA and a certificate for 127.0.0.1 signed by it
// into dir, and returns the paths of the certificate, its key and the CA.
func writeTLSFiles(t *testing.T, dir string) (certFile, keyFile, caFile string) {
	t.Helper()
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "batchq CLI test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature, BasicConstraintsValid: true, IsCA: true}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	must(t, err)
	ca, err := x509.ParseCertificate(caDER)
	must(t, err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "redis"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	must(t, err)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	must(t, err)
	write := func(name, typ string, b []byte) string {
		path := filepath.Join(dir, name)
		must(t, os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600))
		return path
	}
	return write("redis.crt", "CERTIFICATE", der), write("redis.key", "PRIVATE KEY", keyDER), write("ca.crt", "CERTIFICATE", caDER)
}

// The real binary: main wires run to the process' arguments, output and
// exit status.
func TestBinary(t *testing.T) {
	b := testredis.Real(t)
	fixture(t, b, 1)
	bin := filepath.Join(t.TempDir(), "batchq")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "-redis", b.Addr, "-prefix", b.Prefix, "stats", "-json").Output()
	must(t, err)
	var all []inspect.Stats
	decode(t, string(out), &all)
	if len(all) != 3 || all[1].Queue != "orders" || all[1].PendingItems != 6 {
		t.Fatalf("stats -json: %+v", all)
	}
	cmd := exec.Command(bin, "frobnicate")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	var exit *exec.ExitError
	if err := cmd.Run(); !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(stderr.String(), "unknown command") {
		t.Fatalf("an unknown command: %v, %q", err, stderr.String())
	}
}

// Queue names come from whoever wrote the registry: a name holding a
// terminal escape or a newline (refused by producers now, but possibly in
// the registry already) reaches no output raw, on any path.
func TestHostileNamesAreQuoted(t *testing.T) {
	b := testredis.Real(t)
	fixture(t, b, 1)
	ctx := context.Background()
	hostile := []string{"esc\x1b[31mRED", "evil\nbatchq: forged line", "tab\there"}
	for _, q := range hostile {
		must(t, b.Client.Do(ctx, b.Client.B().Hset().Key(keys.Registry(b.Prefix)).FieldValue().FieldValue(q, "1").Build()).Error())
	}
	clean := func(name, out string) {
		t.Helper()
		if strings.ContainsAny(out, "\x1b\t") || strings.Contains(out, "\nbatchq: forged") {
			t.Errorf("%s printed a name raw:\n%q", name, out)
		}
	}
	r := cli(t, "-redis", b.Addr, "-prefix", b.Prefix, "stats", "nosuch")
	if r.code != 1 || !strings.Contains(r.stderr, `"esc\x1b[31mRED"`) {
		t.Errorf("stats nosuch: exit %d, stderr %q; want the known queues quoted", r.code, r.stderr)
	}
	clean("stats nosuch", r.stderr)
	clean("stats", ok(t, b, "stats"))
}

func TestEscapeControls(t *testing.T) {
	for in, want := range map[string]string{
		"plain: ü日本 \"q\"": "plain: ü日本 \"q\"",
		"a\x1b[31mb":       `a\x1b[31mb`,
		"a\nb\tc\r":        `a\nb\tc\r`,
		"a\u0085b\x7f":     `a\u0085b\x7f`,
		"a\xffb":           `a\xffb`,
		"a\u202eb":         `a\u202eb`,
	} {
		if got := escapeControls(in); got != want {
			t.Errorf("escapeControls(%q) = %q, want %q", in, got, want)
		}
	}
}

// queue forget takes an empty queue out of the registry with -yes, says
// what it would do without it, and refuses a queue that holds items.
func TestQueueForget(t *testing.T) {
	b := testredis.Real(t)
	fixture(t, b, 1)
	// A queue whose items all died, then were purged: empty, but registered.
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix))
	must(t, err)
	must(t, p.Add(context.Background(), "spam00001", "k", 1))
	kill(t, b, "spam00001", 1)
	ok(t, b, "dead", "purge", "spam00001", "-yes")

	r := cli(t, "-redis", b.Addr, "-prefix", b.Prefix, "queue", "forget", "orders", "-yes")
	if r.code != 1 || !strings.Contains(r.stderr, "the queue holds items") || !strings.Contains(r.stderr, "3 pending keys") {
		t.Errorf("forget orders: exit %d, stderr %q; want a refusal naming its 3 pending keys", r.code, r.stderr)
	}
	r = cli(t, "-redis", b.Addr, "-prefix", b.Prefix, "queue", "forget", "spam00001")
	if r.code != 1 || !strings.Contains(r.stderr, "would forget queue spam00001, which holds nothing; run again with -yes") {
		t.Errorf("forget without -yes: exit %d, stderr %q", r.code, r.stderr)
	}
	if out := ok(t, b, "queue", "forget", "spam00001", "-yes"); out != "forgot queue spam00001\n" {
		t.Errorf("forget -yes: %q", out)
	}
	if out := ok(t, b, "stats"); strings.Contains(out, "spam00001") || !strings.Contains(out, "orders") {
		t.Errorf("stats after forget:\n%s", out)
	}
	r = cli(t, "-redis", b.Addr, "-prefix", b.Prefix, "queue", "forget", "spam00001", "-yes")
	if r.code != 1 || !strings.Contains(r.stderr, `no queue "spam00001"`) {
		t.Errorf("forget again: exit %d, stderr %q", r.code, r.stderr)
	}
	if r := cli(t, "queue"); r.code != 2 || !strings.Contains(r.stderr, "queue needs a subcommand: forget") {
		t.Errorf("queue alone: exit %d, stderr %q", r.code, r.stderr)
	}
}

// queue create records a queue's shard count before any writer; queue
// shards raises it, and refuses to lower it. Neither writes without -yes.
func TestQueueCreateAndShards(t *testing.T) {
	b := testredis.Real(t)
	shardsOf := func(queue string) int {
		t.Helper()
		var st []inspect.Stats
		decode(t, ok(t, b, "-json", "stats", queue), &st)
		return st[0].Shards
	}
	r := on(t, b, "queue", "create", "orders", "4")
	if r.code != 1 || !strings.Contains(r.stderr, "would create queue orders with 4 shards; run again with -yes") {
		t.Errorf("create without -yes: exit %d, stderr %q", r.code, r.stderr)
	}
	if r := on(t, b, "stats", "orders"); r.code != 1 {
		t.Errorf("create without -yes recorded the queue: %q", r.stdout)
	}
	if out := ok(t, b, "queue", "create", "orders", "4", "-yes"); out != "created queue orders with 4 shards\n" {
		t.Errorf("create -yes: %q", out)
	}
	if n := shardsOf("orders"); n != 4 {
		t.Errorf("orders has %d shards, want 4", n)
	}
	for _, tt := range []struct {
		args   []string
		code   int
		stderr string
	}{
		{[]string{"queue", "create", "orders", "8", "-yes"}, 1, "queue orders exists with 4 shards"},
		{[]string{"queue", "create", "orders", "8"}, 1, "queue orders exists with 4 shards"},
		{[]string{"queue", "create", "x", "0"}, 2, `shards must be a number from 1 to 1024, not "0"`},
		{[]string{"queue", "shards", "orders", "many"}, 2, `shards must be a number from 1 to 1024, not "many"`},
		{[]string{"queue", "shards", "orders"}, 2, "missing SHARDS"},
		{[]string{"queue", "shards", "nosuch", "8", "-yes"}, 1, `no queue "nosuch"`},
		{[]string{"queue", "shards", "orders", "2", "-yes"}, 1, "a queue's shards cannot shrink: it has 4, and 2 would strand the items in the others"},
		{[]string{"queue", "shards", "orders", "2"}, 1, "queue orders has 4 shards: a queue's shards cannot shrink"},
		{[]string{"queue", "shards", "orders", "16"}, 1, "would raise the shards of queue orders from 4 to 16; run again with -yes"},
	} {
		if r := on(t, b, tt.args...); r.code != tt.code || !strings.Contains(r.stderr, tt.stderr) {
			t.Errorf("%s: exit %d, stderr %q; want %d and %q", strings.Join(tt.args, " "), r.code, r.stderr, tt.code, tt.stderr)
		}
	}
	if n := shardsOf("orders"); n != 4 {
		t.Errorf("orders has %d shards after refusals, want 4", n)
	}
	// The count it has: nothing to do, with -yes or without.
	for _, args := range [][]string{{"queue", "shards", "orders", "4"}, {"queue", "create", "orders", "4"}} {
		for _, yes := range [][]string{nil, {"-yes"}} {
			args := append(slices.Clone(args), yes...)
			if out := ok(t, b, args...); !strings.Contains(out, "queue orders") || !strings.Contains(out, "4 shards already") {
				t.Errorf("%s: %q", strings.Join(args, " "), out)
			}
		}
	}
	var already struct {
		Queue   string
		Shards  int
		Created bool
	}
	decode(t, ok(t, b, "-json", "queue", "create", "orders", "4"), &already)
	if already.Queue != "orders" || already.Shards != 4 || already.Created {
		t.Errorf("-json queue create of an existing queue: %+v", already)
	}
	if out := ok(t, b, "queue", "shards", "orders", "16", "-yes"); out != "queue orders has 16 shards (was 4); producers and workers follow within seconds\n" {
		t.Errorf("shards -yes: %q", out)
	}
	var got struct {
		Queue       string
		Shards, Was int
	}
	decode(t, ok(t, b, "-json", "queue", "shards", "orders", "32", "-yes"), &got)
	if got.Queue != "orders" || got.Shards != 32 || got.Was != 16 || shardsOf("orders") != 32 {
		t.Errorf("-json queue shards: %+v", got)
	}
}

// A registry value that is not a count (another program wrote it) does not
// block queue create or queue shards: without -yes they say they would
// replace it, with -yes they do.
func TestQueueCommandsReplaceACorruptCount(t *testing.T) {
	b := testredis.Real(t)
	must(t, b.Client.Do(context.Background(), b.Client.B().Hset().Key(keys.Registry(b.Prefix)).FieldValue().FieldValue("a", "abc").FieldValue("b", "0").Build()).Error())
	for _, tt := range []struct {
		args   []string
		stderr string
	}{
		{[]string{"queue", "create", "a", "3"}, "would create queue a with 3 shards, replacing what the registry holds, which is not a count; run again with -yes"},
		{[]string{"queue", "shards", "b", "5"}, "would give queue b 5 shards, replacing what the registry holds, which is not a count; run again with -yes"},
	} {
		if r := on(t, b, tt.args...); r.code != 1 || !strings.Contains(r.stderr, tt.stderr) {
			t.Errorf("%s: exit %d, stderr %q", strings.Join(tt.args, " "), r.code, r.stderr)
		}
	}
	if out := ok(t, b, "queue", "create", "a", "3", "-yes"); out != "created queue a with 3 shards\n" {
		t.Errorf("create -yes over a corrupt count: %q", out)
	}
	if out := ok(t, b, "queue", "shards", "b", "5", "-yes"); out != "queue b has 5 shards (was 0); producers and workers follow within seconds\n" {
		t.Errorf("shards -yes over a corrupt count: %q", out)
	}
	var st []inspect.Stats
	decode(t, ok(t, b, "-json", "stats", "a", "b"), &st)
	if len(st) != 2 || st[0].Shards != 3 || st[1].Shards != 5 {
		t.Errorf("stats after the repair: %+v", st)
	}
}
