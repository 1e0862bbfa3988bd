package batchq_test

import (
	"context"
	"testing"

	"github.com/batchq/batchq"
	"github.com/batchq/batchq/batchqtest"
	"github.com/batchq/batchq/deadletter"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/metrics"
	"github.com/batchq/batchq/producer"
	"github.com/batchq/batchq/statuspage"
)

// The conventions of the README's design notes, checked across packages: a
// constructor returns its options' errors, a nil option included, each
// starting with the package's name once (the whole text is compared); a
// registration panics with them.

func TestConstructorsReturnOptionErrors(t *testing.T) {
	b := testredis.Mini(t)
	in, err := inspect.New(b.Client)
	if err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		f    func() error
		want string
	}{
		"batchq nil":           {func() error { _, err := batchq.NewWorker(b.Client, nil); return err }, "batchq: nil option"},
		"batchq bad":           {func() error { _, err := batchq.NewWorker(b.Client, batchq.WithDefaultShards(0)); return err }, "batchq: shards must be 1-1024, got 0"},
		"producer nil":         {func() error { _, err := producer.New(b.Client, nil); return err }, "producer: nil option"},
		"producer bad":         {func() error { _, err := producer.New(b.Client, producer.WithDefaultShards(0)); return err }, "producer: shards must be 1-1024, got 0"},
		"producer observer":    {func() error { _, err := producer.New(b.Client, producer.WithObserver(nil)); return err }, "producer: nil observer"},
		"producer logger":      {func() error { _, err := producer.New(b.Client, producer.WithLogger(nil)); return err }, "producer: nil logger"},
		"inspect nil":          {func() error { _, err := inspect.New(b.Client, nil); return err }, "inspect: nil option"},
		"deadletter nil":       {func() error { _, err := deadletter.New(b.Client, nil); return err }, "deadletter: nil option"},
		"deadletter bad":       {func() error { _, err := deadletter.New(b.Client, deadletter.WithPrefix("")); return err }, `deadletter: invalid prefix "": must be 1-512 bytes without braces`},
		"metrics nil":          {func() error { _, err := metrics.New(in, nil); return err }, "metrics: nil option"},
		"statuspage nil":       {func() error { _, err := statuspage.New(in, nil); return err }, "statuspage: nil option"},
		"statuspage nil input": {func() error { _, err := statuspage.New(nil); return err }, "statuspage: nil inspector"},
		"batchqtest nil": {func() error {
			w := newWorker(t, b)
			batchq.Handle(w, "q", func(context.Context, item) error { return nil })
			_, err := batchqtest.RunUntilIdle(context.Background(), w, nil)
			return err
		}, "batchqtest: nil option"},
	} {
		err := c.f()
		if err == nil || err.Error() != c.want {
			t.Errorf("%s: got %v, want %q", name, err, c.want)
		}
	}
	w := newWorker(t, b)
	defer func() {
		if v := recover(); v != "batchq: queue q: nil option" {
			t.Errorf("Handle with a nil QueueOption panicked with %v", v)
		}
	}()
	batchq.Handle(w, "q", func(context.Context, item) error { return nil }, nil)
}
