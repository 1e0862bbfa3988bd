package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// statsConn is a plain RESP connection for the bench's own commands (INFO,
// DBSIZE, FLUSHDB). It shares nothing with the clients of the systems under
// test, and sends nothing in the background, so what it adds to the server's
// counters is exactly the commands it is asked to send.
type statsConn struct {
	conn net.Conn
	r    *bufio.Reader
}

// statsTimeout bounds one command of a statsConn; FLUSHDB of a large
// database is the slowest.
const statsTimeout = 30 * time.Second

// dialStats connects to the Redis server at addr.
func dialStats(addr string) (*statsConn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("connect to redis %s: %w", addr, err)
	}
	return &statsConn{conn: c, r: bufio.NewReader(c)}, nil
}

// Close closes the connection.
func (s *statsConn) Close() error { return s.conn.Close() }

// do sends one command and returns its reply: the text of a simple string,
// integer or bulk string reply, or an error for an error reply.
func (s *statsConn) do(args ...string) (string, error) {
	if err := s.conn.SetDeadline(time.Now().Add(statsTimeout)); err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := io.WriteString(s.conn, b.String()); err != nil {
		return "", fmt.Errorf("redis %s: %w", args[0], err)
	}
	line, err := s.r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("redis %s: %w", args[0], err)
	}
	line = strings.TrimSuffix(line, "\r\n")
	if line == "" {
		return "", fmt.Errorf("redis %s: empty reply", args[0])
	}
	switch line[0] {
	case '+', ':':
		return line[1:], nil
	case '-':
		return "", fmt.Errorf("redis %s: %s", args[0], line[1:])
	case '$':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return "", fmt.Errorf("redis %s: unexpected reply %q", args[0], line)
		}
		buf := make([]byte, n+2) // the data and its \r\n
		if _, err := io.ReadFull(s.r, buf); err != nil {
			return "", fmt.Errorf("redis %s: %w", args[0], err)
		}
		return string(buf[:n]), nil
	}
	return "", fmt.Errorf("redis %s: unexpected reply %q", args[0], line)
}

// serverStats is what the bench reads from INFO.
type serverStats struct {
	commands int64   // total_commands_processed
	cpu      float64 // used_cpu_sys + used_cpu_user, in seconds
	cpuSys   float64 // used_cpu_sys: in the kernel (socket I/O, waking up)
	memory   int64   // used_memory, in bytes
	version  string  // redis_version
}

// stats reads the server's counters with one INFO command.
func (s *statsConn) stats() (serverStats, error) {
	info, err := s.do("INFO")
	if err != nil {
		return serverStats{}, err
	}
	var st serverStats
	var found int
	for line := range strings.Lines(info) {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		switch k {
		case "total_commands_processed":
			st.commands, err = strconv.ParseInt(v, 10, 64)
			found++
		case "used_cpu_sys", "used_cpu_user":
			var f float64
			f, err = strconv.ParseFloat(v, 64)
			st.cpu += f
			if k == "used_cpu_sys" {
				st.cpuSys = f
			}
			found++
		case "used_memory":
			st.memory, err = strconv.ParseInt(v, 10, 64)
			found++
		case "redis_version":
			st.version = v
		}
		if err != nil {
			return serverStats{}, fmt.Errorf("redis INFO: field %s: %w", k, err)
		}
	}
	if found != 4 {
		return serverStats{}, errors.New("redis INFO: total_commands_processed, used_cpu_* or used_memory missing")
	}
	return st, nil
}

// dbSize returns the number of keys of the connection's database.
func (s *statsConn) dbSize() (int64, error) {
	v, err := s.do("DBSIZE")
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(v, 10, 64)
}

// flush empties the connection's database.
func (s *statsConn) flush() error {
	_, err := s.do("FLUSHDB")
	return err
}
