// Package keys builds every Redis key name batchq uses. No other package
// formats key names.
//
// All keys of one queue shard share the hash tag {<queue>:<shard>}, so every
// script and transaction on a shard touches one hash slot (Redis Cluster
// safe). docs/PROTOCOL.md says what each holds and who writes it:
//
//	<prefix>:{<queue>:<shard>}:k:<key>       pending items, a JSON array (string)
//	<prefix>:{<queue>:<shard>}:n:<key>       the items and length of k:<key>, packed in one integer (string)
//	<prefix>:{<queue>:<shard>}:c:<key>       the latest due time of k:<key> under a quiet period (string, expires)
//	<prefix>:{<queue>:<shard>}:o:<key>       ordered queues: the lease that holds key (string), while a batch of it is out
//	<prefix>:{<queue>:<shard>}:ready         ZSET key -> due time (ms): due keys, pushed on wake
//	<prefix>:{<queue>:<shard>}:later         ZSET key -> due time (ms): keys a flush policy scheduled
//	<prefix>:{<queue>:<shard>}:wake          LIST of due keys for workers to pop
//	<prefix>:{<queue>:<shard>}:leases        ZSET lease -> deadline (ms); a lease is "<token>:<worker>[:<key>]"
//	<prefix>:{<queue>:<shard>}:lease:<tok>   a leased batch (string array, or hash of retries)
//	<prefix>:{<queue>:<shard>}:leasen:<tok>  the items and length of lease:<tok>, as n:<key>
//	<prefix>:{<queue>:<shard>}:retry         ZSET retry id -> due time (ms)
//	<prefix>:{<queue>:<shard>}:retrydata     HASH retry id -> retry envelope
//	<prefix>:{<queue>:<shard>}:dead          ZSET dead letter id -> time (ms)
//	<prefix>:{<queue>:<shard>}:deaddata      HASH dead letter id -> dead letter envelope
//	<prefix>:{<queue>:<shard>}:quarantine:<id> a value found under k:<key> that was not a string
//	<prefix>:{<queue>:<shard>}:quarantined   SET of the quarantine keys
//	<prefix>:{<queue>:<shard>}:settled:<id>  marks a batch without a lease as settled (expires in a day)
//
// Beside them, the keys of the whole prefix: the registry, outside every
// hash tag, written by producers and workers and read by the inspector; and
// the live workers, in the registry's hash slot (their hash tag is the
// registry's name), so that the one script that records a worker's queues
// announces the worker too, on Redis Cluster as well:
//
//	<prefix>:queues                          HASH queue -> shards: the queues under the prefix
//	<prefix>:workers:{<prefix>:queues}       ZSET worker name -> last seen (ms)
//	<prefix>:workerdata:{<prefix>:queues}    HASH worker name -> what it announced (JSON)
//	<prefix>:grown:{<prefix>:queues}         HASH queue -> the counts it had before, ascending ("2,4")
package keys

import (
	"errors"
	"fmt"
	"hash/fnv"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// DefaultPrefix is the key prefix used when none is configured.
const DefaultPrefix = "batchq"

// Validation errors. They hold no package prefix: the public package that
// returns one adds its own (producer: invalid queue name ...).
var (
	ErrQueueName = errors.New("invalid queue name")
	ErrKeyName   = errors.New("invalid key")
	ErrPrefix    = errors.New("invalid prefix")
)

// MaxNameLen bounds queue names and keys, in bytes.
const MaxNameLen = 512

// MaxShards bounds the shards of a queue.
const MaxShards = 1024

// CheckPrefix reports whether p can be used as a key prefix.
func CheckPrefix(p string) error {
	if p == "" || len(p) > MaxNameLen || strings.ContainsAny(p, "{}") {
		return fmt.Errorf("%w %q: must be 1-%d bytes without braces", ErrPrefix, Short(p), MaxNameLen)
	}
	return nil
}

// CheckQueue reports whether q can be used as a queue name: 1-512 bytes of
// UTF-8 without braces or colons (a queue name is part of the hash tag),
// without control characters (names are printed and logged), and neither
// "." nor ".." (a queue's name is a path segment of the status page, and
// those are dot segments, which browsers and ServeMux resolve away).
func CheckQueue(q string) error {
	if q == "" || len(q) > MaxNameLen || strings.ContainsAny(q, "{}:") || q == "." || q == ".." || !printable(q) {
		return fmt.Errorf("%w %q: must be 1-%d bytes of UTF-8 without braces, colons or control characters, and not . or ..",
			ErrQueueName, Short(q), MaxNameLen)
	}
	return nil
}

// printable reports whether s is valid UTF-8 without control characters.
func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return false
		}
	}
	return true
}

// CheckKey reports whether k can be used as a key of a queue: 1-512 bytes
// of UTF-8 without control characters (NUL, newline, escape and the like:
// keys are printed and logged, and such a key could forge a line or a
// terminal escape). Any other character is fine, colons and braces
// included: a key never leaves its queue's hash tag (see For).
func CheckKey(k string) error {
	if k == "" || len(k) > MaxNameLen || !printable(k) {
		return fmt.Errorf("%w %q: must be 1-%d bytes of UTF-8 without control characters", ErrKeyName, Short(k), MaxNameLen)
	}
	return nil
}

// CheckStoredKey reports whether k can name a key that may hold items
// already: 1-512 bytes, what CheckKey asked before it refused invalid UTF-8
// and control characters. Reading a key and requeueing a dead letter to its
// key use it, so that keys stored before still work; only appends check
// CheckKey.
func CheckStoredKey(k string) error {
	if k == "" || len(k) > MaxNameLen {
		return fmt.Errorf("%w %q: must be 1-%d bytes", ErrKeyName, Short(k), MaxNameLen)
	}
	return nil
}

// shortLen is how many bytes of a name Short keeps.
const shortLen = 64

// Short returns s for an error message or a log line: whole when it is at
// most 64 bytes long, else its first 64 bytes or fewer, cut at a rune
// boundary, followed by "…(N bytes)", N being the length of s. Names may be
// up to MaxNameLen bytes long, and a name that fails a check any length.
// Quote the result (%q) where s may hold control characters.
func Short(s string) string {
	if len(s) <= shortLen {
		return s
	}
	cut := shortLen
	for cut > shortLen-utf8.UTFMax+1 && !utf8.RuneStart(s[cut]) {
		cut-- // at most to the start of a rune of valid UTF-8
	}
	return s[:cut] + "…(" + strconv.Itoa(len(s)) + " bytes)"
}

// Shard returns the shard of key in a queue split into n shards: a stable
// FNV-1a hash of the key modulo n.
func Shard(key string, n int) int {
	if n <= 1 {
		return 0
	}
	h := fnv.New32a()
	h.Write([]byte(key))
	return int(h.Sum32() % uint32(n))
}

// Registry is the hash of the queues under prefix: queue name -> shards.
// Producers and workers write it; the inspector reads it. It is the one key
// outside every queue's hash tag.
func Registry(prefix string) string { return prefix + ":queues" }

// Workers is the ZSET of the workers under prefix, scored by when each last
// announced itself (ms, the server's clock). It shares the registry's hash
// slot.
func Workers(prefix string) string { return prefix + ":workers:{" + Registry(prefix) + "}" }

// WorkerData is the hash of worker name to what the worker announced (see
// Workers).
func WorkerData(prefix string) string { return prefix + ":workerdata:{" + Registry(prefix) + "}" }

// Grown is the hash of queue name to the shard counts the queue had
// before its current one, ascending and comma-separated ("2,4"): where
// its keys' items may still be, which ordered drains look at. It shares
// the registry's hash slot.
func Grown(prefix string) string { return prefix + ":grown:{" + Registry(prefix) + "}" }

// Space names the keys of one queue shard.
type Space struct {
	base string // "<prefix>:{<queue>:<shard>}:"
}

// For returns the key space of a queue shard.
func For(prefix, queue string, shard int) Space {
	return Space{base: prefix + ":{" + queue + ":" + strconv.Itoa(shard) + "}:"}
}

// Items is the key holding the pending JSON array of key.
func (s Space) Items(key string) string { return s.base + "k:" + key }

// Count is the key holding how many items Items(key) holds, and its length
// (see protocol.PackCount).
func (s Space) Count(key string) string { return s.base + "n:" + key }

// Cap is the key holding the latest time key may be due at when its queue
// has a flush policy with a quiet period.
func (s Space) Cap(key string) string { return s.base + "c:" + key }

// Hold is the key that marks key of an ordered queue as held: one batch of
// it is leased, or its first failed item waits for a retry, and no other
// batch of it may be drained until that one is settled.
func (s Space) Hold(key string) string { return s.base + "o:" + key }

// Ready is the ZSET of due keys, scored by the time they fell due: each is
// on the wake list, or popped by a worker about to drain it.
func (s Space) Ready() string { return s.base + "ready" }

// Later is the ZSET of keys with pending items that a flush policy
// scheduled, scored by the time they fall due.
func (s Space) Later() string { return s.base + "later" }

// Wake is the list of due keys that workers pop, blocking when idle.
func (s Space) Wake() string { return s.base + "wake" }

// Leases is the ZSET of leases scored by deadline.
func (s Space) Leases() string { return s.base + "leases" }

// Lease is the key holding the leased batch of token.
func (s Space) Lease(token string) string { return s.base + "lease:" + token }

// LeaseCount is the key holding how many items the lease of token holds.
func (s Space) LeaseCount(token string) string { return s.base + "leasen:" + token }

// Retry is the ZSET of retry ids scored by due time.
func (s Space) Retry() string { return s.base + "retry" }

// RetryData is the hash of retry id to retry envelope.
func (s Space) RetryData() string { return s.base + "retrydata" }

// Dead is the ZSET of dead letter ids scored by the time they died.
func (s Space) Dead() string { return s.base + "dead" }

// DeadData is the hash of dead letter id to dead letter envelope.
func (s Space) DeadData() string { return s.base + "deaddata" }

// Quarantine is where a non-string value found under an items key is kept.
func (s Space) Quarantine(id string) string { return s.base + "quarantine:" + id }

// Quarantined is the set of the shard's quarantine keys.
func (s Space) Quarantined() string { return s.base + "quarantined" }

// Settled marks the batch id, drained without a lease, as settled, so that a
// settlement sent twice is applied once.
func (s Space) Settled(id string) string { return s.base + "settled:" + id }

// Tag returns the hash tag of the space's keys ("<queue>:<shard>"): the
// part Redis Cluster hashes to place them.
func (s Space) Tag() string {
	open := strings.IndexByte(s.base, '{')
	return s.base[open+1 : strings.IndexByte(s.base[open:], '}')+open]
}

// Slot returns the Redis Cluster hash slot of a hash tag: CRC16 (XMODEM)
// modulo 16384, as CLUSTER KEYSLOT computes it for a key whose tag it is.
func Slot(tag string) int {
	var crc uint16
	for i := 0; i < len(tag); i++ {
		crc ^= uint16(tag[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return int(crc) & (1<<14 - 1)
}
