package batchqotel_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"testing"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/batchq/batchq"
	batchqotel "github.com/batchq/batchq/otel"
)

// spanContext returns a context carrying a sampled remote span context with
// the IDs of the W3C Trace Context specification's example.
func spanContext(t *testing.T) context.Context {
	t.Helper()
	tid, err := trace.TraceIDFromHex("0af7651916cd43dd8448eb211c80319c")
	if err != nil {
		t.Fatal(err)
	}
	sid, err := trace.SpanIDFromHex("b7ad6b7169203331")
	if err != nil {
		t.Fatal(err)
	}
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid, TraceFlags: trace.FlagsSampled, Remote: true})
	return trace.ContextWithSpanContext(context.Background(), sc)
}

const traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

// An envelope is one JSON object: the propagator's fields, then the item.
func TestWrapFormat(t *testing.T) {
	for _, tc := range []struct {
		name string
		ctx  context.Context
		p    propagation.TextMapPropagator
		want string
	}{
		{"W3C", spanContext(t), propagation.TraceContext{},
			`{"batchq_trace":{"traceparent":"` + traceparent + `"},"item":{"to":"a@example.com"}}`},
		{"no span", context.Background(), propagation.TraceContext{}, `{"batchq_trace":{},"item":{"to":"a@example.com"}}`},
		{"no propagator", spanContext(t), propagation.NewCompositeTextMapPropagator(), `{"batchq_trace":{},"item":{"to":"a@example.com"}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := json.Marshal(batchqotel.Wrap(tc.ctx, Email{To: "a@example.com"}, tc.p))
			if err != nil || string(got) != tc.want {
				t.Errorf("Wrap encodes to %s (%v), want %s", got, err, tc.want)
			}
		})
	}
}

// Wrap given a nil propagator writes with the global one: nothing until
// the program sets one, then what that one writes.
func TestWrapGlobalPropagator(t *testing.T) {
	want := func(wantJSON string) {
		t.Helper()
		got, err := json.Marshal(batchqotel.Wrap(spanContext(t), 1, nil))
		if err != nil || string(got) != wantJSON {
			t.Errorf("Wrap with a nil propagator encodes to %s (%v), want %s", got, err, wantJSON)
		}
	}
	want(`{"batchq_trace":{},"item":1}`)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	// The global propagator cannot be unset: back to one that carries
	// nothing, as the default does, for the tests after this one.
	t.Cleanup(func() { otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator()) })
	want(`{"batchq_trace":{"traceparent":"` + traceparent + `"},"item":1}`)
}

// call runs one call of items through the middleware and returns the
// items its handler got, and whether the call's span has a link.
func call(t *testing.T, items ...string) (got []string, linked bool) {
	t.Helper()
	tr := newTracing(t)
	h := tr.middleware(t)(func(ctx context.Context, c batchq.Call) error {
		for _, it := range c.Items {
			got = append(got, string(it))
		}
		return nil
	})
	raw := make([]json.RawMessage, len(items))
	for i, it := range items {
		raw[i] = json.RawMessage(it)
	}
	before := bytes.Join(bytesOf(raw), nil)
	if err := h(context.Background(), batchq.Call{Queue: "q", Key: "k", Items: raw, Batch: len(items) > 1}); err != nil {
		t.Fatal(err)
	}
	if after := bytes.Join(bytesOf(raw), nil); !bytes.Equal(before, after) {
		t.Errorf("the middleware changed the call's items in place: %s, was %s", after, before)
	}
	spans := tr.spans.Ended()
	if len(spans) != 1 {
		t.Fatalf("%d spans, want 1", len(spans))
	}
	return got, len(spans[0].Links()) > 0
}

func bytesOf(items []json.RawMessage) [][]byte {
	out := make([][]byte, len(items))
	for i, it := range items {
		out[i] = it
	}
	return out
}

// An item is an envelope when it is an object with exactly the two
// members, the trace member an object of strings; anything else reaches
// the handler as it was stored.
func TestEnvelopeDetection(t *testing.T) {
	tp := `{"traceparent":"` + traceparent + `"}`
	for _, tc := range []struct {
		name, item, want string
		linked           bool
	}{
		{"envelope", `{"batchq_trace":` + tp + `,"item":{"to":"a"}}`, `{"to":"a"}`, true},
		{"members in the other order", `{"item":[1,2], "batchq_trace":` + tp + `}`, `[1,2]`, true},
		{"whitespace", " {\n \"batchq_trace\" : {} ,\"item\" : 7 }\n", `7`, false},
		{"no trace context", `{"batchq_trace":{},"item":"x"}`, `"x"`, false},
		{"null item", `{"batchq_trace":{},"item":null}`, `null`, false},
		{"envelope in an envelope: one is opened", `{"batchq_trace":{},"item":{"batchq_trace":{},"item":1}}`, `{"batchq_trace":{},"item":1}`, false},
		{"invalid traceparent", `{"batchq_trace":{"traceparent":"00-zz"},"item":1}`, `1`, false},
		{"other fields in the carrier", `{"batchq_trace":{"b3":"x"},"item":1}`, `1`, false},
		{"a third member", `{"batchq_trace":{},"item":1,"id":2}`, `{"batchq_trace":{},"item":1,"id":2}`, false},
		{"a member twice", `{"batchq_trace":{},"batchq_trace":{},"item":1}`, `{"batchq_trace":{},"batchq_trace":{},"item":1}`, false},
		{"the item twice", `{"batchq_trace":{},"item":1,"item":2}`, `{"batchq_trace":{},"item":1,"item":2}`, false},
		{"no item", `{"batchq_trace":{}}`, `{"batchq_trace":{}}`, false},
		{"no trace", `{"item":1,"trace":{}}`, `{"item":1,"trace":{}}`, false},
		{"trace null", `{"batchq_trace":null,"item":1}`, `{"batchq_trace":null,"item":1}`, false},
		{"trace not an object", `{"batchq_trace":"x","item":1}`, `{"batchq_trace":"x","item":1}`, false},
		{"trace with a number", `{"batchq_trace":{"traceparent":1},"item":1}`, `{"batchq_trace":{"traceparent":1},"item":1}`, false},
		{"an array", `[{"batchq_trace":{},"item":1}]`, `[{"batchq_trace":{},"item":1}]`, false},
		{"a string", `"batchq_trace"`, `"batchq_trace"`, false},
		{"names in another case", `{"Batchq_Trace":{},"Item":1}`, `{"Batchq_Trace":{},"Item":1}`, false},
		{"a plain object", `{"to":"a"}`, `{"to":"a"}`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, linked := call(t, tc.item)
			if len(got) != 1 || got[0] != tc.want || linked != tc.linked {
				t.Errorf("handler got %q, linked %v; want %q, linked %v", got, linked, tc.want, tc.linked)
			}
		})
	}
}

// A call's items keep their number and order, enveloped or not.
func TestMixedItems(t *testing.T) {
	env := `{"batchq_trace":{"traceparent":"` + traceparent + `"},"item":`
	got, linked := call(t, `1`, env+`2}`, `{"n":3}`, env+`4}`)
	want := []string{`1`, `2`, `{"n":3}`, `4`}
	if len(got) != len(want) || !linked {
		t.Fatalf("handler got %q, linked %v; want %q, linked", got, linked, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("item %d: %q, want %q", i, got[i], want[i])
		}
	}
}

// Whatever an item holds, the middleware passes it on as it is or opens
// it, and only an envelope (as Envelope decodes it) is opened.
func FuzzEnvelopeDetection(f *testing.F) {
	for _, s := range []string{
		`{"batchq_trace":{"traceparent":"` + traceparent + `"},"item":{"to":"a"}}`,
		`{"batchq_trace":{},"item":1,"x":2}`, `{"batchq_trace":null,"item":1}`, `[1]`, `"batchq_trace"`, `{}`,
		`{"batchq_trace":{"a":"b"},"batchq_trace":{},"item":1}`,
	} {
		f.Add([]byte(s))
	}
	mw, err := batchqotel.NewMiddleware(batchqotel.WithTracerProvider(noop.NewTracerProvider()),
		batchqotel.WithPropagator(propagation.TraceContext{}))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if !json.Valid(data) {
			return // the producer stores valid JSON only
		}
		var got json.RawMessage
		h := mw(func(ctx context.Context, c batchq.Call) error {
			if len(c.Items) != 1 {
				t.Fatalf("%d items, want 1", len(c.Items))
			}
			got = c.Items[0]
			return nil
		})
		if err := h(context.Background(), batchq.Call{Queue: "q", Key: "k", Items: []json.RawMessage{data}}); err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(got, data) {
			return
		}
		var members map[string]json.RawMessage
		var env batchqotel.Envelope[json.RawMessage]
		if err := json.Unmarshal(data, &members); err != nil || len(members) != 2 || bytes.Count(data, []byte(`"batchq_trace"`)) == 0 {
			t.Fatalf("%s was opened, but is not an object of two members", data)
		}
		if err := json.Unmarshal(data, &env); err != nil || env.Trace == nil || !bytes.Equal(env.Item, got) {
			t.Fatalf("%s was opened to %s, which is not its item (%v)", data, got, err)
		}
	})
}

// A batch links once to each distinct span its envelopes carry, up to 128
// (the SDK's default limit), and opens every envelope all the same.
func TestLinksCapped(t *testing.T) {
	var items []string
	for i := range 130 {
		tp := fmt.Sprintf("00-0af7651916cd43dd8448eb211c80319c-%016x-01", i+1)
		env := `{"batchq_trace":{"traceparent":"` + tp + `"},"item":` + fmt.Sprint(i) + `}`
		items = append(items, env, env) // each span twice: one link
	}
	tr := newTracing(t)
	opened := 0
	h := tr.middleware(t)(func(ctx context.Context, c batchq.Call) error {
		for i, it := range c.Items {
			if string(it) == fmt.Sprint(i/2) {
				opened++
			}
		}
		return nil
	})
	raw := make([]json.RawMessage, len(items))
	for i, it := range items {
		raw[i] = json.RawMessage(it)
	}
	if err := h(context.Background(), batchq.Call{Queue: "q", Key: "k", Items: raw, Batch: true}); err != nil {
		t.Fatal(err)
	}
	s := tr.one(t, "process q")
	if opened != len(items) || len(s.Links()) != 128 || s.DroppedLinks() != 0 {
		t.Errorf("%d of %d items opened, %d links (%d dropped), want all, 128 and 0", opened, len(items), len(s.Links()), s.DroppedLinks())
	}
}
