package main

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// server is a private redis-server the bench started.
type server struct {
	addr   string
	cmd    *exec.Cmd
	dir    string
	exited chan struct{}
}

// startServer starts redis-server on a free loopback port, with no
// persistence, in a temporary directory, with extra arguments args. Stop it
// with stop.
func startServer(args ...string) (*server, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, fmt.Errorf("redis-server is not installed (or give -redis ADDR): %w", err)
	}
	var lastErr error
	for range 5 {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		dir, err := os.MkdirTemp("", "batchq-bench-")
		if err != nil {
			return nil, err
		}
		s := &server{addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), dir: dir, exited: make(chan struct{})}
		s.cmd = exec.Command(bin, append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no", "--dir", dir}, args...)...)
		var log bytes.Buffer
		s.cmd.Stdout, s.cmd.Stderr = &log, &log
		if err := s.cmd.Start(); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		go func() {
			_ = s.cmd.Wait()
			close(s.exited)
		}()
		if lastErr = waitForRedis(s.addr, s.exited); lastErr == nil {
			return s, nil
		}
		s.stop()
		lastErr = fmt.Errorf("%w; log:\n%s", lastErr, log.String())
	}
	return nil, fmt.Errorf("could not start redis-server: %w", lastErr)
}

// startReplica starts a redis-server that replicates master, as startServer
// starts one, and waits until its link to the master is up, so that a WAIT
// on the master counts it. Stop it with stop, before the master.
func startReplica(master *server) (*server, error) {
	st, err := dialStats(master.addr)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	// A master waits repl-diskless-sync-delay (5 s) before the first sync,
	// for more replicas to join it.
	if _, err := st.do("CONFIG", "SET", "repl-diskless-sync-delay", "0"); err != nil {
		return nil, err
	}
	host, port, err := net.SplitHostPort(master.addr)
	if err != nil {
		return nil, err
	}
	r, err := startServer("--replicaof", host, port)
	if err != nil {
		return nil, fmt.Errorf("replica: %w", err)
	}
	if err := waitForLink(r); err != nil {
		r.stop()
		return nil, err
	}
	return r, nil
}

// waitForLink waits until the replica r reports master_link_status:up, it
// exits, or ten seconds pass.
func waitForLink(r *server) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		var info string
		st, err := dialStats(r.addr)
		if err == nil {
			info, err = st.do("INFO", "replication")
			st.Close()
			if err == nil && strings.Contains(info, "master_link_status:up") {
				return nil
			}
		}
		select {
		case <-r.exited:
			return errors.New("replica redis-server exited")
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("replica redis-server at %s: link to its master not up after 10s (%v): %s", r.addr, err, info)
		}
	}
}

// stop kills the server by its pid and removes its directory.
func (s *server) stop() {
	_ = s.cmd.Process.Kill()
	<-s.exited
	os.RemoveAll(s.dir)
}

// waitForRedis waits until the server at addr answers PING, it exits, or
// ten seconds pass.
func waitForRedis(addr string, exited <-chan struct{}) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := dialStats(addr)
		if err == nil {
			_, err = st.do("PING")
			st.Close()
			if err == nil {
				return nil
			}
		}
		select {
		case <-exited:
			return errors.New("redis-server exited")
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("redis-server at %s does not answer: %w", addr, err)
		}
	}
}

// freePort returns a loopback port that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
