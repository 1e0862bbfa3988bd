package batchqotel_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
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

// An envelope is a JSON array: the marker, the propagator's fields, then
// the item.
func TestWrapFormat(t *testing.T) {
	for _, tc := range []struct {
		name string
		ctx  context.Context
		p    propagation.TextMapPropagator
		want string
	}{
		{"W3C", spanContext(t), propagation.TraceContext{},
			`["batchq:trace",{"traceparent":"` + traceparent + `"},{"to":"a@example.com"}]`},
		{"no span", context.Background(), propagation.TraceContext{}, `["batchq:trace",{},{"to":"a@example.com"}]`},
		{"no propagator", spanContext(t), propagation.NewCompositeTextMapPropagator(), `["batchq:trace",{},{"to":"a@example.com"}]`},
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
	want(`["batchq:trace",{},1]`)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	// The global propagator cannot be unset: back to one that carries
	// nothing, as the default does, for the tests after this one.
	t.Cleanup(func() { otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator()) })
	want(`["batchq:trace",{"traceparent":"` + traceparent + `"},1]`)
}

// An Envelope encodes to its array whether a value or a pointer, with a
// nil Trace as an empty object, and decodes what it encodes; <, > and &
// are escaped or not as the encoder around it says.
func TestEnvelopeJSON(t *testing.T) {
	env := batchqotel.Envelope[Email]{Trace: propagation.MapCarrier{"traceparent": traceparent, "tracestate": "a=1"}, Item: Email{To: "<a&b>"}}
	const want = `["batchq:trace",{"traceparent":"` + traceparent + `","tracestate":"a=1"},{"to":"<a&b>"}]`
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // as batchq's producer encodes
	for _, v := range []any{env, &env, []any{env}} {
		buf.Reset()
		if err := enc.Encode(v); err != nil {
			t.Fatal(err)
		}
		got := strings.TrimSuffix(buf.String(), "\n")
		if _, isSlice := v.([]any); isSlice {
			got = strings.TrimSuffix(strings.TrimPrefix(got, "["), "]")
		}
		if got != want {
			t.Errorf("%T encodes to %s, want %s", v, got, want)
		}
	}
	if got, err := json.Marshal(env); err != nil || !strings.Contains(string(got), `{"to":"\u003ca\u0026b\u003e"}`) {
		t.Errorf("json.Marshal: %s (%v), want <, > and & escaped", got, err)
	}
	if got, err := json.Marshal(batchqotel.Envelope[int]{Item: 1}); err != nil || string(got) != `["batchq:trace",{},1]` {
		t.Errorf("an Envelope with a nil Trace encodes to %s (%v)", got, err)
	}

	var back batchqotel.Envelope[Email]
	if err := json.Unmarshal([]byte(want), &back); err != nil || back.Item != env.Item || len(back.Trace) != 2 ||
		back.Trace["traceparent"] != traceparent || back.Trace["tracestate"] != "a=1" {
		t.Errorf("decodes to %+v (%v), want %+v", back, err, env)
	}
	if err := json.Unmarshal([]byte(`null`), &back); err != nil || back.Item != env.Item {
		t.Errorf("null: %v, envelope now %+v; want it left as it was", err, back)
	}
	for _, data := range []string{`{"to":"a"}`, `["batchq:trace",{},{"to":"a"},1]`, `["batchq:trace",{"a":1},{"to":"a"}]`, `[]`} {
		if err := json.Unmarshal([]byte(data), &back); err == nil {
			t.Errorf("%s decodes to an envelope, %+v", data, back)
		}
	}
	var typed batchqotel.Envelope[int]
	if err := json.Unmarshal([]byte(`["batchq:trace",{},"x"]`), &typed); err == nil {
		t.Error(`an envelope of "x" decodes to an Envelope[int]`)
	}
}

// The envelope's overhead, as the docs give it: what it adds to an item
// with the W3C propagator and no tracestate.
func TestEnvelopeOverhead(t *testing.T) {
	const documented = 91
	item, err := json.Marshal(Email{To: "a@example.com"})
	if err != nil {
		t.Fatal(err)
	}
	env, err := json.Marshal(batchqotel.Wrap(spanContext(t), Email{To: "a@example.com"}, propagation.TraceContext{}))
	if err != nil {
		t.Fatal(err)
	}
	if got := len(env) - len(item); got != documented {
		t.Errorf("an envelope adds %d bytes; the docs say %d", got, documented)
	}
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

// An item is an envelope when it is an array of exactly three elements:
// the marker as Wrap writes it, an object of strings with no name twice,
// and the item. Anything else reaches the handler as it was stored.
func TestEnvelopeDetection(t *testing.T) {
	tp := `{"traceparent":"` + traceparent + `"}`
	for _, tc := range []struct {
		name, item, want string
		linked           bool
	}{
		{"envelope", `["batchq:trace",` + tp + `,{"to":"a"}]`, `{"to":"a"}`, true},
		{"an array item", `["batchq:trace",` + tp + `,[1,2]]`, `[1,2]`, true},
		{"whitespace", " [\n \"batchq:trace\" , { } ,\t7 ]\n", `7`, false},
		{"no trace context", `["batchq:trace",{},"x"]`, `"x"`, false},
		{"null item", `["batchq:trace",{},null]`, `null`, false},
		{"envelope in an envelope: one is opened", `["batchq:trace",{},["batchq:trace",{},1]]`, `["batchq:trace",{},1]`, false},
		{"invalid traceparent", `["batchq:trace",{"traceparent":"00-zz"},1]`, `1`, false},
		{"other fields in the carrier", `["batchq:trace",{"b3":"x"},1]`, `1`, false},
		{"escapes in the carrier", `["batchq:trace",{"trace\u0070arent":"` + traceparent + `"},1]`, `1`, true},
		{"a fourth element", `["batchq:trace",{},1,2]`, `["batchq:trace",{},1,2]`, false},
		{"no item", `["batchq:trace",{}]`, `["batchq:trace",{}]`, false},
		{"the marker alone", `["batchq:trace"]`, `["batchq:trace"]`, false},
		{"an empty array", `[]`, `[]`, false},
		{"a name twice in the carrier", `["batchq:trace",{"a":"1","a":"2"},1]`, `["batchq:trace",{"a":"1","a":"2"},1]`, false},
		{"a name twice, once escaped", `["batchq:trace",{"a":"1","\u0061":"2"},1]`, `["batchq:trace",{"a":"1","\u0061":"2"},1]`, false},
		{"carrier null", `["batchq:trace",null,1]`, `["batchq:trace",null,1]`, false},
		{"carrier a string", `["batchq:trace","x",1]`, `["batchq:trace","x",1]`, false},
		{"carrier an array", `["batchq:trace",[],1]`, `["batchq:trace",[],1]`, false},
		{"a number in the carrier", `["batchq:trace",{"traceparent":1},1]`, `["batchq:trace",{"traceparent":1},1]`, false},
		{"an object in the carrier", `["batchq:trace",{"a":{}},1]`, `["batchq:trace",{"a":{}},1]`, false},
		{"null in the carrier", `["batchq:trace",{"a":null},1]`, `["batchq:trace",{"a":null},1]`, false},
		{"the marker escaped", `["batchq:trac\u0065",{},1]`, `["batchq:trac\u0065",{},1]`, false},
		{"the marker in another case", `["Batchq:Trace",{},1]`, `["Batchq:Trace",{},1]`, false},
		{"a longer marker", `["batchq:traces",{},1]`, `["batchq:traces",{},1]`, false},
		{"the marker second", `[1,"batchq:trace",{},1]`, `[1,"batchq:trace",{},1]`, false},
		{"the old object envelope", `{"batchq_trace":{},"item":1}`, `{"batchq_trace":{},"item":1}`, false},
		{"an array of an envelope", `[["batchq:trace",{},1]]`, `[["batchq:trace",{},1]]`, false},
		{"the marker as a string", `"batchq:trace"`, `"batchq:trace"`, false},
		{"a plain array", `["a",{},1]`, `["a",{},1]`, false},
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
	env := `["batchq:trace",{"traceparent":"` + traceparent + `"},`
	got, linked := call(t, `1`, env+`2]`, `{"n":3}`, env+`4]`)
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

// isEnvelope is the detection rule written another way, for the fuzz
// target: an array of three elements, the first the marker's exact bytes,
// the second an object of strings that names no member twice. It returns
// the item.
func isEnvelope(data []byte) (json.RawMessage, bool) {
	var elems []json.RawMessage
	if err := json.Unmarshal(data, &elems); err != nil || len(elems) != 3 || string(elems[0]) != `"batchq:trace"` {
		return nil, false
	}
	var members map[string]string
	if err := json.Unmarshal(elems[1], &members); err != nil || members == nil {
		return nil, false
	}
	// No name twice: as many names as the object has members, counted by
	// decoding its members as a list of name and value tokens.
	dec := json.NewDecoder(bytes.NewReader(elems[1]))
	tokens := 0
	for {
		if _, err := dec.Token(); err != nil {
			break
		}
		tokens++
	}
	if tokens != 2+2*len(members) { // "{", "}", and a name and a value each
		return nil, false
	}
	return elems[2], true
}

// Whatever an item holds, the middleware passes it on as it is or opens
// it, and it opens exactly the envelopes (by the rule as isEnvelope
// writes it, and as Envelope decodes them), to their items.
func FuzzEnvelopeDetection(f *testing.F) {
	for _, s := range []string{
		`["batchq:trace",{"traceparent":"` + traceparent + `"},{"to":"a"}]`,
		`["batchq:trace",{},1,2]`, `["batchq:trace",null,1]`, `[1]`, `"batchq:trace"`, `{}`, `[]`,
		`["batchq:trace",{"a":"b","a":"c"},1]`, `["batchq:trace",{"a":"b","\u0061":"c"},1]`,
		`["batchq:trac\u0065",{},1]`, ` [ "batchq:trace" , { "a" : "b" } , [ 1 ] ] `,
		`{"batchq_trace":{},"item":1}`,
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
		opened := !bytes.Equal(got, data)
		item, want := isEnvelope(data)
		var env batchqotel.Envelope[json.RawMessage]
		decodeErr := json.Unmarshal(data, &env)
		switch {
		case want && !opened:
			t.Fatalf("%s is an envelope, but was not opened", data)
		case !want && opened:
			t.Fatalf("%s was opened to %s, but is not an envelope", data, got)
		case want && !bytes.Equal(item, got):
			t.Fatalf("%s was opened to %s, which is not its item %s", data, got, item)
		case want != (decodeErr == nil) && !bytes.Equal(bytes.TrimSpace(data), []byte("null")):
			t.Fatalf("%s: Envelope decodes it with error %v, but is an envelope: %v", data, decodeErr, want)
		case want && !bytes.Equal(env.Item, got):
			t.Fatalf("%s: Envelope decodes its item to %s, the middleware to %s", data, env.Item, got)
		}
	})
}

// A batch links once to each distinct span its envelopes carry, up to 128
// (the SDK's default limit), and opens every envelope all the same.
func TestLinksCapped(t *testing.T) {
	var items []string
	for i := range 130 {
		tp := fmt.Sprintf("00-0af7651916cd43dd8448eb211c80319c-%016x-01", i+1)
		env := `["batchq:trace",{"traceparent":"` + tp + `"},` + fmt.Sprint(i) + `]`
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
