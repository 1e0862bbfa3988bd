package producer

import (
	"fmt"
	"time"

	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/protocol"
)

// FlushPolicy says when a key with pending items becomes due for workers.
// The zero FlushPolicy, the default, makes a key due as soon as its first
// item is stored. The merge script applies the policy by the Redis server's
// clock, atomically with the append, so producers need not agree on time.
//
// With MaxAge set, a key is due MaxAge after its first pending item, so
// that workers get fuller batches; at once when it reaches MaxItems items or
// MaxBytes bytes; and, with Quiet set, once no item has come for Quiet (a
// debounce that cannot starve: MaxAge still bounds the wait).
//
// A flush policy never drops or refuses an item: a key that passes MaxItems
// or MaxBytes is due at once and takes more items until a worker drains it.
// What a key refuses is set by the caps (WithMaxKeyItems, WithMaxKeyBytes):
// an append past them fails with ErrKeyFull, storing nothing.
type FlushPolicy struct {
	MaxAge   time.Duration // due at most this long after the first pending item (0: at once)
	Quiet    time.Duration // due once no item has come for this long, but never past MaxAge
	MaxItems int           // due at once when the key holds this many items (0: no limit)
	MaxBytes int           // due at once when the key's JSON array is this long (0: no limit)
}

func (f FlushPolicy) validate() error {
	switch {
	case f.MaxAge < 0 || f.Quiet < 0 || f.MaxItems < 0 || f.MaxBytes < 0:
		return fmt.Errorf("producer: flush policy values must not be negative: %+v", f)
	case f.MaxAge == 0 && (f.Quiet > 0 || f.MaxItems > 0 || f.MaxBytes > 0):
		return fmt.Errorf("producer: a flush policy with Quiet, MaxItems or MaxBytes needs a MaxAge to bound the wait: %+v", f)
	case f.MaxAge > 0 && f.MaxAge < time.Millisecond, f.Quiet > 0 && f.Quiet < time.Millisecond:
		return fmt.Errorf("producer: flush policy durations must be at least a millisecond: %+v", f)
	}
	return nil
}

func (f FlushPolicy) store() protocol.Flush {
	return protocol.Flush{MaxAge: f.MaxAge.Milliseconds(), Quiet: f.Quiet.Milliseconds(), Items: f.MaxItems, Bytes: f.MaxBytes}
}

// WithFlushPolicy sets the flush policy of a queue (see FlushPolicy). Every
// producer appending to the queue should use the same policy: each append
// applies its own producer's.
func WithFlushPolicy(queue string, f FlushPolicy) Option {
	return func(pr *Producer) error {
		if err := keys.CheckQueue(queue); err != nil {
			return fmt.Errorf("producer: flush policy: %w", err)
		}
		if err := f.validate(); err != nil {
			return err
		}
		if pr.flush == nil {
			pr.flush = make(map[string]protocol.Flush)
		}
		pr.flush[queue] = f.store()
		return nil
	}
}
