package proxy

import (
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/resume"
)

// taggedEcho is an upstream that first sends its tag, then echoes.
func taggedEcho(t *testing.T, tag string) string {
	return testnet.TCPServer(t, func(c *net.TCPConn) {
		c.Write([]byte(tag))
		io.Copy(c, c)
	})
}

// openTagged opens a session through the client and returns the app
// connection and the tag its upstream sent.
func openTagged(t *testing.T, addr string) (*net.TCPConn, string) {
	t.Helper()
	c := dialApp(t, addr)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("reading the upstream's tag: %v", err)
	}
	return c, string(b)
}

func echoes(t *testing.T, c *net.TCPConn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, len(msg))
	if _, err := io.ReadFull(c, b); err != nil || string(b) != msg {
		t.Fatalf("echo: %q, %v; want %q", b, err, msg)
	}
}

// reconnectTimeoutOf is the negotiated reconnect timeout of the gateway
// session with the given route (the only one on it).
func reconnectTimeoutOf(t *testing.T, g *Gateway, n int) time.Duration {
	t.Helper()
	var list []SessionInfo
	waitFor(t, "the gateway to take the session", 5*time.Second, func() bool { list = g.Sessions(); return len(list) >= n })
	x := g.tracker.find(list[n-1].ID)
	if x == nil {
		t.Fatalf("session %s not tracked", list[n-1].ID)
	}
	return x.conn.ReconnectTimeout()
}

// A reload changes the upstream and session settings of sessions opened
// after it; the session opened before keeps its upstream, its settings
// and its bytes, through a link break too. A bad table is refused and the
// old one kept.
func TestGatewayReload(t *testing.T) {
	a, b := taggedEcho(t, "A"), taggedEcho(t, "B")
	rsA := fastConfig()
	rsA.ReconnectTimeout = 11 * time.Second
	s := newStack(t, stackOpts{routes: []Route{{Name: "default", Upstream: a, ConnectTimeout: time.Second, Session: rsA}}})

	old, tag := openTagged(t, s.appAddr)
	defer old.Close()
	if tag != "A" {
		t.Fatalf("first session reached %q, want A", tag)
	}
	if got := reconnectTimeoutOf(t, s.gw, 1); got != 11*time.Second {
		t.Fatalf("first session's reconnect timeout %v, want 11s", got)
	}

	rsB := fastConfig()
	rsB.ReconnectTimeout = 7 * time.Second
	if err := s.gw.Reload([]Route{{Name: "default", Upstream: b, Session: rsB}, {Name: "other", Upstream: a}}); err != nil {
		t.Fatal(err)
	}
	if r := s.gw.Routes(); r["default"].Upstream != b || r["default"].ConnectTimeout != DefaultConnectTimeout || r["other"].Upstream != a {
		t.Fatalf("routes after reload: %+v", r)
	}

	fresh, tag := openTagged(t, s.appAddr)
	defer fresh.Close()
	if tag != "B" {
		t.Fatalf("session after the reload reached %q, want B", tag)
	}
	if got := reconnectTimeoutOf(t, s.gw, 2); got != 7*time.Second {
		t.Errorf("new session's reconnect timeout %v, want 7s", got)
	}

	// The old session still goes to A, also after a resume.
	echoes(t, old, "before the break")
	s.relay.Reset()
	echoes(t, old, "after the break")
	echoes(t, fresh, "the new one too")
	if got := reconnectTimeoutOf(t, s.gw, 1); got != 11*time.Second {
		t.Errorf("old session's reconnect timeout after the reload %v, want 11s still", got)
	}

	for name, bad := range map[string][]Route{
		"empty":        nil,
		"bad upstream": {{Name: "default", Upstream: "nowhere"}},
		"duplicate":    {{Name: "default", Upstream: a}, {Name: "default", Upstream: b}},
		"bad session":  {{Name: "default", Upstream: a, Session: &resume.Config{}}},
	} {
		if err := s.gw.Reload(bad); err == nil {
			t.Errorf("%s: Reload accepted it", name)
		}
	}
	third, tag := openTagged(t, s.appAddr)
	defer third.Close()
	if tag != "B" {
		t.Errorf("after refused reloads a new session reached %q, want B (the table kept)", tag)
	}

	// A route removed: new sessions on it are refused, live ones go on.
	if err := s.gw.Reload([]Route{{Name: "other", Upstream: a}}); err != nil {
		t.Fatal(err)
	}
	// The reset may come before the connect returns (loopback).
	if gone, err := net.DialTimeout("tcp", s.appAddr, 2*time.Second); err == nil {
		defer gone.Close()
		testnet.ExpectReset(t, gone, 10*time.Second)
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("dial: %v", err)
	}
	echoes(t, old, "still here")
	echoes(t, fresh, "and here")
}

// A client listener's route and session settings change for the
// application connections it accepts after a reload.
func TestClientReload(t *testing.T) {
	a, b := taggedEcho(t, "A"), taggedEcho(t, "B")
	s := newStack(t, stackOpts{routes: []Route{{Name: "default", Upstream: a}, {Name: "second", Upstream: b}}})

	old, tag := openTagged(t, s.appAddr)
	defer old.Close()
	if tag != "A" {
		t.Fatalf("first session reached %q, want A", tag)
	}
	cfg := fastConfig()
	cfg.ReconnectTimeout = 9 * time.Second
	if err := s.client.Reload(s.appAddr, "second", cfg); err != nil {
		t.Fatal(err)
	}
	fresh, tag := openTagged(t, s.appAddr)
	defer fresh.Close()
	if tag != "B" {
		t.Fatalf("session after the reload reached %q, want B", tag)
	}
	var list []SessionInfo
	waitFor(t, "two client sessions", 5*time.Second, func() bool { list = s.client.Sessions(); return len(list) == 2 })
	if list[0].Route != "default" || list[1].Route != "second" {
		t.Errorf("routes %q, %q; want default, second", list[0].Route, list[1].Route)
	}
	if got := s.client.tracker.find(list[1].ID).conn.ReconnectTimeout(); got != 9*time.Second {
		t.Errorf("new session's reconnect timeout %v, want 9s", got)
	}
	if got := s.client.tracker.find(list[0].ID).conn.ReconnectTimeout(); got != fastConfig().ReconnectTimeout {
		t.Errorf("old session's reconnect timeout %v, want %v", got, fastConfig().ReconnectTimeout)
	}
	s.relay.Reset()
	echoes(t, old, "old one resumes to A")
	echoes(t, fresh, "new one to B")

	if err := s.client.Reload("127.0.0.1:1", "x", nil); err == nil {
		t.Error("Reload of a listener that does not exist: no error")
	}
	if err := s.client.Reload(s.appAddr, "", nil); err == nil {
		t.Error("Reload with an empty route name: no error")
	}
	third, tag := openTagged(t, s.appAddr)
	defer third.Close()
	if tag != "B" {
		t.Errorf("after a refused reload a new session reached %q, want B", tag)
	}
}
