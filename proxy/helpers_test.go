package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fastConfig has short timers so that tests on loopback find dead links
// and reconnect quickly.
func fastConfig() *resume.Config {
	c := resume.DefaultConfig()
	c.ReconnectTimeout = 20 * time.Second
	c.PingInterval = 100 * time.Millisecond
	c.LivenessTimeout = 600 * time.Millisecond
	c.HandshakeTimeout = 2 * time.Second
	c.LingerTimeout = 5 * time.Second
	c.BufferSize = 256 << 10
	c.DisconnectedBufferSize = 1 << 20
	c.Strategy = resume.Backoff{Initial: 10 * time.Millisecond, Max: 100 * time.Millisecond, Jitter: 0.2}
	return c
}

// testLogger writes to the test log when -v is given.
func testLogger(t testing.TB) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tlogWriter struct{ t testing.TB }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// stack is an in-process upstream <- gateway <- relay <- client sidecar.
type stack struct {
	gw      *Gateway
	client  *Client
	relay   *faultnet.Relay
	appAddr string // where applications connect
	gwAddr  string
	metrics *PromMetrics
}

type stackOpts struct {
	upstream  string
	route     string // client's route (default "default")
	server    *resume.ServerConfig
	cfg       *resume.Config // client session config
	transport string
	serverTLS *tls.Config
	clientTLS *tls.Config
	routes    []Route
	noRelay   bool // dial the gateway directly (benchmarks)
	// log, if set, replaces the test log (a fuzz target must not log to
	// its F).
	log *slog.Logger
	// movable: the client can follow a GOAWAY to another address
	// (ClientRoute.NewDialer).
	movable bool
	// proxyIn: the gateway's listener reads PROXY protocol headers
	// from these sources.
	proxyIn *transport.ProxyIn
}

func newStack(t testing.TB, o stackOpts) *stack {
	t.Helper()
	if o.route == "" {
		o.route = "default"
	}
	if o.transport == "" {
		o.transport = "tcp"
	}
	if o.server == nil {
		o.server = resume.DefaultServerConfig()
		o.server.Session = fastConfig()
	}
	if o.cfg == nil {
		o.cfg = fastConfig()
	}
	if o.routes == nil {
		o.routes = []Route{{Name: "default", Upstream: o.upstream, ConnectTimeout: time.Second}}
	}
	log := o.log
	if log == nil {
		log = testLogger(t)
	}
	o.server.Session.Logger = log
	o.cfg.Logger = log
	m := NewPromMetrics()
	gw, err := NewGateway(GatewayConfig{Routes: o.routes, Server: o.server, Logger: log, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	ll, err := transport.Listen(transport.Config{Name: o.transport, Addr: "127.0.0.1:0", TLS: o.serverTLS, Logger: log, ProxyIn: o.proxyIn})
	if err != nil {
		t.Fatal(err)
	}
	go gw.Serve(ll)
	relay, err := faultnet.NewRelay("127.0.0.1:0", ll.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	linkAddr := relay.Addr()
	if o.noRelay {
		linkAddr = ll.Addr().String()
	}
	dialer, err := transport.NewDialer(transport.Config{Name: o.transport, Addr: linkAddr, TLS: o.clientTLS, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	cl := NewClient(ClientConfig{Logger: log, Metrics: m})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := ClientRoute{Route: o.route, Dialer: dialer, Session: o.cfg, Gateway: linkAddr}
	if o.movable {
		r.NewDialer = func(addr string) (transport.Dialer, error) {
			return transport.NewDialer(transport.Config{Name: o.transport, Addr: addr, TLS: o.clientTLS, Logger: log})
		}
	}
	go cl.Serve(ln, r)
	s := &stack{gw: gw, client: cl, relay: relay, appAddr: ln.Addr().String(), gwAddr: ll.Addr().String(), metrics: m}
	t.Cleanup(func() {
		cl.Close()
		relay.Close()
		gw.Close()
	})
	return s
}

func dialApp(t testing.TB, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn)
}

// breaker breaks the relay's links every interval in rotating ways until
// stop is called; it returns the number of breaks that hit a link.
func breaker(r *faultnet.Relay, every time.Duration) (stop func() int) {
	done := make(chan struct{})
	var n int
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			case <-t.C:
			}
			if r.Break(faultnet.Modes[i%3]) > 0 {
				n++
			}
		}
	}()
	return func() int { close(done); wg.Wait(); return n }
}

func waitFor(t testing.TB, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

var _ = context.Background

func defaultServerForTest() *resume.ServerConfig {
	sc := resume.DefaultServerConfig()
	sc.Session = fastConfig()
	return sc
}

func get(t testing.TB, h http.Handler, path string) string {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	return rec.Body.String()
}

// gwAdmin is the gateway's admin API, without a token.
func (s *stack) gwAdmin(t testing.TB) http.Handler {
	t.Helper()
	h, err := GatewayAdmin(s.gw, AdminConfig{Registry: s.metrics.Registry()})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// clAdmin is the client sidecar's admin API, without a token.
func (s *stack) clAdmin(t testing.TB) http.Handler {
	t.Helper()
	return clientAdmin(t, s.client, AdminConfig{Registry: s.metrics.Registry()})
}

func clientAdmin(t testing.TB, c *Client, cfg AdminConfig) http.Handler {
	t.Helper()
	h, err := ClientAdmin(c, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return h
}
