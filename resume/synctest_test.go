package resume

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// holeConn can go silent like a blackholed path: writes vanish, reads
// block until Close.
type holeConn struct {
	net.Conn
	silent atomic.Bool
	closed chan struct{}
	once   sync.Once
}

func newHole(c net.Conn) *holeConn { return &holeConn{Conn: c, closed: make(chan struct{})} }

func (h *holeConn) Read(p []byte) (int, error) {
	if h.silent.Load() {
		<-h.closed
		return 0, net.ErrClosed
	}
	n, err := h.Conn.Read(p)
	if h.silent.Load() {
		<-h.closed
		return 0, net.ErrClosed
	}
	return n, err
}

func (h *holeConn) Write(p []byte) (int, error) {
	if h.silent.Load() {
		return len(p), nil
	}
	return h.Conn.Write(p)
}

func (h *holeConn) Close() error {
	h.once.Do(func() { close(h.closed) })
	return h.Conn.Close()
}

// gate makes a DialFunc fail while closed, recording when it was called.
type gate struct {
	mu    sync.Mutex
	down  bool
	calls []time.Time
	dial  DialFunc
}

func (g *gate) Dial(ctx context.Context) (net.Conn, error) {
	g.mu.Lock()
	g.calls = append(g.calls, time.Now())
	down := g.down
	g.mu.Unlock()
	if down {
		return nil, errors.New("network unreachable")
	}
	return g.dial(ctx)
}

func (g *gate) set(down bool) {
	g.mu.Lock()
	g.down = down
	g.calls = nil
	g.mu.Unlock()
}

func (g *gate) attempts() []time.Time {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]time.Time(nil), g.calls...)
}

func TestLivenessDetectsBlackhole(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		var mu sync.Mutex
		var holes []*holeConn
		e := memEnv(t, serverConfig(cfg), func(c net.Conn) net.Conn {
			h := newHole(c)
			mu.Lock()
			holes = append(holes, h)
			mu.Unlock()
			return h
		})
		defer e.stop()
		c, s := e.pair(cfg)

		// An idle link stays up: PINGs and PONGs keep it alive.
		time.Sleep(30 * time.Second)
		synctest.Wait()
		if f := c.Stats().LinkFailures + s.Stats().LinkFailures; f != 0 {
			t.Fatalf("idle link failed %d times", f)
		}

		mu.Lock()
		holes[0].silent.Store(true)
		mu.Unlock()
		// Not declared dead while within the liveness timeout of the last
		// frame (which came at most one ping interval ago).
		time.Sleep(cfg.LivenessTimeout - cfg.PingInterval - time.Millisecond)
		synctest.Wait()
		if f := c.Stats().LinkFailures; f != 0 {
			t.Fatalf("declared dead after %v of silence", cfg.LivenessTimeout-cfg.PingInterval)
		}
		time.Sleep(cfg.PingInterval + 2*time.Millisecond)
		synctest.Wait()
		if f := c.Stats().LinkFailures; f != 1 {
			t.Fatalf("link failures %d after %v of silence, want 1", f, cfg.LivenessTimeout)
		}
		// The client resumes at once on a new link; the gateway's own
		// liveness check (or the resume) retires the silent link.
		if c.State() != StateActive || c.Stats().Resumes != 1 {
			t.Fatalf("client %v, %d resumes", c.State(), c.Stats().Resumes)
		}
		c.Write([]byte("after"))
		b := make([]byte, 5)
		if _, err := io.ReadFull(s, b); err != nil || string(b) != "after" {
			t.Fatalf("after resume: %q %v", b, err)
		}
		c.Reset(CodeAppReset, "done")
		s.Close()
	})
}

func TestReconnectStrategies(t *testing.T) {
	for _, tc := range []struct {
		name  string
		strat ReconnectStrategy
		check func(t *testing.T, gaps []time.Duration)
	}{
		{"fixed 5s", FixedInterval{5 * time.Second}, func(t *testing.T, gaps []time.Duration) {
			for i, g := range gaps {
				if g != 5*time.Second {
					t.Fatalf("gap %d = %v, want 5s", i, g)
				}
			}
		}},
		{"default backoff", DefaultStrategy(), func(t *testing.T, gaps []time.Duration) {
			if gaps[0] != 0 {
				t.Fatalf("first attempt after %v, want at once", gaps[0])
			}
			want := 50 * time.Millisecond
			for i, g := range gaps[1:] {
				lo, hi := time.Duration(float64(want)*0.79), time.Duration(float64(want)*1.21)
				if g < lo || g > hi {
					t.Fatalf("gap %d = %v, want %v ±20%%", i+1, g, want)
				}
				want = min(2*want, time.Second)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				cfg := DefaultConfig()
				cfg.Strategy = tc.strat
				srv, g, c, s := gatedPair(t, cfg, DefaultConfig())
				defer srv.Close()
				g.set(true)
				start := time.Now()
				c.Kill()
				time.Sleep(20 * time.Second)
				synctest.Wait()
				calls := g.attempts()
				if len(calls) < 4 {
					t.Fatalf("%d attempts in 20s", len(calls))
				}
				var gaps []time.Duration
				prev := start
				for _, at := range calls {
					gaps = append(gaps, at.Sub(prev))
					prev = at
				}
				tc.check(t, gaps)
				if st := c.State(); st != StateDisconnected && st != StateReconnecting {
					t.Fatalf("state %v while the network is down", st)
				}
				g.set(false)
				time.Sleep(6 * time.Second)
				synctest.Wait()
				if c.State() != StateActive {
					t.Fatalf("state %v after the network returned", c.State())
				}
				c.Reset(CodeAppReset, "done")
				s.Close()
			})
		})
	}
}

func TestReconnectTimeoutExpires(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig() // 60 s
		srv, g, c, s := gatedPair(t, cfg, DefaultConfig())
		defer srv.Close()
		g.set(true)
		c.Kill()
		time.Sleep(60*time.Second - time.Millisecond)
		synctest.Wait()
		if c.State() == StateClosed || s.State() != StateDisconnected {
			t.Fatalf("before the timeout: client %v, gateway %v", c.State(), s.State())
		}
		if srv.NumSessions() != 1 {
			t.Fatal("parked session not held")
		}
		time.Sleep(2 * time.Millisecond)
		synctest.Wait()
		for name, x := range map[string]*Conn{"client": c, "gateway": s} {
			if x.State() != StateClosed || !errors.Is(x.Err(), ErrTimeout) {
				t.Fatalf("%s after the timeout: %v, %v", name, x.State(), x.Err())
			}
		}
		if srv.NumSessions() != 0 || srv.MemoryInUse() != 0 {
			t.Fatalf("after expiry: %d sessions, %d bytes held", srv.NumSessions(), srv.MemoryInUse())
		}
		c.Close()
		s.Close()
	})
}

// TestDisconnectedQueueLimit checks the queue rule of protocol.md §9: while
// disconnected the larger limit applies; after the resume, the normal limit
// returns once the buffered data has drained to 80% of it.
func TestDisconnectedQueueLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		cfg.BufferSize = 128 << 10
		cfg.DisconnectedBufferSize = 512 << 10
		srv, g, c, s := gatedPair(t, cfg, cfg)
		defer srv.Close()
		g.set(true)
		c.Kill()
		synctest.Wait()

		// 400 KiB fit while disconnected (the normal limit is 128 KiB).
		if _, err := c.Write(make([]byte, 400<<10)); err != nil {
			t.Fatal(err)
		}
		// More than 512 KiB does not: the Write blocks (backpressure).
		wrote := make(chan error, 1)
		go func() { _, err := c.Write(make([]byte, 200<<10)); wrote <- err }()
		synctest.Wait()
		select {
		case err := <-wrote:
			t.Fatalf("Write past the disconnected limit returned %v", err)
		default:
		}
		if got := c.Stats().Buffered; got != 512<<10 {
			t.Fatalf("buffered %d, want exactly the disconnected limit", got)
		}

		// Resume; the gateway's application reads slowly.
		g.set(false)
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if c.State() != StateActive {
			t.Fatalf("state %v", c.State())
		}
		c.s.mu.Lock()
		elevated, limit := c.s.send.elevated, c.s.sendLimit()
		c.s.unlock()
		if !elevated || limit != 512<<10 {
			t.Fatalf("right after resume: elevated %v limit %d; want the larger limit until drained", elevated, limit)
		}
		// Read until the client's buffer is at most 80% of 128 KiB.
		buf := make([]byte, 16<<10)
		total := 0
		for c.Stats().Buffered > 128<<10*8/10 {
			n, err := s.Read(buf)
			if err != nil {
				t.Fatal(err)
			}
			total += n
			time.Sleep(10 * time.Millisecond)
			synctest.Wait()
		}
		c.s.mu.Lock()
		elevated, limit = c.s.send.elevated, c.s.sendLimit()
		c.s.unlock()
		if elevated || limit != 128<<10 {
			t.Fatalf("after draining to 80%%: elevated %v limit %d", elevated, limit)
		}
		go io.Copy(io.Discard, s)
		if err := <-wrote; err != nil {
			t.Fatal(err)
		}
		c.Reset(CodeAppReset, "done")
		s.Close()
	})
}

// gatedPair opens a session over net.Pipe links whose dialing a gate
// controls (inside a synctest bubble: fake time, no real sockets).
func gatedPair(t *testing.T, cfg, serverCfg *Config) (*Server, *gate, *Conn, *Conn) {
	t.Helper()
	srv, err := NewServer(serverConfig(serverCfg))
	if err != nil {
		t.Fatal(err)
	}
	g := &gate{dial: func(ctx context.Context) (net.Conn, error) {
		a, b := net.Pipe()
		go srv.ServeLink(b)
		return a, nil
	}}
	c, err := Dial(context.Background(), g.Dial, "r", cfg)
	if err != nil {
		t.Fatal(err)
	}
	s, err := srv.Accept()
	if err != nil {
		t.Fatal(err)
	}
	return srv, g, c, s
}
