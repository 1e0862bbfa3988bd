package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/redisaddr"
)

// Defaults of the global flags.
const (
	defaultAddr    = "127.0.0.1:6379"
	defaultTimeout = 10 * time.Second
)

// config is what the global flags set.
type config struct {
	redis    string
	addr     redisaddr.Addr // redis parsed, with the credentials (set by resolve)
	prefix   string
	user     string
	password string
	tls      bool
	tlsCA    string
	json     bool
	timeout  time.Duration
}

// bind defines the global flags on fs, each defaulting to its value in c,
// so that a command's flag set can take them too without undoing what was
// set before the command.
func (c *config) bind(fs *flag.FlagSet) {
	fs.StringVar(&c.redis, "redis", c.redis, "`ADDRESS` of Redis: HOST:PORT of a server or of any node of a Redis Cluster, a redis:// or rediss:// URL, or sentinel://MASTER@HOST:PORT,HOST:PORT... for a Sentinel setup (default $REDIS_ADDR, else "+defaultAddr+")")
	fs.StringVar(&c.prefix, "prefix", c.prefix, "key `prefix` of the queues")
	fs.BoolVar(&c.json, "json", c.json, "print one JSON document on stdout instead of text")
	fs.DurationVar(&c.timeout, "timeout", c.timeout, "bound on the whole command, connection included")
	fs.StringVar(&c.user, "user", c.user, "Redis ACL user `name`")
	fs.StringVar(&c.password, "password", c.password, "Redis `password`, of the servers and not of Sentinels (default $REDIS_PASSWORD; prefer it: flags show in ps; Sentinels' own: $REDIS_SENTINEL_PASSWORD)")
	fs.BoolVar(&c.tls, "tls", c.tls, "connect over TLS, trusting the system's roots (to Sentinels too)")
	fs.StringVar(&c.tlsCA, "tls-ca", c.tlsCA, "connect over TLS, trusting the CA certificates in `FILE` (PEM; to Sentinels too)")
}

// options are the flags of the commands; each command defines its own.
type options struct {
	by    string
	n     int
	all   bool
	yes   bool
	items bool
	ids   []string
}

// invocation is a parsed command line.
type invocation struct {
	cfg  config
	opts options
	cmd  *command
	args []string
}

// usageError is a mistake in the command line; cmd is the command it
// concerns, if known. Every error of parse is a usage error (exit status
// 2), a helpRequest or errNoCommand.
type usageError struct {
	msg   string
	cmd   *command
	group string // the command that takes a subcommand it concerns, if cmd is nil
}

func (e *usageError) Error() string { return e.msg }

// helpRequest asks for the usage of one command, of a command that takes
// a subcommand (group), or of every command (neither).
type helpRequest struct {
	cmd   *command
	group string
}

func (helpRequest) Error() string { return "help requested" }

// errNoCommand is a command line without a command.
var errNoCommand = errors.New("no command given")

// run runs the command line args (without the program name), writing
// results to stdout and errors to stderr, and returns the exit status: 0
// on success, 1 on an error, 2 on a usage error.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	inv, err := parse(args, os.Getenv)
	if err != nil {
		var help helpRequest
		if errors.As(err, &help) {
			switch {
			case help.cmd != nil:
				printCommandUsage(stdout, help.cmd)
			case help.group != "":
				printGroupUsage(stdout, help.group)
			default:
				printUsage(stdout)
			}
			return 0
		}
		if errors.Is(err, errNoCommand) {
			printUsage(stderr)
			return 2
		}
		fmt.Fprintf(stderr, "batchq: %s\n", message(err))
		var uerr *usageError
		switch {
		case errors.As(err, &uerr) && uerr.cmd != nil:
			fmt.Fprintf(stderr, "usage: batchq [flags] %s %s\nRun 'batchq help %s' for details.\n", uerr.cmd.name, uerr.cmd.synopsis, uerr.cmd.name)
		case errors.As(err, &uerr) && uerr.group != "":
			fmt.Fprintf(stderr, "usage: batchq [flags] %s SUBCOMMAND [args]\nRun 'batchq help %s' for its subcommands.\n", uerr.group, uerr.group)
		default:
			fmt.Fprintln(stderr, "Run 'batchq help' for usage.")
		}
		return 2
	}

	ctx, cancel := context.WithTimeout(ctx, inv.cfg.timeout)
	defer cancel()
	if err := execute(ctx, inv, stdout); err != nil {
		msg := message(err)
		if errors.Is(err, context.DeadlineExceeded) {
			msg += fmt.Sprintf(" (-timeout %v)", inv.cfg.timeout)
		}
		fmt.Fprintf(stderr, "batchq: %s\n", msg)
		return 1
	}
	return 0
}

// message is the text of err with control characters escaped (see
// escapeControls).
func message(err error) string {
	return escapeControls(err.Error())
}

// execute connects to Redis and runs the command.
func execute(ctx context.Context, inv *invocation, stdout io.Writer) error {
	rdb, err := connect(ctx, inv.cfg)
	if err != nil {
		return err
	}
	defer rdb.Close()
	in, err := inspect.New(rdb, inspect.WithPrefix(inv.cfg.prefix))
	if err != nil {
		return err // checked by parse already
	}
	s := &session{cfg: inv.cfg, opts: inv.opts, in: in, out: stdout}
	err = inv.cmd.run(ctx, s, inv.args)
	if inv.cmd.queue && errors.Is(err, inspect.ErrNoQueue) {
		return s.noQueue(ctx, inv.args[0])
	}
	return err
}

// parse parses a command line: global flags, the command, its arguments
// and flags (in any order; "--" ends the flags), and checks them all, so
// that a usage error costs no connection. getenv reads the environment.
func parse(args []string, getenv func(string) string) (*invocation, error) {
	inv := &invocation{cfg: config{prefix: keys.DefaultPrefix, timeout: defaultTimeout}}
	fs := flag.NewFlagSet("batchq", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	inv.cfg.bind(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, helpRequest{}
		}
		return nil, &usageError{msg: err.Error()}
	}
	rest := fs.Args()
	if len(rest) == 0 {
		return nil, errNoCommand
	}
	name, rest := rest[0], rest[1:]
	if name == "help" {
		return nil, helpFor(strings.Join(rest, " "))
	}
	if _, ok := groups[name]; ok {
		switch {
		case len(rest) > 0 && isHelpFlag(rest[0]):
			return nil, helpRequest{group: name}
		case len(rest) == 0 || strings.HasPrefix(rest[0], "-"):
			return nil, &usageError{msg: name + " needs a subcommand: " + subcommandList(name), group: name}
		}
		if lookup(name+" "+rest[0]) == nil {
			return nil, &usageError{msg: fmt.Sprintf("unknown command %q", name+" "+rest[0]), group: name}
		}
		name, rest = name+" "+rest[0], rest[1:]
	}
	c := lookup(name)
	if c == nil {
		return nil, &usageError{msg: fmt.Sprintf("unknown command %q", name)}
	}
	inv.cmd = c

	cfs := flag.NewFlagSet(name, flag.ContinueOnError)
	cfs.SetOutput(io.Discard)
	inv.cfg.bind(cfs)
	if c.flags != nil {
		c.flags(cfs, &inv.opts)
	}
	var err error
	if inv.args, err = parseInterleaved(cfs, rest); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, helpRequest{cmd: c}
		}
		return nil, &usageError{msg: name + ": " + err.Error(), cmd: c}
	}
	if err := c.checkArgs(inv.args); err != nil {
		return nil, &usageError{msg: name + ": " + message(err), cmd: c}
	}
	if c.check != nil {
		if err := c.check(&inv.opts); err != nil {
			return nil, &usageError{msg: name + ": " + message(err), cmd: c}
		}
	}
	if err := inv.cfg.resolve(getenv); err != nil {
		return nil, &usageError{msg: err.Error()}
	}
	return inv, nil
}

// helpFor returns the help request for 'batchq help name': name may be a
// command, a command that takes a subcommand, "help", or nothing (every
// command).
func helpFor(name string) error {
	if _, ok := groups[name]; ok {
		return helpRequest{group: name}
	}
	if c := lookup(name); c != nil {
		return helpRequest{cmd: c}
	}
	if name == "" || name == "help" {
		return helpRequest{}
	}
	return &usageError{msg: fmt.Sprintf("help: unknown command %q", name)}
}

// isHelpFlag reports whether arg asks for help, as the flag package takes it.
func isHelpFlag(arg string) bool {
	switch arg {
	case "-h", "-help", "--h", "--help":
		return true
	}
	return false
}

// parseInterleaved parses flags and positional arguments in any order, as
// in "keys orders -n 5", and returns the positional ones. After "--" every
// argument is positional.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if i := len(args) - len(rest); i > 0 && args[i-1] == "--" {
			return append(pos, rest...), nil
		}
		pos, args = append(pos, rest[0]), rest[1:]
	}
}

// resolve fills in the defaults from the environment and checks the
// global flags.
func (c *config) resolve(getenv func(string) string) error {
	if c.redis == "" {
		c.redis = getenv("REDIS_ADDR")
	}
	if c.redis == "" {
		c.redis = defaultAddr
	}
	a, err := redisaddr.Parse(c.redis)
	if err != nil {
		return fmt.Errorf("-redis: %w", err)
	}
	// Each credential comes from the URL or from its flag, never both; a
	// password from neither comes from $REDIS_PASSWORD.
	switch o := &a.Option; {
	case o.Username != "" && c.user != "":
		return errors.New("-redis holds a user name: give it there or with -user, not both")
	case o.Password != "" && c.password != "":
		return errors.New("-redis holds a password: give it there or with -password, not both")
	default:
		if c.user != "" {
			o.Username = c.user
		}
		if o.Password == "" {
			if c.password == "" {
				c.password = getenv("REDIS_PASSWORD")
			}
			o.Password = c.password
		}
	}
	if a.Sentinel() {
		a.Option.Sentinel.Password = getenv("REDIS_SENTINEL_PASSWORD")
	}
	c.addr = a
	if err := keys.CheckPrefix(c.prefix); err != nil {
		return err
	}
	if c.timeout <= 0 {
		return fmt.Errorf("-timeout must be positive, got %v", c.timeout)
	}
	return nil
}

// connect returns a client of the Redis that cfg.addr names (a single
// server or a node of a cluster, rueidis tells which; or the master of a
// Sentinel setup) that has answered a PING. Dialing and every command are
// bounded by ctx's deadline.
func connect(ctx context.Context, cfg config) (rueidis.Client, error) {
	a := cfg.addr
	if d, ok := ctx.Deadline(); ok {
		// NewClient takes no context: bound its dial and handshake by
		// what is left of ours.
		left := max(time.Until(d), time.Millisecond)
		a.Option.Dialer.Timeout = left
		a.Option.Sentinel.Dialer.Timeout = left
		a.Option.ConnWriteTimeout = left
	}
	if cfg.tls || cfg.tlsCA != "" {
		tc, err := tlsConfig(cfg.tlsCA)
		if err != nil {
			return nil, err
		}
		a.SetTLS(tc)
	}
	c, err := rueidis.NewClient(a.Option)
	if err != nil {
		return nil, unreachable(a, err)
	}
	if err := c.Do(ctx, c.B().Ping().Build()).Error(); err != nil {
		c.Close()
		return nil, unreachable(a, err)
	}
	return c, nil
}

// unreachable explains a failure to connect to the Redis that a names.
func unreachable(a redisaddr.Addr, err error) error {
	addr := a.Display
	if _, ok := rueidis.IsRedisErr(err); ok {
		msg := err.Error()
		if strings.HasPrefix(msg, "NOAUTH") || strings.HasPrefix(msg, "WRONGPASS") {
			hint := "set $REDIS_PASSWORD or -password, and -user for an ACL user"
			if a.Sentinel() {
				hint += "; the Sentinels' own password: $REDIS_SENTINEL_PASSWORD"
			}
			return fmt.Errorf("Redis at %s refused the connection: %w (%s)", addr, err, hint)
		}
		if a.Sentinel() && strings.Contains(msg, "No such master") {
			return fmt.Errorf("Redis at %s refused the connection: %w (the Sentinels monitor no master named %q: see 'sentinel monitor' in their sentinel.conf)",
				addr, err, a.Option.Sentinel.MasterSet)
		}
		return fmt.Errorf("Redis at %s refused the connection: %w", addr, err)
	}
	if strings.Contains(err.Error(), "unknown message type") {
		// rueidis read a reply that is not RESP: an HTTP server, a proxy...
		return fmt.Errorf("cannot reach Redis at %s: %w (is it a Redis server, and does it want -tls?)", addr, err)
	}
	return fmt.Errorf("cannot reach Redis at %s: %w", addr, err)
}

// tlsConfig returns the TLS configuration of a client that trusts the CA
// certificates in caFile, or the system's roots when caFile is empty.
func tlsConfig(caFile string) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile == "" {
		return tc, nil
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("-tls-ca: %w", err)
	}
	tc.RootCAs = x509.NewCertPool()
	if !tc.RootCAs.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("-tls-ca: no PEM certificate in %s", caFile)
	}
	return tc, nil
}
