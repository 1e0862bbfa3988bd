package protocol

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"
)

// The errors the scripts' replies stand for. This file is where script
// replies become Go errors, and the only one.
var (
	// ErrNotArray reports that a key's items hold a value that is not the
	// JSON array batchq wrote (another program wrote or replaced it).
	ErrNotArray = errors.New("the key holds a value that is not a JSON array batchq wrote")
	// ErrLeaseLost reports a settlement refused because the lease had
	// expired and been reaped: the batch's items are being redelivered.
	ErrLeaseLost = errors.New("lease expired before the batch was settled")
	// ErrGone reports a value to quarantine that is no longer there.
	ErrGone = errors.New("the value to quarantine is gone")
)

// ErrOutOfMemory reports a write Redis refused with its OOM reply: its
// used memory is past maxmemory, and its maxmemory-policy is noeviction (or
// finds no key it may evict). Redis refuses a script only before its first
// write, and a transaction whole, so a refused call changed nothing. Writes
// fail until memory is freed or maxmemory raised.
var ErrOutOfMemory = errors.New("Redis is out of memory (used memory is past maxmemory, and maxmemory-policy is noeviction or finds nothing to evict): it refused the write, and stored nothing")

// oomText is in Redis' refusal of a write past maxmemory, raised by a
// command or a script (Redis 6 puts it behind the script's name and line).
const oomText = "OOM command not allowed"

// memoryError returns ErrOutOfMemory for Redis' OOM error reply, raised by
// a command or by a script's first write, and err otherwise.
func memoryError(err error) error {
	if re, ok := rueidis.IsRedisErr(err); ok && strings.Contains(re.Error(), oomText) {
		return ErrOutOfMemory
	}
	return err
}

// execError returns the error of a transaction whose EXEC failed, given its
// replies from MULTI to EXEC. An EXECABORT says only that Redis refused to
// queue a command: the first refused command's error is the cause (an OOM
// reply, mostly: past maxmemory, Redis refuses every command queued in a
// MULTI), as memoryError maps it.
func execError(tx []rueidis.RedisResult) error {
	err := tx[len(tx)-1].Error()
	if re, ok := rueidis.IsRedisErr(err); ok && strings.HasPrefix(re.Error(), "EXECABORT") {
		for _, r := range tx[1 : len(tx)-1] {
			if cause := r.Error(); cause != nil {
				return memoryError(cause)
			}
		}
	}
	return memoryError(err)
}

// ErrNoQueue reports a queue the registry does not hold (shards.lua's
// NOQUEUE).
var ErrNoQueue = errors.New("no such queue")

// ErrBadCount reports a registry value that is not a shard count (another
// program wrote it). Registering the queue replaces it.
var ErrBadCount = errors.New("the registry holds no shard count")

// ShrinkError reports a shard count refused because it is below the
// recorded one (shards.lua's SHRINK).
type ShrinkError struct {
	Recorded int // the queue's shard count
	Asked    int
}

func (e *ShrinkError) Error() string {
	return fmt.Sprintf("a queue's shards cannot shrink: it has %d, and %d would strand the items in the others", e.Recorded, e.Asked)
}

// shardsError turns shards.lua's NOQUEUE and SHRINK error replies, to a
// call that asked for n shards, into ErrNoQueue and *ShrinkError; other
// errors pass as they are.
func shardsError(err error, n int) error {
	re, ok := rueidis.IsRedisErr(err)
	if !ok {
		return err
	}
	if re.Error() == "NOQUEUE" {
		return ErrNoQueue
	}
	if rest, ok := strings.CutPrefix(re.Error(), "SHRINK "); ok {
		if cur, err := strconv.Atoi(rest); err == nil {
			return &ShrinkError{Recorded: cur, Asked: n}
		}
	}
	return err
}

// FullError reports an append refused because it would take the key past
// one of its caps.
type FullError struct {
	Items int64 // items the key holds
	Bytes int64 // bytes the key holds
}

func (e *FullError) Error() string {
	return fmt.Sprintf("the key is full (it holds %d items, %d bytes)", e.Items, e.Bytes)
}

// AckError reports a write that its master applied but fewer replicas than
// asked acknowledged within the timeout: it is lost if the master fails
// before they catch up, and kept otherwise.
type AckError struct {
	Want, Got int // replicas asked for, and those that acknowledged (-1: WAIT failed, see Err)
	Timeout   time.Duration
	Err       error // WAIT's own error, when it failed
}

func (e *AckError) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("applied by the master, but waiting for %d replica acknowledgements failed: %v", e.Want, e.Err)
	}
	return fmt.Sprintf("applied by the master, but %d of %d replicas acknowledged it within %v", e.Got, e.Want, e.Timeout)
}

func (e *AckError) Unwrap() error { return e.Err }

// appendError turns the scripts' NOTARRAY, FULL and OOM error replies into
// ErrNotArray, *FullError and ErrOutOfMemory; other errors pass as they are.
func appendError(err error) error {
	re, ok := rueidis.IsRedisErr(err)
	if !ok {
		return err
	}
	if e := scriptError(re.Error()); e != nil {
		return e
	}
	return err
}

// scriptError parses a NOTARRAY, FULL or OOM error text of the merge
// scripts; it returns nil for any other text.
func scriptError(msg string) error {
	if strings.Contains(msg, oomText) {
		return ErrOutOfMemory
	}
	if rest, ok := strings.CutPrefix(msg, "NOTARRAY "); ok {
		return fmt.Errorf("%w (%s)", ErrNotArray, rest)
	}
	if rest, ok := strings.CutPrefix(msg, "FULL "); ok {
		var fe FullError
		if _, err := fmt.Sscan(rest, &fe.Items, &fe.Bytes); err == nil {
			return &fe
		}
	}
	return nil
}

// settleResult turns the settle script's reply into Settle's error.
func settleResult(n int64, err error) error {
	switch {
	case err != nil:
		return memoryError(err)
	case n == 0:
		return ErrLeaseLost
	case n == -1:
		return fmt.Errorf("put back unfinished items: %w", ErrNotArray)
	case n == -2:
		return ErrGone
	}
	return nil
}
