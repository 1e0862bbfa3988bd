package batchq_test

// The fault harness's TCP proxy (see faultharness_test.go): cutProxy cuts
// the connections between clients and Redis on demand.

import (
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

// ---------------------------------------------------------------------------
// A proxy that cuts connections.

// cutProxy forwards loopback TCP connections to a server and cuts them on
// demand: both ends closed mid-stream, half of the time with a reset
// (SO_LINGER 0) rather than a FIN.
type cutProxy struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup

	mu     sync.Mutex
	conns  map[*proxyConn]struct{}
	closed bool
}

type proxyConn struct {
	client, server net.Conn
	once           sync.Once
}

func (pc *proxyConn) close(reset bool) {
	pc.once.Do(func() {
		if reset {
			pc.client.(*net.TCPConn).SetLinger(0)
			pc.server.(*net.TCPConn).SetLinger(0)
		}
		pc.client.Close()
		pc.server.Close()
	})
}

func startCutProxy(t testing.TB, target string) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	p := &cutProxy{ln: ln, target: target, conns: make(map[*proxyConn]struct{})}
	p.wg.Go(p.accept)
	t.Cleanup(p.close)
	return p
}

func (p *cutProxy) addr() string { return p.ln.Addr().String() }

func (p *cutProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		s, err := net.DialTimeout("tcp", p.target, time.Second)
		if err != nil {
			c.Close()
			continue
		}
		pc := &proxyConn{client: c, server: s}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			pc.close(false)
			return
		}
		p.conns[pc] = struct{}{}
		p.mu.Unlock()
		p.wg.Go(func() { io.Copy(s, c); p.drop(pc) })
		p.wg.Go(func() { io.Copy(c, s); p.drop(pc) })
	}
}

func (p *cutProxy) drop(pc *proxyConn) {
	pc.close(false)
	p.mu.Lock()
	delete(p.conns, pc)
	p.mu.Unlock()
}

// cut closes each live connection with probability frac, and returns how
// many it closed.
func (p *cutProxy) cut(frac float64) int {
	p.mu.Lock()
	var victims []*proxyConn
	for pc := range p.conns {
		if rand.Float64() < frac {
			victims = append(victims, pc)
		}
	}
	p.mu.Unlock()
	for _, pc := range victims {
		pc.close(rand.IntN(2) == 0)
	}
	return len(victims)
}

func (p *cutProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.cut(1)
	p.wg.Wait()
}
