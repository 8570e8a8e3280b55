//go:build linux

package resume

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// captureConn passes writes through until capture is set; then it keeps
// them, for the test to put on the wire in pieces of its choosing.
type captureConn struct {
	net.Conn
	mu      sync.Mutex
	capture bool
	kept    []byte
}

func (c *captureConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.capture {
		c.kept = append(c.kept, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// take returns what was kept since the last take.
func (c *captureConn) take() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.kept
	c.kept = nil
	return b
}

// tlsPipe returns a TLS client over a TLSSocket, and a TLS server whose
// writes can be captured, after their handshake.
func tlsPipe(t *testing.T) (client *tls.Conn, sock *tlsSocket, server *tls.Conn, wire *captureConn) {
	t.Helper()
	a, b := tcpPair(t)
	ts, ok := TLSSocket(a).(*tlsSocket)
	if !ok {
		t.Fatal("TLSSocket did not wrap a *net.TCPConn")
	}
	wire = &captureConn{Conn: b}
	client = tls.Client(ts, &tls.Config{InsecureSkipVerify: true}) // the test checks reads, not the certificate
	server = tls.Server(wire, &tls.Config{Certificates: []tls.Certificate{testCert(t)}})
	errs := make(chan error, 1)
	go func() { errs <- server.Handshake() }()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := client.HandshakeContext(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return client, ts, server, wire
}

// record writes one DATA frame as one TLS record and returns the record.
func record(t *testing.T, server *tls.Conn, wire *captureConn, payload string) []byte {
	t.Helper()
	if _, err := server.Write(append(frame.AppendDataHeader(nil, len(payload)), payload...)); err != nil {
		t.Fatal(err)
	}
	return wire.take()
}

func nextData(t *testing.T, fr *frame.Reader, want string) {
	t.Helper()
	h, err := fr.Next()
	if err != nil {
		t.Fatalf("Next: %v (want DATA %q)", err, want)
	}
	if h.Type != frame.TypeData || h.Len != len(want) {
		t.Fatalf("header %v len %d, want DATA %d", h.Type, h.Len, len(want))
	}
	got := make([]byte, h.Len)
	if _, err := fr.ReadData(got); err != nil || string(got) != want {
		t.Fatalf("DATA %q, %v; want %q", got, err, want)
	}
}

// The idle probe of a TLS link: the reader waits for the socket only when
// crypto/tls has nothing either. A whole record crypto/tls already holds
// is read without a wait (waiting on the socket would hang: it has
// nothing more); half a record makes the reader wait, and what crypto/tls
// kept of it is completed by the rest; EOF is an error, not a wait.
func TestTLSIdleProbe(t *testing.T) {
	client, ts, server, wire := tlsPipe(t)
	wire.mu.Lock()
	wire.capture = true
	wire.mu.Unlock()
	raw := wire.Conn

	var waits int
	var onWait func()
	fr := frame.NewReader(client, linkReadBuffer)
	fr.SetIdleProbe(ts.nowait.Store, func(err error) bool { return err == errNoData })
	fr.SetIdleWait(func() error {
		waits++
		if onWait != nil {
			onWait()
			onWait = nil
		}
		return waitReadable(ts.rc)
	})

	// Two whole records at once: crypto/tls reads both from the socket
	// with its first read; the second comes out of its buffer.
	r1, r2 := record(t, server, wire, "one"), record(t, server, wire, "two")
	if _, err := raw.Write(append(r1, r2...)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "records on the socket", func() bool { return readableNow(ts.rc) })
	nextData(t, fr, "one")
	nextData(t, fr, "two")
	if waits != 0 {
		t.Fatalf("%d idle waits with the bytes already there, want 0", waits)
	}

	// A whole record and half of the next, then (during the wait) the rest.
	r3, r4 := record(t, server, wire, "three"), record(t, server, wire, "four, split across the wait")
	half := len(r4) / 2
	if _, err := raw.Write(append(r3, r4[:half]...)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "records on the socket", func() bool { return readableNow(ts.rc) })
	onWait = func() {
		if _, err := raw.Write(r4[half:]); err != nil {
			t.Error(err)
		}
	}
	nextData(t, fr, "three")
	nextData(t, fr, "four, split across the wait")
	if waits != 1 {
		t.Fatalf("%d idle waits for the split record, want 1", waits)
	}

	// Nothing at all: the wait, then the record.
	r5 := record(t, server, wire, "five")
	onWait = func() {
		if _, err := raw.Write(r5); err != nil {
			t.Error(err)
		}
	}
	nextData(t, fr, "five")
	if waits != 2 {
		t.Fatalf("%d idle waits, want 2", waits)
	}

	// The peer's close: EOF from the probe, no wait.
	raw.(*net.TCPConn).CloseWrite()
	waitFor(t, 5*time.Second, "EOF on the socket", func() bool { return readableNow(ts.rc) })
	if _, err := fr.Next(); err != io.EOF && err != io.ErrUnexpectedEOF {
		t.Fatalf("Next after the peer's close: %v, want EOF", err)
	}
	if waits != 2 {
		t.Fatalf("%d idle waits, want 2 (EOF is not a wait)", waits)
	}
}

// tlsSocketEnv is tlsEnv's gateway and dialer with TLSSocket under both
// ends, as the tls transport sets them up.
func tlsSocketEnv(t *testing.T, sc *ServerConfig) *env {
	t.Helper()
	srv, err := NewServer(sc)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	stc := &tls.Config{Certificates: []tls.Certificate{testCert(t)}}
	done := make(chan struct{})
	go func() { srv.Serve(&tlsSocketListener{Listener: ln, tc: stc}); close(done) }()
	addr := ln.Addr().String()
	dial := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		raw, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		c := tls.Client(TLSSocket(raw), &tls.Config{InsecureSkipVerify: true}) // the test checks parking, not the certificate
		if err := c.HandshakeContext(ctx); err != nil {
			raw.Close()
			return nil, err
		}
		return c, nil
	}
	return &env{t: t, srv: srv, dial: dial, stop: func() { srv.Close(); <-done }}
}

type tlsSocketListener struct {
	net.Listener
	tc *tls.Config
}

func (l *tlsSocketListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return tls.Server(TLSSocket(c), l.tc), nil
}

// An idle TLS session keeps no reader goroutine on either end, as a TCP
// one: bytes either way, a link break and Close still reach the parked
// readers, and nothing is left registered or open.
func TestTLSIdleReaderParks(t *testing.T) {
	fds := openFDs(t)
	cfg := testConfig()
	e := tlsSocketEnv(t, serverConfig(cfg))
	c, s := e.pair(cfg)
	roundTrip(t, c, s, "a")
	roundTrip(t, s, c, "b")
	waitIdle(t, c, s, 1)

	big := make([]byte, 1<<20)
	for i := range big {
		big[i] = byte(i * 7)
	}
	roundTrip(t, c, s, string(big))
	waitIdle(t, c, s, 1)
	roundTrip(t, s, c, "from the gateway")
	waitIdle(t, c, s, 1)

	before := c.Stats().Resumes
	c.Kill()
	waitFor(t, 5*time.Second, "resumed", func() bool { return c.Stats().Resumes > before && c.State() == StateActive })
	roundTrip(t, c, s, "after the break")
	roundTrip(t, s, c, "and back")
	waitIdle(t, c, s, 1)

	closeBoth(c, s)
	e.stop()
	waitNoLeaks(t, fds)
}
