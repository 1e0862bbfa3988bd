// Package batchqotel traces batchq with OpenTelemetry: a span for every
// handler call on the worker side, and, for items that carry trace context
// in an opt-in envelope, links from those spans to the spans that added
// the items. It is a module of its own (github.com/batchq/batchq/otel), so
// that batchq itself does not depend on OpenTelemetry.
//
// On the worker, the middleware NewMiddleware returns traces every call of
// the handlers it wraps:
//
//	mw, err := batchqotel.NewMiddleware()
//	if err != nil {
//		return err
//	}
//	w.Use(mw)
//
// Where items are added, NewProducer wraps a producer so that each append
// runs under a span and each item carries that span's context:
//
//	emails, err := batchqotel.NewProducer(p)
//	if err != nil {
//		return err
//	}
//	err = emails.Add(ctx, "emails", "user:42", Email{To: "a@example.com"})
//
// Both use the global tracer provider and propagator unless told otherwise
// (WithTracerProvider, WithPropagator). The global propagator carries
// nothing until the program sets one, as it must for HTTP tracing:
//
//	otel.SetTextMapPropagator(propagation.TraceContext{})
//
// As in every batchq package, an option checks its value: a nil tracer
// provider or propagator, a nil Option, or a nil producer makes the
// constructor return an error ("batchqotel: nil propagator"), never panic.
// Wrap, which has no error to return, takes its propagator as an argument
// instead of options.
//
// # Spans
//
// The spans follow OpenTelemetry's semantic conventions for messaging
// (semconv v1.43.0), with messaging.system "batchq":
//
//   - "process <queue>", kind Consumer, one per handler call: one item for
//     Handle and HandleRaw, the items of one call for HandleBatch. Its
//     attributes: messaging.operation.type and messaging.operation.name
//     "process", messaging.destination.name the queue,
//     messaging.batch.message_count the number of items (batch handlers
//     only, one item included), batchq.key the key, batchq.attempt the
//     failed attempts before this one (for a batch, the most of any item),
//     and batchq.outcome, below. Its parent is the span of the context the
//     worker's handlers get, if any (the worker's own context carries none,
//     so each call starts a trace of its own); its links go to the span
//     contexts its items' envelopes carry, one per distinct context, at
//     most 128 (the SDK's default limit). The handler's context carries
//     this span.
//   - "send <queue>", kind Producer, one per Producer.Add: the same
//     messaging attributes with operation "send", batchq.key, and
//     messaging.batch.message_count when it appends more than one item. It
//     is a child of the caller's span, and lasts until the append returns.
//
// The process span links to the send span rather than being its child, for
// one item as for a batch: the messaging conventions ask processing spans
// to link to the contexts that created their messages (a single message's
// span may take that context as its parent instead). A link keeps a
// producer's trace from stretching over the minutes or hours an item may
// wait, keeps retries and batches the same shape, and keeps the trace of a
// request whose items are handled ten times (ten failed attempts) readable.
//
// batchq.outcome says how the call ended, as the worker takes its error:
//
//	ok        the handler returned nil: the items are done
//	retry     any other error (a RetryAfter one included): tried again,
//	          unless out of attempts, then to dead letters
//	no_retry  a *batchq.NoRetryError (an item that does not decode
//	          included): to dead letters at once
//	panic     the handler panicked (a *batchq.PanicError)
//	timeout   the queue's timeout (batchq.WithTimeout) ended the call
//	partial   a *batchq.BatchError: only the items it names failed
//
// A call cut short by the worker's shutdown is a retry: its items are
// handled again. For every outcome but ok the span also has an exception
// event, error.type (semconv's ErrorType of the error) and an Error
// status; on success the status is left unset, as instrumentation should.
//
// Spans never hold an item's contents: no payload is recorded, an item that
// does not decode is described by where and why (Go's JSON errors may quote
// its values), and a panic by its stack, not its value (which may be an
// item), as the worker's logs do. The dead letter, or the retry, keeps the
// whole error. Errors a handler returns are recorded as they are.
//
// A call the worker abandons (a handler that ignores its context past
// batchq.WithTimeout or the shutdown timeout: about 2s later) does not
// return through middleware: its span stays open until the handler
// returns, if it ever does, and is not exported before. The worker settles
// the call's items at once (as failed, a *batchq.TimeoutError wrapping
// batchq.ErrHandlerTimeout, or at shutdown as not handled); when the
// handler does return, its span ends with the outcome of what it returned,
// ok included. The worker's metrics (batchq.Observer) count abandoned
// calls; these spans do not.
//
// # Envelopes
//
// Items carry trace context only when they are added in an Envelope, by
// Producer.Add or by Wrap with any producer call. An envelope is one JSON
// array per item (a key holds a JSON array of them), of exactly three
// elements: the marker string "batchq:trace", the trace context, and the
// item as it would have been stored:
//
//	["batchq:trace",{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},{"to":"a@example.com"}]
//
// The trace context is what the propagator wrote (traceparent and
// tracestate with the W3C propagator; an empty object when it writes
// nothing). The middleware treats an item as an envelope when, and only
// when, it is a JSON array of exactly three elements, the first the marker
// written without escapes (as Wrap writes it), the second an object whose
// members are all strings, no name twice, the third any JSON value: it
// replaces each such item with the third element before the handler
// decodes it, so a Handle[Email] handler gets an Email. Other items pass
// through unchanged, so a queue may get both.
//
// The trade: an enveloped item is 91 bytes bigger with the W3C propagator
// (more with a tracestate), and those bytes count against the producer's
// limits as the item's own do: producer.WithMaxItemBytes and the per-key
// caps (producer.WithMaxKeyBytes), and the bytes of batchq.WithMaxBatch.
// Everything else that reads the queue sees envelopes, not items: a plain
// GET of the key, dead letters (deadletter.List), the CLI and the status
// page.
//
// A queue that gets enveloped items needs this middleware on its worker,
// or handlers that decode the envelope themselves (Envelope[T]). The
// envelope is an array so that a worker without either, as in a rollout
// that wraps the producers first, fails loudly instead of losing items: a
// handler of a struct, map, string, number or bool type fails to decode an
// array (batchq.ErrDecode), and the item goes to dead letters at once,
// envelope and all, where an object would have decoded into a struct's
// zero value and been marked done. Requeueing those dead letters once the middleware
// is installed recovers them, trace context included. Handlers that accept
// any JSON array are not protected: a handler of type any, json.RawMessage,
// or a slice or array whose elements take a string, an object and the item
// ([]any, []json.RawMessage) gets the envelope itself, not the item, and
// its items are done as it says.
package batchqotel
