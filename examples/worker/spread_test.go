package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/testredis"
)

// TestDefaultsSpreadOverMasters runs the example binaries with no shard
// flag on a Redis Cluster of three masters: the webproducer, the queue's
// first writer, records the default count, its items land on every
// master, and two workers started after it drain every shard.
func TestDefaultsSpreadOverMasters(t *testing.T) {
	b := testredis.Cluster(t)
	bin := buildExamples(t)
	web, base, client := startWebproducer(t, bin, b)

	const n = 300
	for i := range n {
		resp, err := client.Post(base+"user:"+strconv.Itoa(i), "application/json", bytes.NewReader(fmt.Appendf(nil, `{"id":%d}`, i)))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("POST item %d: %s", i, resp.Status)
		}
	}
	shards, err := b.Client.Do(context.Background(), b.Client.B().Hget().Key(b.Prefix+":queues").Field(e2eQueue).Build()).AsInt64()
	if err != nil {
		t.Fatal(err)
	}
	perMaster := map[string]int{}
	for addr, node := range b.Client.Nodes() {
		ks, err := node.Do(context.Background(), node.B().Keys().Pattern(b.Prefix+":{"+e2eQueue+":*}:k:*").Build()).AsStrSlice()
		if err != nil {
			t.Fatal(err)
		}
		perMaster[addr] = len(ks)
	}
	counts := slices.Sorted(func(yield func(int) bool) {
		for _, c := range perMaster {
			if !yield(c) {
				return
			}
		}
	})
	t.Logf("%d shards recorded; keys per master %v", shards, perMaster)
	if len(perMaster) != 3 || counts[0] == 0 || counts[0]+counts[1]+counts[2] != n {
		t.Fatalf("%d shards; keys per master %v, want %d keys on 3 masters, each holding some", shards, perMaster, n)
	}

	workers := []*proc{startWorker(t, "worker1", bin, b), startWorker(t, "worker2", bin, b)}
	waitUntil(t, 30*time.Second, func() error {
		for _, w := range workers {
			if err := w.exitedEarly(); err != nil {
				return err
			}
		}
		if got := len(handledLines(t, workers)); got != n {
			return fmt.Errorf("%d of %d items handled", got, n)
		}
		return nil
	})
	for _, p := range append([]*proc{web}, workers...) {
		p.signal(t, syscall.SIGTERM)
		p.waitExit(t, 15*time.Second)
	}
}
