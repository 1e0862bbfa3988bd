package testredis

import (
	"bufio"
	"fmt"
	"io"
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

// Command sends one command to the server over a connection of its own
// (it works during a failover, where a pooled client may be stuck), and
// returns its reply when that is a simple or bulk string, or an integer.
func (s *Server) Command(args ...string) (string, error) {
	c, err := net.DialTimeout("tcp", s.Addr, 500*time.Millisecond)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	req := fmt.Sprintf("*%d\r\n", len(args))
	for _, a := range args {
		req += fmt.Sprintf("$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := io.WriteString(c, req); err != nil {
		return "", err
	}
	rd := bufio.NewReader(c)
	head, err := rd.ReadString('\n')
	if err != nil {
		return "", err
	}
	head = strings.TrimSuffix(head, "\r\n")
	switch {
	case strings.HasPrefix(head, "+"), strings.HasPrefix(head, ":"):
		return head[1:], nil
	case strings.HasPrefix(head, "$"):
		var n int
		if _, err := fmt.Sscanf(head[1:], "%d", &n); err != nil || n < 0 {
			return "", fmt.Errorf("%s answered %q", args[0], head)
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(rd, buf); err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return "", fmt.Errorf("%s answered %q", args[0], head)
}
