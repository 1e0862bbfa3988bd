package testredis

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// SentinelMaster is the name the Sentinels of StartSentinels monitor their
// master under.
const SentinelMaster = "batchq-master"

// Sentinel timings of StartSentinels: a master that does not answer for
// SentinelDownAfter is down; a failover that has not completed within
// SentinelFailoverTimeout is abandoned (and none is tried again for twice
// that).
const (
	SentinelDownAfter       = time.Second
	SentinelFailoverTimeout = 10 * time.Second
)

// SentinelOptions configures StartSentinels.
type SentinelOptions struct {
	// Replicas is the number of replicas of the master that every Sentinel
	// must know before StartSentinels returns, so that a failover can
	// promote one at once.
	Replicas int
	// Password, if set, is the Sentinels' own password (requirepass in
	// sentinel.conf).
	Password string
	// MasterPassword, if set, is the password of the master and replicas
	// (sentinel auth-pass).
	MasterPassword string
}

// Sentinels is a set of Redis Sentinels that monitor one master under the
// name SentinelMaster.
type Sentinels struct {
	Nodes    []*Server // the Sentinel processes
	password string
}

// URL returns the -redis value of the setup, as package redisaddr parses
// it: sentinel://batchq-master@HOST:PORT,HOST:PORT,...
func (s *Sentinels) URL() string {
	addrs := make([]string, len(s.Nodes))
	for i, n := range s.Nodes {
		addrs[i] = n.Addr
	}
	return "sentinel://" + SentinelMaster + "@" + strings.Join(addrs, ",")
}

// Master returns the address of the master as the Sentinel node i sees it
// (SENTINEL GET-MASTER-ADDR-BY-NAME).
func (s *Sentinels) Master(i int) (string, error) {
	lines, err := s.Nodes[i].command(s.password, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SentinelMaster)
	if err != nil {
		return "", err
	}
	if len(lines) != 2 {
		return "", fmt.Errorf("SENTINEL GET-MASTER-ADDR-BY-NAME answered %q", lines)
	}
	return net.JoinHostPort(lines[0], lines[1]), nil
}

// WaitMaster waits until every Sentinel names addr as the master, and
// fails the test after timeout.
func (s *Sentinels) WaitMaster(t testing.TB, addr string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for i := range s.Nodes {
		for {
			got, err := s.Master(i)
			if err == nil && got == addr {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("Sentinel %s names %q as the master after %v (%v), want %s", s.Nodes[i].Addr, got, timeout, err, addr)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// Failover makes the first Sentinel fail the master over at once, without
// asking the others (SENTINEL FAILOVER): a graceful failover, the master
// still running, which the Sentinels then make a replica of the promoted
// one. WaitMaster tells when it is done.
func (s *Sentinels) Failover(t testing.TB) {
	t.Helper()
	if _, err := s.Nodes[0].command(s.password, "SENTINEL", "FAILOVER", SentinelMaster); err != nil {
		t.Fatalf("SENTINEL FAILOVER on %s: %v", s.Nodes[0].Addr, err)
	}
}

// Leader returns the index in Nodes of the Sentinel that was elected to
// lead a failover, from their logs (+elected-leader), or -1 if none was
// (the first it finds: meant for tests that fail over once). The leader announces the new master (+switch-master) only once it
// has made the other replicas replicate it; the other Sentinels announce
// it as soon as they learn of the promotion.
func (s *Sentinels) Leader() int {
	for i, n := range s.Nodes {
		log, err := os.ReadFile(filepath.Join(n.Dir, "redis.log"))
		if err == nil && strings.Contains(string(log), "+elected-leader") {
			return i
		}
	}
	return -1
}

// StartSentinels starts n Redis Sentinels (redis-server --sentinel) on free
// loopback ports, monitoring master under the name SentinelMaster with a
// quorum of a majority of them, and returns once every one of them knows
// the master, opts.Replicas replicas of it and the other Sentinels (which
// they learn from each other through the master within a few seconds). Each
// writes its configuration file, which it rewrites as it learns, in a
// temporary directory of the test; they stop when the test ends.
//
// A master that does not answer for SentinelDownAfter is failed over: a
// replica is promoted in a few seconds, and the other replicas are made to
// replicate it.
func StartSentinels(t testing.TB, master *Server, n int, opts SentinelOptions) *Sentinels {
	t.Helper()
	NeedServer(t)
	host, port, err := net.SplitHostPort(master.Addr)
	if err != nil {
		t.Fatalf("master address %q: %v", master.Addr, err)
	}
	conf := []string{
		fmt.Sprintf("sentinel monitor %s %s %s %d", SentinelMaster, host, port, n/2+1),
		fmt.Sprintf("sentinel down-after-milliseconds %s %d", SentinelMaster, SentinelDownAfter.Milliseconds()),
		fmt.Sprintf("sentinel failover-timeout %s %d", SentinelMaster, SentinelFailoverTimeout.Milliseconds()),
		fmt.Sprintf("sentinel parallel-syncs %s %d", SentinelMaster, max(opts.Replicas, 1)),
	}
	if opts.MasterPassword != "" {
		conf = append(conf, fmt.Sprintf("sentinel auth-pass %s %s", SentinelMaster, opts.MasterPassword))
	}
	if opts.Password != "" {
		conf = append(conf, "requirepass "+opts.Password)
	}
	s := &Sentinels{password: opts.Password}
	for range n {
		node := &Server{Dir: t.TempDir()}
		for try := 0; ; try++ {
			node.Port = FreePort(t)
			node.Addr = "127.0.0.1:" + strconv.Itoa(node.Port)
			err := node.startSentinel(conf, opts.Password)
			if err == nil {
				break
			}
			if try == 4 {
				t.Fatalf("start Sentinel: %v", err)
			}
		}
		t.Cleanup(node.Stop)
		s.Nodes = append(s.Nodes, node)
	}
	// What each Sentinel must report of the master in INFO sentinel.
	want := fmt.Sprintf("name=%s,status=ok,address=%s,slaves=%d,sentinels=%d", SentinelMaster, master.Addr, opts.Replicas, n)
	deadline := time.Now().Add(30 * time.Second)
	for _, node := range s.Nodes {
		for {
			info, err := node.command(opts.Password, "INFO", "sentinel")
			if err == nil && !strings.Contains(strings.Join(info, "\n"), want) {
				err = fmt.Errorf("INFO sentinel says %q, want %q", info, want)
			}
			if err == nil {
				err = s.replicasReady(node, opts.Replicas)
			}
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("Sentinel %s not ready after 30s: %v", node.Addr, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return s
}

// replicasReady returns nil once the Sentinel node knows want replicas of
// the master and could promote any of them: it has their INFO, which it
// asks for every 10 seconds, from the last 5 seconds, and each says its
// link to the master is up. (The master's INFO names its replicas first:
// a Sentinel knows a replica some time before it may promote it, and
// SENTINEL FAILOVER answers NOGOODSLAVE meanwhile.)
func (s *Sentinels) replicasReady(node *Server, want int) error {
	fields, err := node.command(s.password, "SENTINEL", "REPLICAS", SentinelMaster)
	if err != nil {
		return err
	}
	// One flat list of field and value pairs, each replica's starting
	// with "name".
	var replicas []map[string]string
	for i := 0; i+1 < len(fields); i += 2 {
		if fields[i] == "name" {
			replicas = append(replicas, make(map[string]string))
		}
		if len(replicas) > 0 {
			replicas[len(replicas)-1][fields[i]] = fields[i+1]
		}
	}
	if len(replicas) != want {
		return fmt.Errorf("%d replicas known, want %d", len(replicas), want)
	}
	for _, r := range replicas {
		refresh, err := strconv.ParseInt(r["info-refresh"], 10, 64)
		if r["flags"] != "slave" || r["master-link-status"] != "ok" || err != nil || refresh > 5000 {
			return fmt.Errorf("replica %s: flags %q, link %q, INFO %q ms ago", r["name"], r["flags"], r["master-link-status"], r["info-refresh"])
		}
	}
	return nil
}

// startSentinel writes a sentinel.conf holding conf into s.Dir and starts
// a Sentinel with it on s.Port, and waits until it answers PING (NOAUTH is
// an answer too, from a Sentinel with a password).
func (s *Server) startSentinel(conf []string, password string) error {
	path := filepath.Join(s.Dir, "sentinel.conf")
	head := []string{"port " + strconv.Itoa(s.Port), "bind 127.0.0.1", "daemonize no", "dir " + s.Dir}
	if err := os.WriteFile(path, []byte(strings.Join(append(head, conf...), "\n")+"\n"), 0o600); err != nil {
		return err
	}
	return s.run([]string{path, "--sentinel"}, func() error {
		_, err := s.command(password, "PING")
		return err
	}, "Sentinel")
}
