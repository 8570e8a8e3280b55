package resume

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// testConfig is DefaultConfig with short timers for tests on loopback.
func testConfig() *Config {
	c := DefaultConfig()
	c.ReconnectTimeout = 10 * time.Second
	c.LingerTimeout = 5 * time.Second
	c.Strategy = Backoff{Initial: 5 * time.Millisecond, Max: 50 * time.Millisecond, Jitter: 0.2}
	return c
}

// env is a gateway plus a way for clients to reach it.
type env struct {
	t    testing.TB
	srv  *Server
	dial DialFunc
	stop func()
}

// memEnv links client and gateway with net.Pipe; wrap may interpose on
// each client-side link.
func memEnv(t testing.TB, sc *ServerConfig, wrap func(net.Conn) net.Conn) *env {
	srv, err := NewServer(sc)
	if err != nil {
		t.Fatal(err)
	}
	dial := func(ctx context.Context) (net.Conn, error) {
		a, b := net.Pipe()
		go srv.ServeLink(b)
		if wrap != nil {
			return wrap(a), nil
		}
		return a, nil
	}
	return &env{t: t, srv: srv, dial: dial, stop: func() { srv.Close() }}
}

// tcpEnv links them over loopback TCP.
func tcpEnv(t testing.TB, sc *ServerConfig, wrap func(net.Conn) net.Conn) *env {
	srv, addr := tcpGateway(t, sc)
	dial := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		if wrap != nil {
			return wrap(c), nil
		}
		return c, nil
	}
	return &env{t: t, srv: srv, dial: dial, stop: func() { srv.Close() }}
}

func serverConfig(c *Config) *ServerConfig {
	sc := DefaultServerConfig()
	sc.Session = c
	return sc
}

// pair opens one session and returns both ends.
func (e *env) pair(cfg *Config) (client, server *Conn) {
	e.t.Helper()
	c, err := Dial(context.Background(), e.dial, "test", cfg)
	if err != nil {
		e.t.Fatalf("Dial: %v", err)
	}
	s, err := e.srv.Accept()
	if err != nil {
		e.t.Fatalf("Accept: %v", err)
	}
	return c, s
}

// cutConn closes its link after a byte budget, counting both directions,
// like a network that fails mid-frame.
type cutConn struct {
	net.Conn
	left atomic.Int64
	once sync.Once
}

func newCutConn(c net.Conn, budget int64) *cutConn {
	cc := &cutConn{Conn: c}
	cc.left.Store(budget)
	return cc
}

// spend takes up to n bytes from the budget and returns how many it got.
func (c *cutConn) spend(n int) int {
	left := c.left.Add(-int64(n))
	if left < 0 {
		return max(0, n+int(left))
	}
	return n
}

func (c *cutConn) cut() { c.once.Do(func() { c.Conn.Close() }) }

func (c *cutConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		if k := c.spend(n); k < n {
			c.cut()
			return k, net.ErrClosed
		}
	}
	return n, err
}

func (c *cutConn) Write(p []byte) (int, error) {
	k := c.spend(len(p))
	if k < len(p) {
		n, _ := c.Conn.Write(p[:k])
		c.cut()
		return n, net.ErrClosed
	}
	return c.Conn.Write(p)
}

// faultMode is how a faultConn fails once its byte budget is spent.
type faultMode int

const (
	faultClose     faultMode = iota // close: the peer reads EOF
	faultReset                      // RST: the peer reads ECONNRESET
	faultBlackhole                  // silence: nothing moves, nobody is told
	numFaultModes
)

// faultConn wraps a client-side TCP link and breaks it after a byte budget
// (counting both directions, so it breaks mid-frame), in one of the modes.
type faultConn struct {
	net.Conn
	mode   faultMode
	left   atomic.Int64
	once   sync.Once
	broken chan struct{}
	closed chan struct{}
	cOnce  sync.Once
}

func newFaultConn(c net.Conn, budget int64, mode faultMode) *faultConn {
	f := &faultConn{Conn: c, mode: mode, broken: make(chan struct{}), closed: make(chan struct{})}
	f.left.Store(budget)
	return f
}

func (f *faultConn) spend(n int) int {
	left := f.left.Add(-int64(n))
	if left < 0 {
		return max(0, n+int(left))
	}
	return n
}

func (f *faultConn) breakNow() {
	f.once.Do(func() {
		close(f.broken)
		switch f.mode {
		case faultClose:
			f.Conn.Close()
		case faultReset:
			if tc, ok := f.Conn.(*net.TCPConn); ok {
				tc.SetLinger(0)
			}
			f.Conn.Close()
		case faultBlackhole:
			// keep the socket open: the peer sees silence
		}
	})
}

func (f *faultConn) Read(p []byte) (int, error) {
	select {
	case <-f.broken:
		if f.mode == faultBlackhole {
			// Nothing arrives, but deadlines and Close work as on a
			// real socket.
			for {
				if _, err := f.Conn.Read(p); err != nil {
					return 0, err
				}
			}
		}
		return 0, net.ErrClosed
	default:
	}
	n, err := f.Conn.Read(p)
	if n > 0 {
		if k := f.spend(n); k < n {
			f.breakNow()
			if f.mode == faultBlackhole {
				// deliver what "arrived" before the path went silent
				return k, nil
			}
			return k, net.ErrClosed
		}
	}
	return n, err
}

func (f *faultConn) Write(p []byte) (int, error) {
	select {
	case <-f.broken:
		if f.mode == faultBlackhole {
			return len(p), nil // swallowed by the void
		}
		return 0, net.ErrClosed
	default:
	}
	k := f.spend(len(p))
	if k < len(p) {
		n, _ := f.Conn.Write(p[:k])
		f.breakNow()
		if f.mode == faultBlackhole {
			return len(p), nil
		}
		return n, net.ErrClosed
	}
	return f.Conn.Write(p)
}

func (f *faultConn) Close() error {
	f.cOnce.Do(func() { close(f.closed) })
	return f.Conn.Close()
}

// pingsSent is when the session's current link last sent a PING (0: never).
func pingsSent(c *Conn) int64 {
	s := c.s
	s.mu.Lock()
	defer s.unlock()
	if s.link == nil {
		return -1
	}
	return s.link.pingAt
}

// unacked is how many bytes the session has sent that its peer has not
// acknowledged yet.
func unacked(c *Conn) uint64 {
	s := c.s
	s.mu.Lock()
	defer s.unlock()
	return s.send.next - s.send.acked
}
