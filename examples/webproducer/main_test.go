package main

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/batchq/batchq/embedded"
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
func newAPI(t *testing.T) (*embedded.Redis, http.Handler) {
	t.Helper()
	r, err := embedded.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	p, err := producer.New(r.Client, producer.WithMaxItemBytes(testMaxItem))
	if err != nil {
		t.Fatal(err)
	}
	a := &api{p: p, maxBody: testMaxBody, timeout: 500 * time.Millisecond, log: zaptest.NewLogger(t)}
	return r, a.routes()
}

// do sends one request and returns the status and the decoded JSON body.
func do(t *testing.T, h http.Handler, method, path, body string) (int, map[string]any) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(method, path, strings.NewReader(body)))
	var got map[string]any
	if rec.Header().Get("Content-Type") == "application/json" {
		if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
			t.Fatalf("%s %s: body %q: %v", method, path, rec.Body, err)
		}
	}
	return rec.Code, got
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
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r, h := newAPI(t)
			code, got := do(t, h, tt.method, tt.path, tt.body)
			if code != tt.want {
				t.Fatalf("%d %v, want %d", code, got, tt.want)
			}
			if code != http.StatusMethodNotAllowed && got["error"] == "" {
				t.Errorf("no error message: %v", got)
			}
			t.Logf("%d %v", code, got)
			if keys := r.Server.Keys(); len(keys) > 0 {
				t.Errorf("rejected request stored %v", keys)
			}
		})
	}
}

func TestRedisDown(t *testing.T) {
	t.Parallel()
	r, h := newAPI(t)
	r.Server.Close()
	code, got := do(t, h, http.MethodPost, "/queues/orders/keys/k", `{"id":1}`)
	if code != http.StatusServiceUnavailable || got["error"] == "" {
		t.Fatalf("%d %v, want 503 with a message", code, got)
	}
}
