package producer_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batchq/batchq/internal/testredis"
	"github.com/batchq/batchq/producer"
)

// BenchmarkAppend compares one append to an empty key with one append to a
// key that already holds 100k items, on a real redis-server: the merge
// script splices without decoding, so the two should cost about the same.
//
// Besides ns/op (a round trip, noisy on a shared machine) it reports
// redis-µs/op: the server's own time per script call, from INFO
// commandstats, which is what grows when a script does work in proportion
// to the stored array.
//
//	go test -run '^$' -bench Append -count 6 ./producer/
func BenchmarkAppend(b *testing.B) {
	be := testredis.Real(b)
	p, err := producer.New(be.Client, producer.WithPrefix(be.Prefix))
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	item := json.RawMessage(`{"id":12345,"at":1764201600000,"email":"someone@example.com","note":"a payload of about 100 bytes"}`)

	b.Run("empty", func(b *testing.B) {
		i := 0
		defer reportRedisTime(b, be)()
		for b.Loop() {
			// A new key each time: every append finds no array.
			if err := p.AddRaw(ctx, "bench", "empty"+strconv.Itoa(i), item); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
	runs := 0
	b.Run("100k", func(b *testing.B) {
		// A fresh key each run (of -count), so it holds 100k items plus
		// this run's, never a growing pile that meets the key's caps.
		runs++
		key := "full" + strconv.Itoa(runs)
		chunk := make([]json.RawMessage, 1000)
		for i := range chunk {
			chunk[i] = item
		}
		for range 100 {
			if err := p.AddRaw(ctx, "bench", key, chunk...); err != nil {
				b.Fatal(err)
			}
		}
		b.ResetTimer()
		defer reportRedisTime(b, be)()
		for b.Loop() {
			if err := p.AddRaw(ctx, "bench", key, item); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// reportRedisTime starts measuring the server time spent in EVALSHA and
// returns a function that reports it, and the script calls, per benchmark op.
func reportRedisTime(b *testing.B, be testredis.Backend) func() {
	calls0, usec0 := evalshaStats(b, be)
	return func() {
		calls, usec := evalshaStats(b, be)
		if b.N > 0 {
			b.ReportMetric(float64(usec-usec0)/float64(b.N), "redis-µs/op")
			b.ReportMetric(float64(calls-calls0)/float64(b.N), "calls/op")
		}
	}
}

func evalshaStats(t testing.TB, be testredis.Backend) (calls, usec int64) {
	t.Helper()
	info, err := be.Client.Do(context.Background(), be.Client.B().Info().Section("commandstats").Build()).ToString()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(info, "\r\n") {
		rest, ok := strings.CutPrefix(line, "cmdstat_evalsha:")
		if !ok {
			continue
		}
		for _, f := range strings.Split(rest, ",") {
			k, v, _ := strings.Cut(f, "=")
			n, _ := strconv.ParseInt(v, 10, 64)
			switch k {
			case "calls":
				calls = n
			case "usec":
				usec = n
			}
		}
	}
	return calls, usec
}

// BenchmarkAppendParallel appends one item per call from many goroutines,
// to 10 hot keys and to 1,000 keys, directly and with linger (a 2 ms wait,
// and group commit); redis-µs/op is the server's script time per item.
// Linger gathers per queue shard, whatever the keys.
//
//	go test -run '^$' -bench AppendParallel -count 6 ./producer/
func BenchmarkAppendParallel(b *testing.B) {
	be := testredis.Real(b)
	ctx := context.Background()
	item := json.RawMessage(`{"id":12345,"at":1764201600000,"email":"someone@example.com","note":"a payload of about 100 bytes"}`)
	for _, nkeys := range []int64{10, 1000} {
		for _, c := range []struct {
			name string
			opts []producer.Option
		}{
			{"direct", nil},
			{"linger_2ms", []producer.Option{producer.WithLinger(2*time.Millisecond, 256)}},
			{"linger_0", []producer.Option{producer.WithLinger(0, 256)}},
		} {
			b.Run(fmt.Sprintf("keys_%d/%s", nkeys, c.name), func(b *testing.B) {
				p, err := producer.New(be.Client, append([]producer.Option{producer.WithPrefix(be.Prefix)}, c.opts...)...)
				if err != nil {
					b.Fatal(err)
				}
				b.SetParallelism(32) // 32 goroutines per CPU, like web handlers
				defer reportRedisTime(b, be)()
				var next atomic.Int64
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						k := "k" + strconv.FormatInt(next.Add(1)%nkeys, 10)
						if err := p.AddRaw(ctx, "par", k, item); err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
		}
	}
}
