package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// The 503 test closes the server under a client: rueidis then runs a
// delayed topology refresh that outlives Close by up to half a second.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*call).DelayDo.func1"))
}

// Limits of the API under test.
const (
	testMaxItem = 64
	testMaxBody = 256
)

// newAPI returns the routes of an api backed by a fresh embedded Redis.
func newAPI(t *testing.T, opts ...producer.Option) (*embedded.Redis, http.Handler) {
	t.Helper()
	r, err := embedded.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r, newAPIOn(t, r.Client, opts...)
}

// newAPIOn returns the routes of an api that appends through c.
func newAPIOn(t *testing.T, c rueidis.Client, opts ...producer.Option) http.Handler {
	t.Helper()
	p, err := producer.New(c, append([]producer.Option{producer.WithMaxItemBytes(testMaxItem)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	a := &api{p: p, maxBody: testMaxBody, timeout: 500 * time.Millisecond, log: zaptest.NewLogger(t)}
	return a.routes()
}

// do sends one request and returns the status and the decoded JSON body.
func do(t *testing.T, h http.Handler, method, path, body string) (int, map[string]any) {
	t.Helper()
	code, got, _ := doHeader(t, h, method, path, body)
	return code, got
}

// doHeader is do that returns the answer's header too.
func doHeader(t *testing.T, h http.Handler, method, path, body string) (int, map[string]any, http.Header) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(method, path, strings.NewReader(body)))
	var got map[string]any
	if rec.Header().Get("Content-Type") == "application/json" {
		if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
			t.Fatalf("%s %s: body %q: %v", method, path, rec.Body, err)
		}
	}
	return rec.Code, got, rec.Header()
}

func TestAccepted(t *testing.T) {
	tests := []struct {
		name   string
		key    string   // in the path
		bodies []string // posted in order
		queued []float64
		stored string // under batchq:{orders:0}:k:<stored key>
		as     string // the stored key
	}{
		{"one value", "user:42", []string{`{"id": 1, "name": "é"}`}, []float64{1}, `[{"id": 1, "name": "é"}]`, "user:42"},
		{"array is many items", "user:42", []string{" [ {\"id\":2}, 3.50 , \"x\" ]\n"}, []float64{3}, `[{"id":2},3.50,"x"]`, "user:42"},
		{"wrapped array is one item", "user:42", []string{`[[1,2,3]]`}, []float64{1}, `[[1,2,3]]`, "user:42"},
		{"appends", "user:42", []string{`1`, `[2,3]`, `{"id":4}`}, []float64{1, 2, 1}, `[1,2,3,{"id":4}]`, "user:42"},
		{"escaped slash in key", "user%2F42", []string{`{"id":5}`}, []float64{1}, `[{"id":5}]`, "user/42"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r, h := newAPI(t)
			for i, body := range tt.bodies {
				code, got := do(t, h, http.MethodPost, "/queues/orders/keys/"+tt.key, body)
				if code != http.StatusAccepted || got["queued"] != tt.queued[i] {
					t.Fatalf("POST %q: %d %v, want 202 queued %v", body, code, got, tt.queued[i])
				}
			}
			stored, err := r.Client.Do(context.Background(), r.Client.B().Get().Key("batchq:{orders:0}:k:"+tt.as).Build()).ToString()
			if err != nil {
				t.Fatal(err)
			}
			if stored != tt.stored {
				t.Errorf("stored %s, want %s", stored, tt.stored)
			}
		})
	}
}

func TestRejected(t *testing.T) {
	tests := []struct {
		name   string
		method string
		path   string
		body   string
		want   int
	}{
		{"invalid JSON", "POST", "/queues/orders/keys/k", `{"id":`, http.StatusBadRequest},
		{"invalid JSON in array", "POST", "/queues/orders/keys/k", `[1,}`, http.StatusBadRequest},
		{"two values", "POST", "/queues/orders/keys/k", `1 2`, http.StatusBadRequest},
		{"empty body", "POST", "/queues/orders/keys/k", ``, http.StatusBadRequest},
		{"invalid queue", "POST", "/queues/a:b/keys/k", `1`, http.StatusBadRequest},
		{"invalid key", "POST", "/queues/orders/keys/" + strings.Repeat("k", 513), `1`, http.StatusBadRequest},
		{"body too large", "POST", "/queues/orders/keys/k", "[" + strings.Repeat("1,", testMaxBody) + "1]", http.StatusRequestEntityTooLarge},
		{"item too large", "POST", "/queues/orders/keys/k", `[1,"` + strings.Repeat("x", testMaxItem) + `"]`, http.StatusRequestEntityTooLarge},
		{"GET", "GET", "/queues/orders/keys/k", ``, http.StatusMethodNotAllowed},
		{"PUT", "PUT", "/queues/orders/keys/k", `1`, http.StatusMethodNotAllowed},
		{"unknown path", "POST", "/orders/k", `1`, http.StatusNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r, h := newAPI(t)
			code, got := do(t, h, tt.method, tt.path, tt.body)
			if code != tt.want {
				t.Fatalf("%d %v, want %d", code, got, tt.want)
			}
			if got["error"] == "" || got["stored"] != "none" {
				t.Errorf("want an error message and stored none: %v", got)
			}
			t.Logf("%d %v", code, got)
			if keys := r.Server.Keys(); len(keys) > 0 {
				t.Errorf("rejected request stored %v", keys)
			}
		})
	}
}

// Each error of the producer gets the answer its meaning deserves: whether
// anything was stored, and whether the same request can succeed later.
func TestAppendErrors(t *testing.T) {
	t.Parallel()
	r, h := newAPI(t, producer.WithMaxKeyItems(2))
	sp := keys.For(keys.DefaultPrefix, "orders", 0)
	must(t, r.Client.Do(context.Background(), r.Client.B().Set().Key(sp.Items("foreign")).Value("[1,2]]").Build()).Error())
	if code, _ := do(t, h, "POST", "/queues/orders/keys/full", `[1,2]`); code != http.StatusAccepted {
		t.Fatalf("filling the key: %d", code)
	}
	deep := strings.Repeat(`{"a":`, producer.MaxItemDepth+1) + "1" + strings.Repeat("}", producer.MaxItemDepth+1)
	big := &api{p: must2(producer.New(r.Client)), maxBody: 1 << 20, timeout: time.Second, log: zaptest.NewLogger(t)}
	tests := []struct {
		name, key, body string
		status          int
		retryAfter      string
		h               http.Handler // nil: h
	}{
		{"nested too deeply", "deep", deep, http.StatusBadRequest, "", big.routes()},
		{"more items than a key may hold: never storable", "other", `[1,2,3]`, http.StatusRequestEntityTooLarge, "", nil},
		{"key full: try again later", "full", `3`, http.StatusServiceUnavailable, "1", nil},
		{"a value batchq did not write", "foreign", `3`, http.StatusConflict, "", nil},
	}
	for _, tt := range tests {
		h := h
		if tt.h != nil {
			h = tt.h
		}
		code, got, hdr := doHeader(t, h, "POST", "/queues/orders/keys/"+tt.key, tt.body)
		if code != tt.status || got["stored"] != "none" || hdr.Get("Retry-After") != tt.retryAfter {
			t.Errorf("%s: %d %v Retry-After %q; want %d, stored none, Retry-After %q", tt.name, code, got, hdr.Get("Retry-After"), tt.status, tt.retryAfter)
		}
	}
}

// An append that Redis does not answer in time may still be stored: the
// answer says it is unknown, and does not invite a retry. Here the item is
// stored once Redis resumes, so "nothing is stored" would have been a lie.
func TestRedisTimeoutIsUnknown(t *testing.T) {
	t.Parallel()
	srv := testredis.Start(t)
	b := srv.Backend(t)
	h := newAPIOn(t, b.Client)
	// Concurrent requests first, as a busy service makes: rueidis then
	// pipelines (a client used one call at a time closes its connection on
	// a timeout, and the server drops what it had not read yet).
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Go(func() { do(t, h, "POST", "/queues/orders/keys/warm"+strconv.Itoa(i), `0`) })
	}
	wg.Wait()
	srv.Pause(t)
	code, got, hdr := doHeader(t, h, "POST", "/queues/orders/keys/k", `{"id":1}`)
	srv.Resume(t)
	if code != http.StatusServiceUnavailable || got["stored"] != "unknown" || hdr.Get("Retry-After") != "" {
		t.Fatalf("%d %v Retry-After %q; want 503, stored unknown, no Retry-After", code, got, hdr.Get("Retry-After"))
	}
	ik := keys.For(keys.DefaultPrefix, "orders", 0).Items("k")
	deadline := time.Now().Add(10 * time.Second)
	for {
		v, err := b.Client.Do(context.Background(), b.Client.B().Get().Key(ik).Build()).ToString()
		if err == nil && v == `[{"id":1}]` {
			return // stored after all
		}
		if time.Now().After(deadline) {
			t.Fatalf("the item was not stored after Redis resumed: %q %v", v, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// With Redis gone, nothing can be sent: once the client finds no server to
// dial, the answer says that nothing is stored, and to try again. Requests
// written to a connection the server dropped before that are answered
// "unknown" (EOF): the client cannot tell whether the server ran them.
func TestRedisDown(t *testing.T) {
	t.Parallel()
	srv := testredis.Start(t)
	h := newAPIOn(t, srv.Backend(t).Client)
	srv.Stop()
	for i := range 20 {
		code, got, hdr := doHeader(t, h, http.MethodPost, "/queues/orders/keys/k", `{"id":1}`)
		switch {
		case code == http.StatusServiceUnavailable && got["stored"] == "none" && hdr.Get("Retry-After") == "1":
			return
		case code == http.StatusServiceUnavailable && got["stored"] == "unknown" && hdr.Get("Retry-After") == "":
			t.Logf("request %d: %v", i, got["error"])
		default:
			t.Fatalf("%d %v Retry-After %q, want 503, stored none, Retry-After 1 (or unknown)", code, got, hdr.Get("Retry-After"))
		}
	}
	t.Fatal("20 requests after Redis stopped, and none was answered 'nothing is stored'")
}

func must2[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// With -queues, other queues are refused with 404 and nothing is stored.
func TestQueueAllowList(t *testing.T) {
	t.Parallel()
	queues, err := parseQueues(" orders , emails")
	must(t, err)
	r, err := embedded.Start()
	must(t, err)
	t.Cleanup(r.Close)
	a := &api{p: must2(producer.New(r.Client)), queues: queues, maxBody: testMaxBody, timeout: time.Second, log: zaptest.NewLogger(t)}
	h := a.routes()
	if code, got := do(t, h, "POST", "/queues/spam00001/keys/k", `1`); code != http.StatusNotFound || got["stored"] != "none" {
		t.Errorf("unknown queue: %d %v, want 404 stored none", code, got)
	}
	if keys := r.Server.Keys(); len(keys) > 0 {
		t.Errorf("a refused queue left %v", keys)
	}
	for _, q := range []string{"orders", "emails"} {
		if code, _ := do(t, h, "POST", "/queues/"+q+"/keys/k", `1`); code != http.StatusAccepted {
			t.Errorf("%s: %d, want 202", q, code)
		}
	}
	for _, bad := range []string{"a,b:c", "a,,b", "x{y}"} {
		if _, err := parseQueues(bad); !errors.Is(err, producer.ErrQueueName) {
			t.Errorf("parseQueues(%q): %v, want ErrQueueName", bad, err)
		}
	}
	if q, err := parseQueues(""); q != nil || err != nil {
		t.Errorf("parseQueues(\"\") = %v, %v; want any queue", q, err)
	}
}

// A client that trickles its body is cut off after the read timeout, with
// nothing stored; one that sends in time is served on the same server.
func TestSlowClientIsCut(t *testing.T) {
	t.Parallel()
	r, err := embedded.Start()
	must(t, err)
	t.Cleanup(r.Close)
	a := &api{p: must2(producer.New(r.Client)), maxBody: testMaxBody, timeout: time.Second, log: zaptest.NewLogger(t)}
	srv := newServer(a, 300*time.Millisecond)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	conn, err := net.Dial("tcp", ln.Addr().String())
	must(t, err)
	defer conn.Close()
	_, err = fmt.Fprintf(conn, "POST /queues/orders/keys/k HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n[1")
	must(t, err)
	cut := make(chan string, 1)
	go func() {
		answer, _ := io.ReadAll(conn) // until the server closes the connection
		cut <- string(answer)
	}()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	timeout := time.After(10 * time.Second)
	for sent := 0; ; sent++ {
		select {
		case answer := <-cut:
			if !strings.Contains(answer, "408") {
				t.Errorf("cut off with %q, want a 408 answer", answer)
			}
			if keys := r.Server.Keys(); len(keys) > 0 {
				t.Errorf("a cut request stored %v", keys)
			}
			if code, _ := doReal(t, ln.Addr().String(), `1`); code != http.StatusAccepted {
				t.Errorf("a prompt client after it: %d, want 202", code)
			}
			return
		case <-timeout:
			t.Fatalf("a client trickling its body was not cut off in 10s (%d bytes sent)", sent)
		case <-tick.C:
			conn.Write([]byte(",1")) // an error means it was cut: the read above says how
		}
	}
}

// doReal posts body over TCP to the server at addr.
func doReal(t *testing.T, addr, body string) (int, error) {
	t.Helper()
	resp, err := http.Post("http://"+addr+"/queues/orders/keys/k2", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

// At shutdown the server lets the request under way finish, then closes
// the producer, which sends what it has gathered at once: an item posted
// just before shutdown is stored and answered 202, though it was still
// waiting for the producer's linger when the server's shutdown timeout
// passed. After shutdown an append is answered 503, nothing stored.
func TestShutdownClosesTheProducer(t *testing.T) {
	t.Parallel()
	r, err := embedded.Start()
	must(t, err)
	t.Cleanup(r.Close)
	// A linger far longer than the shutdown timeout: only Close sends the
	// item in time.
	p := must2(producer.New(r.Client, producer.WithLinger(time.Second, 1000)))
	a := &api{p: p, maxBody: testMaxBody, timeout: 2 * time.Second, log: zaptest.NewLogger(t)}
	srv := newServer(a, 5*time.Second)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	answered := make(chan string, 1)
	go func() {
		resp, err := http.Post("http://"+ln.Addr().String()+"/queues/orders/keys/k", "application/json", strings.NewReader(`{"id":1}`))
		if err != nil {
			answered <- err.Error()
			return
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		answered <- resp.Status
	}()
	waitLingering(t)

	start := time.Now()
	shutdown(srv, a, 50*time.Millisecond)
	if took := time.Since(start); took > 900*time.Millisecond {
		t.Fatalf("shutdown took %v: the item waited for the producer's linger (1s)", took)
	}
	// Stored when shutdown returns, not when the linger's timer fires.
	stored, err := r.Client.Do(context.Background(), r.Client.B().Get().Key("batchq:{orders:0}:k:k").Build()).ToString()
	if err != nil || stored != `[{"id":1}]` {
		t.Fatalf("after shutdown the key holds %q (%v), want the item posted before it", stored, err)
	}
	select {
	case status := <-answered:
		if status != "202 Accepted" {
			t.Fatalf("the request under way at shutdown: %s, want 202 Accepted", status)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the request under way at shutdown has no answer 5s after it")
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	code, got, hdr := doHeader(t, a.routes(), "POST", "/queues/orders/keys/k2", `1`)
	if code != http.StatusServiceUnavailable || got["stored"] != "none" || hdr.Get("Retry-After") != "1" {
		t.Fatalf("an append after shutdown: %d %v Retry-After %q; want 503, stored none, Retry-After 1", code, got, hdr.Get("Retry-After"))
	}
}

// waitLingering waits until a goroutine is blocked in the lingering
// producer, waiting for its items to be sent (by the goroutine stacks: a
// select in producer's (*linger).add), and fails the test after 10s.
func waitLingering(t *testing.T) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		n := runtime.Stack(buf, true)
		for _, g := range strings.Split(string(buf[:n]), "\n\n") {
			if strings.Contains(g, " [select") && strings.Contains(g, "batchq/producer.(*linger).add(") {
				return
			}
		}
	}
	t.Fatal("no append waited in the lingering producer after 10s")
}

// With -replica-acks 1, a 202 means the replica has the items; with the
// replica stopped, the answer is 503 unknown after the 1s timeout, and the
// master keeps the items.
func TestReplicaAcksFlag(t *testing.T) {
	t.Parallel()
	m := testredis.Start(t)
	r := testredis.StartReplica(t, m)
	mc, rc := m.Backend(t).Client, testredis.Client(t, r.Addr)
	p := must2(producer.New(mc, producerOptions(config{prefix: "batchq", maxItem: testMaxItem, replicaAcks: 1})...))
	a := &api{p: p, maxBody: testMaxBody, timeout: 2 * time.Second, log: zaptest.NewLogger(t)}
	h := a.routes()
	get := func(c rueidis.Client) string {
		v, err := c.Do(context.Background(), c.B().Get().Key("batchq:{orders:0}:k:k").Build()).ToString()
		if err != nil && !rueidis.IsRedisNil(err) {
			t.Fatal(err)
		}
		return v
	}
	if code, got := do(t, h, http.MethodPost, "/queues/orders/keys/k", `{"id":1}`); code != http.StatusAccepted {
		t.Fatalf("POST with the replica up: %d %v, want 202", code, got)
	}
	if v := get(rc); v != `[{"id":1}]` {
		t.Fatalf("answered 202, but the replica holds %q", v)
	}
	r.Pause(t)
	defer r.Resume(t)
	code, got, hdr := doHeader(t, h, http.MethodPost, "/queues/orders/keys/k", `{"id":2}`)
	if code != http.StatusServiceUnavailable || got["stored"] != "unknown" || hdr.Get("Retry-After") != "" ||
		!strings.Contains(got["error"].(string), "replicas") {
		t.Fatalf("POST with the replica stopped: %d %v Retry-After %q, want 503, stored unknown, no Retry-After, an error about replicas", code, got, hdr.Get("Retry-After"))
	}
	if v := get(mc); v != `[{"id":1},{"id":2}]` {
		t.Fatalf("the master holds %q, want both items", v)
	}
}
