package statuspage

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
)

// Defaults of the options.
const (
	DefaultLaggingKeys = 10
	DefaultDeadLetters = 50
	DefaultTitle       = "batchq"
	DefaultTimeout     = 10 * time.Second
)

// MaxListed bounds WithLaggingKeys and WithDeadLetters.
const MaxListed = 1000

// QueuesPerPage is how many queues the index lists per page, by name.
const QueuesPerPage = 100

// maxItemShown bounds the bytes of an item shown with WithShowItems.
const maxItemShown = 1024

// Option configures the handler New returns.
type Option func(*page) error

// WithLogger sets the logger (default none). The handler logs the dead
// letters requeued and purged (info), refused POSTs (info) and Redis errors
// (warn), never an item. A nil logger makes New fail.
func WithLogger(l *zap.Logger) Option {
	return func(p *page) error {
		if l == nil {
			return errors.New("nil logger")
		}
		p.log = l
		return nil
	}
}

// WithLaggingKeys sets how many of a queue's pending keys, longest due
// first, its page lists: 1 to MaxListed, DefaultLaggingKeys (10) by
// default. Another number makes New fail.
func WithLaggingKeys(n int) Option {
	return func(p *page) error {
		if n < 1 || n > MaxListed {
			return fmt.Errorf("lagging keys must be 1-%d, got %d", MaxListed, n)
		}
		p.laggingKeys = n
		return nil
	}
}

// WithDeadLetters sets how many of a queue's dead letters its page lists,
// newest first: 1 to MaxListed, DefaultDeadLetters (50) by default.
// Another number makes New fail.
func WithDeadLetters(n int) Option {
	return func(p *page) error {
		if n < 1 || n > MaxListed {
			return fmt.Errorf("dead letters must be 1-%d, got %d", MaxListed, n)
		}
		p.deadLetters = n
		return nil
	}
}

// WithTitle sets the title of the pages (DefaultTitle, "batchq", by
// default), for instance the name of the service or environment. A blank
// title makes New fail.
func WithTitle(title string) Option {
	return func(p *page) error {
		if strings.TrimSpace(title) == "" {
			return errors.New("empty title")
		}
		p.title = title
		return nil
	}
}

// WithShowItems shows the item of each dead letter (its first KiB) on the
// queue's page. Items are hidden by default: they may hold personal data.
func WithShowItems() Option {
	return func(p *page) error {
		p.showItems = true
		return nil
	}
}

// WithSecret sets the key of the form tokens, at least 32 bytes (a shorter
// key makes New fail). By default each handler draws its own at random, so
// a form posted to another replica of a load-balanced service (or after a
// restart) is refused with 403: replicas that share one page give them the
// same secret.
func WithSecret(key []byte) Option {
	return func(p *page) error {
		if len(key) < 32 {
			return fmt.Errorf("secret must be at least 32 bytes, got %d", len(key))
		}
		p.secret = bytes.Clone(key)
		return nil
	}
}

// WithAllowedHosts adds host names the page answers to. By default it
// answers only requests whose Host is an IP address or localhost, so that a
// web page elsewhere cannot reach it through a DNS name that resolves to the
// page's address (DNS rebinding) and read its tokens or post its forms.
// Requests for other hosts get 421 Misdirected Request. Give the names the
// page is reached by, say the name of a reverse proxy in front of it; a port
// in the Host header is ignored, and names match regardless of case. A name
// with a port, a scheme or a space, or an empty one, makes New fail.
func WithAllowedHosts(hosts ...string) Option {
	return func(p *page) error {
		names, err := hostNames(hosts)
		if err != nil {
			return err
		}
		maps.Copy(p.hosts, names)
		return nil
	}
}

// WithTimeout bounds the Redis work of one request (DefaultTimeout, 10s, by
// default): an unreachable Redis costs a request that long, then a 503. A d
// that is not positive makes New fail.
func WithTimeout(d time.Duration) Option {
	return func(p *page) error {
		if d <= 0 {
			return fmt.Errorf("timeout must be positive, got %v", d)
		}
		p.timeout = d
		return nil
	}
}

//go:embed layout.html index.html queue.html error.html style.css
var files embed.FS

var (
	css     = template.CSS(must(files.ReadFile("style.css")))
	cssHash = sha256.Sum256([]byte(css))
	csp     = "default-src 'none'; style-src 'sha256-" + base64.StdEncoding.EncodeToString(cssHash[:]) + "'; " +
		"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
	funcs = template.FuncMap{"lag": formatLag, "clock": formatClock, "rfc3339": formatRFC3339, "item": formatItem}

	indexPage = parse("index.html")
	queuePage = parse("queue.html")
	errorPage = parse("error.html")
)

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func parse(content string) *template.Template {
	return template.Must(template.New("layout").Funcs(funcs).ParseFS(files, "layout.html", content))
}

// page is the handler New returns.
type page struct {
	in          *inspect.Inspector
	log         *zap.Logger
	laggingKeys int
	deadLetters int
	title       string
	showItems   bool
	secret      []byte
	timeout     time.Duration
	hosts       map[string]bool // names answered to besides IP addresses
	h           http.Handler
}

// New returns a handler that serves the status page of the queues in reads
// (see the package doc for its routes and mounting). It returns an error,
// and no handler, when in is nil or an option is invalid. The handler is
// safe for concurrent use.
func New(in *inspect.Inspector, opts ...Option) (http.Handler, error) {
	if in == nil {
		return nil, errors.New("statuspage: nil inspector")
	}
	p := &page{
		in:          in,
		log:         zap.NewNop(),
		laggingKeys: DefaultLaggingKeys,
		deadLetters: DefaultDeadLetters,
		title:       DefaultTitle,
		timeout:     DefaultTimeout,
		hosts:       map[string]bool{"localhost": true},
	}
	for _, o := range opts {
		if o == nil {
			return nil, errors.New("statuspage: nil option")
		}
		if err := o(p); err != nil {
			return nil, fmt.Errorf("statuspage: %w", err)
		}
	}
	p.log = p.log.Named("statuspage")
	if p.secret == nil {
		p.secret = make([]byte, 32)
		rand.Read(p.secret) // never fails (crypto/rand, Go 1.24+)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", p.index)
	mux.HandleFunc("GET /queues/{queue}", p.queue)
	mux.HandleFunc("POST /queues/{queue}/requeue", p.requeue)
	mux.HandleFunc("POST /queues/{queue}/purge", p.purge)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		p.fail(w, r, http.StatusNotFound, "There is no page at this address.")
	})
	cop := http.NewCrossOriginProtection()
	cop.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.log.Info("refused a cross-origin request", zap.String("method", r.Method), zap.String("path", r.URL.Path),
			zap.String("remote_addr", r.RemoteAddr))
		p.fail(w, r, http.StatusForbidden, "Cross-origin request refused: post the forms of this page from this page.")
	}))
	p.h = cop.Handler(mux)
	return p, nil
}

// ServeHTTP sets the security headers every answer carries and serves r,
// if it is for an allowed host.
func (p *page) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Security-Policy", csp)
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "same-origin")
	h.Set("Cache-Control", "no-store")
	if !p.allowedHost(r.Host) {
		p.log.Info("refused a request for another host", zap.String("host", r.Host), zap.String("path", r.URL.Path),
			zap.String("remote_addr", r.RemoteAddr))
		p.fail(w, r, http.StatusMisdirectedRequest, "This page does not answer to that host name (see statuspage.WithAllowedHosts).")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), p.timeout)
	defer cancel()
	p.h.ServeHTTP(w, r.WithContext(ctx))
}

// allowedHost reports whether the page answers to a request whose Host
// header is host.
func (p *page) allowedHost(host string) bool { return hostAllowed(host, p.hosts) }

// hostAllowed reports whether host, a Host header, is an IP address
// (with or without a port), or a name in names (lower case, no trailing
// dot).
func hostAllowed(host string, names map[string]bool) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if _, err := netip.ParseAddr(host); err == nil {
		return true
	}
	return names[strings.ToLower(strings.TrimSuffix(host, "."))]
}

// HostHandler returns a handler that passes to h the requests whose Host
// is an IP address, localhost or one of hosts, as the status page itself
// does (see WithAllowedHosts), and answers others with 421 Misdirected
// Request. Wrap with it what a service serves beside the page on the same
// listener, such as Prometheus metrics, whose key names a web page should
// not read through DNS rebinding either. It panics on an invalid host.
func HostHandler(h http.Handler, hosts ...string) http.Handler {
	names, err := hostNames(hosts)
	if err != nil {
		panic("statuspage: " + err.Error())
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !hostAllowed(r.Host, names) {
			http.Error(w, "421 misdirected request: this server does not answer to that host name", http.StatusMisdirectedRequest)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// hostNames returns the set of names a page answers to: localhost and
// hosts, each checked.
func hostNames(hosts []string) (map[string]bool, error) {
	names := map[string]bool{"localhost": true}
	for _, h := range hosts {
		if h == "" || strings.ContainsAny(h, ":/ ") {
			return nil, fmt.Errorf("allowed host %q: want a host name without port or scheme", h)
		}
		names[strings.ToLower(strings.TrimSuffix(h, "."))] = true
	}
	return names, nil
}

// common is what every page shows.
type common struct {
	Title   string
	Heading string // the page's own heading; "" on the index
	Prefix  string
	Home    string // the relative link to the index
	CSS     template.CSS
	Now     time.Time
}

func (p *page) common(r *http.Request, heading string) common {
	return common{Title: p.title, Heading: heading, Prefix: p.in.Prefix(), Home: home(r), CSS: css}
}

// home returns the relative link from r's page to the index: the page is
// as many directories deep as its path has slashes after the first.
func home(r *http.Request) string {
	if d := strings.Count(r.URL.EscapedPath(), "/") - 1; d > 0 {
		return strings.Repeat("../", d)
	}
	return "./"
}

type queueRow struct {
	inspect.Stats
	Link string
}

// index lists the queues, QueuesPerPage at a time (?page=N, from 1): the
// page reads the state of its own queues only, so that a registry of many
// queues keeps it small and quick.
func (p *page) index(w http.ResponseWriter, r *http.Request) {
	n := 1
	if v := r.URL.Query().Get("page"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			p.fail(w, r, http.StatusBadRequest, "The page number must be a whole number from 1.")
			return
		}
	}
	qs, err := p.in.Queues(r.Context())
	if err != nil {
		p.redisError(w, r, "", err)
		return
	}
	pages := max(1, (len(qs)+QueuesPerPage-1)/QueuesPerPage)
	if n > pages {
		p.fail(w, r, http.StatusNotFound, fmt.Sprintf("There is no page %d: %s fill %s.", n, plural(len(qs), "queue"), plural(pages, "page")))
		return
	}
	first := (n - 1) * QueuesPerPage
	shown := qs[first:min(first+QueuesPerPage, len(qs))]
	all, err := p.in.StatsOf(r.Context(), shown...)
	if err != nil {
		p.redisError(w, r, "", err)
		return
	}
	data := struct {
		common
		Queues             []queueRow
		Partial            bool
		First, Last, Total int
		Prev, Next         string
	}{common: p.common(r, ""), First: first + 1, Last: first + len(shown), Total: len(qs)}
	if n > 1 {
		data.Prev = "?page=" + strconv.Itoa(n-1)
	}
	if first+QueuesPerPage < len(qs) {
		data.Next = "?page=" + strconv.Itoa(n+1)
	}
	for _, s := range all {
		data.Queues = append(data.Queues, queueRow{Stats: s, Link: "queues/" + url.PathEscape(s.Queue)})
		data.Partial = data.Partial || s.Partial
		data.Now = s.Now
	}
	p.render(w, r, http.StatusOK, indexPage, data)
}

func (p *page) queue(w http.ResponseWriter, r *http.Request) {
	ctx, name := r.Context(), r.PathValue("queue")
	st, err := p.in.Stats(ctx, name)
	if err != nil {
		p.redisError(w, r, name, err)
		return
	}
	ks, err := p.in.Keys(ctx, name, inspect.ByAge, p.laggingKeys)
	if err != nil {
		p.redisError(w, r, name, err)
		return
	}
	c, err := p.in.DeadLetters(ctx, name)
	if err != nil {
		p.redisError(w, r, name, err)
		return
	}
	dead, err := c.List(ctx, name, p.deadLetters)
	if err != nil {
		p.redisError(w, r, name, err)
		return
	}
	data := struct {
		common
		Stats                    inspect.Stats
		Keys                     []inspect.KeyStats
		Dead                     []deadletter.Letter
		ShowItems                bool
		Flash                    string
		Requeue, Purge           string
		RequeueToken, PurgeToken string
	}{
		common: p.common(r, name), Stats: st, Keys: ks, Dead: dead, ShowItems: p.showItems, Flash: flash(r.URL.Query()),
		Requeue: "./" + url.PathEscape(name) + "/requeue", Purge: "./" + url.PathEscape(name) + "/purge",
		RequeueToken: p.token("requeue", name), PurgeToken: p.token("purge", name),
	}
	data.Now = st.Now
	p.render(w, r, http.StatusOK, queuePage, data)
}

func (p *page) requeue(w http.ResponseWriter, r *http.Request) {
	name, c, ok := p.action(w, r, "requeue")
	if !ok {
		return
	}
	ctx := r.Context()
	if r.PostFormValue("all") == "1" {
		n, skipped, err := c.RequeueNewest(ctx, name, 0)
		if n > 0 {
			p.log.Info("requeued dead letters", zap.String("queue", name), zap.Int("count", n), zap.String("remote_addr", r.RemoteAddr))
		}
		if err != nil && n > 0 {
			p.log.Warn("redis error", zap.String("path", r.URL.Path), zap.Error(err))
			p.fail(w, r, http.StatusServiceUnavailable, fmt.Sprintf("Requeued %s, then: Redis error: %v", plural(n, "dead letter"), err))
			return
		}
		if err != nil {
			p.redisError(w, r, name, err)
			return
		}
		p.done(w, name, "requeued", n, skipped)
		return
	}
	id := r.PostFormValue("id")
	if id == "" {
		p.fail(w, r, http.StatusBadRequest, "Say which dead letter to requeue (id), or all=1.")
		return
	}
	letters, err := c.Get(ctx, name, id)
	if err != nil {
		p.redisError(w, r, name, err)
		return
	}
	if len(letters) == 0 {
		p.fail(w, r, http.StatusNotFound, fmt.Sprintf("Queue %s has no dead letter %s: it was requeued or purged meanwhile.", name, id))
		return
	}
	if !letters[0].Requeueable() {
		p.fail(w, r, http.StatusConflict, fmt.Sprintf("Dead letter %s of queue %s holds a corrupt value, not an item: it cannot be requeued, only purged.", id, name))
		return
	}
	n, err := c.Requeue(ctx, letters[0])
	if err != nil {
		p.redisError(w, r, name, err)
		return
	}
	if n == 0 {
		p.fail(w, r, http.StatusNotFound, fmt.Sprintf("Dead letter %s of queue %s was requeued or purged meanwhile.", id, name))
		return
	}
	p.log.Info("requeued dead letters", zap.String("queue", name), zap.Int("count", n), zap.String("id", id), zap.String("remote_addr", r.RemoteAddr))
	p.done(w, name, "requeued", n, 0)
}

func (p *page) purge(w http.ResponseWriter, r *http.Request) {
	name, c, ok := p.action(w, r, "purge")
	if !ok {
		return
	}
	if r.PostFormValue("confirm") != "1" {
		p.fail(w, r, http.StatusBadRequest, "Tick the box to confirm that every dead letter of "+name+" is to be deleted.")
		return
	}
	n, err := c.Purge(r.Context(), name)
	if err != nil {
		p.redisError(w, r, name, err)
		return
	}
	p.log.Info("purged dead letters", zap.String("queue", name), zap.Int64("count", n), zap.String("remote_addr", r.RemoteAddr))
	p.done(w, name, "purged", int(n), 0)
}

// action checks a POST's form token for the action on its queue and
// returns the queue with a client of its dead letters, or answers the request.
func (p *page) action(w http.ResponseWriter, r *http.Request, action string) (string, *deadletter.Client, bool) {
	name := r.PathValue("queue")
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		p.fail(w, r, http.StatusBadRequest, "Unreadable form: "+err.Error())
		return "", nil, false
	}
	if !hmac.Equal([]byte(r.PostForm.Get("token")), []byte(p.token(action, name))) {
		p.log.Info("refused a form without a valid token", zap.String("action", action), zap.String("queue", name),
			zap.String("remote_addr", r.RemoteAddr))
		p.fail(w, r, http.StatusForbidden, "The form's token is missing or invalid: reload the page and try again.")
		return "", nil, false
	}
	c, err := p.in.DeadLetters(r.Context(), name)
	if err != nil {
		p.redisError(w, r, name, err)
		return "", nil, false
	}
	return name, c, true
}

// token returns the form token of action on queue: the HMAC-SHA256 of both
// under the handler's secret.
func (p *page) token(action, queue string) string {
	m := hmac.New(sha256.New, p.secret)
	m.Write([]byte(action))
	m.Write([]byte{0})
	m.Write([]byte(queue))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// done redirects a POST back to its queue's page (303: the browser GETs
// it), saying what was done.
func (p *page) done(w http.ResponseWriter, queue, what string, n, skipped int) {
	v := url.Values{"done": {what}, "n": {strconv.Itoa(n)}}
	if skipped > 0 {
		v.Set("skipped", strconv.Itoa(skipped))
	}
	// A relative Location: http.Redirect would resolve it against the path
	// after StripPrefix, which is not the browser's.
	w.Header().Set("Location", "../"+url.PathEscape(queue)+"?"+v.Encode())
	w.WriteHeader(http.StatusSeeOther)
}

// flash returns the message of a done redirect's query, built from known
// words and numbers only (the query is not echoed).
func flash(q url.Values) string {
	n, err := strconv.Atoi(q.Get("n"))
	if err != nil || n < 0 {
		return ""
	}
	switch q.Get("done") {
	case "requeued":
		s := "Requeued " + plural(n, "dead letter") + "."
		if k, _ := strconv.Atoi(q.Get("skipped")); k > 0 {
			s += " Skipped " + plural(k, "dead letter") + " holding a corrupt value (purge only)."
		}
		return s
	case "purged":
		return "Purged " + plural(n, "dead letter") + "."
	}
	return ""
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return strconv.Itoa(n) + " " + what + "s"
}

// redisError answers a failed read or action on queue: 404 for a queue
// that is not registered (or cannot be), else 503 with the error.
func (p *page) redisError(w http.ResponseWriter, r *http.Request, queue string, err error) {
	if errors.Is(err, inspect.ErrNoQueue) || errors.Is(err, keys.ErrQueueName) {
		p.fail(w, r, http.StatusNotFound, fmt.Sprintf("There is no queue %q under prefix %q.", queue, p.in.Prefix()))
		return
	}
	if r.Context().Err() == nil || errors.Is(r.Context().Err(), context.DeadlineExceeded) {
		p.log.Warn("redis error", zap.String("path", r.URL.Path), zap.Error(err))
	}
	p.fail(w, r, http.StatusServiceUnavailable, "Redis error: "+err.Error())
}

// fail answers with an error page.
func (p *page) fail(w http.ResponseWriter, r *http.Request, status int, msg string) {
	data := struct {
		common
		Status, Message string
	}{p.common(r, http.StatusText(status)), strconv.Itoa(status) + " " + http.StatusText(status), msg}
	p.render(w, r, status, errorPage, data)
}

// render executes t into a buffer, so that a failure sends no half page.
func (p *page) render(w http.ResponseWriter, r *http.Request, status int, t *template.Template, data any) {
	var b bytes.Buffer
	if err := t.ExecuteTemplate(&b, "layout", data); err != nil {
		p.log.Error("render page", zap.String("path", r.URL.Path), zap.Error(err))
		http.Error(w, "statuspage: render: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Length", strconv.Itoa(b.Len()))
	w.WriteHeader(status)
	w.Write(b.Bytes())
}

// formatLag rounds a lag for people: milliseconds under a second, tenths
// of a second under a minute, seconds above.
func formatLag(d time.Duration) string {
	switch {
	case d <= 0:
		return "0s"
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}

func formatClock(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format("2006-01-02 15:04:05 UTC")
}

func formatRFC3339(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000Z07:00") }

// formatItem returns the first maxItemShown bytes of an item (cut at a
// rune boundary).
func formatItem(item json.RawMessage) string {
	if len(item) <= maxItemShown {
		return string(item)
	}
	cut := maxItemShown
	for cut > 0 && !utf8.RuneStart(item[cut]) {
		cut--
	}
	return string(item[:cut]) + "…"
}
