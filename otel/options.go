package batchqotel

import (
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
)

// scope names the instrumentation: the tracer of every span this package
// starts.
const scope = "github.com/batchq/batchq/otel"

// An Option configures Middleware, NewProducer or Wrap.
type Option func(*config)

type config struct {
	tp         trace.TracerProvider
	propagator propagation.TextMapPropagator
}

// WithTracerProvider sets the provider of the tracer that starts the spans
// (default otel.GetTracerProvider(), the global provider, also when tp is
// nil). Wrap starts no span and ignores it.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(c *config) { c.tp = tp }
}

// WithPropagator sets how trace context is written into envelopes and read
// back (default otel.GetTextMapPropagator(), the global propagator, also
// when p is nil). The global propagator carries nothing until the program
// sets one, as it must for HTTP tracing; propagation.TraceContext{} writes
// the W3C traceparent and tracestate. Producers and workers must use
// propagators that read what the other writes.
func WithPropagator(p propagation.TextMapPropagator) Option {
	return func(c *config) { c.propagator = p }
}

func newConfig(opts []Option) config {
	var c config
	for _, o := range opts {
		if o == nil {
			panic("batchqotel: nil Option")
		}
		o(&c)
	}
	if c.tp == nil {
		c.tp = otel.GetTracerProvider()
	}
	if c.propagator == nil {
		c.propagator = otel.GetTextMapPropagator()
	}
	return c
}

func (c config) tracer() trace.Tracer {
	return c.tp.Tracer(scope, trace.WithSchemaURL(semconv.SchemaURL))
}
