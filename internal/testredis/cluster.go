package testredis

import (
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Cluster returns a backend on a real Redis Cluster of three masters: the
// one whose seed address is $BATCHQ_CLUSTER_ADDR when it is set (CI starts
// one), else a private cluster started for the test and stopped after it.
func Cluster(t testing.TB) Backend {
	t.Helper()
	addr := os.Getenv("BATCHQ_CLUSTER_ADDR")
	if addr == "" {
		addr = StartCluster(t)[0].Addr
	}
	return Backend{Name: "cluster", Addr: addr, Client: Client(t, addr), Prefix: prefix()}
}

// StartCluster starts three redis-server processes in cluster mode on free
// loopback ports, joins them into a cluster of three masters with
// redis-cli --cluster create, and waits until every node reports
// cluster_state:ok. The servers stop when the test ends.
func StartCluster(t testing.TB) []*Server {
	t.Helper()
	nodes := createCluster(t, 3, 0, "--cluster-node-timeout", "60000")
	deadline := time.Now().Add(20 * time.Second)
	for _, n := range nodes {
		for {
			out, err := exec.Command("redis-cli", "-p", strconv.Itoa(n.Port), "cluster", "info").Output()
			if err == nil && strings.Contains(string(out), "cluster_state:ok") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("cluster node %s not ok after 20s: %s", n.Addr, out)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nodes
}

// createCluster starts n redis-server processes in cluster mode, with args
// besides, on free loopback ports, stopped when the test ends, and joins
// them with redis-cli --cluster create, replicas replicas per master. It
// fails the test (CI=true) or skips it without redis-server or redis-cli.
func createCluster(t testing.TB, n, replicas int, args ...string) []*Server {
	t.Helper()
	NeedServer(t)
	if _, err := exec.LookPath("redis-cli"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("redis-cli is not installed (CI=true): %v", err)
		}
		t.Skipf("redis-cli is not installed: %v", err)
	}
	nodes := make([]*Server, n)
	create := []string{"--cluster", "create"}
	for i := range nodes {
		s := &Server{Dir: t.TempDir(), args: append([]string{"--cluster-enabled", "yes",
			"--cluster-config-file", "nodes.conf", "--cluster-require-full-coverage", "no"}, args...)}
		for try := 0; ; try++ {
			s.Port = freeClusterPort(t)
			s.Addr = "127.0.0.1:" + strconv.Itoa(s.Port)
			err := s.start()
			if err == nil {
				break
			}
			if try == 4 {
				t.Fatalf("start cluster node: %v", err)
			}
		}
		t.Cleanup(s.Stop)
		nodes[i] = s
		create = append(create, s.Addr)
	}
	create = append(create, "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	if out, err := exec.Command("redis-cli", create...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	return nodes
}

// freeClusterPort returns a free loopback port whose cluster bus port (the
// port plus 10000) is free too.
func freeClusterPort(t testing.TB) int {
	t.Helper()
	for range 100 {
		p := FreePort(t)
		if p+10000 > 65535 {
			continue
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+10000))
		if err != nil {
			continue
		}
		l.Close()
		return p
	}
	t.Fatal("no free port pair for a cluster node")
	return 0
}
