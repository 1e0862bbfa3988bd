package batchqotel

import (
	"context"
	"errors"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/batchq/batchq/producer"
)

// A Producer appends items in envelopes, each append under a span of its
// own. It is safe for concurrent use.
type Producer struct {
	p          *producer.Producer
	tracer     trace.Tracer
	propagator propagation.TextMapPropagator
}

// NewProducer returns a Producer that appends with p, which the caller
// keeps owning (and closes, if it lingers). It returns an error, and no
// Producer, when p or an option is nil, or an option is invalid.
func NewProducer(p *producer.Producer, opts ...Option) (*Producer, error) {
	if p == nil {
		return nil, errors.New("batchqotel: nil producer")
	}
	c, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	return &Producer{p: p, tracer: c.tracer(), propagator: c.propagator}, nil
}

// Add appends items to the key of a queue as p.Add does, each in an
// Envelope, under a "send <queue>" span (kind Producer, a child of ctx's
// span) that lasts until the append returns and records its error. Every
// envelope carries that span's context: the spans of the calls that handle
// the items link to it. Adding no item does nothing and starts no span.
func (p *Producer) Add(ctx context.Context, queue, key string, items ...any) error {
	if len(items) == 0 {
		return nil
	}
	attrs := []attribute.KeyValue{
		semconv.MessagingSystemKey.String("batchq"),
		semconv.MessagingOperationTypeSend,
		semconv.MessagingOperationName("send"),
		semconv.MessagingDestinationName(queue),
		keyKey.String(key),
	}
	if len(items) > 1 {
		attrs = append(attrs, semconv.MessagingBatchMessageCount(len(items)))
	}
	ctx, span := p.tracer.Start(ctx, "send "+queue, trace.WithSpanKind(trace.SpanKindProducer), trace.WithAttributes(attrs...))
	defer span.End()
	carrier := propagation.MapCarrier{} // the same for every item: only read from here on
	p.propagator.Inject(ctx, carrier)
	wrapped := make([]any, len(items))
	for i, it := range items {
		wrapped[i] = Envelope[any]{Trace: carrier, Item: it}
	}
	err := p.p.Add(ctx, queue, key, wrapped...)
	if err != nil {
		recordError(span, err)
	}
	return err
}
