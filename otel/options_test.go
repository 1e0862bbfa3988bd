package batchqotel_test

import (
	"context"
	"encoding/json"
	"slices"
	"testing"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/embedded"
	batchqotel "github.com/batchq/batchq/otel"
	"github.com/batchq/batchq/producer"
)

// An option given nil, a nil Option or a nil producer makes the
// constructor return the first error, with the package's name once, and
// nothing else; it never panics.
func TestOptionErrors(t *testing.T) {
	r, err := embedded.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	p, err := producer.New(r.Client)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		opts []batchqotel.Option
		want string
	}{
		{"nil tracer provider", []batchqotel.Option{batchqotel.WithTracerProvider(nil)}, "batchqotel: nil tracer provider"},
		{"nil propagator", []batchqotel.Option{batchqotel.WithPropagator(nil)}, "batchqotel: nil propagator"},
		{"nil option", []batchqotel.Option{nil}, "batchqotel: nil option"},
		{"nil option after a good one", []batchqotel.Option{batchqotel.WithPropagator(propagation.TraceContext{}), nil}, "batchqotel: nil option"},
		{"the first error", []batchqotel.Option{batchqotel.WithPropagator(nil), batchqotel.WithTracerProvider(nil)}, "batchqotel: nil propagator"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mw, err := batchqotel.NewMiddleware(tc.opts...)
			if err == nil || err.Error() != tc.want || mw != nil {
				t.Errorf("NewMiddleware returned %v, %v; want no middleware and %q", mw != nil, err, tc.want)
			}
			tp, err := batchqotel.NewProducer(p, tc.opts...)
			if err == nil || err.Error() != tc.want || tp != nil {
				t.Errorf("NewProducer returned %v, %v; want no producer and %q", tp, err, tc.want)
			}
		})
	}
	for _, tc := range []struct {
		name string
		opts []batchqotel.Option
	}{
		{"nil producer", nil},
		{"nil producer and a bad option", []batchqotel.Option{batchqotel.WithTracerProvider(nil)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const want = "batchqotel: nil producer"
			tp, err := batchqotel.NewProducer(nil, tc.opts...)
			if err == nil || err.Error() != want || tp != nil {
				t.Errorf("NewProducer(nil) returned %v, %v; want no producer and %q", tp, err, want)
			}
		})
	}
	good := []batchqotel.Option{batchqotel.WithTracerProvider(noop.NewTracerProvider()), batchqotel.WithPropagator(propagation.TraceContext{})}
	if mw, err := batchqotel.NewMiddleware(good...); err != nil || mw == nil {
		t.Errorf("NewMiddleware with good options returned %v, %v", mw != nil, err)
	}
	if tp, err := batchqotel.NewProducer(p, good...); err != nil || tp == nil {
		t.Errorf("NewProducer with good options returned %v, %v", tp, err)
	}
}

// Without options, the producer and the middleware trace with the global
// tracer provider and propagator.
func TestGlobalDefaults(t *testing.T) {
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	// The globals cannot be unset: back to ones that record and carry
	// nothing, as the defaults do, for the tests after this one.
	t.Cleanup(func() {
		otel.SetTracerProvider(noop.NewTracerProvider())
		otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator())
	})

	r, err := embedded.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	p, err := producer.New(r.Client)
	if err != nil {
		t.Fatal(err)
	}
	bp, err := batchqotel.NewProducer(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := bp.Add(t.Context(), "q", "k", 1); err != nil {
		t.Fatal(err)
	}
	mw, err := batchqotel.NewMiddleware()
	if err != nil {
		t.Fatal(err)
	}
	env, err := json.Marshal(batchqotel.Wrap(spanContext(t), 2, propagation.TraceContext{}))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	h := mw(func(ctx context.Context, c batchq.Call) error {
		for _, it := range c.Items {
			got = append(got, string(it))
		}
		return nil
	})
	if err := h(t.Context(), batchq.Call{Queue: "q", Key: "k", Items: []json.RawMessage{env}}); err != nil {
		t.Fatal(err)
	}

	var names []string
	for _, s := range sr.Ended() {
		names = append(names, s.Name())
	}
	if !slices.Equal(names, []string{"send q", "process q"}) {
		t.Fatalf("the global provider recorded %v, want the send and process spans", names)
	}
	if !slices.Equal(got, []string{"2"}) {
		t.Errorf("handler got %q, want the item out of its envelope", got)
	}
	want := trace.SpanContextFromContext(spanContext(t)).SpanID()
	if l := linkedTo(sr.Ended()[1]); !slices.Equal(l, []trace.SpanID{want}) {
		t.Errorf("process span links to %v, want %v (read by the global propagator)", l, want)
	}
}
