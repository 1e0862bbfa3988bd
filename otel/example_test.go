package batchqotel_test

import (
	"context"
	"fmt"
	"log"

	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/batchqtest"
	"github.com/batchq/batchq/embedded"
	batchqotel "github.com/batchq/batchq/otel"
	"github.com/batchq/batchq/producer"
)

// A web service appends an email under its request's span; the worker's
// span for the email links to the append's. A program would set the
// global tracer provider and propagator instead of passing options:
//
//	otel.SetTracerProvider(tp)
//	otel.SetTextMapPropagator(propagation.TraceContext{})
func Example() {
	ctx := context.Background()
	spans := tracetest.NewSpanRecorder() // keeps the ended spans, for printing
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	defer tp.Shutdown(ctx)
	opts := []batchqotel.Option{batchqotel.WithTracerProvider(tp), batchqotel.WithPropagator(propagation.TraceContext{})}

	r, err := embedded.Start() // an in-process Redis
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()

	// The web service.
	p, err := producer.New(r.Client)
	if err != nil {
		log.Fatal(err)
	}
	emails, err := batchqotel.NewProducer(p, opts...)
	if err != nil {
		log.Fatal(err)
	}
	reqCtx, request := tp.Tracer("web").Start(ctx, "POST /signup", trace.WithSpanKind(trace.SpanKindServer))
	if err := emails.Add(reqCtx, "emails", "user:42", Email{To: "a@example.com"}); err != nil {
		log.Fatal(err)
	}
	request.End()

	// The worker.
	w, err := batchq.NewWorker(r.Client)
	if err != nil {
		log.Fatal(err)
	}
	mw, err := batchqotel.NewMiddleware(opts...)
	if err != nil {
		log.Fatal(err)
	}
	w.Use(mw)
	batchq.Handle(w, "emails", func(ctx context.Context, e Email) error {
		fmt.Println("sending to", e.To) // the item, out of its envelope
		return nil
	})
	if _, err := batchqtest.RunUntilIdle(ctx, w); err != nil {
		log.Fatal(err)
	}

	names := make(map[trace.SpanID]string) // span ID to name
	for _, s := range spans.Ended() {
		names[s.SpanContext().SpanID()] = s.Name()
	}
	for _, s := range spans.Ended() {
		fmt.Printf("%s (%v)", s.Name(), s.SpanKind())
		if s.Parent().IsValid() {
			fmt.Printf(", child of %s", names[s.Parent().SpanID()])
		}
		for _, l := range s.Links() {
			fmt.Printf(", linked to %s", names[l.SpanContext.SpanID()])
		}
		for _, kv := range s.Attributes() {
			if kv.Key == "batchq.outcome" {
				fmt.Printf(", outcome %s", kv.Value.AsString())
			}
		}
		fmt.Println()
	}
	// Output:
	// sending to a@example.com
	// send emails (producer), child of POST /signup
	// POST /signup (server)
	// process emails (consumer), linked to send emails, outcome ok
}
