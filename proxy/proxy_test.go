package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// Many sessions carry random data both ways while the link is reset,
// closed and blackholed in turn; every byte must come back.
func TestEchoSurvivesLinkBreaks(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	const sessions = 10
	stop := breaker(s.relay, 250*time.Millisecond)
	var wg sync.WaitGroup
	var want, rounds atomic.Uint64
	errs := make(chan error, sessions)
	for i := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// At least two rounds per session, and rounds until several
			// breaks have happened (bounded), so sessions live across breaks.
			start := time.Now()
			for round := 0; round < 2 || time.Since(start) < 1200*time.Millisecond && round < 50; round++ {
				if err := (faultnet.Echo{Seed: uint64(i*100 + round), Size: 1<<20 + int64(i)*7919, MaxWrite: 48 << 10}.Dial(s.appAddr)); err != nil {
					errs <- fmt.Errorf("session %d round %d: %w", i, round, err)
					return
				}
				want.Add(uint64(1<<20 + i*7919))
				rounds.Add(1)
			}
		}()
	}
	wg.Wait()
	breaks := stop()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if breaks < 3 {
		t.Errorf("only %d breaks hit a link; the test did not test much", breaks)
	}
	tot := s.gw.Tracker().Totals()
	ct := s.client.Tracker().Totals()
	t.Logf("breaks=%d gateway resumes=%d link failures=%d replayed=%d", breaks, tot.Resumes, tot.LinkFailures, tot.BytesReplayed)
	if ct.Resumes == 0 {
		t.Errorf("no session resumed (client totals %+v)", ct)
	}
	// (A session whose WELCOME was lost stays parked on the gateway until
	// its reconnect timeout; only the client side is sure to be empty.)
	waitFor(t, "sessions to end", 10*time.Second, func() bool { return s.client.Tracker().Len() == 0 })
	ct = s.client.Tracker().Totals()
	if ct.BytesSent != want.Load() || ct.BytesReceived != want.Load() {
		t.Errorf("client carried %d up / %d down, want %d each", ct.BytesSent, ct.BytesReceived, want.Load())
	}
	if got := testutil.ToFloat64(s.metrics.ends.WithLabelValues("client", "default", "closed")); got != float64(rounds.Load()) {
		t.Errorf("client sessions ended closed = %v, want %d", got, rounds.Load())
	}
}

// A FIN from the application reaches the upstream after all data, and the
// upstream can still answer; and the other way round.
func TestHalfClose(t *testing.T) {
	t.Run("app_first", func(t *testing.T) {
		up := testnet.TCPServer(t, func(c *net.TCPConn) {
			b, err := io.ReadAll(c) // until the app's FIN
			if err != nil {
				return
			}
			fmt.Fprintf(c, "got %d bytes ending %q", len(b), b[len(b)-3:])
			c.CloseWrite()
		})
		s := newStack(t, stackOpts{upstream: up})
		c := dialApp(t, s.appAddr)
		defer c.Close()
		c.Write(bytes.Repeat([]byte("x"), 100000))
		c.Write([]byte("end"))
		s.relay.Reset() // a break in the middle must not matter
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil {
			t.Fatal(err)
		}
		if want := `got 100003 bytes ending "end"`; string(b) != want {
			t.Fatalf("reply %q, want %q", b, want)
		}
	})
	t.Run("upstream_first", func(t *testing.T) {
		got := make(chan string, 1)
		up := testnet.TCPServer(t, func(c *net.TCPConn) {
			c.Write([]byte("hello from upstream"))
			c.CloseWrite()
			b, _ := io.ReadAll(c)
			got <- string(b)
		})
		s := newStack(t, stackOpts{upstream: up})
		c := dialApp(t, s.appAddr)
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c) // EOF proves the FIN arrived
		if err != nil || string(b) != "hello from upstream" {
			t.Fatalf("read %q, %v", b, err)
		}
		// Our direction still works after the upstream's FIN.
		s.relay.CloseConns()
		c.Write([]byte("still "))
		c.Write([]byte("talking"))
		c.CloseWrite()
		select {
		case g := <-got:
			if g != "still talking" {
				t.Fatalf("upstream got %q", g)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("upstream never saw the FIN")
		}
	})
}

// An application RST arrives as an RST at the other application, both ways.
func TestResetPropagates(t *testing.T) {
	t.Run("app_reset", func(t *testing.T) {
		upErr := make(chan error, 1)
		up := testnet.TCPServer(t, func(c *net.TCPConn) {
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err := io.Copy(io.Discard, c)
			upErr <- err
		})
		s := newStack(t, stackOpts{upstream: up})
		c := dialApp(t, s.appAddr)
		c.Write([]byte("some data"))
		waitFor(t, "session", 5*time.Second, func() bool { return s.gw.Tracker().Len() == 1 })
		c.SetLinger(0)
		c.Close()
		select {
		case err := <-upErr:
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("upstream read ended with %v, want ECONNRESET", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("upstream never saw the reset")
		}
		waitFor(t, "client app_reset end counted", 5*time.Second, func() bool {
			return testutil.ToFloat64(s.metrics.ends.WithLabelValues("client", "default", "app_reset")) == 1
		})
	})
	t.Run("upstream_reset", func(t *testing.T) {
		up := testnet.TCPServer(t, func(c *net.TCPConn) {
			buf := make([]byte, 5)
			io.ReadFull(c, buf)
			c.SetLinger(0)
		})
		s := newStack(t, stackOpts{upstream: up})
		c := dialApp(t, s.appAddr)
		defer c.Close()
		c.Write([]byte("hello"))
		testnet.ExpectReset(t, c, 10*time.Second)
	})
}

// An upstream that refuses gives the application a reset within the
// connect timeout.
func TestUpstreamRefused(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	s := newStack(t, stackOpts{upstream: dead})
	start := time.Now()
	// On loopback the reset may come before connect returns; either way
	// the application sees ECONNRESET.
	c, err := net.Dial("tcp", s.appAddr)
	if err != nil {
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatal(err)
		}
	} else {
		defer c.Close()
		testnet.ExpectReset(t, c, 5*time.Second)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("reset took %v", d)
	}
	if got := testutil.ToFloat64(s.metrics.dialErr.WithLabelValues("gateway", "default")); got != 1 {
		t.Errorf("gateway dial failures = %v, want 1", got)
	}
}

// A route the gateway does not have: the application gets a reset.
func TestUnknownRoute(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t), route: "nope"})
	// The refusal is so fast on loopback that the reset may arrive before
	// connect returns; either way the application sees ECONNRESET.
	c, err := net.Dial("tcp", s.appAddr)
	if err != nil {
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatal(err)
		}
	} else {
		defer c.Close()
		testnet.ExpectReset(t, c, 5*time.Second)
	}
	// The gateway is fine for the right route.
	s2 := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	if err := (faultnet.Echo{Seed: 1, Size: 1000}.Dial(s2.appAddr)); err != nil {
		t.Fatal(err)
	}
}

// While the link is down, the application's connection stays open and its
// data arrives after the link returns.
func TestOutageKeepsAppOpen(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	c := dialApp(t, s.appAddr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Second))
	buf := make([]byte, 5)
	c.Write([]byte("first"))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "first" {
		t.Fatalf("%q %v", buf, err)
	}
	s.relay.SetDown(true)
	s.relay.Reset()
	waitFor(t, "session parked", 5*time.Second, func() bool { return s.client.Tracker().Totals().Parked == 1 })
	c.Write([]byte("again")) // buffered while parked
	time.Sleep(300 * time.Millisecond)
	if st := s.client.Sessions(); len(st) != 1 || (st[0].State != "DISCONNECTED" && st[0].State != "RECONNECTING") {
		t.Fatalf("sessions while down: %+v", st)
	}
	s.relay.SetDown(false)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "again" {
		t.Fatalf("%q %v", buf, err)
	}
	if st := s.client.Sessions(); len(st) != 1 || st[0].Resumes < 1 || st[0].State != "ACTIVE" {
		t.Fatalf("sessions after: %+v", st)
	}
}

// The gateway's session limit refuses new sessions with a reset and a log
// line, and existing ones go on.
func TestMaxSessions(t *testing.T) {
	sc := defaultServerForTest()
	sc.MaxSessions = 1
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t), server: sc})
	c := dialApp(t, s.appAddr)
	defer c.Close()
	c.Write([]byte("x"))
	waitFor(t, "first session", 5*time.Second, func() bool { return s.gw.Tracker().Len() == 1 })
	if c2, err := net.Dial("tcp", s.appAddr); err == nil {
		defer c2.Close()
		testnet.ExpectReset(t, c2, 5*time.Second)
	} else if !errors.Is(err, syscall.ECONNRESET) { // the reset can beat connect
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil || b[0] != 'x' {
		t.Fatalf("first session broken: %v", err)
	}
}

// The status endpoint lists sessions and exports metrics.
func TestAdminListsAndExports(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	c := dialApp(t, s.appAddr)
	defer c.Close()
	c.Write([]byte("ping"))
	b := make([]byte, 4)
	io.ReadFull(c, b)
	h := s.gwAdmin(t)
	body := get(t, h, "/sessions")
	if !strings.Contains(body, `"count": 1`) || !strings.Contains(body, `"state": "ACTIVE"`) || !strings.Contains(body, `"bytes_sent": 4`) {
		t.Errorf("/sessions:\n%s", body)
	}
	m := get(t, h, "/metrics")
	for _, want := range []string{`lifeline_sessions_active{side="gateway"} 1`, `lifeline_sessions_active{side="client"} 1`,
		`lifeline_session_starts_total{route="default",side="gateway"} 1`, `lifeline_bytes_total{dir="sent",side="client"} 4`} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if got := get(t, h, "/healthz"); got != "ok\n" {
		t.Errorf("/healthz %q", got)
	}
}

// POST /sessions/{id}/goaway on the gateway moves the session to a new
// link (docs/protocol.md section 5.6) without a gap.
func TestOperatorGoAway(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	c := dialApp(t, s.appAddr)
	defer c.Close()
	c.Write([]byte("ping"))
	b := make([]byte, 4)
	io.ReadFull(c, b)
	h := s.gwAdmin(t)
	id := s.gw.Sessions()[0].ID
	if code := post(t, h, "/sessions/"+id+"/goaway"); code != http.StatusAccepted {
		t.Fatalf("goaway: HTTP %d", code)
	}
	if code := post(t, h, "/sessions/0000000000000000/goaway"); code != http.StatusNotFound {
		t.Fatalf("goaway for an unknown session: HTTP %d", code)
	}
	waitFor(t, "client moved", 5*time.Second, func() bool {
		ss := s.client.Sessions()
		return len(ss) == 1 && ss[0].Resumes == 1
	})
	if ss := s.client.Sessions(); ss[0].LinkFailures != 0 {
		t.Errorf("migration counted as %d link failures", ss[0].LinkFailures)
	}
	c.Write([]byte("pong"))
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "pong" {
		t.Fatalf("after the move: %q %v", b, err)
	}
}

func post(t *testing.T, h http.Handler, path string) int {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", path, nil))
	return rec.Code
}

// With ProxyProtocol set the upstream first reads a PROXY header naming the
// client sidecar's link address, then the application's bytes.
func TestProxyProtocolHeader(t *testing.T) {
	got := make(chan string, 1)
	up := testnet.TCPServer(t, func(c *net.TCPConn) {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 200)
		n, _ := io.ReadAtLeast(c, b, 10)
		got <- string(b[:n])
	})
	s := newStack(t, stackOpts{upstream: up, routes: []Route{{Name: "default", Upstream: up, ProxyProtocol: 1}}})
	c := dialApp(t, s.appAddr)
	defer c.Close()
	c.Write([]byte("payload"))
	select {
	case g := <-got:
		if !strings.HasPrefix(g, "PROXY TCP4 127.0.0.1 127.0.0.1 ") || !strings.Contains(g, "\r\n") {
			t.Fatalf("upstream read %q, want a PROXY v1 header first", g)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("upstream read nothing")
	}
}
