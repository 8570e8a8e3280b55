package proxy

import (
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// exhaustedListener fails Accept with EMFILE, as a listener at the
// descriptor limit does, while failing is set; calls counts the failures.
type exhaustedListener struct {
	net.Listener
	failing atomic.Bool
	calls   atomic.Int64
}

func (l *exhaustedListener) Accept() (net.Conn, error) {
	if l.failing.Load() {
		l.calls.Add(1)
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return l.Listener.Accept()
}

func healthz(h http.Handler) (int, string) {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
	return rec.Code, rec.Body.String()
}

// waitHealthz polls /healthz until it answers code, and returns the body.
func waitHealthz(t *testing.T, h http.Handler, code int) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, body := healthz(h)
		if c == code {
			return body
		}
		if time.Now().After(deadline) {
			t.Fatalf("/healthz still %d %q, want %d", c, body, code)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A client sidecar whose application listener hits the descriptor limit
// keeps retrying instead of giving up, /healthz says why it is unhealthy
// meanwhile, and once descriptors return the listener serves again.
func TestClientSurvivesAcceptExhaustion(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	real, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &exhaustedListener{Listener: real}
	ln.failing.Store(true)
	cl := NewClient(ClientConfig{Logger: testLogger(t)})
	defer cl.Close()
	d, err := transport.NewDialer(transport.Config{Name: "tcp", Addr: s.gwAddr})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() {
		served <- cl.Serve(ln, ClientRoute{Route: "default", Dialer: d, Session: fastConfig(), Gateway: s.gwAddr})
	}()
	h := clientAdmin(t, cl, AdminConfig{})

	body := waitHealthz(t, h, http.StatusServiceUnavailable)
	if !strings.Contains(body, "accept on "+real.Addr().String()+": too many open files") {
		t.Errorf("/healthz %q does not say what fails", body)
	}
	for ln.calls.Load() < 3 {
		time.Sleep(time.Millisecond)
	}
	select {
	case err := <-served:
		t.Fatalf("Serve returned %v on EMFILE, want retries", err)
	default:
	}

	ln.failing.Store(false)
	c, err := net.Dial("tcp", real.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("after"))
	b := make([]byte, 5)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "after" {
		t.Fatalf("echo after the exhaustion: %q %v", b, err)
	}
	if body := waitHealthz(t, h, http.StatusOK); body != "ok\n" {
		t.Errorf("/healthz %q after recovery", body)
	}
	cl.Close()
	if err := <-served; err != nil {
		t.Errorf("Serve after Close: %v", err)
	}
}

// The gateway's link listener at the descriptor limit: retried, reported
// on /healthz, and serving again once descriptors return.
func TestGatewaySurvivesAcceptExhaustion(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	real, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &exhaustedListener{Listener: real}
	ln.failing.Store(true)
	served := make(chan error, 1)
	go func() { served <- s.gw.Serve(ln) }()
	h := s.gwAdmin(t)

	body := waitHealthz(t, h, http.StatusServiceUnavailable)
	// The session server keeps one accept State for all its listeners, so
	// the name may be the other listener's.
	if !strings.HasPrefix(body, "unhealthy: accept on ") || !strings.Contains(body, ": too many open files (since ") {
		t.Errorf("/healthz %q does not say what fails", body)
	}
	for ln.calls.Load() < 3 {
		time.Sleep(time.Millisecond)
	}
	select {
	case err := <-served:
		t.Fatalf("Serve returned %v on EMFILE, want retries", err)
	default:
	}

	ln.failing.Store(false)
	d, _ := transport.NewDialer(transport.Config{Name: "tcp", Addr: real.Addr().String()})
	sess, err := resume.Dial(context.Background(), d.Dial, "default", fastConfig())
	if err != nil {
		t.Fatalf("new session after the exhaustion: %v", err)
	}
	defer sess.Close()
	sess.SetDeadline(time.Now().Add(10 * time.Second))
	sess.Write([]byte("after"))
	b := make([]byte, 5)
	if _, err := io.ReadFull(sess, b); err != nil || string(b) != "after" {
		t.Fatalf("echo after the exhaustion: %q %v", b, err)
	}
	if body := waitHealthz(t, h, http.StatusOK); body != "ok\n" {
		t.Errorf("/healthz %q after recovery", body)
	}
	s.gw.Close()
	if err := <-served; err != nil {
		t.Errorf("Serve after Close: %v", err)
	}
}

// Refused links are counted by reason in lifeline_refusals_total, and
// sessions that got WELCOME but were never confirmed show in
// lifeline_sessions_unconfirmed: a flood of either is visible.
func TestRefusalsAndUnconfirmedInMetrics(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	h := s.gwAdmin(t)
	metric := func(name string) string {
		for _, line := range strings.Split(get(t, h, "/metrics"), "\n") {
			if strings.HasPrefix(line, name+" ") {
				return strings.TrimPrefix(line, name+" ")
			}
		}
		return ""
	}
	if v := metric("lifeline_sessions_unconfirmed"); v != "0" {
		t.Errorf("lifeline_sessions_unconfirmed %q before any HELLO, want 0", v)
	}

	// Not a lifeline link: REJECT VALIDATION, counted as bad_preamble.
	c, err := net.Dial("tcp", s.gwAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.ReadAll(c)
	waitFor(t, "bad_preamble counted", 5*time.Second, func() bool {
		return metric(`lifeline_refusals_total{reason="bad_preamble"}`) == "1"
	})

	// A HELLO whose client never confirms the WELCOME.
	key, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	hello := &frame.Hello{ReconnectTimeout: 60000, Buffer: 1 << 20, Route: "default"}
	copy(hello.Key[:], key.PublicKey().Bytes())
	b, err := frame.AppendHello(frame.AppendPreamble(nil), hello)
	if err != nil {
		t.Fatal(err)
	}
	u, err := net.Dial("tcp", s.gwAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	u.Write(b)
	u.SetReadDeadline(time.Now().Add(5 * time.Second))
	hdr := make([]byte, frame.HeaderLen)
	if _, err := io.ReadFull(u, hdr); err != nil {
		t.Fatalf("no answer to HELLO: %v", err)
	}
	if h, err := frame.ParseHeader(hdr); err != nil || h.Type != frame.TypeWelcome {
		t.Fatalf("answer %x, want WELCOME", hdr)
	}
	waitFor(t, "unconfirmed session in the gauge", 5*time.Second, func() bool {
		return metric("lifeline_sessions_unconfirmed") == "1"
	})
}
