package protocol_test

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

func deadLetters(t *testing.T, c *protocol.Consumer) []deadletter.Letter {
	t.Helper()
	ds, err := dl(c).List(context.Background(), queue, 100)
	if err != nil {
		t.Fatalf("DeadLetters: %v", err)
	}
	return ds
}

func countDead(t *testing.T, c *protocol.Consumer) int64 {
	t.Helper()
	n, err := dl(c).Count(context.Background(), queue)
	if err != nil {
		t.Fatalf("CountDead: %v", err)
	}
	return n
}

// Dead items are listed with their error and attempts; RequeueDead puts
// them back at the end of their key as fresh items; PurgeDead empties.
func TestDeadLetters(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b)
		const item1, item2 = `{"n": 1, "s":"é\/x"}`, `[1, 2.50]`
		addRaw(t, p, "k", item1, item2, `3`)
		before := time.Now().Truncate(time.Millisecond)
		bt := fetchOne(t, c)
		settle(t, c, bt,
			protocol.Outcome{Kind: protocol.Dead, Err: errors.New("bad item")},
			protocol.Outcome{Kind: protocol.Retry, Err: errors.New("first")},
			done)
		rb := fetchOne(t, c)
		settle(t, c, rb, protocol.Outcome{Kind: protocol.Dead, Err: errors.New("second")})
		after := time.Now()
		noLeases(t, b)

		if n := countDead(t, c); n != 2 {
			t.Fatalf("CountDead %d, want 2", n)
		}
		ds := deadLetters(t, c)
		if len(ds) != 2 {
			t.Fatalf("DeadLetters: got %d, want 2", len(ds))
		}
		byItem := map[string]deadletter.Letter{}
		for _, d := range ds {
			byItem[string(d.Item)] = d
			if d.Queue != queue || d.Shard != 0 || d.Key != "k" || d.Corrupt || d.ID == "" {
				t.Errorf("dead letter %+v", d)
			}
			if d.FailedAt.Before(before) || d.FailedAt.After(after) {
				t.Errorf("dead letter failed at %v, not within [%v, %v]", d.FailedAt, before, after)
			}
		}
		if d, ok := byItem[item1]; !ok || d.Attempts != 1 || d.Error != "bad item" {
			t.Fatalf("dead letter of %s: %+v (found %v), want 1 attempt, error \"bad item\"", item1, d, ok)
		}
		if d, ok := byItem[item2]; !ok || d.Attempts != 2 || d.Error != "second" {
			t.Fatalf("dead letter of %s: %+v (found %v), want 2 attempts, error \"second\"", item2, d, ok)
		}

		// Requeued items go to the END of their key, with no attempts.
		addRaw(t, p, "k", `"meanwhile"`)
		n, err := dl(c).Requeue(ctx, byItem[item1], byItem[item2])
		if err != nil || n != 2 {
			t.Fatalf("RequeueDead: %d, %v", n, err)
		}
		if n := countDead(t, c); n != 0 {
			t.Fatalf("CountDead %d after requeue, want 0", n)
		}
		if ds := deadLetters(t, c); len(ds) != 0 {
			t.Fatalf("dead letters left after requeue: %+v", ds)
		}
		bt = fetchOne(t, c)
		if bt.Retry() || bt.Key != "k" {
			t.Fatalf("requeued items came as retry=%v key %q", bt.Retry(), bt.Key)
		}
		checkItems(t, bt, `"meanwhile"`, item1, item2)
		for _, it := range bt.Items {
			if it.Attempt != 0 || it.LastError != "" {
				t.Fatalf("requeued item %s: attempt %d, last error %q", it.Data, it.Attempt, it.LastError)
			}
		}
		// A dead letter already requeued is skipped.
		if n, err := dl(c).Requeue(ctx, byItem[item1]); err != nil || n != 0 {
			t.Fatalf("RequeueDead of a requeued letter: %d, %v", n, err)
		}
		if v, ok := stored(t, b, "k"); ok {
			t.Fatalf("requeue of a gone letter stored %s", v)
		}

		// PurgeDead empties the dead letters and says how many there were.
		settle(t, c, bt, all(3, protocol.Outcome{Kind: protocol.Dead})...)
		if n := countDead(t, c); n != 3 {
			t.Fatalf("CountDead %d, want 3", n)
		}
		if d := deadLetters(t, c); len(d) != 3 || d[0].Error != "unknown error" {
			t.Fatalf("dead letters %+v, want 3 with error \"unknown error\"", d)
		}
		if n, err := dl(c).Purge(ctx, queue); err != nil || n != 3 {
			t.Fatalf("PurgeDead: %d, %v", n, err)
		}
		if n := countDead(t, c); n != 0 {
			t.Fatalf("CountDead %d after purge", n)
		}
		if d := deadLetters(t, c); len(d) != 0 {
			t.Fatalf("dead letters after purge: %+v", d)
		}
		if ks := testredis.Keys(t, b, b.Prefix+":*dead*"); len(ks) != 0 {
			t.Fatalf("dead letter keys left after purge: %v", ks)
		}
		if n, err := dl(c).Purge(ctx, queue); err != nil || n != 0 {
			t.Fatalf("second PurgeDead: %d, %v", n, err)
		}
	})
}

// Past the cap, the oldest dead letters are dropped, index and data alike.
func TestDeadLetterCap(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		p := newProducer(t, b)
		c := newConsumer(t, b, protocol.WithDeadLetterCap(2))
		clk := withFakeClock(c)
		for i, it := range []string{`"old"`, `"mid"`, `"new"`} {
			addRaw(t, p, "k", it)
			bt := fetchOne(t, c)
			settle(t, c, bt, protocol.Outcome{Kind: protocol.Dead, Err: errors.New("e")})
			clk.Advance(time.Duration(i+1) * time.Millisecond)
		}
		ds := deadLetters(t, c)
		if len(ds) != 2 || string(ds[0].Item) != `"new"` || string(ds[1].Item) != `"mid"` {
			t.Fatalf("dead letters %+v, want new and mid", ds)
		}
		n, err := b.Client.Do(context.Background(), b.Client.B().Hlen().Key(space(b).DeadData()).Build()).AsInt64()
		if err != nil || n != 2 {
			t.Fatalf("dead letter data holds %d entries (%v), want 2", n, err)
		}
	})
}

// Values batchq did not write never wedge a consumer: they go to dead
// letters with a reason, and the other keys of the same Fetch are delivered.
func TestCorruptKeys(t *testing.T) {
	eachMode(t, testCorruptKeys)
}

// An element of a key's array that is not valid JSON, or nests deeper than
// producers allow, goes to dead letters on its own, as a JSON string that
// cannot be requeued; the other elements are delivered. A key with only bad
// elements is released at once.
func TestBadItemsAreIsolated(t *testing.T) {
	eachMode(t, func(t *testing.T, b testredis.Backend, opts ...protocol.Option) {
		c := newConsumer(t, b, opts...)
		deep := strings.Repeat("[", 600) + strings.Repeat("]", 600)
		deepValue := strings.Repeat(`{"a":`, 10_000) + "1" + strings.Repeat("}", 10_000) // valid alone, not in an envelope
		for k, v := range map[string]string{
			"mixed":     `[1,{"x":,},2,` + deep + `,3]`,
			"allbad":    `[tru]`,
			"deepvalue": deepValue,
		} {
			setReady(t, b, k, v)
		}
		f := fetch(t, c, 10)
		if len(f.Batches) != 1 || f.Batches[0].Key != "mixed" || itemsOf(f.Batches[0]) != `[1,2,3]` || len(f.Dead) != 4 {
			t.Fatalf("fetched %s, want mixed [1,2,3] and 4 dead letters", describe(f))
		}
		settle(t, c, f.Batches[0], all(3, done)...)
		noLeases(t, b)
		ds := deadLetters(t, c)
		if len(ds) != 4 {
			t.Fatalf("dead letters %+v, want 4", ds)
		}
		want := map[string]string{strconv.Quote(deepValue): "the key held a string that is not a JSON array", `"{\"x\":,}"`: "item 1 of the key's array: not valid JSON", `"` + deep + `"`: "item 3 of the key's array: nested 600 levels deep", `"tru"`: "item 0 of the key's array: not valid JSON"}
		for _, d := range ds {
			if w, ok := want[string(d.Item)]; !ok || !strings.HasPrefix(d.Error, w) || !d.Corrupt || d.Requeueable() {
				t.Errorf("dead letter %s: item %.40s error %q corrupt %v", d.Key, d.Item, d.Error, d.Corrupt)
			}
		}
	})
}

// One value cannot flood dead letters: a run of bad elements is one letter,
// and past 16 runs the rest of the value is one letter.
func TestBadItemsCannotFloodDeadLetters(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		c := newConsumer(t, b)
		var alternating []string
		for i := range 100 {
			alternating = append(alternating, strconv.Itoa(i), "x")
		}
		for k, v := range map[string]string{
			"commas":      "[" + strings.Repeat(",", 100_000) + "]",
			"alternating": "[" + strings.Join(alternating, ",") + "]",
		} {
			setReady(t, b, k, v)
		}
		f := fetch(t, c, 10)
		for _, bt := range f.Batches {
			settle(t, c, bt, all(len(bt.Items), done)...)
		}
		noLeases(t, b)
		byKey := map[string][]deadletter.Letter{}
		for _, d := range deadLetters(t, c) {
			byKey[d.Key] = append(byKey[d.Key], d)
		}
		if n := len(byKey["commas"]); n != 1 {
			t.Errorf("100,000 missing values made %d dead letters, want 1", n)
		}
		alt := byKey["alternating"]
		if len(alt) != 16 || len(f.Batches) != 1 || len(f.Batches[0].Items) != 16 {
			t.Fatalf("alternating good and bad items: %d dead letters and %s, want 16 letters and the first 16 items", len(alt), describe(f))
		}
		last := alt[0] // newest first: the one holding the rest
		if !strings.Contains(last.Error, "items 31 to 199 (the rest of the array") || !strings.HasPrefix(string(last.Item), `"x,16,x,17`) {
			t.Errorf("the last letter: %q %.40s", last.Error, last.Item)
		}
	})
}

// A dead letter whose stored envelope does not decode (written by another
// program, or too deep to decode) is listed as a corrupt letter, and does
// not hide the others.
func TestUndecodableDeadLetterIsListed(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		c := newConsumer(t, b)
		r := b.Client
		sp := space(b)
		p := newProducer(t, b)
		addRaw(t, p, "k", `1`)
		f := fetch(t, c, 1)
		settle(t, c, f.Batches[0], protocol.Outcome{Kind: protocol.Dead, Err: errors.New("boom")})
		deep := strings.Repeat(`{"a":`, 10_000) + "1" + strings.Repeat("}", 10_000)
		for id, env := range map[string]string{"garbage": "not json", "deep": `{"id":"deep","item":` + deep + `}`} {
			for _, cmd := range []rueidis.Completed{
				r.B().Hset().Key(sp.DeadData()).FieldValue().FieldValue(id, env).Build(),
				r.B().Zadd().Key(sp.Dead()).ScoreMember().ScoreMember(1, id).Build(),
			} {
				if err := r.Do(ctx, cmd).Error(); err != nil {
					t.Fatal(err)
				}
			}
		}
		ds := deadLetters(t, c)
		byID := map[string]deadletter.Letter{}
		for _, d := range ds {
			byID[d.ID] = d
		}
		if len(ds) != 3 || !byID["garbage"].Corrupt || !byID["deep"].Corrupt || byID["deep"].Requeueable() ||
			!strings.Contains(byID["garbage"].Error, "does not decode") {
			t.Fatalf("dead letters %+v, want the good one and two corrupt ones", ds)
		}
		if n, err := dl(c).Purge(ctx, queue); err != nil || n != 3 {
			t.Fatalf("PurgeDead: %d, %v", n, err)
		}
	})
}

// setReady stores value under key, as another program would (no count),
// and makes the key due.
func setReady(t *testing.T, b testredis.Backend, key, value string) {
	t.Helper()
	r := b.Client
	for _, cmd := range []rueidis.Completed{
		r.B().Set().Key(space(b).Items(key)).Value(value).Build(),
		r.B().Zadd().Key(space(b).Ready()).ScoreMember().ScoreMember(0, key).Build(),
	} {
		if err := r.Do(context.Background(), cmd).Error(); err != nil {
			t.Fatal(err)
		}
	}
}

// eachMode runs fn with leases and at-most-once, each on miniredis and on
// redis-server; opts selects the mode.
func eachMode(t *testing.T, fn func(t *testing.T, b testredis.Backend, opts ...protocol.Option)) {
	t.Helper()
	for _, mode := range []struct {
		name string
		opts []protocol.Option
	}{
		{"leased", nil},
		{"at-most-once", []protocol.Option{protocol.WithAtMostOnce()}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			testredis.Each(t, func(t *testing.T, b testredis.Backend) { fn(t, b, mode.opts...) })
		})
	}
}

func testCorruptKeys(t *testing.T, b testredis.Backend, opts ...protocol.Option) {
	ctx := context.Background()
	p := newProducer(t, b)
	c := newConsumer(t, b, opts...)
	r := b.Client
	sp := space(b)
	addRaw(t, p, "good1", `1`, `2`)
	set := map[string]func(k string) rueidis.Completed{
		"obj":   func(k string) rueidis.Completed { return r.B().Set().Key(k).Value(`{"a":1}`).Build() },
		"hello": func(k string) rueidis.Completed { return r.B().Set().Key(k).Value(`hello`).Build() },
		"null":  func(k string) rueidis.Completed { return r.B().Set().Key(k).Value(`null`).Build() },
		"hash":  func(k string) rueidis.Completed { return r.B().Hset().Key(k).FieldValue().FieldValue("f", "v").Build() },
	}
	for k, cmd := range set {
		if err := r.Do(ctx, cmd(sp.Items(k))).Error(); err != nil {
			t.Fatal(err)
		}
		// An append fails, and makes the key ready for a worker to clean up.
		if err := p.Add(ctx, queue, k, 1); !errors.Is(err, producer.ErrNotArray) {
			t.Fatalf("append to corrupt %s: got %v, want ErrNotArray", k, err)
		}
	}
	addRaw(t, p, "good2", `3`)

	f := fetch(t, c, 10)
	got := map[string]string{}
	for _, bt := range f.Batches {
		got[bt.Key] = itemsOf(bt)
	}
	if len(got) != 2 || got["good1"] != `[1,2]` || got["good2"] != `[3]` {
		t.Fatalf("batches %v, want good1 [1,2] and good2 [3] only", got)
	}
	fetchedDead := map[string]deadletter.Letter{}
	for _, d := range f.Dead {
		fetchedDead[d.Key] = deadletter.Letter(d)
	}
	if len(fetchedDead) != len(set) {
		t.Fatalf("Fetched.Dead: %+v, want obj, hello, null and hash", f.Dead)
	}
	for _, bt := range f.Batches {
		settle(t, c, bt, all(len(bt.Items), done)...)
	}
	noLeases(t, b)

	ds := deadLetters(t, c)
	if len(ds) != len(set) {
		t.Fatalf("DeadLetters: %+v, want %d", ds, len(set))
	}
	byKey := map[string]deadletter.Letter{}
	for _, d := range ds {
		byKey[d.Key] = d
		if !d.Corrupt || d.Error == "" || d.Queue != queue {
			t.Errorf("dead letter of %s: corrupt %v error %q queue %q", d.Key, d.Corrupt, d.Error, d.Queue)
		}
		if fd := fetchedDead[d.Key]; fd.ID != d.ID || !fd.Corrupt || fd.Error != d.Error {
			t.Errorf("Fetched.Dead for %s is %+v, stored %+v", d.Key, fd, d)
		}
	}
	if d := byKey["obj"]; string(d.Item) != `{"a":1}` || !strings.Contains(d.Error, "not a JSON array") {
		t.Errorf("obj: item %s error %q", d.Item, d.Error)
	}
	if d := byKey["hello"]; string(d.Item) != `"hello"` || !strings.Contains(d.Error, "not a JSON array") {
		t.Errorf("hello: item %s error %q", d.Item, d.Error)
	}
	if d := byKey["null"]; string(d.Item) != `null` || !strings.Contains(d.Error, "not a JSON array") {
		t.Errorf("null: item %s error %q", d.Item, d.Error)
	}
	hd := byKey["hash"]
	qk := sp.Quarantine(hd.ID)
	if !strings.Contains(hd.Error, "hash") || !strings.Contains(hd.Error, qk) {
		t.Errorf("hash: error %q does not name the type and %s", hd.Error, qk)
	}
	if v, err := r.Do(ctx, r.B().Hget().Key(qk).Field("f").Build()).ToString(); err != nil || v != "v" {
		t.Errorf("quarantined hash at %s: HGET f = %q, %v", qk, v, err)
	}
	for k := range set {
		if n, err := r.Do(ctx, r.B().Exists().Key(sp.Items(k)).Build()).AsInt64(); err != nil || n != 0 {
			t.Errorf("items key of corrupt %s still exists (%d, %v)", k, n, err)
		}
		if ready(t, b, k) {
			t.Errorf("corrupt %s still on the ready index", k)
		}
	}
	for _, d := range ds {
		if _, err := dl(c).Requeue(ctx, d); !errors.Is(err, deadletter.ErrNotRequeueable) {
			t.Errorf("RequeueDead of corrupt %s: got %v, want ErrNotRequeueable", d.Key, err)
		}
	}
	if n := countDead(t, c); n != int64(len(set)) {
		t.Fatalf("CountDead %d after refused requeues, want %d", n, len(set))
	}
	// The keys work again.
	for k := range set {
		addRaw(t, p, k, `"fresh"`)
	}
	f = fetch(t, c, 10)
	if len(f.Batches) != len(set) || len(f.Dead) != 0 {
		t.Fatalf("after cleanup got %s, want %d fresh batches", describe(f), len(set))
	}
	for _, bt := range f.Batches {
		checkItems(t, bt, `"fresh"`)
		settle(t, c, bt, done)
	}
	noLeases(t, b)
}

// A key on the ready index with no items and on no wake list (left by
// something else) is pushed again by a claim's sweep once the wake list is
// empty; its drain finds nothing: no batch, no lease, and the key leaves
// the index.
func TestReadyKeyWithoutItems(t *testing.T) {
	eachMode(t, func(t *testing.T, b testredis.Backend, opts ...protocol.Option) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b, opts...)
		if err := b.Client.Do(ctx, b.Client.B().Zadd().Key(space(b).Ready()).ScoreMember().ScoreMember(0, "ghost").Build()).Error(); err != nil {
			t.Fatal(err)
		}
		addRaw(t, p, "k", `1`)
		bt := fetchOne(t, c)
		if bt.Key != "k" {
			t.Fatalf("got key %q, want k", bt.Key)
		}
		settle(t, c, bt, done)
		noLeases(t, b)
		fetchNone(t, c) // the sweep pushes ghost, the drain finds nothing
		if ready(t, b, "ghost") {
			t.Fatal("key without items still on the ready index")
		}
		noLeases(t, b)
	})
}

// Trimming many dead letters past the cap at once works on a real Redis
// (whose Lua unpack takes a few thousand values at most) and the settlement
// applies whole.
func TestDeadLetterCapTrimsInChunks(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		n := 9000
		if !b.Real() {
			n = 3000
		}
		p := newProducer(t, b)
		c := newConsumer(t, b, protocol.WithDeadLetterCap(10))
		items := make([]string, n)
		for i := range items {
			items[i] = strconv.Itoa(i)
		}
		addRaw(t, p, "k", items...)
		bt := fetchOne(t, c)
		out := all(n, protocol.Outcome{Kind: protocol.Dead, Err: errors.New("d")})
		out[0] = protocol.Outcome{Kind: protocol.Unfinished}
		settle(t, c, bt, out...)
		if got := countDead(t, c); got != 10 {
			t.Fatalf("%d dead letters kept, want the cap, 10", got)
		}
		if v, _ := stored(t, b, "k"); v != "[0]" {
			t.Fatalf("key holds %s, want [0]", v)
		}
		noLeases(t, b)
		ds := deadLetters(t, c)
		if string(ds[0].Item) != strconv.Itoa(n-1) {
			t.Fatalf("newest dead letter holds %s, want %d", ds[0].Item, n-1)
		}
	})
}

// A settlement without a lease that is sent twice (its reply lost, say) is
// applied once: unfinished items go back once.
func TestAtMostOnceSettleIsIdempotent(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b, protocol.WithAtMostOnce())
		addRaw(t, p, "k", `1`, `2`)
		bt := fetchOne(t, c)
		out := []protocol.Outcome{{Kind: protocol.Unfinished}, {Kind: protocol.Dead, Err: errors.New("d")}}
		for range 2 {
			if err := c.Settle(ctx, bt, out); err != nil {
				t.Fatal(err)
			}
		}
		if v, _ := stored(t, b, "k"); v != "[1]" {
			t.Fatalf("key holds %s after settling twice, want [1]", v)
		}
		if n := countDead(t, c); n != 1 {
			t.Fatalf("%d dead letters after settling twice, want 1", n)
		}
	})
}

// RequeueDead refuses a dead letter whose item or key was edited into
// something invalid, and stores nothing.
func TestRequeueDeadValidates(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b)
		addRaw(t, p, "k", `1`)
		settle(t, c, fetchOne(t, c), protocol.Outcome{Kind: protocol.Dead, Err: errors.New("d")})
		d := deadLetters(t, c)[0]
		bad := []deadletter.Letter{d, d, d}
		bad[0].Item = []byte(`{"broken":`)
		bad[1].Key = ""
		bad[2].Shard = 5
		for i, x := range bad {
			if n, err := dl(c).Requeue(ctx, x); err == nil || n != 0 {
				t.Errorf("case %d: requeued %d, err %v", i, n, err)
			}
		}
		if _, ok := stored(t, b, "k"); ok {
			t.Fatal("a refused requeue stored something")
		}
		if n, err := dl(c).Requeue(ctx, d); err != nil || n != 1 {
			t.Fatalf("requeue of the untouched letter: %d, %v", n, err)
		}
	})
}

// PurgeDead also deletes the values kept in quarantine.
func TestPurgeDeadDeletesQuarantine(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		c := newConsumer(t, b)
		r := b.Client
		if err := r.Do(ctx, r.B().Hset().Key(space(b).Items("h")).FieldValue().FieldValue("f", "v").Build()).Error(); err != nil {
			t.Fatal(err)
		}
		if err := r.Do(ctx, r.B().Zadd().Key(space(b).Ready()).ScoreMember().ScoreMember(0, "h").Build()).Error(); err != nil {
			t.Fatal(err)
		}
		if f := fetch(t, c, 10); len(f.Dead) != 1 {
			t.Fatalf("got %s, want the hash in dead letters", describe(f))
		}
		if ks := testredis.Keys(t, b, b.Prefix+":*quarantine*"); len(ks) != 2 { // the value and the set
			t.Fatalf("quarantine keys %v", ks)
		}
		if n, err := dl(c).Purge(ctx, queue); err != nil || n != 1 {
			t.Fatalf("PurgeDead: %d, %v", n, err)
		}
		if ks := testredis.Keys(t, b, b.Prefix+":*"); len(ks) != 0 {
			t.Fatalf("keys left after purge: %v", ks)
		}
	})
}

// A value quarantined while PurgeDead runs, between its read of the
// quarantine set and its delete, is not left behind outside the set (a
// purge finds quarantine keys only through it): it stays, listed, and the
// next purge deletes it.
func TestPurgeDeadRacingAQuarantine(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		c := newConsumer(t, b)
		r := b.Client
		quarantine := func(key string) {
			t.Helper()
			if err := r.Do(ctx, r.B().Hset().Key(space(b).Items(key)).FieldValue().FieldValue("f", "v").Build()).Error(); err != nil {
				t.Fatal(err)
			}
			if err := r.Do(ctx, r.B().Zadd().Key(space(b).Ready()).ScoreMember().ScoreMember(0, key).Build()).Error(); err != nil {
				t.Fatal(err)
			}
			if f := fetch(t, c, 10); len(f.Dead) != 1 {
				t.Fatalf("got %s, want the hash of %s in dead letters", describe(f), key)
			}
		}
		quarantine("h1")
		reads := 0
		protocol.SetPurgeHook(t, func() {
			if reads++; reads == 1 {
				quarantine("h2")
			}
		})
		if n, err := dl(c).Purge(ctx, queue); err != nil || n != 2 {
			t.Fatalf("Purge: %d, %v; want both dead letters", n, err)
		}
		kept := testredis.Keys(t, b, b.Prefix+":*:quarantine:*")
		listed, err := r.Do(ctx, r.B().Smembers().Key(space(b).Quarantined()).Build()).AsStrSlice()
		if err != nil {
			t.Fatal(err)
		}
		if len(kept) != 1 || !slices.Equal(listed, kept) {
			t.Fatalf("after the purge: quarantine keys %v, the set lists %v; want h2's, listed", kept, listed)
		}
		if n, err := dl(c).Purge(ctx, queue); err != nil || n != 0 {
			t.Fatalf("second Purge: %d, %v; want no dead letter", n, err)
		}
		if ks := testredis.Keys(t, b, b.Prefix+":*"); len(ks) != 0 {
			t.Fatalf("keys left after the second purge: %v", ks)
		}
	})
}

// RequeueNewest puts back the newest dead letters first, at most max, and
// the items of a batch that died together keep their order.
func TestRequeueNewestDead(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b)
		must(t, c.Sync(ctx))
		die(t, p, c, "old", `0`)
		time.Sleep(5 * time.Millisecond) // the batch of k dies later
		die(t, p, c, "k", `1`, `2`, `3`)
		// Letters are stamped by the consumer's reckoning of the server's
		// clock, which may run a few ms ahead of it (half a round trip at
		// most); RequeueNewest leaves letters younger than its start.
		time.Sleep(50 * time.Millisecond)

		n, skipped, err := dl(c).RequeueNewest(ctx, queue, 3)
		if err != nil || n != 3 || skipped != 0 {
			t.Fatalf("RequeueNewest(3) = %d, %d, %v; want 3, 0", n, skipped, err)
		}
		if v, _ := stored(t, b, "k"); v != `[1,2,3]` {
			t.Fatalf("key k holds %s, want its items in order", v)
		}
		if v, ok := stored(t, b, "old"); ok {
			t.Fatalf("the older dead letter was requeued too: %s", v)
		}
		if n, _, err := dl(c).RequeueNewest(ctx, queue, 0); err != nil || n != 1 {
			t.Fatalf("RequeueNewest(0) = %d, %v; want the 1 left", n, err)
		}
		if n := countDead(t, c); n != 0 {
			t.Fatalf("%d dead letters left", n)
		}
	})
}

// RequeueNewest reads past corrupt letters at the front of the list, and
// leaves letters that died after it started (by the server's clock) where
// they are.
func TestRequeueNewestDeadSkipsCorruptAndFresh(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		p := newProducer(t, b)
		c := newConsumer(t, b)
		must(t, c.Sync(ctx))
		die(t, p, c, "old", `1`)
		time.Sleep(5 * time.Millisecond)
		// A newer corrupt letter: a key holding a string that is no array.
		setReady(t, b, "bad", "hello")
		if f := fetch(t, c, 10); len(f.Dead) != 1 {
			t.Fatalf("fetched %s, want the corrupt key in dead letters", describe(f))
		}
		// A letter that dies "after" the requeue starts: its worker's clock
		// is an hour ahead.
		ahead := newConsumer(t, b)
		withFakeClock(ahead)
		die(t, p, ahead, "fresh", `2`)

		n, skipped, err := dl(c).RequeueNewest(ctx, queue, 1)
		if err != nil || n != 1 || skipped != 1 {
			t.Fatalf("RequeueNewest(1) = %d, %d, %v; want 1 requeued past 1 corrupt", n, skipped, err)
		}
		if v, _ := stored(t, b, "old"); v != `[1]` {
			t.Fatalf("key old holds %q, want its item back", v)
		}
		if v, ok := stored(t, b, "fresh"); ok {
			t.Fatalf("the letter that died after the start was requeued: %s", v)
		}
		if n := countDead(t, c); n != 2 {
			t.Fatalf("%d dead letters left, want the corrupt one and the fresh one", n)
		}
	})
}

func die(t *testing.T, p *producer.Producer, c *protocol.Consumer, key string, items ...string) {
	t.Helper()
	addRaw(t, p, key, items...)
	settle(t, c, fetchOne(t, c), all(len(items), protocol.Outcome{Kind: protocol.Dead, Err: errors.New("boom")})...)
}

// dl returns a client of the dead letters of c's queues.
func dl(c *protocol.Consumer) *deadletter.Client {
	d, err := deadletter.New(protocol.ClientOf(c), deadletter.WithPrefix(c.Prefix()))
	if err != nil {
		panic(err)
	}
	return d
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
