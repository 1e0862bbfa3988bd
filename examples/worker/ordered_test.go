package main

import (
	"bytes"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/testredis"
)

// TestOrderedFlag runs two workers with -ordered, whose first attempts fail
// a third of the time, behind the webproducer: each key's items, posted one
// by one, are handled once each, in the order they were posted, across both
// workers, though failed items wait for their retry a second or more.
func TestOrderedFlag(t *testing.T) {
	b := testredis.Real(t)
	bin := buildExamples(t)
	_, base, client := startWebproducer(t, bin, b)
	workers := []*proc{
		startWorker(t, "worker1", bin, b, "-ordered", "-fail", "0.3"),
		startWorker(t, "worker2", bin, b, "-ordered", "-fail", "0.3"),
	}
	const keys, perKey = 4, 12
	for i := 1; i <= perKey; i++ {
		for k := range keys {
			body := fmt.Sprintf(`{"id": %d}`, k*1000+i)
			resp, err := client.Post(base+"user:"+strconv.Itoa(k), "application/json", bytes.NewReader([]byte(body)))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusAccepted {
				t.Fatalf("POST %s: %s", body, resp.Status)
			}
		}
	}
	var handled map[string][]logLine
	waitUntil(t, 60*time.Second, func() error {
		for _, w := range workers {
			if err := w.exitedEarly(); err != nil {
				return err
			}
		}
		handled = handledLines(t, workers)
		if len(handled) < keys*perKey {
			return fmt.Errorf("%d of %d items handled", len(handled), keys*perKey)
		}
		return nil
	})
	// Each key's items by the time they were handled: ids in posting order.
	type event struct {
		ts float64
		id int
	}
	byKey := make(map[string][]event)
	for id, lines := range handled {
		if len(lines) != 1 {
			t.Errorf("item %s handled %d times", id, len(lines))
		}
		n, _ := strconv.Atoi(id)
		ts, err := lines[0]["ts"].(interface{ Float64() (float64, error) }).Float64()
		if err != nil {
			t.Fatal(err)
		}
		key, _ := lines[0]["key"].(string)
		byKey[key] = append(byKey[key], event{ts, n})
	}
	for key, evs := range byKey {
		slices.SortFunc(evs, func(a, b event) int { return int((a.ts - b.ts) * 1e9) })
		ids := make([]int, len(evs))
		for i, e := range evs {
			ids[i] = e.id
		}
		if !slices.IsSorted(ids) {
			t.Errorf("%s: items handled in the order %v", key, ids)
		}
	}
	failed := 0
	for _, w := range workers {
		for _, l := range w.logLines(t) {
			if l["msg"] == "batch failed" {
				failed++
			}
		}
	}
	if failed == 0 {
		t.Error("no attempt failed: the test of holding a key proves nothing")
	}
	t.Logf("%d keys × %d items handled in order by 2 workers; %d batches failed first", keys, perKey, failed)
}
