package statuspage_test

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/internal/protocol"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
	"github.com/batchq/batchq/statuspage"
)

// chromium returns the path of the Chromium binary. Without one the test
// skips, except where CI=true: there it fails.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if path, err := exec.LookPath(name); err == nil {
			return path
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("chromium is not installed (CI=true): install Debian's chromium package (.ci/run does)")
	}
	t.Skip("chromium is not installed: the browser test needs it (apt-get install chromium)")
	return ""
}

// showcase makes the state of a small shop on b, with the real producer
// and consumer:
//
//	webhooks: 3 dead letters (endpoint:umbrella's 2 items, 410 Gone, and
//	          one of endpoint:acme after 3 attempts), 1 retry due in 10
//	          minutes, and 17 pending items in 3 keys, the oldest due 3m12s
//	          ago.
//	emails:   a batch of 3 items in flight, 3 pending items in 2 keys.
//	invoices: 4 shards, 9 pending items in 6 keys.
func showcase(t *testing.T, b testredis.Backend) *fixture {
	t.Helper()
	ctx := context.Background()
	f := newFixture(t, b)

	hook := func(ev string, order int) map[string]any { return map[string]any{"event": ev, "order": order} }
	// fail appends items to a key and fails them attempts times, the last
	// time for good.
	fail := func(queue, key string, attempts int, msg string, items ...any) {
		must(t, f.p.Add(ctx, queue, key, items...))
		for attempt := 1; attempt <= attempts; attempt++ {
			fe, err := f.c.Fetch(ctx, queue, 0, 10)
			must(t, err)
			if len(fe.Batches) != 1 {
				t.Fatalf("fetched %d batches of %s, want 1", len(fe.Batches), queue)
			}
			bt := fe.Batches[0]
			out := make([]protocol.Outcome, len(bt.Items))
			for i := range out {
				out[i] = protocol.Outcome{Kind: protocol.Retry, Err: errors.New(msg)}
				if attempt == attempts {
					out[i].Kind = protocol.Dead
				}
			}
			must(t, f.c.Settle(ctx, bt, out))
		}
	}
	fail("webhooks", "endpoint:acme", 3, "POST https://acme.example/hooks: context deadline exceeded (30s)", hook("order.paid", 1017))
	fail("webhooks", "endpoint:umbrella", 1, "POST https://umbrella.example/hooks: 410 Gone",
		hook("order.paid", 1042), hook("order.shipped", 1042))
	// A retry due in 10 minutes.
	must(t, f.p.Add(ctx, "webhooks", "endpoint:globex", hook("order.refunded", 998)))
	fe, err := f.c.Fetch(ctx, "webhooks", 0, 10)
	must(t, err)
	must(t, f.c.Settle(ctx, fe.Batches[0], []protocol.Outcome{{Kind: protocol.Retry, Err: errors.New("POST https://globex.example/hooks: 429 Too Many Requests"), Delay: 10 * time.Minute}}))
	for i := range 12 {
		must(t, f.p.Add(ctx, "webhooks", "endpoint:acme", hook("order.paid", 1100+i)))
	}
	for i := range 4 {
		must(t, f.p.Add(ctx, "webhooks", "endpoint:globex", hook("order.paid", 1200+i)))
	}
	must(t, f.p.Add(ctx, "webhooks", "endpoint:initech", hook("order.paid", 1300)))
	f.backdate(t, "webhooks", "endpoint:acme", 3*time.Minute+12*time.Second)
	f.backdate(t, "webhooks", "endpoint:globex", 41*time.Second)

	mail := func(to string) map[string]string { return map[string]string{"to": to, "template": "receipt"} }
	must(t, f.p.Add(ctx, "emails", "user:1042", mail("a@example.com"), mail("a@example.com"), mail("a@example.com")))
	if fe, err := f.c.Fetch(ctx, "emails", 0, 10); err != nil || len(fe.Batches) != 1 {
		t.Fatalf("fetch emails: %+v, %v", fe, err)
	} // held: in flight
	must(t, f.p.Add(ctx, "emails", "user:77", mail("b@example.com")))
	must(t, f.p.Add(ctx, "emails", "user:3141", mail("c@example.com"), mail("c@example.com")))
	f.backdate(t, "emails", "user:3141", 8*time.Second)

	p4, err := producer.New(b.Client, producer.WithPrefix(b.Prefix), producer.WithDefaultShards(4))
	must(t, err)
	for i := range 6 {
		items := []any{map[string]int{"invoice": 5000 + i}}
		if i%2 == 0 {
			items = append(items, map[string]int{"invoice": 6000 + i})
		}
		must(t, p4.Add(ctx, "invoices", "customer:"+strconv.Itoa(700+i), items...))
	}
	return f
}

// syncBuffer is a bytes.Buffer safe for the browser's output goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// browser starts a headless Chromium, bounded by ctx, and stops it (and
// waits for the process) when the test ends.
func browser(t *testing.T, ctx context.Context, path string) context.Context {
	t.Helper()
	var out syncBuffer
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(ctx,
		chromedp.ExecPath(path),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.Flag("disable-dev-shm-usage", true), // /dev/shm is small in containers
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1200, 900),
		chromedp.CombinedOutput(&out),
	)
	bctx, cancel := chromedp.NewContext(allocCtx)
	t.Cleanup(func() {
		// Close the browser gracefully, then make sure its process is gone.
		if err := chromedp.Cancel(bctx); err != nil && ctx.Err() == nil {
			t.Logf("close the browser: %v", err)
		}
		cancel()
		cancelAlloc() // kills the process if it is still there, and waits for it
		if t.Failed() {
			t.Logf("browser output:\n%s", out.String())
		}
	})
	return bctx
}

// In headless Chromium: the index shows a queue's real numbers; its link
// leads to the queue's page; a click on a dead letter's Requeue button
// requeues it (the browser's POST passes the cross-origin check and the
// token), and the page it lands on says so, as Redis does. With
// BATCHQ_SCREENSHOT=path, it saves a screenshot of that page there.
func TestBrowser(t *testing.T) {
	path := chromium(t)
	f := showcase(t, testredis.Real(t))
	s := serve(t, newPage(t, f.in, statuspage.WithTitle("shop-api · batchq")), "/batchq/")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	bctx := browser(t, ctx, path)

	text := func(sel string) string {
		t.Helper()
		v, err := chromedp.Run(bctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("text of %s: %v", sel, err)
		}
		return strings.TrimSpace(v)
	}
	wantText := func(sel, want string) {
		t.Helper()
		if got := text(sel); got != want {
			t.Errorf("%s: %q, want %q", sel, got, want)
		}
	}
	load := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		res, err := chromedp.RunResponse(bctx, steps...)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if res.Status != http.StatusOK {
			t.Fatalf("%s: status %d", what, res.Status)
		}
	}

	// The index.
	load("open the index", chromedp.Navigate(s.base.String()))
	row := `tr[data-queue="webhooks"] `
	for stat, want := range map[string]string{"shards": "1", "ready-keys": "3", "pending-items": "17",
		"in-flight-batches": "0", "retries": "1", "dead-letters": "3"} {
		wantText(row+`td[data-stat="`+stat+`"]`, want)
	}
	wantText(`tr[data-queue="emails"] td[data-stat="in-flight-items"]`, "3")
	wantText(`tr[data-queue="invoices"] td[data-stat="shards"]`, "4")
	wantText(`tr[data-queue="invoices"] td[data-stat="pending-items"]`, "9")
	lag, err := chromedp.Run(bctx, chromedp.AttributeValue(chromedp.CSS(row+`td[data-stat="lag"]`), "data-ms"))
	must(t, err)
	if ms, _ := strconv.Atoi(lag.Value); ms < 192_000 {
		t.Errorf("webhooks lag %q ms, want at least 3m12s", lag.Value)
	}
	// The style sheet applies: the CSP's hash matches it.
	collapse, err := chromedp.Run(bctx, chromedp.Evaluate[string](`getComputedStyle(document.querySelector("table")).borderCollapse`))
	if err != nil || collapse != "collapse" {
		t.Errorf("the style sheet does not apply (border-collapse %q, %v): blocked by the CSP?", collapse, err)
	}

	// The queue's page, by its link.
	load("follow the link to webhooks", chromedp.Click(chromedp.CSS(row+`a[data-stat="link"]`)))
	loc, err := chromedp.Run(bctx, chromedp.Location())
	must(t, err)
	if want := s.base.String() + "queues/webhooks"; loc != want {
		t.Fatalf("at %s, want %s", loc, want)
	}
	wantText(`#stats td[data-stat="dead-letters"]`, "3")
	wantText(`#stats td[data-stat="pending-items"]`, "17")
	wantText(`#keys tbody tr:first-child th`, "endpoint:acme")

	// Requeue one of endpoint:umbrella's dead letters.
	var letter deadletter.Letter
	for _, d := range f.dead(t, "webhooks") {
		if d.Key == "endpoint:umbrella" {
			letter = d
			break
		}
	}
	load("click Requeue", chromedp.Click(chromedp.CSS(`button[data-requeue="`+letter.ID+`"]`)))
	wantText("#flash", "Requeued 1 dead letter.")
	wantText(`#stats td[data-stat="dead-letters"]`, "2")
	if loc, err := chromedp.Run(bctx, chromedp.Location()); err != nil || !strings.HasSuffix(loc, "/batchq/queues/webhooks?done=requeued&n=1") {
		t.Errorf("after requeue at %s, %v", loc, err)
	}
	if n, err := chromedp.Run(bctx, chromedp.Evaluate[int](`document.querySelectorAll('button[data-requeue="`+letter.ID+`"]').length`)); err != nil || n != 0 {
		t.Errorf("the requeued letter is still listed (%d, %v)", n, err)
	}

	// Redis agrees.
	if n := f.countDead(t, "webhooks"); n != 2 {
		t.Errorf("%d dead letters in Redis, want 2", n)
	}
	for _, d := range f.dead(t, "webhooks") {
		if d.ID == letter.ID {
			t.Errorf("dead letter %s is still in Redis", d.ID)
		}
	}
	if got, want := f.array(t, "webhooks", "endpoint:umbrella"), "["+string(letter.Item)+"]"; got != want {
		t.Errorf("endpoint:umbrella holds %s, want %s", got, want)
	}

	if shot := os.Getenv("BATCHQ_SCREENSHOT"); shot != "" {
		png, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
		must(t, err)
		must(t, os.WriteFile(shot, png, 0o644))
		t.Logf("screenshot of %s (%d bytes) in %s", loc, len(png), shot)
	}
}
