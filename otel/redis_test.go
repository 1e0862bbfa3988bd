package batchqotel_test

// The Redis servers the tests run against. Each Redis-facing test runs
// twice (each): on an in-process miniredis (package embedded) and on a real
// redis-server, the one at $BATCHQ_REDIS_ADDR when it is set (CI starts
// one), else a private one this file starts on a free loopback port for the
// test and kills when it ends. Without redis-server installed the real
// half skips, except where CI=true: there it fails. This mirrors the core
// module's internal/testredis, which another module cannot import.

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/batchq/batchq/embedded"
)

// backend is one Redis server a test runs against, with a key prefix of
// the test's own, so that tests may share a server.
type backend struct {
	client rueidis.Client
	prefix string
}

var prefixes atomic.Int64

func newBackend(c rueidis.Client) backend {
	return backend{client: c, prefix: fmt.Sprintf("otel%d_%d", os.Getpid(), prefixes.Add(1))}
}

// each runs fn as two subtests: on miniredis and on a real redis-server.
func each(t *testing.T, fn func(t *testing.T, b backend)) {
	t.Helper()
	t.Run("miniredis", func(t *testing.T) {
		r, err := embedded.Start()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(r.Close)
		fn(t, newBackend(r.Client))
	})
	t.Run("redis", func(t *testing.T) {
		addr := os.Getenv("BATCHQ_REDIS_ADDR")
		if addr == "" {
			addr = startRedis(t)
		}
		c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
		if err != nil {
			t.Fatalf("connect to %s: %v", addr, err)
		}
		t.Cleanup(c.Close)
		fn(t, newBackend(c))
	})
}

// startRedis starts a private redis-server on a free loopback port, killed
// when the test ends, and returns its address.
func startRedis(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("redis-server is not installed (CI=true): %v", err)
		}
		t.Skipf("redis-server is not installed: %v", err)
	}
	dir := t.TempDir()
	var last error
	for range 5 { // a port free a moment ago may be taken by now
		addr, err := tryRedis(t, path, dir)
		if err == nil {
			return addr
		}
		last = err
	}
	t.Fatalf("start redis-server: %v", last)
	return ""
}

// tryRedis starts redis-server on a port that was free a moment ago and
// waits up to 5s for it to answer PING.
func tryRedis(t *testing.T, path, dir string) (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	addr := "127.0.0.1:" + strconv.Itoa(port)
	logPath := dir + "/redis-" + strconv.Itoa(port) + ".log"
	out, err := os.Create(logPath)
	if err != nil {
		return "", err
	}
	cmd := exec.Command(path, "--port", strconv.Itoa(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", dir, "--daemonize", "no")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		out.Close()
		return "", err
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); out.Close(); close(exited) }()
	stop := func() { cmd.Process.Kill(); <-exited }
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		if ping(addr) == nil {
			t.Cleanup(stop)
			return addr, nil
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(logPath)
			return "", fmt.Errorf("redis-server on %s exited: %s", addr, strings.TrimSpace(string(log)))
		case <-time.After(10 * time.Millisecond):
		}
	}
	stop()
	return "", fmt.Errorf("redis-server on %s did not answer PING within 5s", addr)
}

// ping checks that the server at addr answers PING.
func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}
