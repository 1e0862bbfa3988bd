// Package statuspage serves a small HTML status page for the batchq queues
// under one prefix: every registered queue with its depth, in-flight work,
// retries, dead letters and lag; for each queue its most lagging keys and
// its dead letters, which an operator can requeue or purge.
//
// New returns an http.Handler (or an error, for a nil inspector or an
// invalid option). It uses relative links and form actions only, so it
// works under any mount path; strip the path's prefix before it:
//
//	in, err := inspect.New(rdb) // the caller keeps owning rdb
//	if err != nil { ... }
//	page, err := statuspage.New(in, statuspage.WithLogger(log))
//	if err != nil { ... }
//	mux := http.NewServeMux()
//	mux.Handle("/batchq/", http.StripPrefix("/batchq", page))
//
// # Routes (relative to the mount path)
//
//	GET  /                        the queues
//	GET  /queues/{queue}          one queue: numbers, lagging keys, dead letters
//	POST /queues/{queue}/requeue  form: id=<dead letter id>, or all=1
//	POST /queues/{queue}/purge    form: confirm=1
//
// A POST answers 303 See Other back to the queue's page, which then says
// what was done. An unknown queue is 404, a Redis error 503 with its text.
// GET never changes anything.
//
// # Security
//
// The page has no authentication of its own: mount it behind whatever
// guards the service's other admin endpoints. It answers only requests
// whose Host header is an IP address, localhost, or a name given to
// WithAllowedHosts, and others with 421 Misdirected Request: a web page
// elsewhere cannot reach it through a DNS name that resolves to its address
// (DNS rebinding) to read its tokens or post its forms. Every POST must pass two
// checks, each of which answers 403 on failure: net/http's
// CrossOriginProtection (the browser's Sec-Fetch-Site or Origin header
// must say the request comes from the page's own origin), and a form token,
// the HMAC-SHA256 of the action and the queue under a secret the handler
// draws at random when it is made (WithSecret shares one between replicas).
// Responses carry a Content-Security-Policy that allows no script, no frame
// and forms to the same origin only, and Cache-Control: no-store.
//
// Dead letters' items are not shown unless WithShowItems is given: payloads
// may be personal data. They are never logged.
package statuspage
