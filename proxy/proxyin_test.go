package proxy

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// The balancer's address: the gateway trusts PROXY headers from it only.
// Everything else in these tests connects from 127.0.0.1.
var balancerIP = net.IPv4(127, 0, 0, 2)

// balancer is a small L4 load balancer: it relays each connection to the
// gateway from balancerIP, after a PROXY header naming the client that
// src gives for the i-th connection.
type balancer struct {
	t       testing.TB
	ln      net.Listener
	target  string
	version byte
	src     func(i int) *net.TCPAddr

	mu    sync.Mutex
	n     int
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func newBalancer(t testing.TB, target string, version byte, src func(i int) *net.TCPAddr) *balancer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &balancer{t: t, ln: ln, target: target, version: version, src: src, conns: map[net.Conn]struct{}{}}
	b.wg.Add(1)
	go b.serve()
	t.Cleanup(b.close)
	return b
}

func (b *balancer) addr() string { return b.ln.Addr().String() }

func (b *balancer) serve() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.mu.Lock()
		i := b.n
		b.n++
		b.conns[c] = struct{}{}
		b.mu.Unlock()
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			b.relay(c, b.src(i))
		}()
	}
}

func (b *balancer) relay(c net.Conn, src *net.TCPAddr) {
	defer b.forget(c)
	up, err := dialFromBalancer(b.target)
	if err != nil {
		return
	}
	b.mu.Lock()
	b.conns[up] = struct{}{}
	b.mu.Unlock()
	defer b.forget(up)
	if _, err := proxyproto.HeaderProxyFromAddrs(b.version, src, up.RemoteAddr()).WriteTo(up); err != nil {
		return
	}
	done := make(chan struct{})
	go func() {
		io.Copy(up, c)
		up.(*net.TCPConn).CloseWrite()
		close(done)
	}()
	io.Copy(c, up)
	c.(*net.TCPConn).CloseWrite()
	<-done
}

func (b *balancer) forget(c net.Conn) {
	c.Close()
	b.mu.Lock()
	delete(b.conns, c)
	b.mu.Unlock()
}

// breakAll closes every relayed connection: the links under the sessions
// break, and their clients come back through the balancer.
func (b *balancer) breakAll() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	for c := range b.conns {
		c.Close()
	}
	return len(b.conns)
}

func (b *balancer) close() {
	b.ln.Close()
	b.breakAll()
	b.wg.Wait()
}

func dialFromBalancer(addr string) (net.Conn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: balancerIP}, Timeout: 2 * time.Second}
	return d.Dial("tcp", addr)
}

// logBuf collects a gateway's JSON log lines.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// lines returns the log lines whose msg is msg.
func (l *logBuf) lines(msg string) []map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for _, line := range bytes.Split(l.b.Bytes(), []byte("\n")) {
		var m map[string]any
		if json.Unmarshal(line, &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

type ppOpts struct {
	transport string // tcp (default) or tls
	version   byte   // of the balancer's headers (default 2)
	src       func(i int) *net.TCPAddr
	server    *resume.ServerConfig
	routes    []Route
	upstream  string
	timeout   time.Duration // PROXY header timeout (default 2 s)
	sendApp   bool          // the client states its applications' addresses
	trustApp  bool          // the gateway believes them
}

// ppStack is a gateway whose link listener takes PROXY headers from the
// balancer, and a client sidecar whose links go through the balancer.
type ppStack struct {
	gw      *Gateway
	client  *Client
	bal     *balancer
	metrics *PromMetrics
	log     *logBuf
	gwAddr  string
	appAddr string
}

func newPPStack(t *testing.T, o ppOpts) *ppStack {
	t.Helper()
	if o.transport == "" {
		o.transport = "tcp"
	}
	if o.version == 0 {
		o.version = 2
	}
	if o.server == nil {
		o.server = defaultServerForTest()
	}
	if o.routes == nil {
		o.routes = []Route{{Name: "default", Upstream: o.upstream, ConnectTimeout: time.Second}}
	}
	if o.timeout == 0 {
		o.timeout = 2 * time.Second
	}
	lb := &logBuf{}
	log := slog.New(slog.NewJSONHandler(io.MultiWriter(lb, tlogWriter{t}), nil))
	if !testing.Verbose() {
		log = slog.New(slog.NewJSONHandler(lb, nil))
	}
	o.server.Session.Logger = log
	m := NewPromMetrics()
	gw, err := NewGateway(GatewayConfig{Routes: o.routes, Server: o.server, Logger: log, Metrics: m, TrustAppAddr: o.trustApp})
	if err != nil {
		t.Fatal(err)
	}
	var stls, ctls *tls.Config
	if o.transport == "tls" {
		cert, err := transport.SelfSignedCert()
		if err != nil {
			t.Fatal(err)
		}
		stls, ctls = transport.ServerTLS(cert), transport.PinnedTLS(transport.CertFingerprint(cert.Leaf.Raw), "")
	}
	from, err := transport.ParseProxyFrom(balancerIP.String())
	if err != nil {
		t.Fatal(err)
	}
	pin := &transport.ProxyIn{From: from, ReadHeaderTimeout: o.timeout, Refused: m.ProxyProtocolRefusals()}
	ll, err := transport.Listen(transport.Config{Name: o.transport, Addr: "127.0.0.1:0", TLS: stls, Logger: log, ProxyIn: pin})
	if err != nil {
		t.Fatal(err)
	}
	go gw.Serve(ll)
	bal := newBalancer(t, ll.Addr().String(), o.version, o.src)
	dialer, err := transport.NewDialer(transport.Config{Name: o.transport, Addr: bal.addr(), TLS: ctls, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	cl := NewClient(ClientConfig{Logger: log, Metrics: m})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := fastConfig()
	cfg.Logger = log
	go cl.Serve(ln, ClientRoute{Route: "default", Dialer: dialer, Session: cfg, Gateway: bal.addr(), SendAppAddr: o.sendApp})
	s := &ppStack{gw: gw, client: cl, bal: bal, metrics: m, log: lb, gwAddr: ll.Addr().String(), appAddr: ln.Addr().String()}
	t.Cleanup(func() {
		cl.Close()
		bal.close()
		gw.Close()
	})
	return s
}

// refusals reads lifeline_proxy_protocol_refusals_total{reason}.
func (s *ppStack) refusals(t *testing.T, reason string) float64 {
	t.Helper()
	mfs, err := s.metrics.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "lifeline_proxy_protocol_refusals_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetLabel()[0].GetValue() == reason {
				return m.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("no lifeline_proxy_protocol_refusals_total{reason=%q}", reason)
	return 0
}

// logAddr is an address as the JSON log holds it: a string, or a
// net.TCPAddr's fields.
func logAddr(v any) string {
	switch v := v.(type) {
	case string:
		return v
	case map[string]any:
		ip, _ := v["IP"].(string)
		port, _ := v["Port"].(float64)
		return net.JoinHostPort(ip, strconv.Itoa(int(port)))
	}
	return ""
}

func fixedSrc(a *net.TCPAddr) func(int) *net.TCPAddr { return func(int) *net.TCPAddr { return a } }

// exchange sends n random bytes through the echo upstream and checks
// that exactly they come back.
func exchange(t *testing.T, c net.Conn, n int) {
	t.Helper()
	data := make([]byte, n)
	rand.Read(data)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		errc <- err
	}()
	got := make([]byte, n)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("echo differs from what was sent")
	}
}

func TestProxyProtocolInRealClientAddress(t *testing.T) {
	for _, tc := range []struct {
		transport string
		version   byte
	}{{"tcp", 1}, {"tcp", 2}, {"tls", 1}, {"tls", 2}} {
		t.Run(tc.transport+"-v"+string('0'+tc.version), func(t *testing.T) {
			// Each link through the balancer comes from another port
			// of the client, as after a NAT rebinding.
			src := func(i int) *net.TCPAddr { return &net.TCPAddr{IP: net.IPv4(198, 51, 100, 20), Port: 41000 + i} }
			s := newPPStack(t, ppOpts{transport: tc.transport, version: tc.version, src: src, upstream: testnet.EchoServer(t)})
			app := dialApp(t, s.appAddr)
			defer app.Close()
			exchange(t, app, 300<<10)
			ss := s.gw.Sessions()
			if len(ss) != 1 || ss[0].Peer != "198.51.100.20:41000" {
				t.Fatalf("gateway sessions %+v, want one with peer 198.51.100.20:41000", ss)
			}
			// resume's line names the remote, the gateway's the link.
			var gwStarts []string
			for _, l := range s.log.lines("session start") {
				if l["side"] == "gateway" {
					gwStarts = append(gwStarts, logAddr(l["remote"])+logAddr(l["link"]))
				}
			}
			if len(gwStarts) != 2 || gwStarts[0] != "198.51.100.20:41000" || gwStarts[1] != "198.51.100.20:41000" {
				t.Fatalf("gateway session start lines name %q, want 198.51.100.20:41000 twice", gwStarts)
			}
			// The link breaks; the resume comes through the balancer
			// as a new connection, with the client's new port.
			if s.bal.breakAll() == 0 {
				t.Fatal("no link to break")
			}
			exchange(t, app, 100<<10)
			waitFor(t, "the resumed session's peer", 5*time.Second, func() bool {
				ss := s.gw.Sessions()
				return len(ss) == 1 && ss[0].Peer == "198.51.100.20:41001" && ss[0].Resumes == 1
			})
			for _, r := range transport.ProxyRefusalReasons {
				if n := s.refusals(t, r); n != 0 {
					t.Errorf("refusals{%s} = %v, want 0", r, n)
				}
			}
			// Nothing logged the balancer's address as a client's.
			s.log.mu.Lock()
			logged := s.log.b.String()
			s.log.mu.Unlock()
			if strings.Contains(logged, "127.0.0.2") {
				t.Errorf("the gateway logged the balancer's address:\n%s", logged)
			}
		})
	}
}

// rawResume sends, from the balancer's address and with a PROXY header
// naming src, a RESUME for a session that does not exist, and returns the
// REJECT code the gateway answers.
func rawResume(t *testing.T, gw string, src *net.TCPAddr) frame.Code {
	t.Helper()
	c, err := dialFromBalancer(gw)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var b bytes.Buffer
	proxyproto.HeaderProxyFromAddrs(2, src, c.RemoteAddr()).WriteTo(&b)
	r := &frame.Resume{Counter: 1, Window: 1 << 20}
	rand.Read(r.SessionID[:])
	rand.Read(r.Key[:])
	c.Write(frame.AppendResume(frame.AppendPreamble(b.Bytes()), r))
	return readRejectCode(t, c)
}

func readRejectCode(t *testing.T, c net.Conn) frame.Code {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, _ := io.ReadAll(c)
	if len(b) < frame.HeaderLen {
		t.Fatalf("closed without a REJECT (%x)", b)
	}
	h, err := frame.ParseHeader(b)
	if err != nil || h.Type != frame.TypeReject || len(b) < frame.HeaderLen+h.Len {
		t.Fatalf("answer %x: %v, want REJECT", b, err)
	}
	cr, err := frame.ParseCodeReason(b[frame.HeaderLen : frame.HeaderLen+h.Len])
	if err != nil {
		t.Fatal(err)
	}
	return cr.Code
}

// The resume failure throttle counts per real client: one client behind
// the balancer that spends its budget does not throttle another.
func TestProxyProtocolInThrottlePerRealClient(t *testing.T) {
	sc := defaultServerForTest()
	sc.FailureBurst = 3
	sc.FailureRate = 0.01 // no refill during the test
	s := newPPStack(t, ppOpts{server: sc, src: fixedSrc(&net.TCPAddr{IP: net.IPv4(1, 1, 1, 1), Port: 1}), upstream: testnet.EchoServer(t)})
	a := &net.TCPAddr{IP: net.IPv4(203, 0, 113, 10), Port: 5000}
	b := &net.TCPAddr{IP: net.IPv4(203, 0, 113, 11), Port: 5000}
	for i := range 3 {
		if code := rawResume(t, s.gwAddr, a); code != frame.CodeNotFound {
			t.Fatalf("resume %d from %v: %v, want NOT_FOUND", i, a, code)
		}
	}
	if code := rawResume(t, s.gwAddr, a); code != frame.CodeThrottled {
		t.Fatalf("4th failed resume from %v: %v, want THROTTLED", a, code)
	}
	// Same balancer, another client: its own budget.
	if code := rawResume(t, s.gwAddr, b); code != frame.CodeNotFound {
		t.Fatalf("first resume from %v: %v, want NOT_FOUND (not throttled with %v)", b, code, a)
	}
	// The refusal lines name the real client.
	found := false
	for _, l := range s.log.lines("resume refused") {
		if logAddr(l["remote"]) == a.String() {
			found = true
		}
	}
	if !found {
		t.Fatalf("no 'resume refused' line with remote=%v:\n%v", a, s.log.lines("resume refused"))
	}
}

// The per-source cap on unconfirmed sessions counts per real client too.
func TestProxyProtocolInUnconfirmedCapPerRealClient(t *testing.T) {
	sc := defaultServerForTest()
	sc.MaxUnconfirmedPerSource = 1
	s := newPPStack(t, ppOpts{server: sc, src: fixedSrc(&net.TCPAddr{IP: net.IPv4(1, 1, 1, 1), Port: 1}), upstream: testnet.EchoServer(t)})
	hello := func(src *net.TCPAddr) (net.Conn, frame.Type) {
		c, err := dialFromBalancer(s.gwAddr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		var b bytes.Buffer
		proxyproto.HeaderProxyFromAddrs(1, src, c.RemoteAddr()).WriteTo(&b)
		h := &frame.Hello{ReconnectTimeout: 10000, Buffer: 1 << 20, Route: "default"}
		rand.Read(h.Key[:])
		p, err := frame.AppendHello(frame.AppendPreamble(b.Bytes()), h)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(p)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		hb := make([]byte, frame.HeaderLen)
		if _, err := io.ReadFull(c, hb); err != nil {
			t.Fatalf("HELLO from %v: %v", src, err)
		}
		fh, err := frame.ParseHeader(hb)
		if err != nil {
			t.Fatal(err)
		}
		return c, fh.Type
	}
	// Two clients behind the balancer each hold an unconfirmed session
	// (they never confirm); a second one from the first is refused.
	a := &net.TCPAddr{IP: net.IPv4(203, 0, 113, 20), Port: 1}
	b := &net.TCPAddr{IP: net.IPv4(203, 0, 113, 21), Port: 1}
	if _, typ := hello(a); typ != frame.TypeWelcome {
		t.Fatalf("HELLO from %v: %v, want WELCOME", a, typ)
	}
	if _, typ := hello(b); typ != frame.TypeWelcome {
		t.Fatalf("HELLO from %v: %v, want WELCOME (not capped with %v)", b, typ, a)
	}
	if _, typ := hello(a); typ != frame.TypeReject {
		t.Fatalf("second HELLO from %v: %v, want REJECT", a, typ)
	}
}

func TestProxyProtocolInRefusals(t *testing.T) {
	s := newPPStack(t, ppOpts{src: fixedSrc(&net.TCPAddr{IP: net.IPv4(1, 1, 1, 1), Port: 1}), upstream: testnet.EchoServer(t),
		timeout: 200 * time.Millisecond})
	closed := func(c net.Conn, within time.Duration) {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(within))
		b, err := io.ReadAll(c)
		if err != nil && !strings.Contains(err.Error(), "reset") {
			t.Fatalf("read: %v (%x), want the connection closed", err, b)
		}
		if len(b) != 0 {
			t.Fatalf("got %x, want the connection closed without an answer", b)
		}
	}
	// A header from 127.0.0.1, which is not the balancer.
	c, err := net.Dial("tcp", s.gwAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	proxyproto.HeaderProxyFromAddrs(2, &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 9}, c.RemoteAddr()).WriteTo(c)
	c.Write(frame.AppendPreamble(nil))
	closed(c, 5*time.Second)
	if n := s.refusals(t, transport.ProxyRefusedUntrusted); n != 1 {
		t.Fatalf("untrusted_header refusals %v, want 1", n)
	}
	// The balancer without a header.
	c2, err := dialFromBalancer(s.gwAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	c2.Write(frame.AppendPreamble(nil))
	closed(c2, 5*time.Second)
	if n := s.refusals(t, transport.ProxyRefusedMissing); n != 1 {
		t.Fatalf("missing_header refusals %v, want 1", n)
	}
	// The balancer, silent: closed after the header timeout.
	c3, err := dialFromBalancer(s.gwAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c3.Close()
	start := time.Now()
	closed(c3, 5*time.Second)
	if d := time.Since(start); d < 150*time.Millisecond || d > 3*time.Second {
		t.Fatalf("silent balancer connection closed after %v, want about the 200ms header timeout", d)
	}
	if n := s.refusals(t, transport.ProxyRefusedTimeout); n != 1 {
		t.Fatalf("header_timeout refusals %v, want 1", n)
	}
	if lines := s.log.lines("link refused: PROXY protocol header"); len(lines) == 0 {
		t.Fatal("no log line for the refusals")
	}
	// A client straight to the gateway, without a header, still works.
	app := dialApp(t, s.appAddr)
	defer app.Close()
	exchange(t, app, 1000)
}

// proxyUpstream is an echo service behind a PROXY header: it records the
// source each connection's header names.
func proxyUpstream(t *testing.T) (addr string, sources <-chan string) {
	ch := make(chan string, 16)
	addr = testnet.TCPServer(t, func(c *net.TCPConn) {
		br := bufio.NewReader(c)
		h, err := proxyproto.Read(br)
		if err != nil {
			ch <- "error: " + err.Error()
			return
		}
		ch <- h.SourceAddr.String()
		io.Copy(c, br)
		c.CloseWrite()
	})
	return addr, ch
}

// The PROXY header the gateway sends upstream names the real client, not
// the balancer.
func TestProxyProtocolInUpstreamHeader(t *testing.T) {
	up, sources := proxyUpstream(t)
	s := newPPStack(t, ppOpts{src: fixedSrc(&net.TCPAddr{IP: net.IPv4(198, 51, 100, 30), Port: 4242}),
		routes: []Route{{Name: "default", Upstream: up, ConnectTimeout: time.Second, ProxyProtocol: 2}}})
	app := dialApp(t, s.appAddr)
	defer app.Close()
	exchange(t, app, 5000)
	select {
	case got := <-sources:
		if got != "198.51.100.30:4242" {
			t.Fatalf("upstream PROXY source %s, want 198.51.100.30:4242", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("upstream got no connection")
	}
}
