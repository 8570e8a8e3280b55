package transport

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/lifeline-proxy/lifeline/resume"
)

// refusals counts ProxyIn.Refused calls by reason.
type refusals struct {
	mu sync.Mutex
	n  map[string]int
}

func (r *refusals) add(reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n == nil {
		r.n = map[string]int{}
	}
	r.n[reason]++
}

func (r *refusals) get(reason string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n[reason]
}

func (r *refusals) total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	t := 0
	for _, v := range r.n {
		t += v
	}
	return t
}

func mustPrefixes(t testing.TB, s string) []netip.Prefix {
	t.Helper()
	p, err := ParseProxyFrom(s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// proxyListen opens a tcp (or tls) listener on loopback with PROXY
// protocol from the sources in from.
func proxyListen(t *testing.T, name, from string, timeout time.Duration, tc *tls.Config) (net.Listener, *refusals) {
	t.Helper()
	r := &refusals{}
	ln, err := Listen(Config{Name: name, Addr: "127.0.0.1:0", TLS: tc, Logger: quicLogger(t),
		ProxyIn: &ProxyIn{From: mustPrefixes(t, from), ReadHeaderTimeout: timeout, Refused: r.add}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln, r
}

func acceptOne(t *testing.T, ln net.Listener) net.Conn {
	t.Helper()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatal(r.err)
		}
		t.Cleanup(func() { r.c.Close() })
		return r.c
	case <-time.After(5 * time.Second):
		t.Fatal("Accept timed out")
		return nil
	}
}

func dialRaw(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

var (
	realClient = &net.TCPAddr{IP: net.IPv4(203, 0, 113, 7), Port: 40001}
	realV6     = &net.TCPAddr{IP: net.ParseIP("2001:db8::7"), Port: 40002}
	gwAddr     = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 7000}
	gwV6       = &net.TCPAddr{IP: net.ParseIP("2001:db8::1"), Port: 7000}
)

func headerBytes(t testing.TB, version byte, src, dst net.Addr) []byte {
	t.Helper()
	var b bytes.Buffer
	if _, err := proxyproto.HeaderProxyFromAddrs(version, src, dst).WriteTo(&b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// readExactly reads len(want) bytes from c and compares them.
func readExactly(t *testing.T, c net.Conn, want []byte) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %q, want %q", got, want)
	}
}

func TestProxyInTrustedHeader(t *testing.T) {
	payload := bytes.Repeat([]byte("lifeline bytes after the header;"), 40) // past the header's read buffer
	for _, tc := range []struct {
		name     string
		version  byte
		src, dst *net.TCPAddr
	}{
		{"v1", 1, realClient, gwAddr},
		{"v2", 2, realClient, gwAddr},
		{"v1-ipv6", 1, realV6, gwV6},
		{"v2-ipv6", 2, realV6, gwV6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, r := proxyListen(t, "tcp", "127.0.0.0/8", 2*time.Second, nil)
			c := dialRaw(t, ln.Addr().String())
			// Header and data in one write, as a balancer's first
			// segment may carry both.
			if _, err := c.Write(append(headerBytes(t, tc.version, tc.src, tc.dst), payload...)); err != nil {
				t.Fatal(err)
			}
			s := acceptOne(t, ln)
			if got := s.RemoteAddr().String(); got != tc.src.String() {
				t.Fatalf("RemoteAddr %s, want the header's source %s", got, tc.src)
			}
			readExactly(t, s, payload)
			// Its TCP connection ends at the balancer: the engine
			// probes it idle with PINGs, not kernel keepalives.
			if m, ok := s.(resume.Middlebox); !ok || !m.ViaMiddlebox() {
				t.Errorf("a link through a balancer is not a resume.Middlebox (%T)", s)
			}
			// And back, then more after the buffer drained.
			if _, err := s.Write([]byte("pong")); err != nil {
				t.Fatal(err)
			}
			readExactly(t, c, []byte("pong"))
			c.Write([]byte("tail"))
			readExactly(t, s, []byte("tail"))
			if r.total() != 0 {
				t.Fatalf("refusals %v, want none", r.n)
			}
		})
	}
}

func TestProxyInTLSUnderneath(t *testing.T) {
	stls, ctls := quicTestTLS(t)
	ln, r := proxyListen(t, "tls", "127.0.0.1", 2*time.Second, stls)
	raw := dialRaw(t, ln.Addr().String())
	if _, err := raw.Write(headerBytes(t, 2, realClient, gwAddr)); err != nil {
		t.Fatal(err)
	}
	cc, err := clientTLS("tls", ctls, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	c := tls.Client(raw, cc)
	hs := make(chan error, 1)
	go func() { hs <- c.Handshake() }()
	s := acceptOne(t, ln)
	if _, ok := s.(*tls.Conn); !ok {
		t.Fatalf("tls link is a %T", s)
	}
	if got := s.RemoteAddr().String(); got != realClient.String() {
		t.Fatalf("RemoteAddr %s, want %s", got, realClient)
	}
	go func() { s.Write([]byte("over tls")) }() // runs the server's handshake
	if err := <-hs; err != nil {
		t.Fatal(err)
	}
	readExactly(t, c, []byte("over tls"))
	c.Write([]byte("and back"))
	readExactly(t, s, []byte("and back"))
	if r.total() != 0 {
		t.Fatalf("refusals %v", r.n)
	}
}

// expectRefused checks that s's Read fails with ErrProxyHeader and that the
// peer c sees the connection closed.
func expectRefused(t *testing.T, s, c net.Conn) {
	t.Helper()
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := s.Read(make([]byte, 16))
	if !errors.Is(err, ErrProxyHeader) {
		t.Fatalf("Read: %v, want ErrProxyHeader", err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 16)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("peer read %d, %v: want the connection closed", n, err)
	}
}

func TestProxyInUntrustedHeaderRefused(t *testing.T) {
	for _, v := range []byte{1, 2} {
		ln, r := proxyListen(t, "tcp", "10.0.0.0/8", 2*time.Second, nil)
		c := dialRaw(t, ln.Addr().String())
		c.Write(append(headerBytes(t, v, realClient, gwAddr), "LFLN"...))
		s := acceptOne(t, ln)
		// Not trusted: the socket's address, at once.
		if got := s.RemoteAddr().(*net.TCPAddr); !got.IP.IsLoopback() {
			t.Fatalf("RemoteAddr %s, want the socket's", got)
		}
		expectRefused(t, s, c)
		if got := r.get(ProxyRefusedUntrusted); got != 1 {
			t.Fatalf("v%d: untrusted refusals %d, want 1 (%v)", v, got, r.n)
		}
	}
}

func TestProxyInUntrustedWithoutHeaderWorks(t *testing.T) {
	ln, r := proxyListen(t, "tcp", "10.0.0.0/8", 2*time.Second, nil)
	c := dialRaw(t, ln.Addr().String())
	// Starts with the first bytes of both signatures, but is neither.
	msg := []byte("PROXZ \r\n\r\n\x00\r\nQUIX and more")
	c.Write(msg)
	s := acceptOne(t, ln)
	readExactly(t, s, msg)
	// Straight from the client: the socket's keepalive reaches it.
	if m, ok := s.(resume.Middlebox); ok && m.ViaMiddlebox() {
		t.Error("a link from an untrusted source counts as through a middlebox")
	}
	if nc, ok := s.(interface{ NetConn() net.Conn }); !ok {
		t.Errorf("%T gives up no socket", s)
	} else if _, ok := nc.NetConn().(*net.TCPConn); !ok {
		t.Errorf("NetConn is a %T", nc.NetConn())
	}
	if r.total() != 0 {
		t.Fatalf("refusals %v", r.n)
	}
}

func TestProxyInTrustedWithoutHeaderRefused(t *testing.T) {
	ln, r := proxyListen(t, "tcp", "127.0.0.0/8", 2*time.Second, nil)
	c := dialRaw(t, ln.Addr().String())
	c.Write([]byte("LFLN\x02 a lifeline preamble, no header"))
	s := acceptOne(t, ln)
	if got := s.RemoteAddr().(*net.TCPAddr); !got.IP.IsLoopback() {
		t.Fatalf("RemoteAddr %s, want the socket's", got)
	}
	expectRefused(t, s, c)
	if got := r.get(ProxyRefusedMissing); got != 1 {
		t.Fatalf("missing-header refusals %d, want 1 (%v)", got, r.n)
	}
}

func TestProxyInBadHeaderRefused(t *testing.T) {
	ln, r := proxyListen(t, "tcp", "127.0.0.0/8", 2*time.Second, nil)
	c := dialRaw(t, ln.Addr().String())
	c.Write([]byte("PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n"))
	s := acceptOne(t, ln)
	expectRefused(t, s, c)
	if got := r.get(ProxyRefusedBad); got != 1 {
		t.Fatalf("bad-header refusals %d, want 1 (%v)", got, r.n)
	}
}

func TestProxyInHeaderTimeout(t *testing.T) {
	const timeout = 150 * time.Millisecond
	ln, r := proxyListen(t, "tcp", "127.0.0.0/8", timeout, nil)
	c := dialRaw(t, ln.Addr().String())
	c.Write([]byte("PROX")) // a header's start, then silence
	s := acceptOne(t, ln)
	start := time.Now()
	s.RemoteAddr()
	if d := time.Since(start); d < timeout-20*time.Millisecond || d > timeout+2*time.Second {
		t.Fatalf("header wait ended after %v, want about %v", d, timeout)
	}
	expectRefused(t, s, c)
	if got := r.get(ProxyRefusedTimeout); got != 1 {
		t.Fatalf("timeout refusals %d, want 1 (%v)", got, r.n)
	}
}

// A user deadline set before the header arrives bounds its wait too, and
// is in force again once it has arrived.
func TestProxyInUserDeadline(t *testing.T) {
	ln, _ := proxyListen(t, "tcp", "127.0.0.0/8", 10*time.Second, nil)
	c := dialRaw(t, ln.Addr().String())
	s := acceptOne(t, ln)
	s.SetDeadline(time.Now().Add(100 * time.Millisecond))
	start := time.Now()
	_, err := s.Read(make([]byte, 1))
	if !errors.Is(err, ErrProxyHeader) || time.Since(start) > 2*time.Second {
		t.Fatalf("Read after %v: %v, want a refusal at the user's deadline", time.Since(start), err)
	}
	_ = c
}

func TestProxyInHealthCheckCloseIsQuiet(t *testing.T) {
	ln, r := proxyListen(t, "tcp", "127.0.0.0/8", 2*time.Second, nil)
	c := dialRaw(t, ln.Addr().String())
	c.Close()
	s := acceptOne(t, ln)
	s.RemoteAddr()
	if _, err := s.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("Read: %v, want EOF", err)
	}
	if r.total() != 0 {
		t.Fatalf("refusals %v, want none for a connect-and-close", r.n)
	}
}

// A LOCAL header (the balancer's own health check) keeps the balancer's
// address and the connection.
func TestProxyInLocalCommand(t *testing.T) {
	ln, r := proxyListen(t, "tcp", "127.0.0.0/8", 2*time.Second, nil)
	c := dialRaw(t, ln.Addr().String())
	h := &proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}
	h.WriteTo(c)
	c.Write([]byte("x"))
	s := acceptOne(t, ln)
	if got := s.RemoteAddr().(*net.TCPAddr); !got.IP.IsLoopback() {
		t.Fatalf("RemoteAddr %s, want the socket's", got)
	}
	readExactly(t, s, []byte("x"))
	if r.total() != 0 {
		t.Fatalf("refusals %v", r.n)
	}
}

// Closing the listener ends a header wait at once: the session server's
// Close waits for its handshake goroutines.
func TestProxyInCloseEndsHeaderWait(t *testing.T) {
	ln, r := proxyListen(t, "tcp", "127.0.0.0/8", 30*time.Second, nil)
	dialRaw(t, ln.Addr().String())
	s := acceptOne(t, ln)
	done := make(chan net.Addr, 1)
	go func() { done <- s.RemoteAddr() }()
	time.Sleep(50 * time.Millisecond)
	ln.Close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("RemoteAddr still waiting for the header after the listener closed")
	}
	if _, err := s.Read(make([]byte, 1)); err == nil {
		t.Fatal("Read succeeded on a link whose listener closed during its header")
	}
	if r.total() != 0 {
		t.Fatalf("refusals %v, want none (the gateway closed it)", r.n)
	}
}

func TestProxyInQUICRefused(t *testing.T) {
	stls, _ := quicTestTLS(t)
	_, err := Listen(Config{Name: "quic", Addr: "127.0.0.1:0", TLS: stls,
		ProxyIn: &ProxyIn{From: mustPrefixes(t, "10.0.0.0/8")}})
	if err == nil {
		t.Fatal("quic listener with PROXY protocol: no error")
	}
}

func TestParseProxyFrom(t *testing.T) {
	for _, tc := range []struct {
		in, want string // want "" : an error
	}{
		{"10.0.0.0/8", "[10.0.0.0/8]"},
		{"10.0.0.0/8, 192.0.2.7", "[10.0.0.0/8 192.0.2.7/32]"},
		{"2001:db8::/32,::1", "[2001:db8::/32 ::1/128]"},
		{"::ffff:10.0.0.0/104", "[10.0.0.0/8]"},
		{"::ffff:192.0.2.7", "[192.0.2.7/32]"},
		{"", ""},
		{"10.0.0.0/8,", ""},
		{"10.0.0.1/8", ""},
		{"gw.example.net", ""},
		{"10.0.0.0/33", ""},
		{"fe80::1%eth0", ""},
	} {
		p, err := ParseProxyFrom(tc.in)
		if tc.want == "" {
			if err == nil {
				t.Errorf("ParseProxyFrom(%q) = %v, want an error", tc.in, p)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseProxyFrom(%q): %v", tc.in, err)
			continue
		}
		if got := fmtPrefixes(p); got != tc.want {
			t.Errorf("ParseProxyFrom(%q) = %s, want %s", tc.in, got, tc.want)
		}
	}
	// An IPv4 source is trusted by an IPv4 prefix whether the socket
	// shows it mapped or not.
	in := &ProxyIn{From: mustPrefixes(t, "192.0.2.0/24")}
	for _, a := range []string{"192.0.2.9", "::ffff:192.0.2.9"} {
		if !in.trusts(&net.TCPAddr{IP: net.ParseIP(a), Port: 1}) {
			t.Errorf("%s not trusted by 192.0.2.0/24", a)
		}
	}
	if in.trusts(&net.TCPAddr{IP: net.ParseIP("192.0.3.1"), Port: 1}) {
		t.Error("192.0.3.1 trusted by 192.0.2.0/24")
	}
}

func fmtPrefixes(p []netip.Prefix) string {
	var b bytes.Buffer
	b.WriteByte('[')
	for i, x := range p {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(x.String())
	}
	b.WriteByte(']')
	return b.String()
}

// The session engine reads and writes a PROXY link's socket directly
// (resume.LinkSocket) only once the header and every byte buffered past it
// were returned by Read: before that, Socket is nil, and the socket it
// then returns holds exactly the bytes that follow.
func TestProxyInSocketAfterDrain(t *testing.T) {
	for _, trusted := range []bool{true, false} {
		name := "trusted"
		if !trusted {
			name = "untrusted"
		}
		t.Run(name, func(t *testing.T) {
			from := "127.0.0.0/8"
			if !trusted {
				from = "192.0.2.0/24"
			}
			ln, _ := proxyListen(t, "tcp", from, 2*time.Second, nil)
			c := dialRaw(t, ln.Addr().String())
			first := []byte("first bytes, read ahead with the header")
			msg := first
			if trusted {
				msg = append(headerBytes(t, 2, realClient, gwAddr), first...)
			}
			if _, err := c.Write(msg); err != nil {
				t.Fatal(err)
			}
			s := acceptOne(t, ln)
			ls, ok := s.(interface{ Socket() *net.TCPConn })
			if !ok {
				t.Fatalf("%T is not a resume.LinkSocket", s)
			}
			if ls.Socket() != nil {
				t.Fatal("Socket before the first Read: the header is still on the socket")
			}
			got := make([]byte, 5)
			s.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(s, got); err != nil || string(got) != "first" {
				t.Fatalf("read %q, %v", got, err)
			}
			if ls.Socket() != nil {
				t.Fatal("Socket while bytes past the header are still buffered")
			}
			readExactly(t, s, first[5:])
			tc := ls.Socket()
			if tc == nil {
				t.Fatal("no Socket once the buffer drained")
			}
			c.Write([]byte("straight from the socket"))
			readExactly(t, tc, []byte("straight from the socket"))
		})
	}
}
