package batchqotel

import (
	"context"
	"encoding/json"
	"errors"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/batchq/batchq"
)

// The attributes of batchq's own, besides the messaging conventions'.
const (
	keyKey     = attribute.Key("batchq.key")
	attemptKey = attribute.Key("batchq.attempt")
	outcomeKey = attribute.Key("batchq.outcome")
)

// The outcomes of a call, the values of batchq.outcome.
const (
	outcomeOK      = "ok"       // the handler returned nil: its items are done
	outcomeRetry   = "retry"    // any other error: tried again, unless out of attempts
	outcomeNoRetry = "no_retry" // a *batchq.NoRetryError: to dead letters at once
	outcomePanic   = "panic"    // the handler panicked (a *batchq.PanicError)
	outcomeTimeout = "timeout"  // the queue's timeout (WithTimeout) ended the call
	outcomePartial = "partial"  // a *batchq.BatchError: the items it names failed
)

// maxLinks bounds a batch's links to the spans that added its items: the
// SDK's default limit of links per span.
const maxLinks = 128

// NewMiddleware returns batchq middleware that traces every handler call
// (see the package doc for its spans) and takes items out of their
// envelopes (see Envelope) before the handler decodes them. Install it on
// the worker, or on the queues that get envelopes (batchq.WithMiddleware):
//
//	mw, err := batchqotel.NewMiddleware()
//	if err != nil {
//		return err
//	}
//	w.Use(mw)
//
// Items without an envelope pass through as they are. It returns an error,
// and no middleware, when an option is nil or invalid. The middleware is
// safe for concurrent use.
func NewMiddleware(opts ...Option) (batchq.Middleware, error) {
	c, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	tracer := c.tracer()
	return func(next batchq.HandlerFunc) batchq.HandlerFunc {
		return func(ctx context.Context, call batchq.Call) error {
			items, links := open(call.Items, c.propagator)
			call.Items = items
			attrs := []attribute.KeyValue{
				semconv.MessagingSystemKey.String("batchq"),
				semconv.MessagingOperationTypeProcess,
				semconv.MessagingOperationName("process"),
				semconv.MessagingDestinationName(call.Queue),
				keyKey.String(call.Key),
				attemptKey.Int(call.Attempt),
			}
			if call.Batch {
				attrs = append(attrs, semconv.MessagingBatchMessageCount(len(call.Items)))
			}
			ctx, span := tracer.Start(ctx, "process "+call.Queue, trace.WithSpanKind(trace.SpanKindConsumer),
				trace.WithAttributes(attrs...), trace.WithLinks(links...))
			// A panic that reaches here comes from middleware inside this
			// one (the worker recovers the handler's and returns it as a
			// *batchq.PanicError): the span records it and ends all the same.
			panicked := true
			defer func() {
				if panicked {
					span.SetAttributes(outcomeKey.String(outcomePanic), semconv.ErrorTypeOther)
					span.SetStatus(codes.Error, "middleware panicked")
					span.End()
				}
			}()
			err := next(ctx, call)
			panicked = false
			end(ctx, span, err)
			return err
		}
	}, nil
}

// open returns items with each envelope replaced by its item, and a link
// to each distinct span context the envelopes carry (at most maxLinks).
// items itself is left as it was: the worker, and middleware outside this
// one, may still read it.
func open(items []json.RawMessage, p propagation.TextMapPropagator) ([]json.RawMessage, []trace.Link) {
	var out []json.RawMessage // a copy, made at the first envelope
	var links []trace.Link
	for i, data := range items {
		item, carrier, ok := unwrap(data)
		if !ok {
			continue
		}
		if out == nil {
			out = make([]json.RawMessage, len(items))
			copy(out, items)
		}
		out[i] = item
		if len(links) == maxLinks {
			continue
		}
		sc := trace.SpanContextFromContext(p.Extract(context.Background(), carrier))
		if sc.IsValid() && !linked(links, sc) {
			links = append(links, trace.Link{SpanContext: sc})
		}
	}
	if out == nil {
		return items, nil
	}
	return out, links
}

// linked reports whether links already has one to sc's span.
func linked(links []trace.Link, sc trace.SpanContext) bool {
	for _, l := range links {
		if l.SpanContext.SpanID() == sc.SpanID() && l.SpanContext.TraceID() == sc.TraceID() {
			return true
		}
	}
	return false
}

// end sets the outcome of the call that got ctx and returned err on span,
// records err, and ends the span.
func end(ctx context.Context, span trace.Span, err error) {
	span.SetAttributes(outcomeKey.String(outcomeOf(ctx, err)))
	if err != nil {
		recordError(span, err)
	}
	span.End()
}

// outcomeOf returns the outcome of a call given ctx that returned err.
func outcomeOf(ctx context.Context, err error) string {
	var pe *batchq.PanicError
	var te *batchq.TimeoutError
	var be *batchq.BatchError
	var ne *batchq.NoRetryError
	switch {
	case err == nil:
		return outcomeOK
	case errors.As(err, &pe):
		return outcomePanic
	case errors.As(err, &te),
		// The worker wraps the handler's error in a *TimeoutError under all
		// middleware; a middleware inside this one may still return the
		// deadline's own error, once the call's deadline has passed.
		errors.Is(err, context.DeadlineExceeded) && errors.Is(ctx.Err(), context.DeadlineExceeded):
		return outcomeTimeout
	case errors.As(err, &be):
		return outcomePartial
	case errors.As(err, &ne):
		return outcomeNoRetry
	}
	return outcomeRetry
}
