package testredis

import (
	"net"
	"strings"
	"testing"
	"time"
)

// StartReplica starts a private redis-server that replicates master, with
// extra configuration args, and waits until its link to the master is up
// (master_link_status:up), so that a WAIT on the master counts it. It stops
// when the test ends.
func StartReplica(t testing.TB, master *Server, args ...string) *Server {
	t.Helper()
	host, port, err := net.SplitHostPort(master.Addr)
	if err != nil {
		t.Fatalf("master address %q: %v", master.Addr, err)
	}
	// A master waits 5 s (repl-diskless-sync-delay) before the first sync,
	// for more replicas to join it.
	if _, err := master.Command("CONFIG", "SET", "repl-diskless-sync-delay", "0"); err != nil {
		t.Fatalf("master %s: %v", master.Addr, err)
	}
	r := Start(t, append([]string{"--replicaof", host, port}, args...)...)
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err := r.Info("replication")
		if err == nil && strings.Contains(info, "master_link_status:up") {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica %s of %s: link not up after 10s (%v): %s", r.Addr, master.Addr, err, info)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Info returns the server's INFO section.
func (s *Server) Info(section string) (string, error) {
	return s.Command("INFO", section)
}
