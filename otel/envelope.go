package batchqotel

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
)

// marker is an envelope's first element, written without escapes: an item
// whose JSON does not start with it (after "[" and any whitespace) is not
// an envelope, with no further decoding.
var marker = []byte(`"batchq:trace"`)

// errNotEnvelope is what Envelope.UnmarshalJSON returns for JSON that is
// not an envelope.
var errNotEnvelope = errors.New(`batchqotel: not an envelope (a JSON array of "batchq:trace", an object of strings and the item)`)

// An Envelope is an item with the trace context of where it was added,
// stored as a JSON array of exactly three elements: the marker string
// "batchq:trace", the trace context (an object of strings) and the item.
//
//	["batchq:trace",{"traceparent":"00-…-…-01"},{"to":"a@example.com"}]
//
// It is an array, not an object, so that a handler of a struct or map type
// (or a string or a number) fails to decode it (batchq.ErrDecode) rather
// than getting a zero value: see the package doc.
//
// Trace holds what the propagator wrote (with the W3C propagator,
// traceparent and tracestate); a nil Trace is written as an empty object.
// The middleware of NewMiddleware takes the item out before the handler
// decodes it. A queue whose worker has no such middleware can decode the
// envelope itself, with a handler of Envelope[T] items; UnmarshalJSON
// accepts what the middleware opens, and fails on anything else.
type Envelope[T any] struct {
	Trace propagation.MapCarrier
	Item  T
}

// MarshalJSON writes e as its three-element array. The item is encoded as
// json.Marshal would, but whether <, > and & are escaped is left to the
// encoder around it (batchq's producer does not escape them).
func (e Envelope[T]) MarshalJSON() ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteByte('[')
	buf.Write(marker)
	buf.WriteByte(',')
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	trace := e.Trace
	if trace == nil {
		trace = propagation.MapCarrier{}
	}
	if err := enc.Encode(trace); err != nil {
		return nil, err
	}
	buf.Truncate(buf.Len() - 1) // Encode's newline
	buf.WriteByte(',')
	if err := enc.Encode(e.Item); err != nil {
		return nil, err
	}
	buf.Truncate(buf.Len() - 1)
	buf.WriteByte(']')
	return buf.Bytes(), nil
}

// UnmarshalJSON reads an envelope, by the rule the middleware opens them
// by (see the package doc), and its item into Item as json.Unmarshal
// would. JSON null leaves e as it is, as json.Unmarshal does.
func (e *Envelope[T]) UnmarshalJSON(data []byte) error {
	if string(bytes.TrimSpace(data)) == "null" {
		return nil
	}
	raw, trace, ok := unwrap(data)
	if !ok {
		return errNotEnvelope
	}
	var item T
	if err := json.Unmarshal(raw, &item); err != nil {
		return err
	}
	e.Trace, e.Item = trace, item
	return nil
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

// skipSpace returns b without its leading JSON whitespace.
func skipSpace(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t' || b[0] == '\n' || b[0] == '\r') {
		b = b[1:]
	}
	return b
}

// unwrap reports whether data is an envelope: a JSON array of exactly
// three elements, the first the string "batchq:trace" written without
// escapes (as MarshalJSON writes it), the second an object whose members
// are all strings, no name twice, the third any JSON value. For an
// envelope it returns the item's JSON and the trace context it carries.
func unwrap(data []byte) (item json.RawMessage, trace propagation.MapCarrier, ok bool) {
	// The quick check: "[", then the marker, bytes for bytes.
	rest := skipSpace(data)
	if len(rest) == 0 || rest[0] != '[' || !bytes.HasPrefix(skipSpace(rest[1:]), marker) {
		return nil, nil, false
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('[') {
		return nil, nil, false
	}
	if _, err := dec.Token(); err != nil { // the marker, checked above
		return nil, nil, false
	}
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, nil, false
	}
	trace = propagation.MapCarrier{}
	for dec.More() {
		name, err := dec.Token()
		if err != nil {
			return nil, nil, false
		}
		value, err := dec.Token()
		if err != nil {
			return nil, nil, false
		}
		n, _ := name.(string) // a member's name is a string
		v, isString := value.(string)
		if _, twice := trace[n]; twice || !isString {
			return nil, nil, false
		}
		trace[n] = v
	}
	if tok, err := dec.Token(); err != nil || tok != json.Delim('}') || !dec.More() {
		return nil, nil, false // the carrier unclosed, or no item after it
	}
	if err := dec.Decode(&item); err != nil {
		return nil, nil, false
	}
	if tok, err := dec.Token(); err != nil || tok != json.Delim(']') {
		return nil, nil, false // a fourth element
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, nil, false // more JSON after the array
	}
	return item, trace, true
}
