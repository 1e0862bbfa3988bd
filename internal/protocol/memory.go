package protocol

import (
	"context"
	"errors"
	"slices"
	"sync"

	"github.com/redis/rueidis"
)

// EvictionWarning is the line producers and workers log, once each, when
// Evictions finds a node that may evict keys: an evicted key takes the
// items in it, acknowledged or not.
const EvictionWarning = "Redis may evict keys, and with them items: set maxmemory-policy noeviction"

// Evicting lists the nodes whose maxmemory-policy may evict keys.
type Evicting struct {
	Policies []string // their policies, sorted, each once
	Nodes    []string // their addresses, sorted
}

// Evictions asks every node c knows for its maxmemory-policy, all at once,
// and returns those whose policy is not noeviction: the server, or on Redis
// Cluster every master and every replica (a replica promoted at failover
// keeps its own policy). A node that cannot tell (an ACL denies CONFIG, the
// node is down, ctx ends) is left out: the check is a warning, and never
// keeps a producer or worker from working.
func Evictions(ctx context.Context, c rueidis.Client) Evicting {
	var (
		wg sync.WaitGroup
		mu sync.Mutex
		ev Evicting
	)
	for addr, node := range c.Nodes() {
		wg.Go(func() {
			policy, err := evictionPolicy(ctx, node)
			if err != nil || policy == "noeviction" {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			ev.Nodes = append(ev.Nodes, addr)
			if !slices.Contains(ev.Policies, policy) {
				ev.Policies = append(ev.Policies, policy)
			}
		})
	}
	wg.Wait()
	slices.Sort(ev.Nodes)
	slices.Sort(ev.Policies)
	return ev
}

// evictionPolicy returns the maxmemory-policy of the server c talks to.
func evictionPolicy(ctx context.Context, c rueidis.Client) (string, error) {
	kv, err := c.Do(ctx, c.B().ConfigGet().Parameter("maxmemory-policy").Build()).AsStrMap()
	if err != nil {
		return "", err
	}
	p, ok := kv["maxmemory-policy"]
	if !ok {
		return "", errors.New("CONFIG GET maxmemory-policy returned nothing")
	}
	return p, nil
}
