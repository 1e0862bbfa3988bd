// Package testredis gives tests the Redis servers they run against: an
// in-process miniredis, and a real redis-server. The real server is the one
// at $BATCHQ_REDIS_ADDR when it is set (CI starts one), else a private
// redis-server this package starts on a free loopback port and stops when
// the test ends. Without redis-server the real-server tests skip, except
// where CI=true: there they fail.
package testredis

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/rueidis"
)

// Backend is one Redis server a test runs against.
type Backend struct {
	Name   string // "miniredis" or "redis"
	Addr   string
	Client rueidis.Client
	Mini   *miniredis.Miniredis // nil for a real server
	// Prefix is a key prefix unique to the test, so tests can share a server.
	Prefix string
}

// Real reports whether the backend is a real redis-server.
func (b Backend) Real() bool { return b.Mini == nil }

var seq atomic.Int64

func prefix() string {
	return fmt.Sprintf("t%d_%d", os.Getpid(), seq.Add(1))
}

// Each runs fn as two subtests: on miniredis and on a real redis-server.
func Each(t *testing.T, fn func(t *testing.T, b Backend)) {
	t.Helper()
	t.Run("miniredis", func(t *testing.T) { fn(t, Mini(t)) })
	t.Run("redis", func(t *testing.T) { fn(t, Real(t)) })
}

// Mini starts a miniredis for the test.
func Mini(t testing.TB) Backend {
	t.Helper()
	m := miniredis.RunT(t)
	return Backend{Name: "miniredis", Addr: m.Addr(), Client: Client(t, m.Addr()), Mini: m, Prefix: prefix()}
}

// Real returns a real redis-server for the test (see the package doc).
func Real(t testing.TB) Backend {
	t.Helper()
	addr := os.Getenv("BATCHQ_REDIS_ADDR")
	if addr == "" {
		addr = Start(t).Addr
	}
	return Backend{Name: "redis", Addr: addr, Client: Client(t, addr), Prefix: prefix()}
}

// Client connects a rueidis client to addr, closed when the test ends.
func Client(t testing.TB, addr string) rueidis.Client {
	t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatalf("connect to %s: %v", addr, err)
	}
	t.Cleanup(c.Close)
	return c
}

// NeedServer skips the test, or fails it where CI=true, when redis-server is
// not installed.
func NeedServer(t testing.TB) string {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("redis-server is not installed (CI=true): %v", err)
		}
		t.Skipf("redis-server is not installed: %v", err)
	}
	return path
}

// Server is a private redis-server process.
type Server struct {
	Addr string
	Port int
	Dir  string
	TLS  bool // the server listens for TLS only (see StartTLS)
	args []string
	cmd  *exec.Cmd
}

// Start starts a private redis-server on a free loopback port, with extra
// configuration args (e.g. "--appendonly", "yes"), stopped when the test
// ends. Its working directory is a temporary directory of the test.
func Start(t testing.TB, args ...string) *Server {
	t.Helper()
	return launch(t, &Server{args: args})
}

// StartTLS starts a private redis-server like Start that listens for TLS
// only (no plain port), with the given PEM files: its certificate, its key
// and the CA it trusts. Clients need not present a certificate
// (tls-auth-clients no). It skips the test when redis-server is built
// without TLS support, a property of the build (BUILD_TLS), not a missing
// install. Its Backend method does not apply: connect with a client whose
// TLSConfig trusts the CA.
func StartTLS(t testing.TB, certFile, keyFile, caFile string, args ...string) *Server {
	t.Helper()
	return launch(t, &Server{TLS: true, args: append([]string{"--tls-cert-file", certFile, "--tls-key-file", keyFile,
		"--tls-ca-cert-file", caFile, "--tls-auth-clients", "no"}, args...)})
}

func launch(t testing.TB, s *Server) *Server {
	t.Helper()
	NeedServer(t)
	s.Dir = t.TempDir()
	for try := 0; ; try++ {
		s.Port = FreePort(t)
		s.Addr = "127.0.0.1:" + strconv.Itoa(s.Port)
		err := s.start()
		if err == nil {
			break
		}
		if s.TLS && noTLS(err) {
			t.Skipf("redis-server is built without TLS support (BUILD_TLS): %v", err)
		}
		if try == 4 {
			t.Fatalf("start redis-server: %v", err)
		}
	}
	t.Cleanup(s.Stop)
	return s
}

// noTLS reports whether a start failure says that redis-server has no TLS
// support: Redis 7.0 built without TLS does not know the tls-* directives;
// later versions panic for want of a TLS listener.
func noTLS(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "Bad directive") && strings.Contains(msg, "tls-") ||
		strings.Contains(msg, "connection listener of tls")
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func (s *Server) start() error {
	port := []string{"--port", strconv.Itoa(s.Port)}
	if s.TLS {
		port = []string{"--port", "0", "--tls-port", strconv.Itoa(s.Port)}
	}
	args := append(append(port, "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", s.Dir, "--daemonize", "no"), s.args...)
	return s.run(args, s.ping, "redis-server")
}

// run starts redis-server with args, its output in redis.log in s.Dir, and
// waits up to 5 s until ready returns nil; what names the server in the
// error when it does not (the log's text is in it).
func (s *Server) run(args []string, ready func() error, what string) error {
	s.cmd = exec.Command("redis-server", args...)
	out, err := os.Create(s.Dir + "/redis.log")
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
		if ready() == nil {
			return nil
		}
		select {
		case <-exited:
			break wait
		case <-time.After(10 * time.Millisecond):
		}
	}
	s.Stop()
	log, _ := os.ReadFile(s.Dir + "/redis.log")
	return fmt.Errorf("%s on %s did not answer: %s", what, s.Addr, strings.TrimSpace(string(log)))
}

// Stop kills the server (SIGKILL: a crash, nothing saved on the way out)
// and waits for its port to close.
func (s *Server) Stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	s.cmd.Process.Kill()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && s.ping() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	s.cmd = nil
}

// Backend returns a backend on the server, with a client and a fresh prefix.
func (s *Server) Backend(t testing.TB) Backend {
	t.Helper()
	return Backend{Name: "redis", Addr: s.Addr, Client: Client(t, s.Addr), Prefix: prefix()}
}

// Pause stops the server process (SIGSTOP): it keeps its connections but
// answers nothing until Resume.
func (s *Server) Pause(t testing.TB) {
	t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatalf("pause redis-server: %v", err)
	}
}

// Resume lets a paused server go on (SIGCONT).
func (s *Server) Resume(t testing.TB) {
	t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatalf("resume redis-server: %v", err)
	}
}

// Restart starts the server again on the same port, with the same data
// directory (what it persisted is loaded again).
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	if err := s.start(); err != nil {
		t.Fatalf("restart redis-server: %v", err)
	}
}

// ping checks that the server answers PING, over TLS for a TLS server (a
// readiness probe: it does not verify the server's certificate).
func (s *Server) ping() error {
	d := &net.Dialer{Timeout: 200 * time.Millisecond}
	var c net.Conn
	var err error
	if s.TLS {
		c, err = tls.DialWithDialer(d, "tcp", s.Addr, &tls.Config{InsecureSkipVerify: true})
	} else {
		c, err = d.Dial("tcp", s.Addr)
	}
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

// Keys returns the keys of the backend matching pattern, on every node of
// a cluster (for assertions in tests only: batchq itself never scans).
func Keys(t testing.TB, b Backend, pattern string) []string {
	t.Helper()
	var out []string
	for addr, n := range b.Client.Nodes() {
		ks, err := n.Do(context.Background(), n.B().Keys().Pattern(pattern).Build()).AsStrSlice()
		if err != nil {
			t.Fatalf("KEYS %s on %s: %v", pattern, addr, err)
		}
		out = append(out, ks...)
	}
	return out
}
