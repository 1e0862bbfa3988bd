// Package redisaddr parses the -redis value of the batchq command and of
// the examples into the rueidis options that reach what it names, so that
// every program takes the same forms with the same rules:
//
//	HOST:PORT                                   one Redis server, or any node of a Redis Cluster
//	redis://[USER:PASSWORD@]HOST:PORT[/DB]      a URL, as rueidis.ParseURL reads it (?addr=, ?master_set=...)
//	rediss://...                                the same over TLS, trusting the system's roots
//	sentinel://MASTER@HOST:PORT[,HOST:PORT...]  the master named MASTER, found through these Sentinels
//
// A Sentinel setup is given by its Sentinels' addresses and the name they
// monitor the master under (the name of "sentinel monitor" in
// sentinel.conf). The client asks the Sentinels for the master, sends every
// command to it, and moves to the new master when they fail it over: on
// their +switch-master event, and by asking them again every
// SentinelRefresh in case it missed one.
//
// Credentials: those of a URL apply to the Redis servers (the master and
// its replicas), never to the Sentinels, as in rueidis.ParseURL; the
// sentinel:// form holds none, and a program sets Option.Username and
// Option.Password itself (the batchq command from -user, -password and
// $REDIS_PASSWORD). Sentinels that have a password of their own
// (requirepass in sentinel.conf) take it in Option.Sentinel.Password. TLS,
// once set with SetTLS, applies to the Sentinels and the servers alike, as
// a rediss:// URL with ?master_set= does.
//
// No password reaches Addr.Display or an error of Parse.
package redisaddr

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"
)

// SentinelRefresh is how often a client of a Sentinel setup asks the
// Sentinels which server is the master, besides following their
// +switch-master events (rueidis' SentinelOption.TopologyRefreshInterval):
// a missed event would otherwise leave it on a demoted master for good.
const SentinelRefresh = 5 * time.Second

// sentinelScheme starts the Sentinel form,
// sentinel://MASTER@HOST:PORT[,HOST:PORT...].
const sentinelScheme = "sentinel://"

// forms lists the forms Parse takes, for its error messages.
const forms = "HOST:PORT, redis://[USER:PASSWORD@]HOST:PORT, rediss://... or sentinel://MASTER@HOST:PORT[,HOST:PORT...]"

// Addr is a parsed -redis value.
type Addr struct {
	// Option connects rueidis.NewClient to what the value names, with
	// DisableCache set (client-side caching has no use in a queue). For a
	// Sentinel setup, Option.InitAddress holds the Sentinels and
	// Option.Sentinel.MasterSet the master's name.
	Option rueidis.ClientOption
	// Display is the value as it may be logged or shown: any password
	// replaced by "xxxxx".
	Display string
}

// Sentinel reports whether a reaches its master through Sentinels.
func (a Addr) Sentinel() bool { return a.Option.Sentinel.MasterSet != "" }

// String returns a.Display.
func (a Addr) String() string { return a.Display }

// SetTLS makes the client connect over TLS with tc: to the servers, and to
// the Sentinels of a Sentinel setup. Each connection of a Sentinel setup
// checks the certificate against the host it dials (tc's ServerName is
// cleared in the clones it gets). A nil tc turns TLS off.
func (a *Addr) SetTLS(tc *tls.Config) {
	a.Option.TLSConfig = tc
	a.Option.Sentinel.TLSConfig = nil
	if tc == nil {
		return
	}
	if a.Sentinel() {
		// The Sentinels and the servers are different hosts: each
		// connection checks the certificate against the address it dials.
		tc = tc.Clone()
		tc.ServerName = ""
		a.Option.TLSConfig = tc
		a.Option.Sentinel.TLSConfig = tc.Clone()
	}
}

// Parse parses s, in one of the forms of the package doc. Its errors name
// the value without its password and say what was wrong: a missing port, a
// port out of range, a sentinel:// value without a master name or
// addresses.
func Parse(s string) (Addr, error) {
	s = strings.TrimSpace(s)
	display := Redact(s)
	fail := func(format string, args ...any) (Addr, error) {
		return Addr{}, fmt.Errorf("invalid Redis address %q: %s", display, fmt.Sprintf(format, args...))
	}
	switch {
	case s == "":
		return fail("empty; want %s", forms)
	case hasScheme(s, sentinelScheme):
		opt, err := parseSentinel(s[len(sentinelScheme):])
		if err != nil {
			return fail("%v; want %sMASTER@HOST:PORT[,HOST:PORT...]", err, sentinelScheme)
		}
		return Addr{Option: opt, Display: display}, nil
	case strings.Contains(s, "://"):
		opt, err := parseURL(s)
		if err != nil {
			return fail("%v", err)
		}
		a := Addr{Option: opt, Display: display}
		if a.Option.TLSConfig != nil {
			a.SetTLS(a.Option.TLSConfig)
		}
		return a, nil
	}
	if strings.Contains(s, "@") {
		return fail("a value with a user name or password is a URL: redis://USER:PASSWORD@HOST:PORT")
	}
	if err := checkHostPort(s); err != nil {
		if strings.Contains(s, ",") {
			return fail("%v; several addresses are a Sentinel setup's, as %sMASTER@HOST:PORT,HOST:PORT", err, sentinelScheme)
		}
		return fail("%v; want %s", err, forms)
	}
	return Addr{Option: rueidis.ClientOption{InitAddress: []string{s}, DisableCache: true}, Display: display}, nil
}

// hasScheme reports whether s starts with scheme, in any case.
func hasScheme(s, scheme string) bool {
	return len(s) >= len(scheme) && strings.EqualFold(s[:len(scheme)], scheme)
}

// parseSentinel parses what follows sentinel://: MASTER@HOST:PORT[,...].
func parseSentinel(rest string) (rueidis.ClientOption, error) {
	at := strings.LastIndex(rest, "@")
	if at < 0 {
		return rueidis.ClientOption{}, errors.New("no master name")
	}
	name, list := rest[:at], rest[at+1:]
	switch {
	case name == "":
		return rueidis.ClientOption{}, errors.New("no master name before @")
	case strings.Contains(name, ":"):
		// Most likely USER:PASSWORD@: never repeat it.
		return rueidis.ClientOption{}, errors.New("the master name holds a colon (credentials do not go in a sentinel:// address)")
	case strings.ContainsAny(name, " \t/?#,"):
		return rueidis.ClientOption{}, fmt.Errorf("invalid master name %q", name)
	}
	var addrs []string
	for a := range strings.SplitSeq(list, ",") {
		a = strings.TrimSpace(a)
		if a == "" {
			continue
		}
		if err := checkHostPort(a); err != nil {
			return rueidis.ClientOption{}, fmt.Errorf("Sentinel address %q: %v", a, err)
		}
		addrs = append(addrs, a)
	}
	if len(addrs) == 0 {
		return rueidis.ClientOption{}, errors.New("no Sentinel address after @")
	}
	return rueidis.ClientOption{
		InitAddress:  addrs,
		DisableCache: true,
		Sentinel:     rueidis.SentinelOption{MasterSet: name, TopologyRefreshInterval: SentinelRefresh},
	}, nil
}

// parseURL parses a redis:// or rediss:// URL with rueidis.ParseURL, and
// checks what it leaves unchecked: the scheme, the ports, that there is a
// host. The errors of a URL that holds a password quote nothing of it: a
// password holding an unescaped "/" would show in a path that does not
// parse.
func parseURL(s string) (rueidis.ClientOption, error) {
	opt, err := parseURLDetailed(s)
	if err != nil && Redact(s) != s {
		err = fmt.Errorf("%w (details left out, as they may quote the password; check the port, path and query, and percent-encode any / ? # @ %% in the password)", errBadURL)
	}
	return opt, err
}

// errBadURL is a URL that does not parse.
var errBadURL = errors.New("not a valid URL")

func parseURLDetailed(s string) (rueidis.ClientOption, error) {
	u, err := url.Parse(s)
	if err != nil {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err // its text repeats the URL
		}
		return rueidis.ClientOption{}, fmt.Errorf("%w: %v", errBadURL, err)
	}
	switch strings.ToLower(u.Scheme) {
	case "redis", "rediss":
	default:
		return rueidis.ClientOption{}, fmt.Errorf("unknown scheme %q", u.Scheme)
	}
	if u.Host == "" {
		return rueidis.ClientOption{}, errors.New("no HOST:PORT")
	}
	for _, a := range append([]string{u.Host}, u.Query()["addr"]...) {
		if _, port, err := net.SplitHostPort(a); err == nil {
			if err := checkPort(port); err != nil {
				return rueidis.ClientOption{}, fmt.Errorf("address %q: %v", a, err)
			}
		}
	}
	u.Scheme = strings.ToLower(u.Scheme)
	opt, err := rueidis.ParseURL(u.String())
	if err != nil {
		return rueidis.ClientOption{}, errors.New(strings.TrimPrefix(err.Error(), "redis: "))
	}
	opt.DisableCache = true
	if opt.Sentinel.MasterSet != "" {
		opt.Sentinel.TopologyRefreshInterval = SentinelRefresh
	}
	return opt, nil
}

// checkHostPort checks that s is HOST:PORT with a port from 1 to 65535.
func checkHostPort(s string) error {
	_, port, err := net.SplitHostPort(s)
	if err != nil {
		var aerr *net.AddrError
		if errors.As(err, &aerr) {
			return errors.New(aerr.Err) // its text repeats the address
		}
		return err
	}
	return checkPort(port)
}

// checkPort checks that port is a number from 1 to 65535.
func checkPort(port string) error {
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("bad port %q: want a number from 1 to 65535", port)
	}
	return nil
}

// Redact returns s with the password of a URL's user information replaced
// by "xxxxx", as url.URL.Redacted does: everything from the first colon
// after "://" (or from the start, without a scheme) to the last "@". It
// errs on the side of hiding: a password holding an unescaped "/", "?" or
// "#", which no URL parser reads as a password, is hidden too, and so is
// the rest of a URL whose query holds both a colon and an "@". Other values
// come back as they are.
func Redact(s string) string {
	at := strings.LastIndex(s, "@")
	if at < 0 {
		return s
	}
	start := 0
	if i := strings.Index(s, "://"); i > 0 && !strings.ContainsAny(s[:i], ":@/?#") {
		start = i + 3 // after a scheme
	}
	user, _, ok := strings.Cut(s[start:at], ":")
	if !ok {
		return s
	}
	return s[:start] + user + ":xxxxx" + s[at:]
}
