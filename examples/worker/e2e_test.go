package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/batchq/batchq/internal/testredis"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// e2eQueue is the queue the end-to-end test produces to and drains.
const e2eQueue = "orders"

// e2eSecret marks the fields of an item other than its id: no log line may
// hold it.
const e2eSecret = "secret-"

// TestEndToEnd runs the webproducer and two workers as separate processes
// against a real redis-server: items posted over HTTP are each handled
// exactly once, the logs name the queue and key but never the item, and
// SIGTERM stops every process cleanly, leaving no data keys behind.
func TestEndToEnd(t *testing.T) {
	testEndToEnd(t, testredis.Real(t))
}

// The same on a Redis Cluster of three masters, the binaries given the
// address of one node as their seed, and no shard count: the queue gets
// the registry's default, spread over every master.
func TestEndToEndOnCluster(t *testing.T) {
	testEndToEnd(t, testredis.Cluster(t))
}

func testEndToEnd(t *testing.T, b testredis.Backend) {
	bin := buildExamples(t)
	web, base, client := startWebproducer(t, bin, b)

	// Both workers wait for items before any is posted, so that they compete
	// for them.
	workers := []*proc{
		startWorker(t, "worker1", bin, b),
		startWorker(t, "worker2", bin, b),
	}
	waitUntil(t, 10*time.Second, func() error {
		for _, w := range workers {
			if err := w.exitedEarly(); err != nil {
				return err
			}
			if !w.logged(t, "worker started") {
				return fmt.Errorf("%s not started yet", w.name)
			}
		}
		return nil
	})

	// 30 items over 3 keys, some posted alone and some as arrays. The ids of
	// the last key are strings. want maps each id to its key.
	keys := []string{"user:1", "user:2", "user:3"}
	want := make(map[string]string)
	// post sends body to key and fails unless the answer is code with
	// reply as its body.
	post := func(key string, body []byte, code int, reply string) {
		t.Helper()
		resp, err := client.Post(base+key, "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatalf("POST %s: %v", key, err)
		}
		defer resp.Body.Close()
		got, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != code || !strings.HasPrefix(string(got), reply) {
			t.Fatalf("POST %s %s: %d %s, want %d %s...", key, body, resp.StatusCode, got, code, reply)
		}
	}
	for k, key := range keys {
		var items []any
		for i := k*10 + 1; i <= k*10+10; i++ {
			var id any = i
			if k == 2 {
				id = fmt.Sprintf("c%d", i)
			}
			want[fmt.Sprint(id)] = key
			items = append(items, map[string]any{"id": id, "email": fmt.Sprintf("%s%d@example.com", e2eSecret, i), "note": e2eSecret + "note"})
		}
		for _, it := range items[:4] {
			post(key, mustJSON(t, it), http.StatusAccepted, `{"queued":1}`)
		}
		post(key, mustJSON(t, items[4:7]), http.StatusAccepted, `{"queued":3}`)
		post(key, mustJSON(t, items[7:]), http.StatusAccepted, `{"queued":3}`)
	}
	post(keys[0], []byte(`{"id": 31, "email": `), http.StatusBadRequest, `{"error":`)

	waitUntil(t, 20*time.Second, func() error {
		for _, w := range workers {
			if err := w.exitedEarly(); err != nil {
				return err
			}
		}
		handled := handledLines(t, workers)
		var missing []string
		for id := range want {
			if len(handled[id]) == 0 {
				missing = append(missing, id)
			}
		}
		if len(missing) > 0 {
			slices.Sort(missing)
			return fmt.Errorf("ids not handled yet: %v", missing)
		}
		return nil
	})

	// Each worker serves its counters at /metrics and the queue's state
	// (read from Redis) there and on the status page: together they handled
	// the 30 items once each, and nothing is left pending.
	waitUntil(t, 10*time.Second, func() error {
		total := 0.0
		for _, w := range workers {
			body, err := httpGet(client, "http://"+w.metricsAddr+"/metrics")
			if err != nil {
				return err
			}
			if v := metricValue(body, `batchq_handled_items_total{queue="orders"}`); v > 0 {
				total += v // absent (-1) in a worker that handled nothing
			}
			if v := metricValue(body, `batchq_pending_items{queue="orders"}`); v != 0 {
				return fmt.Errorf("%s: batchq_pending_items %v", w.name, v)
			}
		}
		if total != float64(len(want)) {
			return fmt.Errorf("workers report %v handled items, want %d", total, len(want))
		}
		return nil
	})
	page, err := httpGet(client, "http://"+workers[0].metricsAddr+"/status/")
	if err != nil || !strings.Contains(page, e2eQueue) {
		t.Fatalf("status page: %v\n%s", err, page)
	}
	// The status page answers its own address and localhost only: a DNS
	// name of someone else's that points at it (DNS rebinding) gets 421.
	for _, path := range []string{"/status/", "/metrics"} {
		for host, want := range map[string]int{"evil.example": http.StatusMisdirectedRequest, "localhost": http.StatusOK} {
			req, _ := http.NewRequest(http.MethodGet, "http://"+workers[0].metricsAddr+path, nil)
			req.Host = host
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != want {
				t.Errorf("%s for Host %s: %s, want %d", path, host, resp.Status, want)
			}
		}
	}

	procs := append([]*proc{web}, workers...)
	for _, p := range procs {
		p.signal(t, syscall.SIGTERM)
	}
	for _, p := range procs {
		p.waitExit(t, 15*time.Second)
	}

	// Every process has exited: its output is complete, and no item, not
	// even the invalid one, was handled twice or without being posted.
	for id, lines := range handledLines(t, workers) {
		key, ok := want[id]
		if !ok {
			t.Errorf("handled an id never posted: %s", id)
			continue
		}
		if len(lines) != 1 {
			t.Errorf("id %s handled %d times, want once: %v", id, len(lines), lines)
		}
		for _, l := range lines {
			if l["queue"] != e2eQueue || l["key"] != key {
				t.Errorf("id %s logged with queue %v key %v, want %s %s", id, l["queue"], l["key"], e2eQueue, key)
			}
		}
	}
	for _, w := range workers {
		var n, failed int
		for _, l := range w.logLines(t) {
			switch l["msg"] {
			case "handled":
				n++
			case "batch failed":
				failed++
			}
		}
		t.Logf("%s handled %d items; %d batches failed", w.name, n, failed)
		for _, msg := range []string{"worker stopping", "worker stopped", "exiting"} {
			if !w.logged(t, msg) {
				t.Errorf("%s did not log %q on SIGTERM", w.name, msg)
			}
		}
	}
	if !web.logged(t, "stopped") {
		t.Errorf("webproducer did not log %q on SIGTERM", "stopped")
	}

	var left []string
	for _, k := range testredis.Keys(t, b, b.Prefix+":{*") {
		if !strings.HasSuffix(k, ":wake") {
			left = append(left, k)
		}
	}
	if len(left) > 0 {
		slices.Sort(left)
		t.Errorf("data keys left in Redis: %v", left)
	}
}

// buildExamples builds the webproducer and worker binaries into a temporary
// directory and returns it.
func buildExamples(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", "..")) // the test runs in examples/worker
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("module root not found: %v", err)
	}
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", dir+string(filepath.Separator), "./examples/webproducer", "./examples/worker")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return dir
}

// startWebproducer starts the webproducer binary of bin on a free port
// against b, with its default flags, and waits until it answers. It
// returns the process, the base URL of the e2e queue's keys and a client.
func startWebproducer(t *testing.T, bin string, b testredis.Backend) (*proc, string, *http.Client) {
	t.Helper()
	addr := "127.0.0.1:" + strconv.Itoa(testredis.FreePort(t))
	web := startProc(t, "webproducer", filepath.Join(bin, "webproducer"), "-addr", addr, "-redis", b.Addr, "-prefix", b.Prefix)
	base := "http://" + addr + "/queues/" + e2eQueue + "/keys/"
	client := &http.Client{Timeout: 5 * time.Second}
	waitUntil(t, 10*time.Second, func() error {
		if err := web.exitedEarly(); err != nil {
			return err
		}
		resp, err := client.Get(base + "up") // any answer will do: the mux answers 405
		if err != nil {
			return err
		}
		resp.Body.Close()
		return nil
	})
	return web, base, client
}

// startWorker starts the worker binary of bin against b, with -work 2ms,
// -fail 0.2 and a -metrics address, then flags.
func startWorker(t *testing.T, name, bin string, b testredis.Backend, flags ...string) *proc {
	t.Helper()
	addr := "127.0.0.1:" + strconv.Itoa(testredis.FreePort(t))
	p := startProc(t, name, filepath.Join(bin, "worker"), append([]string{
		"-redis", b.Addr, "-prefix", b.Prefix, "-queue", e2eQueue, "-work", "2ms", "-fail", "0.2",
		"-metrics", addr}, flags...)...)
	p.metricsAddr = addr
	return p
}

// httpGet returns the body of a 200 answer to GET url.
func httpGet(c *http.Client, url string) (string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return string(body), err
}

// metricValue returns the value of the sample named series (name and
// labels, as Prometheus' text format writes them) in body, or -1.
func metricValue(body, series string) float64 {
	for line := range strings.Lines(body) {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			if v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64); err == nil {
				return v
			}
		}
	}
	return -1
}

// proc is a running example binary whose output, stdout and stderr, is
// collected line by line.
type proc struct {
	name        string
	metricsAddr string // where a worker serves /metrics and /status/
	cmd         *exec.Cmd
	exited      chan struct{} // closed once the process exited and its output was read
	err         error         // what Wait returned; set before exited is closed

	mu    sync.Mutex
	lines []string
}

// startProc starts bin with args. The process is killed when the test ends,
// if it is still running, and its output is logged if the test failed.
func startProc(t *testing.T, name, bin string, args ...string) *proc {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{name: name, cmd: exec.Command(bin, args...), exited: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = w, w // one pipe: lines stay whole and in order
	err = p.cmd.Start()
	w.Close()
	if err != nil {
		r.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	read := make(chan struct{})
	go func() {
		defer close(read)
		defer r.Close()
		sc := bufio.NewScanner(r)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
		}
		if err := sc.Err(); err != nil {
			p.mu.Lock()
			p.lines = append(p.lines, "e2e_test: reading the output: "+err.Error())
			p.mu.Unlock()
			io.Copy(io.Discard, r) // never block the process on a full pipe
		}
	}()
	go func() {
		err := p.cmd.Wait()
		<-read
		p.err = err
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			p.cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("output of %s:\n%s", p.name, strings.Join(p.output(), "\n"))
		}
	})
	return p
}

// output returns the lines the process wrote so far.
func (p *proc) output() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.lines)
}

// exitedEarly returns an error if the process has already exited.
func (p *proc) exitedEarly() error {
	select {
	case <-p.exited:
		return fmt.Errorf("%s exited early: %v", p.name, p.err)
	default:
		return nil
	}
}

func (p *proc) signal(t *testing.T, sig os.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Errorf("signal %s: %v", p.name, err)
	}
}

// waitExit fails the test unless the process exits with status 0 within
// timeout.
func (p *proc) waitExit(t *testing.T, timeout time.Duration) {
	t.Helper()
	select {
	case <-p.exited:
		if p.err != nil {
			t.Errorf("%s exited with %v, want status 0", p.name, p.err)
		}
	case <-time.After(timeout):
		t.Errorf("%s still running %v after SIGTERM", p.name, timeout)
	}
}

// logLine is one decoded zap JSON line; numbers are json.Number.
type logLine map[string]any

// logLines decodes the lines the process wrote so far. Every line must be
// JSON, and none may hold an item's fields other than its id.
func (p *proc) logLines(t *testing.T) []logLine {
	t.Helper()
	var out []logLine
	for _, s := range p.output() {
		if strings.Contains(s, e2eSecret) {
			t.Fatalf("%s logged an item's contents: %s", p.name, s)
		}
		d := json.NewDecoder(strings.NewReader(s))
		d.UseNumber()
		var l logLine
		if err := d.Decode(&l); err != nil {
			t.Fatalf("%s wrote a line that is not JSON: %q: %v", p.name, s, err)
		}
		out = append(out, l)
	}
	return out
}

// logged reports whether the process logged a line with message msg.
func (p *proc) logged(t *testing.T, msg string) bool {
	t.Helper()
	return slices.ContainsFunc(p.logLines(t), func(l logLine) bool { return l["msg"] == msg })
}

// handledFields are the fields a "handled" line may hold.
var handledFields = []string{"level", "ts", "caller", "msg", "queue", "key", "attempt", "id"}

// handledLines returns the "handled" lines of the workers by id. It fails
// the test if a line about an item lacks its queue or key, or if a
// "handled" line holds another field than handledFields.
func handledLines(t *testing.T, workers []*proc) map[string][]logLine {
	t.Helper()
	out := make(map[string][]logLine)
	for _, w := range workers {
		for _, l := range w.logLines(t) {
			msg, _ := l["msg"].(string)
			if msg != "handled" && !strings.HasPrefix(msg, "item failed") {
				continue
			}
			if q, _ := l["queue"].(string); q == "" {
				t.Fatalf("%s logged %q without a queue: %v", w.name, msg, l)
			}
			if k, _ := l["key"].(string); k == "" {
				t.Fatalf("%s logged %q without a key: %v", w.name, msg, l)
			}
			if msg != "handled" {
				continue
			}
			for f := range l {
				if !slices.Contains(handledFields, f) {
					t.Fatalf("%s logged an unexpected field %q: %v", w.name, f, l)
				}
			}
			id, ok := l["id"]
			if !ok {
				t.Fatalf("%s logged %q without an id: %v", w.name, msg, l)
			}
			out[fmt.Sprint(id)] = append(out[fmt.Sprint(id)], l)
		}
	}
	return out
}

// waitUntil polls cond every 10ms until it returns nil, and fails the test
// with cond's last error when that takes longer than timeout.
func waitUntil(t *testing.T, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil {
			return
		}
		select {
		case <-deadline.C:
			t.Fatalf("not done within %v: %v", timeout, err)
		case <-tick.C:
		}
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestStatusHosts(t *testing.T) {
	for _, c := range []struct {
		listen, extra string
		want          []string
	}{
		{"127.0.0.1:9090", "", nil},
		{"[::1]:9090", "", nil},
		{":9090", "", nil},
		{"ops.internal:9090", "", []string{"ops.internal"}},
		{"127.0.0.1:9090", " proxy.example.com ,status.example.com,", []string{"proxy.example.com", "status.example.com"}},
	} {
		if got := statusHosts(c.listen, c.extra); !slices.Equal(got, c.want) {
			t.Errorf("statusHosts(%q, %q) = %q, want %q", c.listen, c.extra, got, c.want)
		}
	}
}
