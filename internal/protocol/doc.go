// Package protocol is batchq's lease protocol, whole and in one place: the
// Redis layout of a queue shard (with internal/keys), every script and
// transaction that reads or writes it, and the Consumer that runs the
// worker's side of it: claims, drains, settles, extends and reaps. Each
// script's reply becomes a typed error here and nowhere else.
//
// docs/PROTOCOL.md describes every key and every step, who runs it, why it
// is atomic, and what a crash between any two steps leaves behind. The
// scripts under lua/ each open with their KEYS, ARGV and reply.
//
// Nothing here is public: users reach the protocol through producer,
// batchq.Worker, deadletter and inspect, so that it can change without
// breaking them. Its errors hold no package prefix ("shards must be 1-1024,
// got 0"): the public package that returns one adds its own.
package protocol
