package testredis

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// Command sends one command to the server over a connection of its own
// (it works during a failover, where a pooled client may be stuck), and
// returns its reply when that is one value: a status, an integer or a bulk
// string.
func (s *Server) Command(args ...string) (string, error) {
	r, err := s.command("", args...)
	if err != nil {
		return "", err
	}
	if len(r) != 1 {
		return "", fmt.Errorf("%s answered %d values, want 1: %q", args[0], len(r), r)
	}
	return r[0], nil
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
