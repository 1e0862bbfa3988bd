package batchqotel_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/goleak"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/batchqtest"
	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/internal/testredis"
	batchqotel "github.com/batchq/batchq/otel"
	"github.com/batchq/batchq/producer"
)

// TestMain checks that no test leaves a goroutine behind.
func TestMain(m *testing.M) {
	// A client closed after a failed connection leaves rueidis' delayed
	// topology refresh running for up to half a second.
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*call).DelayDo.func1"))
}

type Email struct {
	To string `json:"to"`
}

// tracing is a tracer provider whose ended spans a test reads, and the
// options that make the package use it with the W3C propagator.
type tracing struct {
	spans  *tracetest.SpanRecorder
	tracer trace.Tracer // the application's, for the spans around appends
	opts   []batchqotel.Option
}

func newTracing(t *testing.T) tracing {
	t.Helper()
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	return tracing{spans: sr, tracer: tp.Tracer("app"),
		opts: []batchqotel.Option{batchqotel.WithTracerProvider(tp), batchqotel.WithPropagator(propagation.TraceContext{})}}
}

// producer returns a Producer that appends with p and traces with tr.
func (tr tracing) producer(t *testing.T, p *producer.Producer) *batchqotel.Producer {
	t.Helper()
	tp, err := batchqotel.NewProducer(p, tr.opts...)
	if err != nil {
		t.Fatal(err)
	}
	return tp
}

// middleware returns the package's middleware, tracing with tr.
func (tr tracing) middleware(t *testing.T) batchq.Middleware {
	t.Helper()
	mw, err := batchqotel.NewMiddleware(tr.opts...)
	if err != nil {
		t.Fatal(err)
	}
	return mw
}

// named returns the ended spans called name, in the order they ended.
func (tr tracing) named(name string) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range tr.spans.Ended() {
		if s.Name() == name {
			out = append(out, s)
		}
	}
	return out
}

// one returns the only ended span called name.
func (tr tracing) one(t *testing.T, name string) sdktrace.ReadOnlySpan {
	t.Helper()
	spans := tr.named(name)
	if len(spans) != 1 {
		t.Fatalf("%d spans %q, want 1 (all: %v)", len(spans), name, tr.names())
	}
	return spans[0]
}

func (tr tracing) names() []string {
	var out []string
	for _, s := range tr.spans.Ended() {
		out = append(out, s.Name())
	}
	return out
}

// attrs returns s's attributes as strings, for comparison.
func attrs(s sdktrace.ReadOnlySpan) map[string]string {
	m := make(map[string]string)
	for _, kv := range s.Attributes() {
		m[string(kv.Key)] = kv.Value.Emit()
	}
	return m
}

// wantAttrs fails the test unless s has exactly the attributes want.
func wantAttrs(t *testing.T, s sdktrace.ReadOnlySpan, want map[string]string) {
	t.Helper()
	got := attrs(s)
	for k, v := range want {
		if got[k] != v {
			t.Errorf("span %q: %s = %q, want %q", s.Name(), k, got[k], v)
		}
	}
	for k, v := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("span %q: unexpected attribute %s = %q", s.Name(), k, v)
		}
	}
}

// linkedTo returns the spans s links to.
func linkedTo(s sdktrace.ReadOnlySpan) []trace.SpanID {
	var out []trace.SpanID
	for _, l := range s.Links() {
		out = append(out, l.SpanContext.SpanID())
	}
	return out
}

func newProducer(t *testing.T, b testredis.Backend) *producer.Producer {
	t.Helper()
	p, err := producer.New(b.Client, producer.WithPrefix(b.Prefix))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func newWorker(t *testing.T, b testredis.Backend) *batchq.Worker {
	t.Helper()
	w, err := batchq.NewWorker(b.Client, batchq.WithPrefix(b.Prefix), batchq.WithShutdownTimeout(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// runIdle runs w until its queues are idle, within 20s.
func runIdle(t *testing.T, w *batchq.Worker, opts ...batchqtest.Option) batchqtest.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	res, err := batchqtest.RunUntilIdle(ctx, w, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// recorder keeps what a handler got, from the worker's goroutines.
type recorder[T any] struct {
	mu    sync.Mutex
	items []T
	spans []trace.SpanContext // the span of each call's context
}

// add records a call with items and returns how many calls there were.
func (r *recorder[T]) add(ctx context.Context, items ...T) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.items = append(r.items, items...)
	r.spans = append(r.spans, trace.SpanContextFromContext(ctx))
	return len(r.spans)
}

// A handled item has a consumer span linked to the producer span of its
// append, with the messaging conventions' attributes; the handler gets the
// item out of its envelope and a context carrying the span.
func TestItemSpan(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		tr := newTracing(t)
		p := tr.producer(t, newProducer(t, b))
		ctx, request := tr.tracer.Start(t.Context(), "request")
		if err := p.Add(ctx, "emails", "user:42", Email{To: "a@example.com"}); err != nil {
			t.Fatal(err)
		}
		request.End()

		w := newWorker(t, b)
		w.Use(tr.middleware(t))
		var got recorder[Email]
		batchq.Handle(w, "emails", func(ctx context.Context, e Email) error {
			got.add(ctx, e)
			return nil
		})
		runIdle(t, w)

		if !slices.Equal(got.items, []Email{{To: "a@example.com"}}) {
			t.Fatalf("handler got %v", got.items)
		}
		send := tr.one(t, "send emails")
		if send.SpanKind() != trace.SpanKindProducer || send.Parent().SpanID() != request.SpanContext().SpanID() {
			t.Errorf("send span: kind %v, parent %v, want producer, child of the request", send.SpanKind(), send.Parent().SpanID())
		}
		wantAttrs(t, send, map[string]string{
			"messaging.system": "batchq", "messaging.operation.type": "send", "messaging.operation.name": "send",
			"messaging.destination.name": "emails", "batchq.key": "user:42",
		})

		process := tr.one(t, "process emails")
		if process.SpanKind() != trace.SpanKindConsumer {
			t.Errorf("process span kind %v, want consumer", process.SpanKind())
		}
		if process.Parent().IsValid() || process.SpanContext().TraceID() == send.SpanContext().TraceID() {
			t.Errorf("process span: parent %v, trace %v: want a trace of its own", process.Parent(), process.SpanContext().TraceID())
		}
		if l := linkedTo(process); !slices.Equal(l, []trace.SpanID{send.SpanContext().SpanID()}) {
			t.Errorf("process span links to %v, want the send span %v", l, send.SpanContext().SpanID())
		}
		wantAttrs(t, process, map[string]string{
			"messaging.system": "batchq", "messaging.operation.type": "process", "messaging.operation.name": "process",
			"messaging.destination.name": "emails", "batchq.key": "user:42", "batchq.attempt": "0", "batchq.outcome": "ok",
		})
		if st := process.Status(); st.Code != codes.Unset || len(process.Events()) != 0 {
			t.Errorf("process span: status %v, events %v, want unset and none", st, process.Events())
		}
		if !got.spans[0].Equal(process.SpanContext()) {
			t.Errorf("the handler's context carries span %v, want the process span %v", got.spans[0].SpanID(), process.SpanContext().SpanID())
		}
	})
}

// A batch call's span counts its items and links once to each distinct
// span that appended them; items without an envelope in the same batch
// are handled as they are.
func TestBatchSpan(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		tr := newTracing(t)
		plain := newProducer(t, b)
		p := tr.producer(t, plain)
		add := func(items ...any) {
			t.Helper()
			ctx, request := tr.tracer.Start(t.Context(), "request")
			defer request.End()
			if err := p.Add(ctx, "events", "user:7", items...); err != nil {
				t.Fatal(err)
			}
		}
		add(1, 2) // one append, one span, two items
		if err := plain.Add(t.Context(), "events", "user:7", 3); err != nil {
			t.Fatal(err)
		}
		add(4)
		add(5)

		w := newWorker(t, b)
		w.Use(tr.middleware(t))
		var got recorder[int]
		batchq.HandleBatch(w, "events", func(ctx context.Context, key string, items []int) error {
			got.add(ctx, items...)
			return nil
		})
		runIdle(t, w)

		if !slices.Equal(got.items, []int{1, 2, 3, 4, 5}) || len(got.spans) != 1 {
			t.Fatalf("handler got %v in %d calls, want [1 2 3 4 5] in one", got.items, len(got.spans))
		}
		sends := tr.named("send events")
		if len(sends) != 3 {
			t.Fatalf("%d send spans, want 3", len(sends))
		}
		var want []trace.SpanID
		for _, s := range sends {
			want = append(want, s.SpanContext().SpanID())
		}
		if got := attrs(sends[0])["messaging.batch.message_count"]; got != "2" {
			t.Errorf("the two-item send span's message count %q, want 2", got)
		}
		if _, ok := attrs(sends[1])["messaging.batch.message_count"]; ok {
			t.Error("a one-item send span has a message count")
		}
		process := tr.one(t, "process events")
		if l := linkedTo(process); !slices.Equal(l, want) {
			t.Errorf("process span links to %v, want the send spans %v", l, want)
		}
		wantAttrs(t, process, map[string]string{
			"messaging.system": "batchq", "messaging.operation.type": "process", "messaging.operation.name": "process",
			"messaging.destination.name": "events", "messaging.batch.message_count": "5",
			"batchq.key": "user:7", "batchq.attempt": "0", "batchq.outcome": "ok",
		})
	})
}

// Items appended without an envelope are handled and traced as usual,
// with no links.
func TestPlainItems(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		tr := newTracing(t)
		if err := newProducer(t, b).Add(t.Context(), "emails", "user:1", Email{To: "a@example.com"}); err != nil {
			t.Fatal(err)
		}
		w := newWorker(t, b)
		w.Use(tr.middleware(t))
		var got recorder[Email]
		batchq.Handle(w, "emails", func(ctx context.Context, e Email) error {
			got.add(ctx, e)
			return nil
		})
		runIdle(t, w)

		if !slices.Equal(got.items, []Email{{To: "a@example.com"}}) {
			t.Fatalf("handler got %v", got.items)
		}
		process := tr.one(t, "process emails")
		if len(process.Links()) != 0 || attrs(process)["batchq.outcome"] != "ok" {
			t.Errorf("process span: links %v, outcome %q, want none and ok", process.Links(), attrs(process)["batchq.outcome"])
		}
	})
}

// Each way a call can end has its outcome; failures are recorded as an
// exception event, error.type and an error status, in words that hold
// nothing of the item.
func TestOutcomes(t *testing.T) {
	const secret = "987654321987654321987" // in the items and panics: must reach no span
	for _, tc := range []struct {
		name    string
		item    any // appended in an envelope
		handle  func(ctx context.Context, e Email) error
		timeout time.Duration
		outcome string
		text    string // the exception's message and the status description
	}{
		{name: "failed", item: Email{To: "a"}, outcome: "retry", text: "smtp down",
			handle: func(context.Context, Email) error { return errors.New("smtp down") }},
		{name: "retry after", item: Email{To: "a"}, outcome: "retry", text: "rate limited",
			handle: func(context.Context, Email) error { return batchq.RetryAfter(time.Hour, errors.New("rate limited")) }},
		{name: "no retry", item: Email{To: "a"}, outcome: "no_retry", text: "no such user",
			handle: func(context.Context, Email) error { return batchq.NoRetry(errors.New("no such user")) }},
		{name: "does not decode", item: map[string]any{"to": json.Number(secret)}, outcome: "no_retry",
			text:   `batchq: item does not decode into the handler's type: field "to" (offset 27) cannot hold the JSON value for Go type string`,
			handle: func(context.Context, Email) error { return nil }},
		{name: "panic", item: Email{To: "a"}, outcome: "panic", text: "batchq: handler panicked (its value is not recorded: it may hold an item)",
			handle: func(context.Context, Email) error { panic("payload " + secret) }},
		{name: "timeout", item: Email{To: "a"}, outcome: "timeout", timeout: 50 * time.Millisecond,
			text:   "batchq: handler timed out after 50ms (WithTimeout): context deadline exceeded",
			handle: func(ctx context.Context, _ Email) error { <-ctx.Done(); return ctx.Err() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testredis.Each(t, func(t *testing.T, b testredis.Backend) {
				tr := newTracing(t)
				p := tr.producer(t, newProducer(t, b))
				if err := p.Add(t.Context(), "emails", "user:1", tc.item); err != nil {
					t.Fatal(err)
				}
				w := newWorker(t, b)
				w.Use(tr.middleware(t))
				opts := []batchq.QueueOption{batchq.WithMaxAttempts(1)}
				if tc.timeout > 0 {
					opts = append(opts, batchq.WithTimeout(tc.timeout))
				}
				batchq.Handle(w, "emails", tc.handle, opts...)
				if res := runIdle(t, w); res.DeadLetters != 1 {
					t.Fatalf("%d dead letters, want the item's", res.DeadLetters)
				}

				process := tr.one(t, "process emails")
				a := attrs(process)
				if a["batchq.outcome"] != tc.outcome || a["error.type"] == "" {
					t.Errorf("outcome %q, error.type %q, want %q and set", a["batchq.outcome"], a["error.type"], tc.outcome)
				}
				if st := process.Status(); st.Code != codes.Error || st.Description != tc.text {
					t.Errorf("status %v %q, want error %q", st.Code, st.Description, tc.text)
				}
				ev := process.Events()
				if len(ev) != 1 || ev[0].Name != "exception" {
					t.Fatalf("events %v, want one exception", ev)
				}
				e := make(map[string]string)
				for _, kv := range ev[0].Attributes {
					e[string(kv.Key)] = kv.Value.Emit()
				}
				if e["exception.message"] != tc.text || e["exception.type"] != a["error.type"] {
					t.Errorf("exception %v, want message %q and type %q", e, tc.text, a["error.type"])
				}
				if _, ok := e["exception.stacktrace"]; ok != (tc.outcome == "panic") {
					t.Errorf("exception stack trace recorded: %v, want it for a panic only", ok)
				}
				if tc.outcome == "panic" && !strings.Contains(e["exception.stacktrace"], "middleware_test.go") {
					t.Errorf("the stack trace does not show where the handler panicked:\n%s", e["exception.stacktrace"])
				}
				for _, s := range tr.spans.Ended() {
					if strings.Contains(fmt.Sprint(s.Attributes(), s.Events(), s.Status()), secret) {
						t.Errorf("span %q holds the item's contents", s.Name())
					}
				}
			})
		})
	}
}

// A failed item is retried in its envelope: every attempt's span links to
// the append's span and counts the attempts before it.
func TestRetriedItemSpans(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		tr := newTracing(t)
		p := tr.producer(t, newProducer(t, b))
		if err := p.Add(t.Context(), "emails", "user:1", Email{To: "a@example.com"}); err != nil {
			t.Fatal(err)
		}
		w := newWorker(t, b)
		w.Use(tr.middleware(t))
		var got recorder[Email]
		batchq.Handle(w, "emails", func(ctx context.Context, e Email) error {
			if got.add(ctx, e) < 3 {
				return errors.New("smtp down")
			}
			return nil
		}, batchq.WithBackoff(batchq.Constant(10*time.Millisecond)))
		runIdle(t, w, batchqtest.WithRetriesWithin(time.Second))

		send := tr.one(t, "send emails")
		spans := tr.named("process emails")
		var summary []string
		for _, s := range spans {
			a := attrs(s)
			summary = append(summary, a["batchq.attempt"]+":"+a["batchq.outcome"])
			if l := linkedTo(s); !slices.Equal(l, []trace.SpanID{send.SpanContext().SpanID()}) {
				t.Errorf("attempt %s links to %v, want the send span", a["batchq.attempt"], l)
			}
		}
		if want := []string{"0:retry", "1:retry", "2:ok"}; !slices.Equal(summary, want) {
			t.Errorf("attempts %v, want %v", summary, want)
		}
		for _, e := range got.items {
			if e.To != "a@example.com" {
				t.Errorf("attempt got %v", e)
			}
		}
	})
}

// A batch that partly failed is "partial".
func TestPartialBatch(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		tr := newTracing(t)
		p := tr.producer(t, newProducer(t, b))
		if err := p.Add(t.Context(), "events", "user:1", 1, 2, 3); err != nil {
			t.Fatal(err)
		}
		w := newWorker(t, b)
		w.Use(tr.middleware(t))
		batchq.HandleBatch(w, "events", func(ctx context.Context, key string, items []int) error {
			return &batchq.BatchError{Failed: map[int]error{1: errors.New("bad event")}}
		}, batchq.WithMaxAttempts(1))
		if res := runIdle(t, w); res.DeadLetters != 1 {
			t.Fatalf("%d dead letters, want 1", res.DeadLetters)
		}
		process := tr.one(t, "process events")
		a := attrs(process)
		if a["batchq.outcome"] != "partial" || a["messaging.batch.message_count"] != "3" || process.Status().Code != codes.Error {
			t.Errorf("attributes %v, status %v: want partial, 3 items, error", a, process.Status())
		}
	})
}

// Without the middleware a handler of a struct, map or scalar type cannot
// decode an envelope (an array): the item goes to dead letters at once with
// batchq.ErrDecode, envelope and all, rather than being handled as a zero
// value and lost. Requeued once the middleware is installed, each is
// handled as its handler's type, linked to its append's span.
func TestWithoutMiddleware(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		tr := newTracing(t)
		p := tr.producer(t, newProducer(t, b))
		adds := map[string]any{"emails": Email{To: "a@example.com"}, "labels": map[string]string{"to": "b@example.com"}, "counts": 42}
		for queue, item := range adds {
			if err := p.Add(t.Context(), queue, "user:1", item); err != nil {
				t.Fatal(err)
			}
		}
		var emails recorder[Email]
		var labels recorder[map[string]string]
		var counts recorder[int]
		register := func(w *batchq.Worker) {
			batchq.Handle(w, "emails", func(ctx context.Context, e Email) error { emails.add(ctx, e); return nil })
			batchq.Handle(w, "labels", func(ctx context.Context, m map[string]string) error { labels.add(ctx, m); return nil })
			batchq.Handle(w, "counts", func(ctx context.Context, n int) error { counts.add(ctx, n); return nil })
		}

		w := newWorker(t, b) // no middleware
		register(w)
		if res := runIdle(t, w); res.DeadLetters != 3 {
			t.Errorf("%d dead letters, want 3", res.DeadLetters)
		}
		if len(emails.items)+len(labels.items)+len(counts.items) != 0 {
			t.Fatalf("handlers without the middleware got %v, %v, %v: want no calls", emails.items, labels.items, counts.items)
		}
		dl, err := deadletter.New(b.Client, deadletter.WithPrefix(b.Prefix))
		if err != nil {
			t.Fatal(err)
		}
		for queue, item := range adds {
			letters, err := dl.List(t.Context(), queue, 10)
			if err != nil || len(letters) != 1 || !strings.Contains(letters[0].Error, batchq.ErrDecode.Error()) {
				t.Fatalf("%s: dead letters %+v, %v: want the envelope's, failed to decode", queue, letters, err)
			}
			var env batchqotel.Envelope[json.RawMessage]
			want, _ := json.Marshal(item)
			if err := json.Unmarshal(letters[0].Item, &env); err != nil || !bytes.Equal(env.Item, want) || env.Trace["traceparent"] == "" {
				t.Fatalf("%s: dead letter holds %s (%v), want the envelope of %s", queue, letters[0].Item, err, want)
			}
			if _, err := dl.Requeue(t.Context(), letters...); err != nil {
				t.Fatal(err)
			}
		}

		w = newWorker(t, b)
		w.Use(tr.middleware(t))
		register(w)
		if res := runIdle(t, w); res.DeadLetters != 0 {
			t.Errorf("%d dead letters after the requeue, want none", res.DeadLetters)
		}
		if !slices.Equal(emails.items, []Email{{To: "a@example.com"}}) || len(labels.items) != 1 ||
			labels.items[0]["to"] != "b@example.com" || len(labels.items[0]) != 1 || !slices.Equal(counts.items, []int{42}) {
			t.Fatalf("handlers got %v, %v, %v after the requeue", emails.items, labels.items, counts.items)
		}
		for queue := range adds {
			send := tr.one(t, "send "+queue)
			// The calls without the middleware were not traced: one span.
			process := tr.one(t, "process "+queue)
			if l := linkedTo(process); !slices.Equal(l, []trace.SpanID{send.SpanContext().SpanID()}) {
				t.Errorf("%s: the requeued item's span links to %v, want the send span", queue, l)
			}
		}
	})
}

// Handlers that accept a JSON array of a string, an object and the item
// still decode an envelope without the middleware, as the docs warn: a
// handler of any gets the array. A handler of Envelope[T] decodes it on
// purpose, trace context and all.
func TestEnvelopeHandlers(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		tr := newTracing(t)
		p := tr.producer(t, newProducer(t, b))
		for _, queue := range []string{"anys", "envelopes"} {
			if err := p.Add(t.Context(), queue, "user:1", Email{To: "a@example.com"}); err != nil {
				t.Fatal(err)
			}
		}
		w := newWorker(t, b) // no middleware
		var anys recorder[any]
		var envelopes recorder[batchqotel.Envelope[Email]]
		batchq.Handle(w, "anys", func(ctx context.Context, v any) error { anys.add(ctx, v); return nil })
		batchq.Handle(w, "envelopes", func(ctx context.Context, e batchqotel.Envelope[Email]) error { envelopes.add(ctx, e); return nil })
		runIdle(t, w)

		if len(anys.items) != 1 {
			t.Fatalf("the handler of any got %v", anys.items)
		}
		if arr, ok := anys.items[0].([]any); !ok || len(arr) != 3 || arr[0] != "batchq:trace" {
			t.Errorf("the handler of any got %#v, want the envelope's array", anys.items[0])
		}
		if len(envelopes.items) != 1 || envelopes.items[0].Item != (Email{To: "a@example.com"}) {
			t.Fatalf("the handler of Envelope[Email] got %+v", envelopes.items)
		}
		sc := trace.SpanContextFromContext(propagation.TraceContext{}.Extract(t.Context(), envelopes.items[0].Trace))
		if send := tr.named("send envelopes"); len(send) != 1 || sc.SpanID() != send[0].SpanContext().SpanID() {
			t.Errorf("the envelope carries span %v, want the send span", sc.SpanID())
		}
	})
}

// A failed append is recorded on its send span.
func TestSendError(t *testing.T) {
	testredis.Each(t, func(t *testing.T, b testredis.Backend) {
		tr := newTracing(t)
		p := tr.producer(t, newProducer(t, b))
		err := p.Add(t.Context(), "emails", "bad\nkey", Email{To: "a@example.com"})
		if !errors.Is(err, producer.ErrKeyName) {
			t.Fatalf("Add with a newline in the key: %v, want ErrKeyName", err)
		}
		send := tr.one(t, "send emails")
		if send.Status().Code != codes.Error || send.Status().Description != err.Error() || attrs(send)["error.type"] == "" {
			t.Errorf("send span status %v, attributes %v: want the error", send.Status(), attrs(send))
		}
	})
}

// A panic from middleware inside this one (the worker recovers handlers'
// panics before they get here) goes on up, and the span still ends, as a
// panic.
func TestInnerMiddlewarePanics(t *testing.T) {
	tr := newTracing(t)
	h := tr.middleware(t)(func(context.Context, batchq.Call) error { panic("inner") })
	func() {
		defer func() {
			if v := recover(); v != "inner" {
				t.Errorf("recovered %v, want the inner panic", v)
			}
		}()
		h(t.Context(), batchq.Call{Queue: "q", Key: "k", Items: []json.RawMessage{json.RawMessage(`1`)}})
	}()
	s := tr.one(t, "process q")
	if attrs(s)["batchq.outcome"] != "panic" || s.Status().Code != codes.Error {
		t.Errorf("span outcome %q, status %v: want panic, error", attrs(s)["batchq.outcome"], s.Status())
	}
}

// A middleware inside this one that returns the deadline's own error, not
// the worker's *TimeoutError, once the call's deadline has passed, still
// ends a "timeout"; the same error before any deadline is a "retry".
func TestInnerDeadline(t *testing.T) {
	for _, tc := range []struct {
		name    string
		expired bool
		outcome string
	}{{"deadline passed", true, "timeout"}, {"no deadline", false, "retry"}} {
		t.Run(tc.name, func(t *testing.T) {
			tr := newTracing(t)
			h := tr.middleware(t)(func(context.Context, batchq.Call) error { return context.DeadlineExceeded })
			ctx := t.Context()
			if tc.expired {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, -time.Second)
				defer cancel()
			}
			h(ctx, batchq.Call{Queue: "q", Key: "k", Items: []json.RawMessage{json.RawMessage(`1`)}})
			if got := attrs(tr.one(t, "process q"))["batchq.outcome"]; got != tc.outcome {
				t.Errorf("outcome %q, want %q", got, tc.outcome)
			}
		})
	}
}
