package batchqotel

import (
	"bytes"
	"context"
	"encoding/json"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
)

// The names of an envelope's two members.
const (
	traceMember = "batchq_trace"
	itemMember  = "item"
)

// traceName is the trace member's name as Wrap writes it: an item whose
// JSON does not hold it is not an envelope, with no further decoding.
var traceName = []byte(`"` + traceMember + `"`)

// An Envelope is an item with the trace context of where it was added,
// stored as one JSON object with exactly two members:
//
//	{"batchq_trace":{"traceparent":"00-…-…-01"},"item":{"to":"a@example.com"}}
//
// Trace holds what the propagator wrote (with the W3C propagator,
// traceparent and tracestate): an empty object when it writes nothing,
// never null, as Wrap makes it (the middleware of NewMiddleware does not
// open an envelope whose Trace is null). The middleware takes the item out
// before the handler decodes it. A queue whose worker has no such
// middleware can decode the envelope itself, with a handler of Envelope[T]
// items.
type Envelope[T any] struct {
	Trace propagation.MapCarrier `json:"batchq_trace"`
	Item  T                      `json:"item"`
}

// Wrap returns item in an Envelope that carries ctx's span context,
// written by p, for appending by other means than Producer.Add: a typed
// producer.Queue of Envelope[T], AddRaw of its JSON. A nil p means the
// global propagator, otel.GetTextMapPropagator(), which carries nothing
// until the program sets one; the workers' middleware must read what p
// writes (see WithPropagator). Wrap takes a propagator rather than options
// because it has no error to return. The span it
// carries is the one current in ctx (an HTTP request's, say), where
// Producer.Add starts a "send" span of its own for the items it appends,
// as the messaging conventions ask. Wrap is safe for concurrent use.
func Wrap[T any](ctx context.Context, item T, p propagation.TextMapPropagator) Envelope[T] {
	if p == nil {
		p = otel.GetTextMapPropagator()
	}
	carrier := propagation.MapCarrier{}
	p.Inject(ctx, carrier)
	return Envelope[T]{Trace: carrier, Item: item}
}

// unwrap reports whether data is an envelope: a JSON object with exactly
// two members, "batchq_trace" (an object of strings) and "item" (any JSON
// value), the first named without escapes, as Wrap writes it. For an
// envelope it returns the item's JSON and the trace context it carries.
func unwrap(data json.RawMessage) (item json.RawMessage, trace propagation.MapCarrier, ok bool) {
	if !bytes.Contains(data, traceName) {
		return nil, nil, false
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, nil, false
	}
	var rawTrace json.RawMessage
	for n := 0; dec.More(); n++ {
		name, err := dec.Token()
		if err != nil || n == 2 {
			return nil, nil, false
		}
		var value json.RawMessage
		if err := dec.Decode(&value); err != nil {
			return nil, nil, false
		}
		switch {
		case name == traceMember && rawTrace == nil:
			rawTrace = value
		case name == itemMember && item == nil:
			item = value
		default: // another member, or one of these twice
			return nil, nil, false
		}
	}
	if rawTrace == nil || item == nil {
		return nil, nil, false
	}
	if err := json.Unmarshal(rawTrace, &trace); err != nil || trace == nil {
		return nil, nil, false // not an object of strings (null decodes to nil)
	}
	return item, trace, true
}
