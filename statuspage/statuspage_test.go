package statuspage_test

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"go.uber.org/goleak"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
	"github.com/batchq/batchq/statuspage"
)

// TestRedisDown closes the server under a client: rueidis then runs a
// delayed topology refresh that outlives Close by up to half a second.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*call).DelayDo.func1"))
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// fixture is a backend with real batchq state, made by the real producer
// and consumer.
type fixture struct {
	b  testredis.Backend
	in *inspect.Inspector
	p  *producer.Producer
	c  *protocol.Consumer
	dl *deadletter.Client
}

// newFixture returns a producer, a synced consumer and an inspector on b,
// under b's prefix, with nothing in Redis yet.
func newFixture(t testing.TB, b testredis.Backend) *fixture {
	t.Helper()
	f := &fixture{b: b}
	var err error
	f.p, err = producer.New(b.Client, producer.WithPrefix(b.Prefix))
	must(t, err)
	f.c, err = protocol.NewConsumer(b.Client, protocol.WithPrefix(b.Prefix))
	must(t, err)
	must(t, f.c.Sync(context.Background()))
	f.dl, err = deadletter.New(b.Client, deadletter.WithPrefix(b.Prefix))
	must(t, err)
	f.in, err = inspect.New(b.Client, inspect.WithPrefix(b.Prefix))
	must(t, err)
	return f
}

// The items of the dead letters: payloads the page must not show.
const (
	itemX  = `{"card":"s3cr3t-x"}`
	itemY1 = `{"card":"s3cr3t-y"}`
	itemY2 = `{"n":2}`
)

// seed makes this state on b:
//
//	orders: keys x and y drained by a worker: x's item and y's first die
//	        ("boom x", "boom y"), y's second waits for a retry in an hour;
//	        then key a gets 3 items, key b 1 (due a minute ago).
//	emails: key v (2 items) held by a worker; then key u gets 1 item.
func seed(t testing.TB, b testredis.Backend) *fixture {
	t.Helper()
	ctx := context.Background()
	f := newFixture(t, b)

	must(t, f.p.AddRaw(ctx, "orders", "x", json.RawMessage(itemX)))
	must(t, f.p.AddRaw(ctx, "orders", "y", json.RawMessage(itemY1), json.RawMessage(itemY2)))
	// The consumer knows the server's clock to within a millisecond or so: a
	// key appended a moment ago may not be due for it yet.
	var batches []*protocol.Batch
	for deadline := time.Now().Add(5 * time.Second); len(batches) < 2; {
		fe, err := f.c.Fetch(ctx, "orders", 0, 10)
		must(t, err)
		batches = append(batches, fe.Batches...)
		if time.Now().After(deadline) {
			t.Fatalf("fetched %d batches of orders, want 2", len(batches))
		}
	}
	for _, bt := range batches {
		out := []protocol.Outcome{{Kind: protocol.Dead, Err: errors.New("boom " + bt.Key)}}
		if bt.Key == "y" {
			out = append(out, protocol.Outcome{Kind: protocol.Retry, Err: errors.New("later"), Delay: time.Hour})
		}
		must(t, f.c.Settle(ctx, bt, out))
	}
	must(t, f.p.AddRaw(ctx, "orders", "a", json.RawMessage(`1`), json.RawMessage(`2`), json.RawMessage(`3`)))
	must(t, f.p.AddRaw(ctx, "orders", "b", json.RawMessage(`4`)))
	f.backdate(t, "orders", "b", time.Minute)

	must(t, f.p.Add(ctx, "emails", "v", map[string]int{"id": 1}, map[string]int{"id": 2}))
	for deadline := time.Now().Add(5 * time.Second); ; {
		fe, err := f.c.Fetch(ctx, "emails", 0, 10)
		must(t, err)
		if len(fe.Batches) == 1 && len(fe.Batches[0].Items) == 2 {
			break
		}
		if len(fe.Batches) != 0 || time.Now().After(deadline) {
			t.Fatalf("fetched %+v from emails, want one batch of 2", fe.Batches)
		}
	}
	must(t, f.p.Add(ctx, "emails", "u", map[string]int{"id": 3}))
	return f
}

// backdate makes a pending key due d ago, as if its items had waited that
// long.
func (f *fixture) backdate(t testing.TB, queue, key string, d time.Duration) {
	t.Helper()
	c := f.b.Client
	due := f.c.Now().Add(-d).UnixMilli()
	ready := keys.For(f.b.Prefix, queue, 0).Ready()
	n, err := c.Do(context.Background(), c.B().Zadd().Key(ready).Xx().Ch().ScoreMember().ScoreMember(float64(due), key).Build()).AsInt64()
	must(t, err)
	if n != 1 {
		t.Fatalf("backdate %s of %s: key not pending", key, queue)
	}
}

// kill drains every due key of a queue and settles each item as dead.
func (f *fixture) kill(t testing.TB, queue string) int {
	t.Helper()
	ctx := context.Background()
	fe, err := f.c.Fetch(ctx, queue, 0, 100)
	must(t, err)
	n := 0
	for _, bt := range fe.Batches {
		out := make([]protocol.Outcome, len(bt.Items))
		for i := range out {
			out[i] = protocol.Outcome{Kind: protocol.Dead, Err: fmt.Errorf("boom %d", i)}
		}
		must(t, f.c.Settle(ctx, bt, out))
		n += len(out)
	}
	return n
}

func (f *fixture) countDead(t testing.TB, queue string) int64 {
	t.Helper()
	n, err := f.dl.Count(context.Background(), queue)
	must(t, err)
	return n
}

func (f *fixture) dead(t testing.TB, queue string) []deadletter.Letter {
	t.Helper()
	ds, err := f.dl.List(context.Background(), queue, 100)
	must(t, err)
	return ds
}

// deadOf returns the id of the dead letter of key.
func (f *fixture) deadOf(t testing.TB, queue, key string) string {
	t.Helper()
	for _, d := range f.dead(t, queue) {
		if d.Key == key {
			return d.ID
		}
	}
	t.Fatalf("no dead letter of key %s in %s", key, queue)
	return ""
}

// array returns the JSON array a key holds ("" when none).
func (f *fixture) array(t testing.TB, queue, key string) string {
	t.Helper()
	pk, err := f.in.Peek(context.Background(), queue, key)
	must(t, err)
	return string(pk.Array)
}

// snapshot returns every key of the fixture's prefix with its type and
// value, to show that requests changed nothing.
func (f *fixture) snapshot(t testing.TB) map[string]string {
	t.Helper()
	ctx, c := context.Background(), f.b.Client
	out := map[string]string{}
	for _, k := range testredis.Keys(t, f.b, f.b.Prefix+":*") {
		typ, err := c.Do(ctx, c.B().Type().Key(k).Build()).ToString()
		must(t, err)
		var v any
		switch typ {
		case "string":
			v, err = c.Do(ctx, c.B().Get().Key(k).Build()).ToString()
		case "zset":
			v, err = c.Do(ctx, c.B().Zrange().Key(k).Min("0").Max("-1").Withscores().Build()).AsZScores()
		case "hash":
			v, err = c.Do(ctx, c.B().Hgetall().Key(k).Build()).AsStrMap()
		case "list":
			v, err = c.Do(ctx, c.B().Lrange().Key(k).Start(0).Stop(-1).Build()).AsStrSlice()
		case "set":
			var m []string
			m, err = c.Do(ctx, c.B().Smembers().Key(k).Build()).AsStrSlice()
			slices.Sort(m)
			v = m
		}
		must(t, err)
		out[k] = fmt.Sprintf("%s %v", typ, v)
	}
	return out
}

// site is the handler mounted under a path of a test server.
type site struct {
	t    testing.TB
	srv  *httptest.Server
	base *url.URL // the mount point, ending in a slash
	hc   *http.Client
}

// serve mounts h at mount ("/" or "/x/.../") of a new test server.
// newPage returns statuspage.New(in, opts...), failing the test on an error.
func newPage(t testing.TB, in *inspect.Inspector, opts ...statuspage.Option) http.Handler {
	t.Helper()
	h, err := statuspage.New(in, opts...)
	must(t, err)
	return h
}

func serve(t testing.TB, h http.Handler, mount string) *site {
	t.Helper()
	mux := http.NewServeMux()
	if mount == "/" {
		mux.Handle("/", h)
	} else {
		mux.Handle(mount, http.StripPrefix(strings.TrimSuffix(mount, "/"), h))
	}
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	base, err := url.Parse(srv.URL + mount)
	must(t, err)
	hc := &http.Client{
		Timeout:       30 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	t.Cleanup(hc.CloseIdleConnections)
	return &site{t: t, srv: srv, base: base, hc: hc}
}

// page is one answer of the site.
type page struct {
	url    *url.URL
	status int
	header http.Header
	body   string
}

// url resolves ref (relative to the mount point when from is nil).
func (s *site) url(from *url.URL, ref string) *url.URL {
	s.t.Helper()
	if from == nil {
		from = s.base
	}
	r, err := url.Parse(ref)
	must(s.t, err)
	return from.ResolveReference(r)
}

func (s *site) do(req *http.Request) page {
	s.t.Helper()
	res, err := s.hc.Do(req)
	must(s.t, err)
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	must(s.t, err)
	return page{url: req.URL, status: res.StatusCode, header: res.Header, body: string(b)}
}

// get GETs ref, relative to the mount point.
func (s *site) get(ref string) page {
	s.t.Helper()
	req, err := http.NewRequest(http.MethodGet, s.url(nil, ref).String(), nil)
	must(s.t, err)
	return s.do(req)
}

// post POSTs form to u with the headers given as name, value pairs.
func (s *site) post(u *url.URL, form url.Values, header ...string) page {
	s.t.Helper()
	req, err := http.NewRequest(http.MethodPost, u.String(), strings.NewReader(form.Encode()))
	must(s.t, err)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	return s.do(req)
}

// follow GETs the Location of a 303 answer.
func (s *site) follow(p page) page {
	s.t.Helper()
	if p.status != http.StatusSeeOther {
		s.t.Fatalf("POST %s: %d, want 303\n%s", p.url, p.status, p.body)
	}
	req, err := http.NewRequest(http.MethodGet, s.url(p.url, p.header.Get("Location")).String(), nil)
	must(s.t, err)
	return s.do(req)
}

func (p page) want(t testing.TB, status int, texts ...string) page {
	t.Helper()
	if p.status != status {
		t.Fatalf("%s: status %d, want %d\n%s", p.url, p.status, status, p.body)
	}
	for _, s := range texts {
		if !strings.Contains(p.body, s) {
			t.Fatalf("%s: no %q in\n%s", p.url, s, p.body)
		}
	}
	return p
}

var (
	rowRe  = regexp.MustCompile(`(?s)<tr data-(?:queue|key|id)="([^"]*)">(.*?)</tr>`)
	statRe = regexp.MustCompile(`data-stat="([a-z-]+)"[^>]*>([^<]*)<`)
	formRe = regexp.MustCompile(`(?s)<form method="post" action="([^"]+)">\s*<input type="hidden" name="token" value="([^"]+)">`)
	hrefRe = regexp.MustCompile(`<a href="([^"]+)" data-stat="link">([^<]*)</a>`)
)

// rows returns the cells (data-stat -> text) of the table rows of a page,
// by the row's data-queue, data-key or data-id.
func (p page) rows() map[string]map[string]string {
	out := map[string]map[string]string{}
	for _, m := range rowRe.FindAllStringSubmatch(p.body, -1) {
		cells := map[string]string{}
		for _, c := range statRe.FindAllStringSubmatch(m[2], -1) {
			cells[c[1]] = c[2]
		}
		out[m[1]] = cells
	}
	return out
}

// stats returns the numbers of a queue page's stats table.
func (p page) stats(t testing.TB) map[string]string {
	t.Helper()
	i, j := strings.Index(p.body, `<table id="stats"`), strings.Index(p.body, `</table>`)
	if i < 0 || j < i {
		t.Fatalf("%s: no stats table in\n%s", p.url, p.body)
	}
	out := map[string]string{}
	for _, c := range statRe.FindAllStringSubmatch(p.body[i:j], -1) {
		out[c[1]] = c[2]
	}
	return out
}

// forms returns the form actions of a page with their tokens.
func (p page) forms() map[string]string {
	out := map[string]string{}
	for _, m := range formRe.FindAllStringSubmatch(p.body, -1) {
		out[m[1]] = m[2]
	}
	return out
}

func wantCells(t testing.TB, what string, got map[string]string, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %s = %q, want %q (all: %v)", what, k, got[k], v, got)
		}
	}
}

// The pages show the real numbers of the queues, the most lagging keys
// and the dead letters without their items, under the security headers;
// unknown queues and pages are 404; GET changes nothing.
func TestPages(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		f := seed(t, b)
		s := serve(t, newPage(t, f.in, statuspage.WithTitle("Shop & Co")), "/batchq/")
		before := f.snapshot(t)

		idx := s.get("").want(t, http.StatusOK, "<caption>Queues (2)</caption>", "Shop &amp; Co", `<th scope="col">Dead letters</th>`)
		wantHeaders(t, idx.header)
		rows := idx.rows()
		wantCells(t, "index orders", rows["orders"], map[string]string{"shards": "1", "ready-keys": "2", "pending-items": "4",
			"in-flight-batches": "0", "in-flight-items": "0", "retries": "1", "dead-letters": "2"})
		wantCells(t, "index emails", rows["emails"], map[string]string{"shards": "1", "ready-keys": "1", "pending-items": "1",
			"in-flight-batches": "1", "in-flight-items": "2", "retries": "0", "dead-letters": "0"})
		if !strings.Contains(idx.body, `data-ms="`) || rows["orders"]["lag"] == "0s" {
			t.Errorf("orders shows no lag: %v", rows["orders"])
		}
		links := hrefRe.FindAllStringSubmatch(idx.body, -1)
		if len(links) != 2 || links[0][1] != "queues/emails" || links[1][1] != "queues/orders" {
			t.Fatalf("links %q", links)
		}

		q := s.get(links[1][1]).want(t, http.StatusOK, "<caption>Queue orders</caption>", "boom x", "boom y",
			`<caption>2 dead letters</caption>`, `<th scope="row"><code>b</code></th>`)
		wantHeaders(t, q.header)
		wantCells(t, "queue orders", q.stats(t), map[string]string{"ready-keys": "2", "pending-items": "4", "retries": "1", "dead-letters": "2"})
		rows = q.rows()
		wantCells(t, "key a", rows["a"], map[string]string{"items": "3", "bytes": "7"})
		wantCells(t, "key b", rows["b"], map[string]string{"items": "1", "bytes": "3"})
		if lag, _ := strconv.Atoi(lagMs(q.body, "b")); lag < 60_000 {
			t.Errorf("key b: lag %d ms, want a minute or more", lag)
		}
		if strings.Index(q.body, `data-key="b"`) > strings.Index(q.body, `data-key="a"`) {
			t.Errorf("key b (due a minute ago) is not listed before key a")
		}
		for _, key := range []string{"x", "y"} {
			id := f.deadOf(t, "orders", key)
			wantCells(t, "dead letter of "+key, rows[id], map[string]string{"attempts": "1"})
			if !strings.Contains(q.body, `data-requeue="`+id+`"`) {
				t.Errorf("no requeue button for %s", id)
			}
		}
		if strings.Contains(q.body, "s3cr3t") || strings.Contains(q.body, "card") {
			t.Errorf("the queue page shows an item:\n%s", q.body)
		}
		if forms := formRe.FindAllStringSubmatch(q.body, -1); len(forms) != 4 { // requeue x, y, all; purge
			t.Errorf("forms %q", forms)
		}
		s.get("queues/emails").want(t, http.StatusOK, "No dead letters.", `<th scope="row"><code>u</code></th>`)

		for _, ref := range []string{"queues/nope", "queues/bad%7Bname", "queues/a:b"} {
			s.get(ref).want(t, http.StatusNotFound, "There is no queue")
		}
		for _, ref := range []string{"nothing/here", "queues/orders/requeue", "queues/orders/purge", "queues/"} {
			s.get(ref).want(t, http.StatusNotFound)
		}
		if after := f.snapshot(t); !reflect.DeepEqual(before, after) {
			t.Fatalf("GET changed Redis:\nbefore %v\nafter  %v", before, after)
		}
	})
}

// A key of an ordered queue that waits for its batch out shows as held,
// with no due time, beside a key that is due.
func TestHeldKey(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		ctx := context.Background()
		f := newFixture(t, b)
		f.c.Order("ord")
		must(t, f.p.Add(ctx, "ord", "k", 1))
		out, err := f.c.Fetch(ctx, "ord", 0, 10)
		must(t, err)
		if len(out.Batches) != 1 {
			t.Fatalf("fetched %d batches, want 1", len(out.Batches))
		}
		// Appended while the batch is out, the item waits: a pop leaves
		// the key held. Key j, added next, has no batch out: it is due.
		must(t, f.p.Add(ctx, "ord", "k", 2))
		if fe, err := f.c.Fetch(ctx, "ord", 0, 1); err != nil || len(fe.Batches) != 0 {
			t.Fatalf("fetched %+v, %v from a held key", fe.Batches, err)
		}
		must(t, f.p.Add(ctx, "ord", "j", 3))

		s := serve(t, newPage(t, f.in), "/")
		q := s.get("queues/ord").want(t, http.StatusOK, "<caption>Queue ord</caption>")
		rows := q.rows()
		wantCells(t, "key k", rows["k"], map[string]string{"items": "1", "due": "held", "lag": "0s"})
		wantCells(t, "key j", rows["j"], map[string]string{"items": "1", "due": ""})
		for _, m := range rowRe.FindAllStringSubmatch(q.body, -1) {
			if m[1] == "j" && !strings.Contains(m[2], `<td data-stat="due"><time datetime="2`) {
				t.Errorf("key j shows no due time: %s", m[2])
			}
		}
	})
}

func lagMs(body, key string) string {
	m := regexp.MustCompile(`(?s)<tr data-key="` + regexp.QuoteMeta(key) + `">.*?data-stat="lag" data-ms="(\d+)"`).FindStringSubmatch(body)
	if m == nil {
		return ""
	}
	return m[1]
}

func wantHeaders(t testing.TB, h http.Header) {
	t.Helper()
	want := map[string]string{
		"Content-Type":           "text/html; charset=utf-8",
		"X-Content-Type-Options": "nosniff",
		"Referrer-Policy":        "same-origin",
		"Cache-Control":          "no-store",
		"X-Frame-Options":        "DENY",
	}
	for k, v := range want {
		if h.Get(k) != v {
			t.Errorf("header %s: %q, want %q", k, h.Get(k), v)
		}
	}
	csp := h.Get("Content-Security-Policy")
	for _, d := range []string{"default-src 'none'", "style-src 'sha256-", "form-action 'self'", "frame-ancestors 'none'", "base-uri 'none'"} {
		if !strings.Contains(csp, d) {
			t.Errorf("Content-Security-Policy %q lacks %q", csp, d)
		}
	}
	if strings.Contains(csp, "script-src") || strings.Contains(csp, "unsafe") {
		t.Errorf("Content-Security-Policy %q allows too much", csp)
	}
}

// POSTs need a valid token for their action and queue and must not come
// from another origin; a valid one requeues a dead letter (its item is back
// at the end of its key), purges them, or requeues them all, and the page
// it redirects to says so.
func TestActions(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		f := seed(t, b)
		s := serve(t, newPage(t, f.in), "/batchq/")
		q := s.get("queues/orders").want(t, http.StatusOK)
		forms := q.forms()
		requeueURL, purgeURL := s.url(q.url, "./orders/requeue"), s.url(q.url, "./orders/purge")
		requeueTok, purgeTok := forms["./orders/requeue"], forms["./orders/purge"]
		emailsTok := s.get("queues/emails").forms()["./emails/requeue"] // none: emails has no dead letters
		if requeueTok == "" || purgeTok == "" || emailsTok != "" {
			t.Fatalf("forms %v", forms)
		}
		idX := f.deadOf(t, "orders", "x")
		badTok := "x" + requeueTok[1:] // one character changed, whatever the first was
		if requeueTok[0] == 'x' {
			badTok = "y" + requeueTok[1:]
		}

		before := f.snapshot(t)
		for _, c := range []struct {
			name   string
			u      *url.URL
			form   url.Values
			header []string
			status int
			text   string
		}{
			{"no token", requeueURL, url.Values{"id": {idX}}, nil, 403, "token is missing or invalid"},
			{"bad token", requeueURL, url.Values{"id": {idX}, "token": {badTok}}, nil, 403, "token"},
			{"purge token", requeueURL, url.Values{"id": {idX}, "token": {purgeTok}}, nil, 403, "token"},
			{"requeue token", purgeURL, url.Values{"confirm": {"1"}, "token": {requeueTok}}, nil, 403, "token"},
			{"token in the query", s.url(nil, "queues/orders/requeue?token="+url.QueryEscape(requeueTok)), url.Values{"id": {idX}}, nil, 403, "token"},
			{"other queue", s.url(nil, "queues/emails/requeue"), url.Values{"all": {"1"}, "token": {requeueTok}}, nil, 403, "token"},
			{"cross-site", requeueURL, url.Values{"id": {idX}, "token": {requeueTok}}, []string{"Sec-Fetch-Site", "cross-site"}, 403, "Cross-origin"},
			{"same-site", requeueURL, url.Values{"id": {idX}, "token": {requeueTok}}, []string{"Sec-Fetch-Site", "same-site"}, 403, "Cross-origin"},
			{"foreign origin", purgeURL, url.Values{"confirm": {"1"}, "token": {purgeTok}}, []string{"Origin", "http://evil.example"}, 403, "Cross-origin"},
			{"unknown id", requeueURL, url.Values{"id": {"nope"}, "token": {requeueTok}}, nil, 404, "no dead letter nope"},
			{"no id", requeueURL, url.Values{"token": {requeueTok}}, nil, 400, "Say which"},
			{"unconfirmed purge", purgeURL, url.Values{"token": {purgeTok}}, nil, 400, "confirm"},
			{"unknown queue", s.url(nil, "queues/nope/purge"), url.Values{"confirm": {"1"}, "token": {"x"}}, nil, 403, "token"},
		} {
			p := s.post(c.u, c.form, c.header...)
			if p.status != c.status || !strings.Contains(p.body, c.text) {
				t.Errorf("%s: %d, want %d with %q\n%s", c.name, p.status, c.status, c.text, p.body)
			}
			wantHeaders(t, p.header)
		}
		if after := f.snapshot(t); !reflect.DeepEqual(before, after) {
			t.Fatalf("refused POSTs changed Redis:\nbefore %v\nafter  %v", before, after)
		}

		// Requeue x's dead letter, as a browser would post it.
		res := s.post(requeueURL, url.Values{"id": {idX}, "token": {requeueTok}}, "Sec-Fetch-Site", "same-origin", "Origin", s.srv.URL)
		if loc := res.header.Get("Location"); loc != "../orders?done=requeued&n=1" {
			t.Errorf("Location %q", loc)
		}
		p := s.follow(res).want(t, http.StatusOK, `<p class="flash" role="status" id="flash">Requeued 1 dead letter.</p>`)
		wantCells(t, "after requeue", p.stats(t), map[string]string{"dead-letters": "1", "ready-keys": "3", "pending-items": "5"})
		if n := f.countDead(t, "orders"); n != 1 {
			t.Fatalf("%d dead letters after requeue, want 1", n)
		}
		if got := f.array(t, "orders", "x"); got != "["+itemX+"]" {
			t.Fatalf("key x holds %s after requeue, want [%s]", got, itemX)
		}
		s.post(requeueURL, url.Values{"id": {idX}, "token": {requeueTok}}).want(t, http.StatusNotFound, "requeued or purged")

		// Purge.
		s.follow(s.post(purgeURL, url.Values{"confirm": {"1"}, "token": {purgeTok}})).
			want(t, http.StatusOK, "Purged 1 dead letter.", "No dead letters.")
		if n := f.countDead(t, "orders"); n != 0 {
			t.Fatalf("%d dead letters after purge", n)
		}

		// Requeue all: every due key (a: 3, b: 1, x: 1) dies, then comes back.
		if n := f.kill(t, "orders"); n != 5 {
			t.Fatalf("killed %d items, want 5", n)
		}
		s.follow(s.post(requeueURL, url.Values{"all": {"1"}, "token": {requeueTok}})).
			want(t, http.StatusOK, "Requeued 5 dead letters.", "No dead letters.")
		if n := f.countDead(t, "orders"); n != 0 {
			t.Fatalf("%d dead letters after requeue all", n)
		}
		for key, want := range map[string]string{"a": "[1,2,3]", "b": "[4]", "x": "[" + itemX + "]"} {
			if got := f.array(t, "orders", key); got != want {
				t.Errorf("key %s holds %s, want %s", key, got, want)
			}
		}
	})
}

// Links, form actions and redirects are relative, so the page works under
// any mount path, and with queue names that need escaping.
func TestMountPaths(t *testing.T) {
	b := testredis.Mini(t)
	f := seed(t, b)
	const odd = "a/b c?d#e%f"
	must(t, f.p.Add(context.Background(), odd, "k", 1))
	f.kill(t, odd)
	h := newPage(t, f.in)
	for _, mount := range []string{"/", "/batchq/", "/ops/queues/batchq/"} {
		t.Run(mount, func(t *testing.T) {
			s := serve(t, h, mount)
			idx := s.get("").want(t, http.StatusOK)
			links := hrefRe.FindAllStringSubmatch(idx.body, -1)
			if len(links) != 3 {
				t.Fatalf("links %q", links)
			}
			for _, l := range links {
				name := htmlUnescape(l[2])
				u := s.url(idx.url, htmlUnescape(l[1]))
				req, _ := http.NewRequest(http.MethodGet, u.String(), nil)
				q := s.do(req).want(t, http.StatusOK)
				if !strings.Contains(q.body, "<caption>Queue "+l[2]+"</caption>") {
					t.Fatalf("%s: not the page of %q:\n%s", u, name, q.body)
				}
				if home := regexp.MustCompile(`<h1><a href="([^"]+)"`).FindStringSubmatch(q.body); home == nil ||
					s.url(q.url, home[1]).String() != s.base.String() {
					t.Errorf("%s: home link %q does not lead to %s", u, home, s.base)
				}
				if name != odd {
					continue
				}
				var action, token string
				for a, tok := range q.forms() {
					if strings.HasSuffix(a, "/requeue") {
						action, token = a, tok
					}
				}
				id := f.deadOf(t, odd, "k")
				p := s.follow(s.post(s.url(q.url, htmlUnescape(action)), url.Values{"id": {id}, "token": {token}}))
				p.want(t, http.StatusOK, "Requeued 1 dead letter.", "<caption>Queue "+l[2]+"</caption>")
				if p.url.Path != u.Path || p.url.RawPath != u.RawPath {
					t.Errorf("redirected to %s, want %s", p.url, u)
				}
				f.kill(t, odd)
			}
		})
	}
}

func htmlUnescape(s string) string {
	return strings.NewReplacer("&amp;", "&", "&#43;", "+", "&#34;", `"`, "&#39;", "'", "&lt;", "<", "&gt;", ">").Replace(s)
}

// WithShowItems shows the items of dead letters, escaped.
func TestShowItems(t *testing.T) {
	f := seed(t, testredis.Mini(t))
	must(t, f.p.AddRaw(context.Background(), "orders", "z", json.RawMessage(`"<script>alert(1)</script>"`)))
	f.kill(t, "orders")
	s := serve(t, newPage(t, f.in, statuspage.WithShowItems()), "/batchq/")
	q := s.get("queues/orders").want(t, http.StatusOK, `<th scope="col">Item</th>`, "s3cr3t-x", "s3cr3t-y", "&lt;script&gt;")
	if strings.Contains(q.body, "<script>") {
		t.Fatalf("an item is not escaped:\n%s", q.body)
	}
}

// The flash message is built from known words and numbers, never echoed.
func TestFlash(t *testing.T) {
	f := seed(t, testredis.Mini(t))
	s := serve(t, newPage(t, f.in), "/batchq/")
	for query, want := range map[string]string{
		"done=requeued&n=1":           "Requeued 1 dead letter.",
		"done=requeued&n=2&skipped=1": "Requeued 2 dead letters. Skipped 1 dead letter holding a corrupt value (purge only).",
		"done=purged&n=0":             "Purged 0 dead letters.",
		"done=purged&n=x":             "",
		"done=hacked&n=1":             "",
		"done=requeued&n=-1":          "",
		"":                            "",
	} {
		p := s.get("queues/orders?"+query).want(t, http.StatusOK)
		m := regexp.MustCompile(`id="flash">([^<]*)<`).FindStringSubmatch(p.body)
		if got := ""; m != nil {
			got = m[1]
			if got != want {
				t.Errorf("?%s: flash %q, want %q", query, got, want)
			}
		} else if want != "" {
			t.Errorf("?%s: no flash, want %q", query, want)
		}
		if strings.Contains(p.body, "hacked") {
			t.Errorf("?%s: the query is echoed", query)
		}
	}
}

// A Redis that does not answer gives 503 with the error, promptly.
func TestRedisDown(t *testing.T) {
	b := testredis.Mini(t)
	f := seed(t, b)
	s := serve(t, newPage(t, f.in, statuspage.WithTimeout(2*time.Second)), "/batchq/")
	b.Mini.Close()
	for _, ref := range []string{"", "queues/orders"} {
		p := s.get(ref).want(t, http.StatusServiceUnavailable, "Redis error: ")
		wantHeaders(t, p.header)
		if strings.Contains(p.body, "goroutine") || strings.Contains(p.body, ".go:") {
			t.Errorf("a stack in the page:\n%s", p.body)
		}
	}
}

// The CSP allows exactly the page's own style sheet.
func TestStyleHash(t *testing.T) {
	s := serve(t, newPage(t, seed(t, testredis.Mini(t)).in), "/")
	p := s.get("").want(t, http.StatusOK)
	m := regexp.MustCompile(`(?s)<style>(.*?)</style>`).FindStringSubmatch(p.body)
	if m == nil {
		t.Fatal("no style element")
	}
	sum := sha256.Sum256([]byte(m[1]))
	if want := "style-src 'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"; !strings.Contains(p.header.Get("Content-Security-Policy"), want) {
		t.Fatalf("CSP %q lacks %q", p.header.Get("Content-Security-Policy"), want)
	}
}

// Two handlers refuse each other's tokens, unless they share a secret.
func TestSecret(t *testing.T) {
	f := seed(t, testredis.Mini(t))
	secret := []byte(strings.Repeat("k", 32))
	token := func(h http.Handler) string {
		return serve(t, h, "/").get("queues/orders").want(t, http.StatusOK).forms()["./orders/purge"]
	}
	if a, b := token(newPage(t, f.in)), token(newPage(t, f.in)); a == b || a == "" {
		t.Errorf("two handlers with random secrets give the same token %q", a)
	}
	a, b := token(newPage(t, f.in, statuspage.WithSecret(secret))), token(newPage(t, f.in, statuspage.WithSecret(secret)))
	if a != b || a == "" {
		t.Errorf("two handlers with one secret give tokens %q and %q", a, b)
	}
}

// New rejects a nil inspector and invalid options with an error, and no
// handler; it never panics.
func TestInvalidOptions(t *testing.T) {
	in, err := inspect.New(testredis.Mini(t).Client)
	must(t, err)
	for name, tt := range map[string]struct {
		opt  statuspage.Option
		want string
	}{
		"logger":         {statuspage.WithLogger(nil), "statuspage: nil logger"},
		"lagging keys 0": {statuspage.WithLaggingKeys(0), "statuspage: lagging keys must be 1-1000, got 0"},
		"lagging keys":   {statuspage.WithLaggingKeys(statuspage.MaxListed + 1), "statuspage: lagging keys must be 1-1000, got 1001"},
		"dead letters 0": {statuspage.WithDeadLetters(0), "statuspage: dead letters must be 1-1000, got 0"},
		"dead letters":   {statuspage.WithDeadLetters(statuspage.MaxListed + 1), "statuspage: dead letters must be 1-1000, got 1001"},
		"title":          {statuspage.WithTitle(" "), "statuspage: empty title"},
		"secret":         {statuspage.WithSecret([]byte("short")), "statuspage: secret must be at least 32 bytes, got 5"},
		"timeout":        {statuspage.WithTimeout(0), "statuspage: timeout must be positive, got 0s"},
	} {
		if h, err := statuspage.New(in, tt.opt); h != nil || err == nil || err.Error() != tt.want {
			t.Errorf("%s: %v, %v; want %q", name, h, err, tt.want)
		}
	}
	if h, err := statuspage.New(nil); h != nil || err == nil || err.Error() != "statuspage: nil inspector" {
		t.Errorf("nil inspector: %v, %v", h, err)
	}
	_, err = statuspage.New(in, statuspage.WithLaggingKeys(1), statuspage.WithDeadLetters(statuspage.MaxListed)) // valid
	must(t, err)
}

// Every name a queue may have round-trips as a path segment: its link on
// the index leads to its own page. Names that could not, "." and ".." (dot
// segments, which browsers and ServeMux resolve), are refused by the
// producer, as are names with control characters or invalid UTF-8.
func TestQueueNamesRoundTrip(t *testing.T) {
	b := testredis.Mini(t)
	f := newFixture(t, b)
	s := serve(t, newPage(t, f.in), "/ops/")
	names := []string{"...", "a.", ".a", "a..b", "a/b", "a/b/", "/a", "a//b", "%", "%2e", "%2e%2e", "%2F", "a%2Fb", `\`, `a\..\b`,
		"a b", "a+b", "a?b", "a#b", "a;b", "a&b", "a=b", "ü日本", "<a>", `"q"`, "'q'", "~", "@", "a,b", "*",
		"a/..", "a/.", "../a", "./a", "a/../b", "a/./b"}
	refused := []string{".", "..", "a\x00b", "a\nb", "a\tb", "a\x1b[31mb", "a\u0085b", "\xff", "a\xc3"}
	for _, name := range refused {
		if err := producer.CheckQueue(name); !errors.Is(err, producer.ErrQueueName) {
			t.Errorf("CheckQueue(%q) = %v, want ErrQueueName", name, err)
		}
	}
	for _, name := range names {
		if err := f.p.Add(context.Background(), name, "k", 1); err != nil {
			t.Fatalf("Add to %q: %v", name, err)
		}
	}
	idx := s.get("").want(t, http.StatusOK)
	links := hrefRe.FindAllStringSubmatch(idx.body, -1)
	if len(links) != len(names) {
		t.Fatalf("%d links for %d queues", len(links), len(names))
	}
	for _, l := range links {
		u := s.url(idx.url, htmlUnescape(l[1]))
		req, _ := http.NewRequest(http.MethodGet, u.String(), nil)
		q := s.do(req)
		if q.status != http.StatusOK || !strings.Contains(q.body, "<caption>Queue "+l[2]+"</caption>") {
			t.Errorf("queue %q: its link %s answers %d, not its page", htmlUnescape(l[2]), u, q.status)
		}
	}
}

// The page answers only requests for its own host: an IP address,
// localhost, or a name given to WithAllowedHosts. A DNS name of an
// attacker's that resolves to the page's address (DNS rebinding) gets 421,
// with no token to read, and its same-origin POSTs change nothing.
func TestAllowedHosts(t *testing.T) {
	f := seed(t, testredis.Mini(t))
	s := serve(t, newPage(t, f.in, statuspage.WithAllowedHosts("ops.example.com", "dot.example.com.")), "/batchq/")
	q := s.get("queues/orders").want(t, http.StatusOK)
	purgeTok := q.forms()["./orders/purge"]
	before := f.snapshot(t)
	withHost := func(method, host string, form url.Values) page {
		t.Helper()
		u := s.url(nil, "queues/orders")
		var body io.Reader
		if form != nil {
			u = s.url(nil, "queues/orders/purge")
			body = strings.NewReader(form.Encode())
		}
		req, err := http.NewRequest(method, u.String(), body)
		must(t, err)
		req.Host = host
		if form != nil {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			req.Header.Set("Sec-Fetch-Site", "same-origin")
		}
		return s.do(req)
	}
	for _, host := range []string{"evil.example", "evil.example:" + s.base.Port(), "localhost.evil.example", "ops.example.com.evil"} {
		p := withHost(http.MethodGet, host, nil)
		if p.status != http.StatusMisdirectedRequest || strings.Contains(p.body, purgeTok) || strings.Contains(p.body, "token") {
			t.Errorf("GET for %s: %d, want 421 without a token\n%s", host, p.status, p.body)
		}
		if p := withHost(http.MethodPost, host, url.Values{"confirm": {"1"}, "token": {purgeTok}}); p.status != http.StatusMisdirectedRequest {
			t.Errorf("POST for %s: %d, want 421", host, p.status)
		}
	}
	if after := f.snapshot(t); !reflect.DeepEqual(before, after) {
		t.Errorf("refused requests changed Redis:\n%v\n%v", before, after)
	}
	for _, host := range []string{"127.0.0.1:" + s.base.Port(), "localhost", "LOCALHOST:80", "[::1]:9090", "10.1.2.3", "ops.example.com", "OPS.Example.com:8443", "dot.example.com", "dot.example.com.:443"} {
		if p := withHost(http.MethodGet, host, nil); p.status != http.StatusOK {
			t.Errorf("GET for %s: %d, want 200", host, p.status)
		}
	}
	for _, bad := range []string{"", "a:80", "http://a", "a b"} {
		want := fmt.Sprintf("statuspage: allowed host %q: want a host name without port or scheme", bad)
		if h, err := statuspage.New(f.in, statuspage.WithAllowedHosts(bad)); h != nil || err == nil || err.Error() != want {
			t.Errorf("WithAllowedHosts(%q): %v, %v; want %q", bad, h, err, want)
		}
	}
}

// The index lists QueuesPerPage queues a page, reading only those: a
// registry of many queues keeps it small and quick.
func TestIndexPages(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		f := newFixture(t, b)
		total := 2*statuspage.QueuesPerPage + 50
		var cmds []rueidis.Completed
		for i := range total {
			cmds = append(cmds, b.Client.B().Hset().Key(keys.Registry(b.Prefix)).FieldValue().FieldValue(fmt.Sprintf("q%04d", i), "1").Build())
		}
		for _, r := range b.Client.DoMulti(context.Background(), cmds...) {
			must(t, r.Error())
		}
		s := serve(t, newPage(t, f.in), "/batchq/")
		p := s.get("").want(t, http.StatusOK, fmt.Sprintf("Queues 1–100 of %d", total), `href="?page=2" rel="next"`)
		for page, want := range map[int]int{1: 100, 2: 100, 3: 50} {
			p = s.get("?page="+strconv.Itoa(page)).want(t, http.StatusOK)
			rows := hrefRe.FindAllStringSubmatch(p.body, -1)
			if len(rows) != want || rows[0][2] != fmt.Sprintf("q%04d", (page-1)*100) {
				t.Errorf("page %d: %d queues from %v, want %d from q%04d", page, len(rows), rows[0][2], want, (page-1)*100)
			}
		}
		s.get("?page=3").want(t, http.StatusOK, `href="?page=2" rel="prev"`, fmt.Sprintf("Queues 201–250 of %d", total))
		s.get("?page=4").want(t, http.StatusNotFound, "There is no page 4")
		s.get("?page=100000000000000001").want(t, http.StatusNotFound, "There is no page")
		s.get("?page=0").want(t, http.StatusBadRequest)
		s.get("?page=x").want(t, http.StatusBadRequest)
	})
}

// HostHandler applies the page's host rule to another handler.
func TestHostHandler(t *testing.T) {
	h := statuspage.HostHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }), "ops.example.com")
	for host, want := range map[string]int{"evil.example": 421, "127.0.0.1:9090": 200, "localhost": 200, "ops.example.com:80": 200, "[::1]": 200} {
		req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
		req.Host = host
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != want {
			t.Errorf("Host %s: %d, want %d", host, rec.Code, want)
		}
	}
}
