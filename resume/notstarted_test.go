package resume

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// afterHello lets HELLO and WELCOME through, then blackholes the link:
// the path fails right after the gateway answered, so the client's
// confirming PING (and its first DATA) never arrive.
type afterHello struct {
	*holeConn
	writes atomic.Int32
}

func (a *afterHello) Write(p []byte) (int, error) {
	if a.writes.Add(1) > 1 {
		a.silent.Store(true)
	}
	return a.holeConn.Write(p)
}

// A path that fails right after WELCOME, for longer than the gateway's
// handshake timeout: the gateway ends the unconfirmed session
// (NOT_STARTED, no upstream dialed), and the client, which comes back
// with RESUME, opens the session again with HELLO and sends its bytes
// from byte 0. Both applications see one stream and nothing else; before
// NOT_STARTED this client got NOT_FOUND and reset its application.
func TestNotStartedSessionOpensAgain(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		cfg.ReconnectTimeout = time.Minute
		var first atomic.Bool
		var hole *afterHello
		e := memEnv(t, serverConfig(cfg), func(c net.Conn) net.Conn {
			if first.CompareAndSwap(false, true) {
				hole = &afterHello{holeConn: newHole(c)}
				return hole
			}
			return c
		})
		defer e.stop()
		g := &gate{dial: e.dial}
		c, err := Dial(context.Background(), g.Dial, "r", cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		g.set(true) // the outage outlasts the gateway's handshake timeout
		first1 := c.SessionID()
		if _, err := c.Write([]byte("before the outage;")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(cfg.HandshakeTimeout + time.Millisecond)
		synctest.Wait()
		if n := e.srv.NumSessions(); n != 0 {
			t.Fatalf("gateway holds %d sessions after the unconfirmed one's deadline", n)
		}
		time.Sleep(cfg.LivenessTimeout + time.Second) // it has unacknowledged data: liveness applies
		synctest.Wait()
		if st := c.State(); st == StateClosed || st == StateActive {
			t.Fatalf("client %v during the outage (%v)", st, c.Err())
		}
		if _, err := c.Write([]byte("during it;")); err != nil {
			t.Fatal(err)
		}
		g.set(false)
		time.Sleep(2 * time.Second) // backoff tops out at 1 s
		synctest.Wait()
		if st := c.State(); st != StateActive {
			t.Fatalf("client %v after the path came back: %v", st, c.Err())
		}
		if c.SessionID() == first1 {
			t.Fatal("the session kept the ID of the session the gateway ended")
		}
		s, err := e.srv.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if s.SessionID() != c.SessionID() {
			t.Fatalf("gateway session %v, client %v", s.SessionID(), c.SessionID())
		}
		want := []byte("before the outage;during it;")
		got := make([]byte, len(want))
		if _, err := io.ReadFull(s, got); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("gateway read %q, %v; want %q", got, err, want)
		}
		if _, err := s.Write([]byte("pong")); err != nil {
			t.Fatal(err)
		}
		got = make([]byte, 4)
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "pong" {
			t.Fatalf("client read %q, %v", got, err)
		}
		c.Reset(CodeAppReset, "done")
		hole.Close()
	})
}

// A session that has exchanged bytes is never opened again: a gateway
// (or a forged REJECT) that says NOT_STARTED for it ends it with that
// code, because the new session could not pick up where the old one was.
func TestNotStartedAfterTrafficIsFinal(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		srv, g, c, s := gatedPair(t, cfg, DefaultConfig())
		defer srv.Close()
		c.Write([]byte("x"))
		io.ReadFull(s, make([]byte, 1))
		time.Sleep(10 * cfg.AckDelay)
		synctest.Wait()
		c.s.mu.Lock()
		ok := c.s.restartable()
		c.s.mu.Unlock()
		if ok {
			t.Fatal("a session with acknowledged bytes counts as restartable")
		}
		g.set(true)
		s.Reset(frame.CodeNotStarted, "forged")
		synctest.Wait()
		if c.State() != StateClosed || !errors.Is(c.Err(), ErrNotStarted) {
			t.Fatalf("client %v, %v after RESET NOT_STARTED on a session with traffic", c.State(), c.Err())
		}
		c.Close()
		s.Close()
	})
}

// A parked client waits for its next resume attempt as a timer: between
// attempts its reconnect loop holds no goroutine (and no stack), so
// thousands of parked sessions cost their buffers and little else.
func TestRedialWaitsWithoutGoroutine(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		cfg.Strategy = Backoff{Initial: time.Second, Max: time.Second}
		srv, err := NewServer(serverConfig(cfg))
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		g := &gate{dial: func(ctx context.Context) (net.Conn, error) {
			a, b := net.Pipe()
			go srv.ServeLink(b)
			return a, nil
		}}
		synctest.Wait()
		base := runtime.NumGoroutine() // the server's own
		const n = 20
		var cs, ss []*Conn
		for range n {
			c, err := Dial(context.Background(), g.Dial, "r", cfg)
			if err != nil {
				t.Fatal(err)
			}
			s, err := srv.Accept()
			if err != nil {
				t.Fatal(err)
			}
			cs, ss = append(cs, c), append(ss, s)
		}
		synctest.Wait()
		g.set(true)
		for _, s := range ss {
			s.Kill() // the gateway ends drop their links; they park
		}
		synctest.Wait()
		time.Sleep(1500 * time.Millisecond) // one failed attempt each, then waiting
		synctest.Wait()
		if got := g.attempts(); len(got) < n {
			t.Fatalf("%d resume attempts, want at least %d", len(got), n)
		}
		for i, c := range cs {
			if st := c.State(); st != StateDisconnected {
				t.Fatalf("session %d %v while the path is down", i, st)
			}
		}
		// Both ends park in this process; neither may hold a goroutine.
		if waiting := runtime.NumGoroutine() - base; waiting >= n {
			t.Fatalf("%d goroutines for %d parked sessions: the wait holds one", waiting, n)
		}
		g.set(false)
		time.Sleep(1500 * time.Millisecond)
		synctest.Wait()
		for i, c := range cs {
			if st := c.State(); st != StateActive {
				t.Fatalf("session %d %v after the path came back", i, st)
			}
			if _, err := c.Write([]byte{byte(i)}); err != nil {
				t.Fatal(err)
			}
			b := make([]byte, 1)
			if _, err := io.ReadFull(ss[i], b); err != nil || b[0] != byte(i) {
				t.Fatalf("session %d after resume: %x %v", i, b, err)
			}
			c.Reset(CodeAppReset, "done")
			ss[i].Close()
		}
	})
}

// A flood of HELLOs that never confirm (each link closed after WELCOME)
// leaves at most maxNotStartedTombs tombstones, and the tombstone of a
// real session that ended stays: its client still gets the end code, not
// NOT_FOUND. A flooded-out one answers NOT_FOUND, one within the cap
// NOT_STARTED.
func TestUnconfirmedFloodTombstonesAreCapped(t *testing.T) {
	defer func(n int) { maxNotStartedTombs = n }(maxNotStartedTombs)
	maxNotStartedTombs = 8
	cfg := testConfig()
	cfg.HandshakeTimeout = 300 * time.Millisecond
	sc := serverConfig(cfg)
	sc.MaxUnconfirmedPerSource = 64
	g := startHGW(t, sc)

	// A real session, confirmed, then reset by its gateway application.
	real := hdial(t, g.addr, hopts{})
	rs := mustHello(t, real, "hold", 1<<20)
	g.conn(t, rs.id).Reset(CodeAppReset, "application gone")
	real.close()

	const flood = 20
	var flooded []*hsess
	for range flood {
		l := hdial(t, g.addr, hopts{})
		s, cr, err := l.hello("hold", 1<<20, 5*time.Second)
		if err != nil || cr != nil {
			t.Fatalf("flood HELLO: %v %v", err, cr)
		}
		flooded = append(flooded, s)
		l.close() // never confirmed
	}
	waitFor(t, 5*time.Second, "every unconfirmed session ended", func() bool { return g.srv.NumSessions() == 0 })
	g.srv.mu.Lock()
	notStarted, tombs := g.srv.notStarted, len(g.srv.tombs)
	g.srv.mu.Unlock()
	if notStarted != maxNotStartedTombs || tombs != maxNotStartedTombs+1 {
		t.Fatalf("%d NOT_STARTED tombstones of %d in all after %d unconfirmed HELLOs, want %d and %d",
			notStarted, tombs, flood, maxNotStartedTombs, maxNotStartedTombs+1)
	}

	answer := func(s *hsess) frame.Code {
		l := hdial(t, g.addr, hopts{})
		defer l.close()
		_, cr, err := l.resume(s, 0, 1<<20, 0)
		if err != nil || cr == nil {
			t.Fatalf("RESUME of %v: %v, %v (want a REJECT)", s.id, err, cr)
		}
		return cr.Code
	}
	if c := answer(rs); c != frame.CodeAppReset {
		t.Fatalf("the real session's client got %v, want APP_RESET", c)
	}
	// One of each kind: more failed RESUMEs from this source would get
	// THROTTLED (the failure budget), which is not what is tested here.
	var kept, dropped *hsess
	g.srv.mu.Lock()
	for _, s := range flooded {
		if g.srv.tombs[s.id] != nil {
			kept = s
		} else {
			dropped = s
		}
	}
	g.srv.mu.Unlock()
	if c := answer(kept); c != frame.CodeNotStarted {
		t.Fatalf("a flooded session with a tombstone: %v, want NOT_STARTED", c)
	}
	if c := answer(dropped); c != frame.CodeNotFound {
		t.Fatalf("a flooded session past the cap: %v, want NOT_FOUND", c)
	}
}
