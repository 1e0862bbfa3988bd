package testredis

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// StartReplicatedCluster starts a Redis Cluster of three masters, each with
// one replica, for failover tests: six redis-server processes in cluster
// mode on free loopback ports, joined with redis-cli --cluster create
// --cluster-replicas 1. replicas[i] replicates masters[i]. It returns once
// every node reports cluster_state:ok and every replica's link to its
// master is up (master_link_status:up), so that a WAIT on a master counts
// its replica. The servers stop when the test ends.
//
// nodeTimeout is the cluster-node-timeout: a master unreachable for that
// long is failed, and its replica is promoted a second or two later (give
// 1-2 s; StartCluster's nodes take 60 s). Full resyncs start at once
// (repl-diskless-sync-delay 0), so a killed master restarted with Restart
// rejoins as the replica of the node promoted in its place within about a
// second. No node persists anything: a restarted node comes back empty.
func StartReplicatedCluster(t testing.TB, nodeTimeout time.Duration) (masters, replicas []*Server) {
	t.Helper()
	// redis-cli picks the masters and gives each a replica in an order of
	// its own: who replicates whom is read back from the nodes.
	nodes := createCluster(t, 6, 1, "--cluster-node-timeout", strconv.FormatInt(nodeTimeout.Milliseconds(), 10),
		"--repl-diskless-sync-delay", "0")
	deadline := time.Now().Add(30 * time.Second)
	masterOf := make(map[*Server]string) // replica -> its master's port
	for _, n := range nodes {
		for {
			state, err := exec.Command("redis-cli", "-p", strconv.Itoa(n.Port), "cluster", "info").Output()
			info, ierr := n.Info("replication")
			if err == nil && ierr == nil && strings.Contains(string(state), "cluster_state:ok") {
				if infoField(info, "role") == "master" {
					masters = append(masters, n)
					break
				}
				if infoField(info, "master_link_status") == "up" {
					masterOf[n] = infoField(info, "master_port")
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("cluster node %s not ready after 30s: %s\n%s", n.Addr, state, info)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	replicas = make([]*Server, len(masters))
	for r, port := range masterOf {
		for i, m := range masters {
			if port == strconv.Itoa(m.Port) {
				replicas[i] = r
			}
		}
	}
	for i, r := range replicas {
		if r == nil || len(masters) != 3 {
			t.Fatalf("redis-cli --cluster create made %d masters; %s has no replica", len(masters), masters[i].Addr)
		}
	}
	return masters, replicas
}

// InfoField returns the value of one field of an INFO section of the
// server (e.g. "replication", "role"), or "" when the section has none,
// read as Info reads it.
func (s *Server) InfoField(section, field string) (string, error) {
	info, err := s.Info(section)
	if err != nil {
		return "", err
	}
	return infoField(info, field), nil
}

// infoField returns the value of field in an INFO reply, "" when absent.
func infoField(info, field string) string {
	for line := range strings.SplitSeq(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), field+":"); ok {
			return v
		}
	}
	return ""
}
