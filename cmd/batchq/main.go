// Command batchq inspects the batchq queues kept on a Redis server or Redis
// Cluster: how deep and how late they are, which keys lag most, what a key
// holds, and the dead letters, which it can requeue or purge. It only reads,
// except for dead requeue, dead purge and queue forget, which do nothing
// without -yes.
//
// Usage:
//
//	batchq [flags] COMMAND [args]
//
// Commands:
//
//	stats [QUEUE...]                           per queue: shards, ready keys, pending items,
//	                                           in flight (batches/items), retries, dead letters, oldest
//	keys QUEUE [-by items|bytes|age] [-n 20]   the top pending keys of a queue
//	peek QUEUE KEY                             the pending items of a key, without taking them
//	dead list QUEUE [-n 50] [-items]           dead letters, newest first; payloads only with -items
//	dead requeue QUEUE (-n N | -all) [-yes]    put dead letters back at the end of their keys
//	dead purge QUEUE [-yes]                    delete the dead letters of a queue
//	queue forget QUEUE [-yes]                  take a queue that holds nothing out of the registry
//	help [COMMAND]                             the usage, of every command or of one
//
// Flags, before or after the command:
//
//	-redis HOST:PORT   Redis, or any node of a Redis Cluster (default $REDIS_ADDR, else 127.0.0.1:6379)
//	-prefix P          key prefix of the queues (default "batchq")
//	-json              print one JSON document on stdout instead of text
//	-timeout D         bound on the whole command, connection included (default 10s)
//	-user U            Redis ACL user name
//	-password P        Redis password (default $REDIS_PASSWORD; prefer it: flags show in ps)
//	-tls               connect over TLS, trusting the system's roots
//	-tls-ca FILE       connect over TLS, trusting the CA certificates in FILE (PEM)
//
// For example:
//
//	batchq -redis 10.0.0.5:6379 stats
//	batchq keys orders -by age -n 5
//	batchq -json peek orders customer-7 | jq '.array | length'
//	batchq dead requeue orders -all -yes
//
// Text output is for people: tables, with keys and error messages that hold
// control characters quoted, long errors cut, and dead letters' payloads
// left out unless -items is given (they may be sensitive). With -json a
// command prints one document on stdout: stats the []inspect.Stats, keys the
// []inspect.KeyStats, peek the key's stats with the pending array byte for
// byte as "array", dead list {"queue", "total", "dead_letters"}, requeue and
// purge the counts done, queue forget {"queue", "forgotten"}. Errors go to
// stderr as text, with control characters escaped.
//
// dead requeue, dead purge and queue forget change nothing without -yes:
// they say what they would do and exit 1.
//
// Exit status: 0 on success; 1 on an error (Redis unreachable, no such
// queue, a destructive command without -yes, the timeout); 2 on a usage
// error (unknown command or flag, missing or invalid arguments).
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
