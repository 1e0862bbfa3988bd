package producer

import "time"

// SetShardsRefresh sets how often p reads a queue's shard count again
// (protocol.ShardsEvery by default), for tests whose callers must not stop
// to read it.
func SetShardsRefresh(p *Producer, d time.Duration) { p.refresh = d }

// Lingering returns, for tests, the items p's lingering producer holds in
// gatherings it has not sent yet, and how many of its goroutines and armed
// timers run.
func Lingering(p *Producer) (gathered, running int) {
	l := p.linger
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.shards {
		for _, g := range s.queue {
			gathered += g.n
		}
	}
	return gathered, l.running
}
