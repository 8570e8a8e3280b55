package resume

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// recordConn keeps a copy of everything written on a link.
type recordConn struct {
	net.Conn
	mu  sync.Mutex
	out bytes.Buffer
}

func (r *recordConn) Write(p []byte) (int, error) {
	r.mu.Lock()
	r.out.Write(p)
	r.mu.Unlock()
	return r.Conn.Write(p)
}

// tcpGateway starts a gateway on loopback and returns its address.
func tcpGateway(t testing.TB, sc *ServerConfig) (*Server, string) {
	t.Helper()
	srv, err := NewServer(sc)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { srv.Serve(ln); close(done) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return srv, ln.Addr().String()
}

// rawExchange writes b on a fresh connection and returns the gateway's
// answer frame.
func rawExchange(t *testing.T, addr string, b []byte) (frame.Header, []byte) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	fr := frame.NewReader(c, 4096)
	h, err := fr.Next()
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	p, err := fr.Payload(h)
	if err != nil {
		t.Fatal(err)
	}
	return h, append([]byte(nil), p...)
}

func wantReject(t *testing.T, h frame.Header, p []byte, code frame.Code) string {
	t.Helper()
	if h.Type != frame.TypeReject {
		t.Fatalf("got %v, want REJECT %v", h.Type, code)
	}
	cr, err := frame.ParseCodeReason(p)
	if err != nil {
		t.Fatal(err)
	}
	if cr.Code != code {
		t.Fatalf("REJECT %v (%q), want %v", cr.Code, cr.Reason, code)
	}
	return cr.Reason
}

// signedResume builds a RESUME for c's session with a valid proof.
func signedResume(c *Conn, counter, received uint64) []byte {
	s := c.s
	s.mu.Lock()
	cred := s.cl.cred
	s.unlock()
	_, pub, _ := newKey()
	r := &frame.Resume{SessionID: s.id, Counter: counter, Key: pub, Received: received, Window: received + 1<<20}
	r.Proof = cred.resumeProof(r, nil)
	return frame.AppendResume(frame.AppendPreamble(nil), r)
}

func dialTo(addr string, rec **recordConn) DialFunc {
	return func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil || rec == nil {
			return c, err
		}
		r := &recordConn{Conn: c}
		*rec = r
		return r, nil
	}
}

func TestRejectVersion(t *testing.T) {
	_, addr := tcpGateway(t, serverConfig(testConfig()))
	b := append(frame.Magic[:], 9)
	h, p := rawExchange(t, addr, b)
	wantReject(t, h, p, frame.CodeVersion)
}

func TestRejectGarbageAndOversize(t *testing.T) {
	srv, addr := tcpGateway(t, serverConfig(testConfig()))
	h, p := rawExchange(t, addr, []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	wantReject(t, h, p, frame.CodeValidation)
	// A header announcing a 16 MiB HELLO: refused before reading it.
	b := frame.AppendPreamble(nil)
	b = append(b, byte(frame.TypeHello), 0xff, 0xff, 0xff)
	h, p = rawExchange(t, addr, b)
	wantReject(t, h, p, frame.CodeValidation)
	// DATA before any handshake.
	b = frame.AppendDataHeader(frame.AppendPreamble(nil), 3)
	h, p = rawExchange(t, addr, append(b, "abc"...))
	wantReject(t, h, p, frame.CodeValidation)
	// The gateway still serves.
	c, err := Dial(context.Background(), dialTo(addr, nil), "r", testConfig())
	if err != nil {
		t.Fatal(err)
	}
	s, _ := srv.Accept()
	c.Reset(CodeAppReset, "done")
	s.Close()
}

func TestSilentClientDropped(t *testing.T) {
	cfg := testConfig()
	cfg.HandshakeTimeout = 300 * time.Millisecond
	_, addr := tcpGateway(t, serverConfig(cfg))
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	if n != 0 || err == nil {
		t.Fatalf("read %d, %v; want the gateway to close", n, err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("dropped after %v; handshake timeout is 300ms", el)
	}
}

func TestResumeErrors(t *testing.T) {
	sc := serverConfig(testConfig())
	sc.FailureBurst = 1000 // this test makes many failures on purpose
	srv, addr := tcpGateway(t, sc)
	var rec *recordConn
	c, err := Dial(context.Background(), dialTo(addr, &rec), "r", testConfig())
	if err != nil {
		t.Fatal(err)
	}
	s, _ := srv.Accept()
	defer s.Close()
	defer c.Reset(CodeAppReset, "test over")

	// Move the session to a second link and capture its RESUME.
	c.Kill()
	deadlineState(t, c, StateActive)
	rec.mu.Lock()
	captured := append([]byte(nil), rec.out.Bytes()[:frame.PreambleLen+frame.HeaderLen+105]...)
	rec.mu.Unlock()

	t.Run("replayed resume is CONFLICT", func(t *testing.T) {
		h, p := rawExchange(t, addr, captured)
		wantReject(t, h, p, frame.CodeConflict)
	})
	t.Run("wrong proof is ACCESS_DENIED", func(t *testing.T) {
		bad := append([]byte(nil), captured...)
		bad[len(bad)-1] ^= 1
		h, p := rawExchange(t, addr, bad)
		wantReject(t, h, p, frame.CodeAccessDenied)
	})
	t.Run("unknown session is NOT_FOUND", func(t *testing.T) {
		bad := append([]byte(nil), captured...)
		bad[frame.PreambleLen+frame.HeaderLen] ^= 1 // session id
		h, p := rawExchange(t, addr, bad)
		wantReject(t, h, p, frame.CodeNotFound)
	})
	t.Run("malformed RESUME is VALIDATION", func(t *testing.T) {
		bad := append([]byte(nil), captured...)
		bad[len(bad)-frame.ProofLen-1] = 0x80 // unknown flag
		h, p := rawExchange(t, addr, bad)
		wantReject(t, h, p, frame.CodeValidation)
	})
	// The session survived all of that.
	if _, err := c.Write([]byte("still here")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 10)
	if _, err := io.ReadFull(s, got); err != nil || string(got) != "still here" {
		t.Fatalf("after failed resumes: %q, %v", got, err)
	}
	if srv.ResumeFailures() < 4 {
		t.Fatalf("ResumeFailures = %d", srv.ResumeFailures())
	}
}

func TestThrottled(t *testing.T) {
	sc := serverConfig(testConfig())
	sc.FailureBurst = 3
	_, addr := tcpGateway(t, sc)
	var sid [16]byte
	r := &frame.Resume{SessionID: sid, Counter: 1}
	b := frame.AppendResume(frame.AppendPreamble(nil), r)
	for i := range 3 {
		h, p := rawExchange(t, addr, b)
		if reason := wantReject(t, h, p, frame.CodeNotFound); reason == "" {
			t.Fatalf("attempt %d: empty reason", i)
		}
	}
	h, p := rawExchange(t, addr, b)
	wantReject(t, h, p, frame.CodeThrottled)
}

func TestOutOfWindowResume(t *testing.T) {
	srv, addr := tcpGateway(t, serverConfig(testConfig()))
	c, err := Dial(context.Background(), dialTo(addr, nil), "r", testConfig())
	if err != nil {
		t.Fatal(err)
	}
	s, _ := srv.Accept()
	defer c.Reset(CodeAppReset, "")
	s.Write([]byte("12345"))
	// Claims 1000 bytes received when the gateway wrote 5.
	h, p := rawExchange(t, addr, signedResume(c, 1000, 1000))
	wantReject(t, h, p, frame.CodeValidation)
	// A resume with a valid proof but impossible offsets is the session's
	// own client lying or broken: the session cannot go on safely.
	if _, err := s.Read(make([]byte, 1)); !errors.Is(err, ErrValidation) {
		t.Fatalf("gateway side: %v, want VALIDATION", err)
	}
}

// A RESUME below what the client has acknowledged is stale, not a loss:
// in a GOAWAY migration the client acknowledges on the old link after it
// sent RESUME, and the gateway may free those bytes before the RESUME
// arrives. The gateway resends from what was acknowledged and says so.
func TestStaleResumePointResendsFromAcked(t *testing.T) {
	srv, addr := tcpGateway(t, serverConfig(testConfig()))
	c, err := Dial(context.Background(), dialTo(addr, nil), "r", testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, _ := srv.Accept()
	defer s.Close()
	msg := bytes.Repeat([]byte("x"), 100<<10)
	if _, err := s.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
		t.Fatal(err)
	}
	// Wait until the gateway has freed the acknowledged bytes.
	for i := 0; s.Stats().Buffered > 0; i++ {
		if i > 500 {
			t.Fatal("gateway never saw the ACK")
		}
		time.Sleep(10 * time.Millisecond)
	}
	h, p := rawExchange(t, addr, signedResume(c, 1000, 0))
	if h.Type != frame.TypeResumed {
		t.Fatalf("got %v, want RESUMED", h.Type)
	}
	d, err := frame.ParseResumed(p)
	if err != nil {
		t.Fatal(err)
	}
	if d.Resend != uint64(len(msg)) {
		t.Fatalf("RESUMED resend %d, want %d (what the client acknowledged)", d.Resend, len(msg))
	}
}

// When the bytes a peer needs are gone, both sides get BUFFER_LOST: an
// abortive close, never a silent gap. (A gateway frees only acknowledged
// bytes, so this takes a side that lost its state; here the gateway's
// replay buffer is emptied behind its back.)
func TestBufferLost(t *testing.T) {
	srv, addr := tcpGateway(t, serverConfig(testConfig()))
	g := &gate{dial: dialTo(addr, nil)}
	c, err := Dial(context.Background(), g.Dial, "r", testConfig())
	if err != nil {
		t.Fatal(err)
	}
	s, _ := srv.Accept()
	// Confirm the session, then cut the link so that what the gateway
	// writes next stays unacknowledged.
	if _, err := c.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(s, make([]byte, 2)); err != nil {
		t.Fatal(err)
	}
	g.set(true)
	c.Kill()
	for i := 0; s.State() != StateDisconnected; i++ {
		if i > 500 {
			t.Fatal("gateway never parked")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := s.Write(bytes.Repeat([]byte("x"), 100<<10)); err != nil {
		t.Fatal(err)
	}
	gs := s.s
	gs.mu.Lock()
	gs.send.highest = gs.send.End() // as if sent before the loss
	gs.send.next = gs.send.End()
	gs.send.Discard(gs.send.End())
	gs.unlock()
	g.set(false)
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, ErrBufferLost) {
		t.Fatalf("client side: %v, want BUFFER_LOST", err)
	}
	if _, err := s.Read(make([]byte, 1)); !errors.Is(err, ErrBufferLost) {
		t.Fatalf("gateway side: %v, want BUFFER_LOST", err)
	}
	c.Close()
}

func TestExpiredSessionNotFound(t *testing.T) {
	sc := serverConfig(testConfig())
	sc.Session.ReconnectTimeout = 200 * time.Millisecond // the gateway's cap
	srv, addr := tcpGateway(t, sc)
	var down sync.Mutex
	dial := dialTo(addr, nil)
	gated := func(ctx context.Context) (net.Conn, error) {
		down.Lock()
		defer down.Unlock()
		return dial(ctx)
	}
	cfg := testConfig()
	c, err := Dial(context.Background(), gated, "r", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.ReconnectTimeout(); got != 200*time.Millisecond {
		t.Fatalf("negotiated reconnect timeout %v, want min(10s, 200ms)", got)
	}
	s, _ := srv.Accept()
	down.Lock()
	c.Kill()
	if _, err := s.Read(make([]byte, 1)); !errors.Is(err, ErrTimeout) {
		t.Fatalf("gateway side after expiry: %v, want TIMEOUT", err)
	}
	down.Unlock()
	// The client's own clock says 200ms too: it gives up.
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, ErrTimeout) && !errors.Is(err, ErrNotFound) {
		t.Fatalf("client side: %v, want TIMEOUT or NOT_FOUND", err)
	}
	// A resume for the expired session is NOT_FOUND.
	h, p := rawExchange(t, addr, signedResume(c, 1000, 0))
	wantReject(t, h, p, frame.CodeNotFound)
	c.Close()
}

func TestLimitsAndShutdown(t *testing.T) {
	sc := serverConfig(testConfig())
	sc.MaxSessions = 1
	sc.Admit = func(route string, _ net.Addr) error {
		switch route {
		case "nope":
			return &Error{Code: frame.CodeNotFound, Reason: "no route " + route}
		case "broken":
			return errors.New("admission backend down")
		}
		return nil
	}
	srv, addr := tcpGateway(t, sc)
	dial := dialTo(addr, nil)
	if _, err := Dial(context.Background(), dial, "nope", testConfig()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown route: %v", err)
	}
	if _, err := Dial(context.Background(), dial, "broken", testConfig()); !errors.Is(err, ErrInternal) {
		t.Fatalf("admission error: %v", err)
	}
	c, err := Dial(context.Background(), dial, "r", testConfig())
	if err != nil {
		t.Fatal(err)
	}
	s, _ := srv.Accept()
	if _, err := Dial(context.Background(), dial, "r", testConfig()); !errors.Is(err, ErrLimit) {
		t.Fatalf("over MaxSessions: %v", err)
	}
	// Draining: no new sessions, the existing one carries on.
	drained := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	go func() { drained <- srv.Shutdown(ctx) }()
	for srv.NumSessions() == 1 {
		if _, err := Dial(context.Background(), dial, "r", testConfig()); errors.Is(err, ErrShuttingDown) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	c.Write([]byte("ok"))
	if b := make([]byte, 2); func() bool { _, err := io.ReadFull(s, b); return err != nil || string(b) != "ok" }() {
		t.Fatal("session broken while draining")
	}
	// The drain deadline passes: the session is aborted, loudly.
	if err := <-drained; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v", err)
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, ErrShuttingDown) {
		t.Fatalf("client after forced shutdown: %v", err)
	}
	c.Close()
	s.Close()
}

func TestResumptionDisabled(t *testing.T) {
	e := tcpEnv(t, serverConfig(testConfig()), nil)
	defer e.stop()
	cfg := testConfig()
	cfg.ReconnectTimeout = 0
	c, s := e.pair(cfg)
	c.Kill()
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, ErrTimeout) {
		t.Fatalf("client: %v", err)
	}
	if _, err := s.Read(make([]byte, 1)); !errors.Is(err, ErrTimeout) {
		t.Fatalf("gateway: %v", err)
	}
	c.Close()
	s.Close()
}

func deadlineState(t *testing.T, c *Conn, want State) {
	t.Helper()
	for i := 0; c.State() != want || c.Stats().Resumes == 0; i++ {
		if i > 1000 {
			t.Fatalf("state %v, want %v after a resume", c.State(), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A client that vanishes right after WELCOME never reaches Accept (no
// upstream is dialed for it); its session is parked like any other and
// freed at its reconnect timeout.
func TestUnconfirmedSessionNotAccepted(t *testing.T) {
	srv, addr := tcpGateway(t, serverConfig(testConfig()))
	_, pub, _ := newKey()
	b, _ := frame.AppendHello(frame.AppendPreamble(nil), &frame.Hello{Key: pub, ReconnectTimeout: 300, Buffer: 1 << 20, Route: "r"})
	h, _ := rawExchange(t, addr, b) // reads WELCOME, then closes
	if h.Type != frame.TypeWelcome {
		t.Fatalf("got %v", h.Type)
	}
	accepted := make(chan *Conn, 1)
	go func() {
		if c, err := srv.Accept(); err == nil {
			accepted <- c
		}
	}()
	deadline := time.Now().Add(3 * time.Second)
	for srv.NumSessions() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("unconfirmed session still held after its 300ms reconnect timeout")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case c := <-accepted:
		t.Fatalf("unconfirmed session %v was handed to Accept", c.SessionID())
	case <-time.After(100 * time.Millisecond):
	}
}

// When the buffers of all sessions reach the memory budget, new sessions
// are refused with LIMIT and the existing ones keep every byte.
func TestMemoryBudget(t *testing.T) {
	sc := serverConfig(testConfig())
	sc.MemoryBudget = 256 << 10
	srv, addr := tcpGateway(t, sc)
	dial := dialTo(addr, nil)
	c, err := Dial(context.Background(), dial, "r", testConfig())
	if err != nil {
		t.Fatal(err)
	}
	s, _ := srv.Accept()
	data := stream(42, 1<<20)
	go c.Write(data) // the gateway's application does not read yet
	for i := 0; srv.MemoryInUse() < sc.MemoryBudget; i++ {
		if i > 1000 {
			t.Fatalf("memory in use %d never reached the budget", srv.MemoryInUse())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := Dial(context.Background(), dial, "r", testConfig()); !errors.Is(err, ErrLimit) {
		t.Fatalf("new session over the budget: %v, want LIMIT", err)
	}
	got := make([]byte, len(data))
	if _, err := io.ReadFull(s, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("existing session after the budget: %v, equal %v", err, bytes.Equal(got, data))
	}
	c.Reset(CodeAppReset, "")
	s.Close()
	for i := 0; srv.MemoryInUse() != 0; i++ {
		if i > 1000 {
			t.Fatalf("memory in use %d after the session ended", srv.MemoryInUse())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// GOAWAY moves a session to a new link while the old one keeps working:
// the stream goes on without a gap and without a parked phase.
func TestGoAwayMigrates(t *testing.T) {
	e := tcpEnv(t, serverConfig(testConfig()), nil)
	defer e.stop()
	c, s := e.pair(testConfig())
	first := c.RemoteAddr().String() + c.LocalAddr().String()
	if err := s.GoAway("rebalance"); err != nil {
		t.Fatal(err)
	}
	for i := 0; c.Stats().Resumes == 0; i++ {
		if i > 1000 {
			t.Fatal("client never moved")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if c.LocalAddr().String()+c.RemoteAddr().String() == first {
		t.Fatal("still on the first link")
	}
	if c.Stats().LinkFailures != 0 {
		t.Fatalf("client counted %d link failures for a migration", c.Stats().LinkFailures)
	}
	c.Write([]byte("moved"))
	b := make([]byte, 5)
	if _, err := io.ReadFull(s, b); err != nil || string(b) != "moved" {
		t.Fatalf("after GOAWAY: %q %v", b, err)
	}
	if err := c.GoAway("x"); err == nil {
		t.Fatal("GoAway from the client side accepted")
	}
	c.Reset(CodeAppReset, "")
	s.Close()
}

// GOAWAY naming another address moves the session's link there, with no
// gap in the stream, and later links after a failure go there too: an
// operator moving sessions off a listener.
func TestGoAwayToAnotherAddress(t *testing.T) {
	srv, addr1 := tcpGateway(t, serverConfig(testConfig()))
	ln2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { srv.Serve(ln2); close(done) }()
	t.Cleanup(func() { srv.Close(); <-done })
	addr2 := ln2.Addr().String()

	cfg := testConfig()
	var d net.Dialer
	cfg.DialAddr = func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
	c, err := Dial(context.Background(), dialTo(addr1, nil), "r", cfg)
	if err != nil {
		t.Fatal(err)
	}
	s, _ := srv.Accept()
	if got := c.RemoteAddr().String(); got != addr1 {
		t.Fatalf("first link to %s, want %s", got, addr1)
	}
	// A stream that runs across the move.
	var sent []byte
	for i := 0; i < 50; i++ {
		msg := bytes.Repeat([]byte{byte(i)}, 1000)
		sent = append(sent, msg...)
		c.Write(msg)
		if i == 10 {
			if err := s.GoAwayTo(addr2, "move to listener 2"); err != nil {
				t.Fatal(err)
			}
		}
	}
	got := make([]byte, len(sent))
	s.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(s, got); err != nil || !bytes.Equal(got, sent) {
		t.Fatalf("stream across the move: %v (equal %v)", err, bytes.Equal(got, sent))
	}
	for i := 0; c.RemoteAddr().String() != addr2; i++ {
		if i > 1000 {
			t.Fatalf("client still on %s", c.RemoteAddr())
		}
		time.Sleep(5 * time.Millisecond)
	}
	// After a failure, the client resumes at the new address too.
	c.Kill()
	for i := 0; c.Stats().Resumes < 2; i++ {
		if i > 1000 {
			t.Fatal("client never resumed after the kill")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if got := c.RemoteAddr().String(); got != addr2 {
		t.Fatalf("resumed to %s after the move, want %s", got, addr2)
	}
	if err := s.GoAwayTo(strings.Repeat("x", 300), ""); !errors.Is(err, ErrValidation) {
		t.Fatalf("GOAWAY to a 300-byte address: %v, want VALIDATION", err)
	}
	c.Reset(CodeAppReset, "")
	s.Close()
}

// A THROTTLED REJECT carries the gateway's suggested delay, and a client
// waits at least that long before it tries again.
func TestThrottledRejectRetryAfterIsHonoured(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := DefaultConfig()
		e := memEnv(t, serverConfig(cfg), nil)
		defer e.stop()
		const retry = 3 * time.Second
		var mu sync.Mutex
		var dials []time.Time
		throttle := true
		dial := func(ctx context.Context) (net.Conn, error) {
			mu.Lock()
			dials = append(dials, time.Now())
			busy := throttle && len(dials) > 1 // the first dial is the HELLO
			mu.Unlock()
			if !busy {
				return e.dial(ctx)
			}
			a, b := net.Pipe()
			go func() { // a gateway that sheds load
				defer b.Close()
				fr := frame.NewReader(b, 4096)
				if _, err := fr.ReadPreamble(); err != nil {
					return
				}
				if _, _, err := readHandshake(fr); err != nil {
					return
				}
				b.Write(frame.AppendReject(nil, frame.Reject{Code: frame.CodeThrottled, RetryAfter: retry, Reason: "busy"}))
			}()
			return a, nil
		}
		c, err := Dial(context.Background(), dial, "r", cfg)
		if err != nil {
			t.Fatal(err)
		}
		s, _ := e.srv.Accept()
		synctest.Wait()
		c.Kill()
		time.Sleep(retry / 2)
		synctest.Wait()
		mu.Lock()
		if n := len(dials); n != 2 {
			mu.Unlock()
			t.Fatalf("%d dials %v after the kill, want the HELLO and one throttled RESUME", n-1, retry/2)
		}
		throttle = false
		mu.Unlock()
		time.Sleep(retry)
		synctest.Wait()
		mu.Lock()
		gap := dials[2].Sub(dials[1])
		mu.Unlock()
		if gap < retry {
			t.Fatalf("retried %v after a THROTTLED REJECT that asked for %v", gap, retry)
		}
		if c.State() != StateActive {
			t.Fatalf("client %v after the gateway had room", c.State())
		}
		c.Reset(CodeAppReset, "")
		s.Close()
	})
}

// Hooks report each resume with its outage and the first byte after it.
func TestHooksReportResumeAndFirstByte(t *testing.T) {
	e := tcpEnv(t, serverConfig(testConfig()), nil)
	defer e.stop()
	var mu sync.Mutex
	var outages, firsts []time.Duration
	cfg := testConfig()
	cfg.Hooks = &Hooks{
		Resumed:   func(d time.Duration) { mu.Lock(); outages = append(outages, d); mu.Unlock() },
		FirstByte: func(d time.Duration) { mu.Lock(); firsts = append(firsts, d); mu.Unlock() },
	}
	c, s := e.pair(cfg)
	c.Write([]byte("a"))
	io.ReadFull(s, make([]byte, 1))
	mu.Lock()
	if len(outages)+len(firsts) != 0 {
		t.Fatalf("hooks on a first link: %v %v", outages, firsts)
	}
	mu.Unlock()
	c.Kill()
	for i := 0; c.Stats().Resumes == 0; i++ {
		if i > 1000 {
			t.Fatal("never resumed")
		}
		time.Sleep(5 * time.Millisecond)
	}
	c.Write([]byte("b"))
	if _, err := io.ReadFull(s, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(outages) != 1 || outages[0] <= 0 || outages[0] > 5*time.Second {
		t.Fatalf("Resumed hook: %v, want one outage", outages)
	}
	if len(firsts) != 1 || firsts[0] < 0 || firsts[0] > 5*time.Second {
		t.Fatalf("FirstByte hook: %v, want one", firsts)
	}
	c.Reset(CodeAppReset, "")
	s.Close()
}

// Stats.DownSince says when a parked session lost its link, and is zero
// once it has one again.
func TestStatsDownSince(t *testing.T) {
	srv, addr := tcpGateway(t, serverConfig(testConfig()))
	g := &gate{dial: dialTo(addr, nil)}
	c, err := Dial(context.Background(), g.Dial, "r", testConfig())
	if err != nil {
		t.Fatal(err)
	}
	s, _ := srv.Accept()
	if !c.Stats().DownSince.IsZero() || !s.Stats().DownSince.IsZero() {
		t.Fatal("DownSince set on a connected session")
	}
	g.set(true)
	before := time.Now()
	c.Kill()
	for i := 0; s.Stats().DownSince.IsZero(); i++ {
		if i > 1000 {
			t.Fatal("gateway never parked")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if d := c.Stats().DownSince; d.Before(before) || time.Since(d) > 5*time.Second {
		t.Fatalf("client DownSince %v, lost after %v", d, before)
	}
	g.set(false)
	for i := 0; c.State() != StateActive || !c.Stats().DownSince.IsZero(); i++ {
		if i > 1000 {
			t.Fatal("never resumed")
		}
		time.Sleep(5 * time.Millisecond)
	}
	c.Reset(CodeAppReset, "")
	s.Close()
}
