package resume

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
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

// Close on a silent path is lost like everything else: the peer sees
// no FIN (its end closes when the peer gives up on the link).
func (h *holeConn) Close() error {
	h.once.Do(func() { close(h.closed) })
	if h.silent.Load() {
		return nil
	}
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

// holes returns a wrap function for memEnv that makes every client link a
// holeConn, and a way to get the n-th one.
func holes() (wrap func(net.Conn) net.Conn, nth func(int) *holeConn) {
	var mu sync.Mutex
	var hs []*holeConn
	wrap = func(c net.Conn) net.Conn {
		h := newHole(c)
		mu.Lock()
		hs = append(hs, h)
		mu.Unlock()
		return h
	}
	nth = func(i int) *holeConn {
		mu.Lock()
		defer mu.Unlock()
		return hs[i]
	}
	return wrap, nth
}

// holedPair is a session over memEnv links that hole(i) can silence (the
// i-th link dialled), settled in the bubble. The caller stops e.
func holedPair(t *testing.T, cfg *Config) (e *env, c, s *Conn, hole func(int) *holeConn) {
	t.Helper()
	wrap, hole := holes()
	e = memEnv(t, serverConfig(cfg), wrap)
	c, s = e.pair(cfg)
	synctest.Wait()
	return e, c, s, hole
}

// A busy link (data sent, not acknowledged) on a path that goes silent is
// declared dead LivenessTimeout after the last frame from the peer, on
// both sides, and the client resumes on a new link.
func TestLivenessBusyLinkBlackholed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		e, c, s, hole := holedPair(t, cfg)
		defer e.stop()

		hole(0).silent.Store(true)
		c.Write([]byte("lost in the hole"))
		// Not dead while within the liveness timeout of the last frame.
		time.Sleep(cfg.LivenessTimeout - time.Millisecond)
		synctest.Wait()
		if f := c.Stats().LinkFailures; f != 0 {
			t.Fatalf("declared dead after %v of silence", cfg.LivenessTimeout-time.Millisecond)
		}
		time.Sleep(2 * time.Millisecond)
		synctest.Wait()
		if f := c.Stats().LinkFailures; f != 1 {
			t.Fatalf("link failures %d after %v of silence with data in flight, want 1", f, cfg.LivenessTimeout)
		}
		if c.State() != StateActive || c.Stats().Resumes != 1 {
			t.Fatalf("client %v, %d resumes", c.State(), c.Stats().Resumes)
		}
		b := make([]byte, 16)
		if _, err := io.ReadFull(s, b); err != nil || string(b) != "lost in the hole" {
			t.Fatalf("after resume: %q %v", b, err)
		}
		c.Reset(CodeAppReset, "done")
		s.Close()
	})
}

// A client that sent a request and waits for the answer (its DATA was
// acknowledged, nothing is outstanding) still finds a path that dies under
// it within the liveness timeout: a link that sent DATA within the last
// AttentionWindow counts as busy.
func TestLivenessAwaitingAnswerBlackholed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		e, c, s, hole := holedPair(t, cfg)
		defer e.stop()
		c.Write([]byte("request"))
		if _, err := io.ReadFull(s, make([]byte, 7)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond) // the ACK is back: nothing outstanding
		synctest.Wait()
		hole(0).silent.Store(true)
		start := time.Now()
		bound := cfg.PingInterval + cfg.LivenessTimeout
		time.Sleep(bound)
		synctest.Wait()
		if f := c.Stats().LinkFailures; f != 1 {
			t.Fatalf("client waiting for an answer: %d link failures %v after the path died, want 1 (bound %v)", f, time.Since(start), bound)
		}
		c.Reset(CodeAppReset, "done")
		s.Reset(CodeAppReset, "done")
	})
}

// On a PING-probed link the client's attention window ends one PING after
// the answer: a client whose requests are answered sends one PING per
// answer, PingInterval after its last bytes, and none once it is answered
// (TestAnswerCutMidwayIsFound says why the one). A request left
// unanswered makes it ping every PingInterval until the answer. The
// gateway, which cannot know that nobody waits for its answer, pings
// through its window and stops at its end.
func TestAttentionEndsOnePingAfterTheAnswer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		e := memEnv(t, serverConfig(cfg), nil)
		defer e.stop()
		c, s := e.pair(cfg)
		synctest.Wait()
		time.Sleep(cfg.PingInterval) // past the first PING and its PONG
		synctest.Wait()
		sp0 := pingsSent(s)
		// onePingAfter checks that the client's last PING came
		// PingInterval after the last frame it received at (the answer,
		// or the gateway's ACK of the request, AckDelay after it), and
		// none since.
		onePingAfter := func(what string, at time.Time) {
			t.Helper()
			if p, want := pingsSent(c), at.Add(cfg.PingInterval).UnixNano(); p < want || p > want+int64(10*time.Millisecond) {
				t.Fatalf("%s: the client's last PING %v after it, want one after %v", what, time.Duration(p-at.UnixNano()), cfg.PingInterval)
			}
		}
		for i := range 5 {
			requested := time.Now()
			roundTrip(t, c, s, fmt.Sprintf("request %d", i))
			time.Sleep(10 * time.Millisecond) // the upstream thinks
			roundTrip(t, s, c, fmt.Sprintf("answer %d", i))
			last := time.Now()
			if acked := requested.Add(cfg.AckDelay); acked.After(last) {
				last = acked
			}
			time.Sleep(3 * time.Second)
			synctest.Wait()
			onePingAfter(fmt.Sprintf("answer %d", i), last)
		}
		cp := pingsSent(c)
		time.Sleep(AttentionWindow)
		synctest.Wait()
		if p := pingsSent(c); p != cp {
			t.Fatalf("the client pinged again after its answers were confirmed (%d, was %d)", p, cp)
		}
		sp1 := pingsSent(s)
		if sp1 <= sp0 {
			t.Fatalf("gateway sent no PING in its attention window (last at %d, was %d)", sp1, sp0)
		}
		time.Sleep(5 * cfg.PingInterval)
		synctest.Wait()
		if sp := pingsSent(s); sp != sp1 {
			t.Fatalf("gateway pinged past its attention window (%d, was %d)", sp, sp1)
		}

		// Unanswered: the client pings within PingInterval of silence
		// (the last frame it gets is the gateway's ACK of the request,
		// AckDelay after it), and again after the next; the gateway
		// does not.
		roundTrip(t, c, s, "unanswered")
		sent := time.Now()
		within := cfg.AckDelay + cfg.PingInterval + 10*time.Millisecond
		time.Sleep(within)
		synctest.Wait()
		p1 := pingsSent(c)
		if p1 <= sent.UnixNano() {
			t.Fatalf("client waiting for an answer sent no PING within %v", within)
		}
		time.Sleep(cfg.PingInterval)
		synctest.Wait()
		if p2 := pingsSent(c); p2 <= p1 {
			t.Fatalf("client waiting for an answer: no second PING (last %d)", p2)
		}
		roundTrip(t, s, c, "answer")
		answered := time.Now()
		time.Sleep(5 * cfg.PingInterval)
		synctest.Wait()
		onePingAfter("the late answer", answered)
		if st := c.Stats(); st.LinkFailures != 0 || st.State != StateActive {
			t.Fatalf("client: %+v", st)
		}
		c.Reset(CodeAppReset, "done")
		s.Reset(CodeAppReset, "done")
	})
}

// An idle link on a path that goes silent costs nothing until the client's
// keepalive: its PING makes the link busy, and it is declared dead
// LivenessTimeout later. The gateway, whose client no longer pings, probes
// after twice the keepalive and parks the session a LivenessTimeout later.
func TestLivenessIdleLinkBlackholed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		sc := serverConfig(cfg)
		wrap, hole := holes()
		e := memEnv(t, sc, wrap)
		defer e.stop()
		cc := *cfg
		cc.ReconnectTimeout = 5 * time.Minute
		g := &gate{dial: e.dial}
		c, err := Dial(context.Background(), g.Dial, "r", &cc)
		if err != nil {
			t.Fatal(err)
		}
		s, _ := e.srv.Accept()
		synctest.Wait()
		g.set(true) // the path stays down: no resume hides the gateway's detection
		hole(0).silent.Store(true)
		start := time.Now()

		// The last frame the client got was at start at the latest.
		bound := cfg.KeepaliveInterval + cfg.LivenessTimeout
		time.Sleep(bound - 2*time.Millisecond)
		synctest.Wait()
		if f := c.Stats().LinkFailures; f != 0 {
			t.Fatalf("idle client link declared dead after %v", time.Since(start))
		}
		time.Sleep(10 * time.Millisecond)
		synctest.Wait()
		if f := c.Stats().LinkFailures; f != 1 {
			t.Fatalf("idle client link: %d failures after %v, want 1 within keepalive+liveness %v", f, time.Since(start), bound)
		}
		gbound := 2*cfg.KeepaliveInterval + cfg.LivenessTimeout
		time.Sleep(gbound - time.Since(start) - 2*time.Millisecond)
		synctest.Wait()
		if st := s.State(); st != StateActive {
			t.Fatalf("gateway %v after %v, before its bound", st, time.Since(start))
		}
		time.Sleep(10 * time.Millisecond)
		synctest.Wait()
		if st := s.State(); st != StateDisconnected {
			t.Fatalf("gateway %v after %v, want DISCONNECTED within 2*keepalive+liveness %v", st, time.Since(start), gbound)
		}
		c.Reset(CodeAppReset, "done")
		s.Reset(CodeAppReset, "done")
	})
}

// The whole path goes down under many sessions, some busy and some idle:
// each is found within its own bound, and every one resumes when the path
// returns.
func TestLivenessWholePathDown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		cfg.ReconnectTimeout = 5 * time.Minute // the idle ones take keepalive+liveness
		wrap, hole := holes()
		e := memEnv(t, serverConfig(cfg), wrap)
		defer e.stop()
		g := &gate{dial: e.dial}
		const n = 8
		var cs, ss []*Conn
		for i := 0; i < n; i++ {
			c, err := Dial(context.Background(), g.Dial, "r", cfg)
			if err != nil {
				t.Fatal(err)
			}
			s, _ := e.srv.Accept()
			cs, ss = append(cs, c), append(ss, s)
		}
		synctest.Wait()
		g.set(true)
		for i := 0; i < n; i++ {
			hole(i).silent.Store(true)
		}
		for i := 0; i < n; i += 2 { // the even ones are busy
			cs[i].Write([]byte{byte(i)})
		}
		time.Sleep(cfg.LivenessTimeout + time.Millisecond)
		synctest.Wait()
		for i, c := range cs {
			want := 0
			if i%2 == 0 {
				want = 1
			}
			if f := c.Stats().LinkFailures; f != want {
				t.Fatalf("session %d: %d failures after the liveness timeout, want %d", i, f, want)
			}
		}
		time.Sleep(cfg.KeepaliveInterval)
		synctest.Wait()
		for i, c := range cs {
			if f := c.Stats().LinkFailures; f != 1 {
				t.Fatalf("session %d: %d failures after keepalive+liveness, want 1", i, f)
			}
		}
		g.set(false)
		time.Sleep(2 * time.Second) // backoff tops out at 1 s
		synctest.Wait()
		for i, c := range cs {
			if st := c.State(); st != StateActive {
				t.Fatalf("session %d %v after the path came back", i, st)
			}
			c.Write([]byte{0xee})
		}
		for i, s := range ss {
			want := []byte{0xee}
			if i%2 == 0 {
				want = []byte{byte(i), 0xee}
			}
			got := make([]byte, len(want))
			if _, err := io.ReadFull(s, got); err != nil || string(got) != string(want) {
				t.Fatalf("session %d after resume: %x %v, want %x", i, got, err, want)
			}
		}
		for i := range cs {
			cs[i].Reset(CodeAppReset, "done")
			ss[i].Close()
		}
	})
}

// countConn counts the bytes and writes on the client end of a link.
type countConn struct {
	net.Conn
	writes, wbytes, rbytes atomic.Int64
}

func (c *countConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	c.wbytes.Add(int64(len(p)))
	return c.Conn.Write(p)
}

func (c *countConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.rbytes.Add(int64(n))
	return n, err
}

// An idle session costs one PING (client) and one PONG (gateway) per
// KeepaliveInterval: it keeps NAT bindings, and nothing else is sent.
func TestLivenessIdleKeepaliveCadence(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		var cc *countConn
		e := memEnv(t, serverConfig(cfg), func(c net.Conn) net.Conn {
			cc = &countConn{Conn: c}
			return cc
		})
		defer e.stop()
		c, s := e.pair(cfg)
		time.Sleep(time.Second) // the first PING and its PONG
		synctest.Wait()
		w0, wb0, rb0 := cc.writes.Load(), cc.wbytes.Load(), cc.rbytes.Load()
		const periods = 8
		time.Sleep(periods * cfg.KeepaliveInterval)
		synctest.Wait()
		const pingLen = 4 + 8 // header and u64
		if w, wb := cc.writes.Load()-w0, cc.wbytes.Load()-wb0; w != periods || wb != periods*pingLen {
			t.Fatalf("client sent %d writes, %d bytes in %d keepalive intervals; want %d PINGs of %d bytes", w, wb, periods, periods, pingLen)
		}
		if rb := cc.rbytes.Load() - rb0; rb != periods*pingLen {
			t.Fatalf("gateway sent %d bytes in %d keepalive intervals; want %d PONGs of %d bytes (and no PING of its own)", rb, periods, periods, pingLen)
		}
		if f := c.Stats().LinkFailures + s.Stats().LinkFailures; f != 0 {
			t.Fatalf("idle link failed %d times", f)
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

// countHandler counts log records by level.
type countHandler struct {
	mu sync.Mutex
	n  map[slog.Level]int
}

func (h *countHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.n[r.Level]++
	h.mu.Unlock()
	return nil
}
func (h *countHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countHandler) WithGroup(string) slog.Handler      { return h }

func (h *countHandler) count(l slog.Level) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n[l]
}

// A long outage does not flood the logs: a reconnecting client logs its
// first failed attempt and then a summary every 30 s at info, every
// attempt at debug (about 120 attempts in two minutes).
func TestRedialLogsAreQuiet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		cfg.ReconnectTimeout = 10 * time.Minute
		e := memEnv(t, serverConfig(cfg), nil)
		defer e.stop()
		g := &gate{dial: e.dial}
		h := &countHandler{n: map[slog.Level]int{}}
		cc := *cfg
		cc.Logger = slog.New(h)
		c, err := Dial(context.Background(), g.Dial, "r", &cc)
		if err != nil {
			t.Fatal(err)
		}
		s, _ := e.srv.Accept()
		synctest.Wait()
		g.set(true)
		info0 := h.count(slog.LevelInfo)
		c.Kill()
		time.Sleep(2 * time.Minute)
		synctest.Wait()
		attempts := len(g.attempts())
		info := h.count(slog.LevelInfo) - info0
		if attempts < 60 {
			t.Fatalf("%d attempts in two minutes: the test proves nothing", attempts)
		}
		// link lost, first attempt's two transitions, four summaries.
		if info > 8 {
			t.Fatalf("%d info lines for %d redial attempts in two minutes, want at most 8", info, attempts)
		}
		if d := h.count(slog.LevelDebug); d < attempts {
			t.Fatalf("%d debug lines for %d attempts", d, attempts)
		}
		c.Reset(CodeAppReset, "done")
		s.Reset(CodeAppReset, "done")
	})
}

// A path that goes silent while an answer is on its way, after its first
// bytes reached the client: the client's watch does not end at those
// bytes, so it finds the path dead within PingInterval + LivenessTimeout
// of them, resumes, and the rest arrives, byte-exact.
func TestAnswerCutMidwayIsFound(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		e, c, s, hole := holedPair(t, cfg)
		defer e.stop()
		time.Sleep(cfg.PingInterval) // past the first PING and its PONG
		synctest.Wait()
		roundTrip(t, c, s, "request")
		roundTrip(t, s, c, "the answer's first part")
		for i := 0; unacked(c) != 0 || unacked(s) != 0; i++ { // the delayed ACKs
			if i == 100 {
				t.Fatalf("not acknowledged after 1 s: client %d, gateway %d bytes", unacked(c), unacked(s))
			}
			time.Sleep(10 * time.Millisecond)
			synctest.Wait()
		}
		hole(0).silent.Store(true)
		cut := time.Now()
		rest := "and the rest of it, sent into the silence"
		if _, err := s.Write([]byte(rest)); err != nil {
			t.Fatal(err)
		}
		got := make(chan string, 1)
		go func() {
			b := make([]byte, len(rest))
			if _, err := io.ReadFull(c, b); err != nil {
				got <- err.Error()
				return
			}
			got <- string(b)
		}()
		time.Sleep(cfg.PingInterval + cfg.LivenessTimeout + 2*time.Second) // and a redial
		synctest.Wait()
		st := c.Stats()
		if st.LinkFailures != 1 || st.Resumes != 1 {
			t.Fatalf("%v after the path went silent: client link failures %d, resumes %d; want 1, 1", time.Since(cut), st.LinkFailures, st.Resumes)
		}
		select {
		case g := <-got:
			if g != rest {
				t.Fatalf("client read %q after the resume, want %q", g, rest)
			}
		default:
			t.Fatal("the rest of the answer not delivered after the resume")
		}
		c.Reset(CodeAppReset, "done")
		s.Reset(CodeAppReset, "done")
	})
}

// frameCounter counts the frames of one direction of a link by type,
// parsing the byte stream as it passes (preamble first if preamble).
type frameCounter struct {
	mu       sync.Mutex
	skip     int // preamble or payload bytes still to pass
	hdr      []byte
	counts   map[frame.Type]int
	badFrame error
}

func newFrameCounter(preamble bool) *frameCounter {
	fc := &frameCounter{counts: map[frame.Type]int{}}
	if preamble {
		fc.skip = frame.PreambleLen
	}
	return fc
}

func (fc *frameCounter) feed(p []byte) {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	for len(p) > 0 {
		if fc.skip > 0 {
			k := min(fc.skip, len(p))
			fc.skip -= k
			p = p[k:]
			continue
		}
		k := min(frame.HeaderLen-len(fc.hdr), len(p))
		fc.hdr = append(fc.hdr, p[:k]...)
		p = p[k:]
		if len(fc.hdr) < frame.HeaderLen {
			return
		}
		h, err := frame.ParseHeader(fc.hdr)
		if err != nil && fc.badFrame == nil {
			fc.badFrame = err
		}
		fc.counts[h.Type]++
		fc.skip, fc.hdr = h.Len, fc.hdr[:0]
	}
}

func (fc *frameCounter) count(ty frame.Type) int {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	return fc.counts[ty]
}

// frameCountConn counts the frames the client end of a link writes and
// reads.
type frameCountConn struct {
	net.Conn
	out, in *frameCounter
}

func (c *frameCountConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.out.feed(p[:n])
	return n, err
}

func (c *frameCountConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.in.feed(p[:n])
	return n, err
}

// A hostile gateway that never pings and answers a request by dripping
// one byte at a time, each just over the client's PingInterval after the
// last, holds the client in its attention window for as long as it drips: every byte is an answer that the
// client confirms with one PING, PingInterval later. That is the most a
// gateway can make the client ping: once per byte and at most once per
// PingInterval, never faster (a faster drip keeps the link from ever
// going silent for PingInterval, and the client does not ping at all).
// The link never fails, and the bytes arrive in order.
func TestDripFeedingGatewayBoundsClientPings(t *testing.T) {
	for _, drip := range []time.Duration{300 * time.Millisecond, 1050 * time.Millisecond, 2500 * time.Millisecond} {
		t.Run(drip.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				cfg := DefaultConfig()
				// The gateway's own probes would hide the client's: it
				// never pings (its idle probe is the client's business).
				gcfg := DefaultConfig()
				gcfg.PingInterval, gcfg.LivenessTimeout, gcfg.KeepaliveInterval = time.Hour, 2*time.Hour, 0
				var cc *frameCountConn
				e := memEnv(t, serverConfig(gcfg), func(c net.Conn) net.Conn {
					cc = &frameCountConn{Conn: c, out: newFrameCounter(true), in: newFrameCounter(false)}
					return cc
				})
				defer e.stop()
				c, s := e.pair(cfg)
				time.Sleep(time.Second) // the client's first PING and its PONG
				synctest.Wait()
				// A request opens the client's attention window; every
				// byte of the answer then asks for a confirmation.
				roundTrip(t, c, s, "request")
				got := make(chan []byte, 1)
				const drips = 20
				go func() {
					b := make([]byte, drips)
					n, _ := io.ReadFull(c, b)
					got <- b[:n]
				}()
				p0 := cc.out.count(frame.TypePing)
				start := time.Now()
				var last time.Time
				for i := range drips {
					if _, err := s.Write([]byte{byte('a' + i)}); err != nil {
						t.Fatal(err)
					}
					last = time.Now()
					time.Sleep(drip)
				}
				// Past the PING that confirms the last byte.
				time.Sleep(cfg.PingInterval + 10*time.Millisecond)
				synctest.Wait()
				elapsed := time.Since(start)
				pings := cc.out.count(frame.TypePing) - p0
				if b := <-got; string(b) != "abcdefghijklmnopqrst" {
					t.Fatalf("client read %q", b)
				}
				if gp := cc.in.count(frame.TypePing); gp != 0 {
					t.Fatalf("the gateway sent %d PINGs: the test does not show the client's own", gp)
				}
				perInterval := int(elapsed / cfg.PingInterval)
				t.Logf("drip every %v: %d bytes, %d client PINGs in %v", drip, drips, pings, elapsed)
				if pings > min(drips, perInterval)+1 {
					t.Fatalf("client sent %d PINGs for %d bytes in %v: more than one per byte and per PingInterval (%v)", pings, drips, elapsed, cfg.PingInterval)
				}
				// Each byte of a slow answer is confirmed, however late.
				if drip > cfg.PingInterval && pings < drips-1 {
					t.Fatalf("client sent %d PINGs for %d bytes %v apart: it stopped confirming answers", pings, drips, drip)
				}
				// And the window does end at the last one: no PING until
				// the keepalive, KeepaliveInterval after that PING's PONG.
				p1 := cc.out.count(frame.TypePing)
				time.Sleep(time.Until(last.Add(cfg.PingInterval + cfg.KeepaliveInterval - 100*time.Millisecond)))
				synctest.Wait()
				if p := cc.out.count(frame.TypePing); p != p1 {
					t.Fatalf("client pinged %d times after its last answer was confirmed", p-p1)
				}
				if cc.out.badFrame != nil || cc.in.badFrame != nil {
					t.Fatalf("unparsable frames: %v, %v", cc.out.badFrame, cc.in.badFrame)
				}
				if f := c.Stats().LinkFailures; f != 0 {
					t.Fatalf("client link failed %d times", f)
				}
				c.Reset(CodeAppReset, "done")
				s.Close()
			})
		})
	}
}
