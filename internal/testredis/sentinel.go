package testredis

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
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
	s.cmd = exec.Command("redis-server", path, "--sentinel")
	out, err := os.Create(filepath.Join(s.Dir, "redis.log"))
	if err != nil {
		return err
	}
	s.cmd.Stdout, s.cmd.Stderr = out, out
	if err := s.cmd.Start(); err != nil {
		out.Close()
		return err
	}
	exited := make(chan struct{})
	go func() { s.cmd.Wait(); out.Close(); close(exited) }()
	deadline := time.Now().Add(5 * time.Second)
wait:
	for time.Now().Before(deadline) {
		if _, err := s.command(password, "PING"); err == nil {
			return nil
		}
		select {
		case <-exited:
			break wait
		case <-time.After(10 * time.Millisecond):
		}
	}
	s.Stop()
	log, _ := os.ReadFile(filepath.Join(s.Dir, "redis.log"))
	return fmt.Errorf("Sentinel on %s did not answer: %s", s.Addr, strings.TrimSpace(string(log)))
}

// command sends one command to the server over a connection of its own,
// after AUTH password when password is set, and returns its reply: a
// status or a bulk string as one line, an array of them line by line.
func (s *Server) command(password string, args ...string) ([]string, error) {
	c, err := net.DialTimeout("tcp", s.Addr, 500*time.Millisecond)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	rd := bufio.NewReader(c)
	if password != "" {
		if _, err := roundTrip(c, rd, "AUTH", password); err != nil {
			return nil, fmt.Errorf("AUTH: %w", err)
		}
	}
	return roundTrip(c, rd, args...)
}

// roundTrip writes one command as a RESP array and reads its reply.
func roundTrip(w io.Writer, rd *bufio.Reader, args ...string) ([]string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return nil, err
	}
	return readReply(rd)
}

// readReply reads one RESP2 reply: a status, an integer, a bulk string
// (one line each), an error (returned as one) or an array of them.
func readReply(rd *bufio.Reader) ([]string, error) {
	head, err := rd.ReadString('\n')
	if err != nil {
		return nil, err
	}
	head = strings.TrimRight(head, "\r\n")
	if head == "" {
		return nil, fmt.Errorf("empty reply")
	}
	switch head[0] {
	case '+', ':':
		return []string{head[1:]}, nil
	case '-':
		return nil, fmt.Errorf("%s", head[1:])
	case '$':
		n, err := strconv.Atoi(head[1:])
		if err != nil || n < 0 {
			return nil, err // a nil bulk string: no error, no line
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(rd, buf); err != nil {
			return nil, err
		}
		return []string{string(buf[:n])}, nil
	case '*':
		n, err := strconv.Atoi(head[1:])
		if err != nil {
			return nil, err
		}
		var out []string
		for range n {
			elem, err := readReply(rd)
			if err != nil {
				return nil, err
			}
			out = append(out, elem...)
		}
		return out, nil
	}
	return nil, fmt.Errorf("unexpected reply %q", head)
}
