package main

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// retryError is the error of the retries of key r1: two lines, long.
var retryError = "declined\n" + strings.Repeat("detail ", 30)

// retried appends secrets[0] to key r1 and secrets[1] to r2 of queue
// refunds, and fails both: r1 due in an hour with retryError, r2 due at
// once (overdue: no worker runs) with "boom".
func retried(t *testing.T, b testredis.Backend, shards int) {
	t.Helper()
	ctx := context.Background()
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(shards))
	must(t, err)
	must(t, p.AddRaw(ctx, "refunds", "r1", json.RawMessage(secrets[0])))
	must(t, p.AddRaw(ctx, "refunds", "r2", json.RawMessage(secrets[1])))
	c, err := protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix), protocol.WithDefaultShards(shards))
	must(t, err)
	must(t, c.Sync(ctx))
	for shard := range shards {
		f, err := c.Fetch(ctx, "refunds", shard, 10)
		must(t, err)
		for _, bt := range f.Batches {
			o := protocol.Outcome{Kind: protocol.Retry, Err: errors.New("boom")}
			if bt.Key == "r1" {
				o = protocol.Outcome{Kind: protocol.Retry, Err: errors.New(retryError), Delay: time.Hour}
			}
			must(t, c.Settle(ctx, bt, []protocol.Outcome{o}))
		}
	}
}

func TestRetriesList(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		fixture(t, b, 1)
		retried(t, b, 1)
		testRetriesList(t, b)
	})
}

func testRetriesList(t *testing.T, b testredis.Backend) {
	out := ok(t, b, "retries", "list", "refunds")
	if strings.Contains(out, "secret") {
		t.Errorf("retries list shows payloads without -items:\n%s", out)
	}
	rs := rows(out)
	if got := strings.Join(rs[0], " "); got != "ID KEY ATTEMPTS DUE IN ERROR" {
		t.Errorf("retries list header: %q", got)
	}
	if len(rs) != 4 || strings.Join(rs[3], " ") != "2 of 2 retries of queue refunds" {
		t.Fatalf("retries list: want 2 rows and a count\n%s", out)
	}
	// Soonest first: r2, overdue, then r1 in about an hour.
	if r := rs[1]; r[1] != "r2" || r[2] != "1" || r[4] != "overdue" || r[6] != "boom" {
		t.Errorf("retries list, first row: %q\n%s", r, out)
	}
	if r := rs[2]; r[1] != "r1" || r[2] != "1" {
		t.Errorf("retries list, second row: %q\n%s", r, out)
	} else if d, err := time.ParseDuration(r[4]); err != nil || d < 59*time.Minute || d > time.Hour+time.Minute {
		t.Errorf("retries list: r1 due in %q, want about an hour", r[4])
	}
	for _, r := range rs[1:3] {
		if _, err := time.Parse(time.RFC3339, r[3]); err != nil {
			t.Errorf("retries list: due %q: %v", r[3], err)
		}
	}
	// The long error, quoted for its newline and cut.
	long := strconv.Quote(retryError)
	if !strings.Contains(out, long[:maxErrorCell-3]+"...\n") || strings.Contains(out, long[:maxErrorCell]) {
		t.Errorf("retries list: long error not quoted and cut to %d:\n%s", maxErrorCell, out)
	}

	out = ok(t, b, "retries", "list", "refunds", "-items", "-n", "1")
	if !strings.Contains(out, secrets[1]) || strings.Contains(out, secrets[0]) || !strings.HasSuffix(out, "1 of 2 retries of queue refunds\n") {
		t.Errorf("retries list -items -n 1: want r2's payload alone\n%s", out)
	}
	if got := strings.Join(rows(out)[0], " "); got != "ID KEY ATTEMPTS DUE IN ERROR ITEM" {
		t.Errorf("retries list -items header: %q", got)
	}

	var doc struct {
		Queue   string            `json:"queue"`
		Total   int64             `json:"total"`
		Now     time.Time         `json:"now"`
		Retries []json.RawMessage `json:"retries"`
	}
	decode(t, ok(t, b, "-json", "retries", "list", "refunds"), &doc)
	if doc.Queue != "refunds" || doc.Total != 2 || len(doc.Retries) != 2 || doc.Now.IsZero() {
		t.Fatalf("retries list -json: %+v", doc)
	}
	var keysSeen []string
	for _, raw := range doc.Retries {
		var r inspect.Retry
		must(t, json.Unmarshal(raw, &r))
		if strings.Contains(string(raw), "secret") || r.Item != nil || r.ID == "" || r.Attempts != 1 || r.Due.IsZero() {
			t.Errorf("retries list -json without -items: %s", raw)
		}
		keysSeen = append(keysSeen, r.Key)
	}
	if !slices.Equal(keysSeen, []string{"r2", "r1"}) {
		t.Errorf("retries list -json: keys %q, want r2 then r1", keysSeen)
	}
	decode(t, ok(t, b, "retries", "list", "refunds", "-items", "-json"), &doc)
	var items []string
	for _, raw := range doc.Retries {
		var r inspect.Retry
		must(t, json.Unmarshal(raw, &r))
		items = append(items, string(r.Item))
	}
	if !slices.Equal(items, []string{secrets[1], secrets[0]}) {
		t.Errorf("retries list -json -items: items %q", items)
	}

	if out := ok(t, b, "retries", "list", "orders"); out != "queue orders has no retries\n" {
		t.Errorf("retries list of a queue with none: %q", out)
	}
	if out := ok(t, b, "-json", "retries", "list", "orders"); !strings.Contains(out, `"total":0,`) || !strings.Contains(out, `"retries":[]`) {
		t.Errorf("retries list -json of a queue with none: %q", out)
	}
	if r := on(t, b, "retries", "list", "nope"); r.code != 1 || !strings.Contains(r.stderr, `no queue "nope" under prefix`) {
		t.Errorf("retries list of an unknown queue: %+v", r)
	}
}
