package deadletter_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"go.uber.org/goleak"

	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/internal/keys"
	"github.com/batchq/batchq/internal/testredis"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// New returns an error, and no client, for a nil client or a bad option.
func TestNewErrors(t *testing.T) {
	c := testredis.Mini(t).Client
	for _, tt := range []struct {
		name string
		new  func() (*deadletter.Client, error)
		want string
		is   error
	}{
		{"nil client", func() (*deadletter.Client, error) { return deadletter.New(nil) }, "deadletter: nil client", nil},
		{"bad prefix", func() (*deadletter.Client, error) { return deadletter.New(c, deadletter.WithPrefix("a{b}")) },
			`deadletter: invalid prefix "a{b}": must be 1-512 bytes without braces`, keys.ErrPrefix},
	} {
		dl, err := tt.new()
		if dl != nil || err == nil || err.Error() != tt.want || (tt.is != nil && !errors.Is(err, tt.is)) {
			t.Errorf("%s: %v, %v; want %q", tt.name, dl, err, tt.want)
		}
	}
}

// Every error a client returns says it is the dead letters', once, and
// wraps its cause.
func TestErrorsSayDeadletter(t *testing.T) {
	b := testredis.Mini(t)
	dl, err := deadletter.New(b.Client, deadletter.WithPrefix(b.Prefix))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	badName := `deadletter: invalid queue name "a:b": must be 1-512 bytes of UTF-8 without braces, colons or control characters, and not . or ..`
	for _, tt := range []struct {
		name string
		err  error
		want string
		is   error
	}{
		{"List", func() error { _, err := dl.List(ctx, "a:b", 1); return err }(), badName, keys.ErrQueueName},
		{"Get", func() error { _, err := dl.Get(ctx, "a:b", "x"); return err }(), badName, keys.ErrQueueName},
		{"Count", func() error { _, err := dl.Count(ctx, "a:b"); return err }(), badName, keys.ErrQueueName},
		{"Purge", func() error { _, err := dl.Purge(ctx, "a:b"); return err }(), badName, keys.ErrQueueName},
		{"corrupt", func() error {
			_, err := dl.Requeue(ctx, deadletter.Letter{ID: "x", Queue: "q", Key: "k", Corrupt: true})
			return err
		}(), `deadletter: requeue "x": the letter holds a corrupt value, not an item`, deadletter.ErrNotRequeueable},
		{"not JSON", func() error {
			_, err := dl.Requeue(ctx, deadletter.Letter{ID: "y", Queue: "q", Key: "k", Item: json.RawMessage(`{`)})
			return err
		}(), `deadletter: requeue "y": the letter holds a corrupt value, not an item: the item is not valid JSON`, deadletter.ErrNotRequeueable},
		{"shard", func() error {
			_, err := dl.Requeue(ctx, deadletter.Letter{ID: "z", Queue: "q", Key: "k", Shard: 2, Item: json.RawMessage(`1`)})
			return err
		}(), `deadletter: requeue "z": shard 2 out of range`, nil},
		{"Redis", func() error { _, err := dl.Count(canceled, "q"); return err }(),
			"deadletter: count dead letters of q: context canceled", context.Canceled},
		{"RequeueNewest", func() error { _, _, err := dl.RequeueNewest(canceled, "q", 0); return err }(),
			"deadletter: requeue dead letters of q: read the server's clock: context canceled", context.Canceled},
	} {
		if tt.err == nil || tt.err.Error() != tt.want || (tt.is != nil && !errors.Is(tt.err, tt.is)) {
			t.Errorf("%s: %v, want %q", tt.name, tt.err, tt.want)
		}
	}
}
