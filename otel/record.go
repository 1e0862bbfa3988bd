package batchqotel

import (
	"encoding/json"
	"errors"
	"fmt"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/batchq/batchq"
)

// recordError records err on span as the exception event RecordError
// writes, with error.type and an error status, in words that hold nothing
// of an item (see safeText); a panic's event has the panic's stack.
func recordError(span trace.Span, err error) {
	errType := semconv.ErrorType(err)
	text := safeText(err)
	attrs := []attribute.KeyValue{semconv.ExceptionType(errType.Value.AsString()), semconv.ExceptionMessage(text)}
	var pe *batchq.PanicError
	if errors.As(err, &pe) && len(pe.Stack) > 0 {
		attrs = append(attrs, semconv.ExceptionStacktrace(string(pe.Stack)))
	}
	span.AddEvent(semconv.ExceptionEventName, trace.WithAttributes(attrs...))
	span.SetAttributes(errType)
	span.SetStatus(codes.Error, text)
}

// safeText returns err's text for a span, which, like the worker's logs,
// must not hold an item's contents: Go's JSON errors may quote an item's
// values, and a panic's value may be an item. Those become where and why
// the call failed; the dead letter, or the retry, keeps the whole error.
// Any other error is the handler's own, recorded as it is.
func safeText(err error) string {
	var pe *batchq.PanicError
	var te *json.UnmarshalTypeError
	var se *json.SyntaxError
	switch {
	case errors.As(err, &pe):
		return "batchq: handler panicked (its value is not recorded: it may hold an item)"
	case errors.As(err, &te):
		return fmt.Sprintf("%v: field %q (offset %d) cannot hold the JSON value for Go type %v", batchq.ErrDecode, te.Field, te.Offset, te.Type)
	case errors.As(err, &se):
		return fmt.Sprintf("%v: invalid JSON at offset %d", batchq.ErrDecode, se.Offset)
	case errors.Is(err, batchq.ErrDecode):
		return batchq.ErrDecode.Error()
	}
	return err.Error()
}
