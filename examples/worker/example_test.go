package main

// The README's worker snippet ("In short") is copied from this file;
// TestREADMESnippetsAreExamples (readme_test.go, at the root) fails when
// they differ. It is this directory's program in short, and needs a Redis
// server, so it is only compiled; the root package's examples run on an
// embedded Redis.

import (
	"context"
	"errors"
	"os"
	"syscall"
	"time"

	"github.com/oklog/run"
	"github.com/redis/rueidis"
	"go.uber.org/zap"

	"github.com/batchq/batchq"
)

// Email is an item of the "emails" queue, stored as JSON.
type Email struct {
	To string `json:"to"`
}

// Event is an item of the "events" queue, stored as JSON.
type Event struct {
	Name string `json:"name"`
}

// send and store stand for a service's own work.
func send(ctx context.Context, e Email) error                  { return nil }
func store(ctx context.Context, key string, evs []Event) error { return nil }

// The main function of a worker binary: it handles two queues until SIGINT
// or SIGTERM, then shuts down gracefully. It needs a Redis server, so it
// is only compiled.
func Example_worker() {
	log := zap.Must(zap.NewProduction())
	defer log.Sync()
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{"127.0.0.1:6379"}, DisableCache: true})
	if err != nil {
		log.Fatal("connect to Redis", zap.Error(err))
	}
	defer rdb.Close()

	w, err := batchq.NewWorker(rdb, batchq.WithConcurrency(64), batchq.WithLogger(log))
	if err != nil {
		log.Fatal("create the worker", zap.Error(err))
	}
	batchq.Handle(w, "emails", func(ctx context.Context, e Email) error { return send(ctx, e) },
		batchq.WithMaxAttempts(5), batchq.WithTimeout(30*time.Second))
	batchq.HandleBatch(w, "events", func(ctx context.Context, key string, evs []Event) error { return store(ctx, key, evs) },
		batchq.WithMaxBatch(500, 0)) // at most 500 events per call

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var g run.Group
	g.Add(run.SignalHandler(ctx, os.Interrupt, syscall.SIGTERM))
	g.Add(func() error { return w.Run(ctx) }, func(error) { cancel() })
	// g.Run returns the error of the first actor to return, once all have:
	// on a signal, a *run.SignalError, after w.Run's graceful shutdown.
	switch err := g.Run(); {
	case errors.Is(err, run.ErrSignal):
		log.Info("stopped", zap.Error(err))
	case err != nil:
		log.Fatal("worker failed", zap.Error(err))
	}
}
