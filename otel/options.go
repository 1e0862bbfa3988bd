package batchqotel

import (
	"errors"
	"fmt"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
)

// scope names the instrumentation: the tracer of every span this package
// starts.
const scope = "github.com/batchq/batchq/otel"

// An Option configures NewMiddleware or NewProducer. An option given a bad
// value makes the constructor fail; so does a nil Option.
type Option func(*config) error

type config struct {
	tp         trace.TracerProvider
	propagator propagation.TextMapPropagator
}

// WithTracerProvider sets the provider of the tracer that starts the spans
// (default otel.GetTracerProvider(), the global provider). A nil tp makes
// the constructor fail.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(c *config) error {
		if tp == nil {
			return errors.New("nil tracer provider")
		}
		c.tp = tp
		return nil
	}
}

// WithPropagator sets how trace context is written into envelopes and read
// back (default otel.GetTextMapPropagator(), the global propagator). The
// global propagator carries nothing until the program sets one, as it must
// for HTTP tracing; propagation.TraceContext{} writes the W3C traceparent
// and tracestate. Producers and workers must use propagators that read what
// the other writes. A nil p makes the constructor fail.
func WithPropagator(p propagation.TextMapPropagator) Option {
	return func(c *config) error {
		if p == nil {
			return errors.New("nil propagator")
		}
		c.propagator = p
		return nil
	}
}

// newConfig applies opts over the defaults, the global tracer provider and
// propagator, and returns the first error, with the package's name.
func newConfig(opts []Option) (config, error) {
	c := config{tp: otel.GetTracerProvider(), propagator: otel.GetTextMapPropagator()}
	for _, o := range opts {
		if o == nil {
			return config{}, errors.New("batchqotel: nil option")
		}
		if err := o(&c); err != nil {
			return config{}, fmt.Errorf("batchqotel: %w", err)
		}
	}
	return c, nil
}

func (c config) tracer() trace.Tracer {
	return c.tp.Tracer(scope, trace.WithSchemaURL(semconv.SchemaURL))
}
