// Command batchq inspects the batchq queues kept on a Redis server, a Redis
// Cluster or the master of a Sentinel setup: how deep and how late they are, which keys lag most, what a key
// holds, the retries waiting for their next attempt, the dead letters, which
// it can requeue or purge, and the live workers; it creates a queue with a
// shard count, and raises a queue's shards online. It only reads, except
// for dead requeue, dead purge, queue create, queue shards and queue
// forget, which do nothing without -yes.
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
//	retries list QUEUE [-n 50] [-items]        retries, soonest due first; payloads only with -items
//	dead list QUEUE [-n 50] [-items]           dead letters with their ids, newest first; payloads only with -items
//	dead requeue QUEUE (-n N | -all | -id ID...) [-yes]
//	                                           put dead letters back at the end of their keys: the newest N,
//	                                           all, or those named (-id, repeated; oldest first)
//	dead purge QUEUE [-yes]                    delete the dead letters of a queue
//	queue create QUEUE SHARDS [-yes]           record a new queue with SHARDS shards (before any producer or worker does)
//	queue shards QUEUE SHARDS [-yes]           raise the shards of a queue, online; counts only grow
//	queue forget QUEUE [-yes]                  take a queue that holds nothing out of the registry
//	workers [QUEUE...]                         the live workers (of the named queues): name, host, pid,
//	                                           queues, concurrency, started, last seen
//	help [COMMAND [SUBCOMMAND]]                the usage of every command, or one's usage, flags and examples
//
// Flags, before or after the command:
//
//	-redis ADDRESS     Redis (default $REDIS_ADDR, else 127.0.0.1:6379), one of:
//	                     HOST:PORT                                   a server, or any node of a Redis Cluster
//	                     redis://[USER:PASSWORD@]HOST:PORT[/DB]      a URL (rediss:// for TLS)
//	                     sentinel://MASTER@HOST:PORT[,HOST:PORT...]  the master named MASTER, found through these Sentinels
//	-prefix P          key prefix of the queues (default "batchq")
//	-json              print one JSON document on stdout instead of text
//	-timeout D         bound on the whole command, connection included (default 10s)
//	-user U            Redis ACL user name
//	-password P        Redis password (default $REDIS_PASSWORD; prefer it: flags show in ps)
//	-tls               connect over TLS, trusting the system's roots
//	-tls-ca FILE       connect over TLS, trusting the CA certificates in FILE (PEM)
//
// Credentials come from a URL, or from -user and -password, or the
// password from $REDIS_PASSWORD (one in the URL wins over it; the same
// credential in the URL and in its flag is a usage error). They are the
// Redis servers', master and replicas: the Sentinels of a sentinel://
// address are asked without a password, or with $REDIS_SENTINEL_PASSWORD
// when their sentinel.conf has a requirepass. -tls and -tls-ca apply to the
// Sentinels as well.
//
// For example:
//
//	batchq -redis 10.0.0.5:6379 stats
//	batchq -redis sentinel://mymaster@10.0.0.7:26379,10.0.0.8:26379,10.0.0.9:26379 stats
//	batchq keys orders -by age -n 5
//	batchq -json peek orders customer-7 | jq '.array | length'
//	batchq retries list orders -n 10
//	batchq dead requeue orders -all -yes
//	batchq dead requeue orders -id 2bvyrspclspei1i7a7fbc1mrf4-0000000 -yes
//	batchq queue shards orders 64 -yes
//	batchq workers orders
//	batchq help dead requeue
//
// Text output is for people: tables, with keys, names and error messages
// that hold control characters quoted, long errors and names cut, and the
// payloads of retries and dead letters left out unless -items is given
// (they may be sensitive). With -json a command prints one document on
// stdout: stats the []inspect.Stats, keys the []inspect.KeyStats, peek the
// key's stats with the pending array byte for byte as "array", retries list
// {"queue", "total", "now", "retries"} (each an inspect.Retry, "item" only
// with -items), dead list {"queue", "total", "dead_letters"}, requeue and
// purge the counts done (requeue -id the ids too), queue create {"queue",
// "shards", "created"}, queue shards {"queue", "shards", "was"}, queue forget {"queue",
// "forgotten"}, workers the inspect.LiveWorkers {"workers", "now"}. Errors
// go to stderr as text, with control characters escaped.
//
// A worker announces itself in Redis when it starts and every 30 seconds,
// and retires when its Run returns; workers lists those seen within the
// last 90 seconds (inspect.WorkerExpiry), so a worker that crashed drops
// off within that time.
//
// dead requeue, dead purge and the queue commands change nothing without -yes:
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
