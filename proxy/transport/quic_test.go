package transport

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"go.uber.org/goleak"
	"golang.org/x/net/nettest"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/resume"
)

// ---------------------------------------------------------------------------
// Helpers. All names start with quic so they do not collide with the other
// tests of the package.

var (
	quicCertOnce sync.Once
	quicCert     *tls.Config
	quicCertFP   string
	quicCertErr  error
)

// quicTestTLS returns the gateway config and the client's pinned config.
func quicTestTLS(t testing.TB) (server, client *tls.Config) {
	t.Helper()
	quicCertOnce.Do(func() {
		cert, err := SelfSignedCert()
		quicCert, quicCertFP, quicCertErr = ServerTLS(cert), "", err
		if err == nil {
			quicCertFP = CertFingerprint(cert.Leaf.Raw)
		}
	})
	if quicCertErr != nil {
		t.Fatal(quicCertErr)
	}
	return quicCert, PinnedTLS(quicCertFP, "")
}

func quicLogger(t testing.TB) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(quicLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type quicLogWriter struct{ t testing.TB }

func (w quicLogWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// quicListen and quicNewDialer open the quic transport's two ends, logging to
// the test.
func quicListen(t testing.TB, tc *tls.Config, q QUICConfig) (*quicListener, error) {
	return listenQUIC(Config{Name: "quic", Addr: "127.0.0.1:0", TLS: tc, QUIC: &q, Logger: quicLogger(t)})
}

func quicNewDialer(t testing.TB, addr string, tc *tls.Config, q QUICConfig) (*quicDialer, error) {
	return newQUICDialer(Config{Name: "quic", Addr: addr, TLS: tc, QUIC: &q, Logger: quicLogger(t)})
}

// connections returns the live connections .
func (l *quicListener) connections() []*quic.Conn {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]*quic.Conn, 0, len(l.conns))
	for qc := range l.conns {
		out = append(out, qc)
	}
	return out
}

// quicNoLeaks checks, when the test and all its cleanups are done, that no
// goroutine the test started is left.
func quicNoLeaks(t *testing.T) {
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opt) })
}

// quicTestConfig and quicSessionConfig are the timers of most tests:
// short enough for tests, long enough that a loaded machine running -race
// does not declare healthy links dead (a test that wants a link failure
// causes one). QUIC idle (6 s) > lifeline liveness (3 s), as in production.
func quicTestConfig(t testing.TB) QUICConfig {
	c := DefaultQUICConfig()
	c.IdleTimeout = 6 * time.Second
	c.KeepAlivePeriod = time.Second
	c.HandshakeTimeout = 2 * time.Second
	return c
}

func quicSessionConfig(t testing.TB) *resume.Config {
	c := resume.DefaultConfig()
	c.ReconnectTimeout = 30 * time.Second
	c.PingInterval = 500 * time.Millisecond
	c.LivenessTimeout = 3 * time.Second
	c.HandshakeTimeout = 5 * time.Second
	c.LingerTimeout = 10 * time.Second
	c.Strategy = resume.Backoff{Initial: 10 * time.Millisecond, Max: 100 * time.Millisecond, Jitter: 0.2}
	return c
}

// quicFastConfigs are short timers for the blackhole tests: QUIC idle 2 s,
// lifeline ping 200 ms and liveness 600 ms.
func quicFastConfigs(t testing.TB) (QUICConfig, *resume.Config) {
	q := quicTestConfig(t)
	q.IdleTimeout = 2 * time.Second
	q.KeepAlivePeriod = 300 * time.Millisecond
	q.HandshakeTimeout = 500 * time.Millisecond
	c := quicSessionConfig(t)
	c.PingInterval = 200 * time.Millisecond
	c.LivenessTimeout = 600 * time.Millisecond
	c.HandshakeTimeout = 2 * time.Second
	return q, c
}

// quicEnv is a resume.Server fed by listenQUIC, echoing every session, and
// a QUIC dialer, optionally through a UDP fault relay.
type quicEnv struct {
	t      testing.TB
	ln     *quicListener
	srv    *resume.Server
	dialer *quicDialer
	relay  *faultnet.UDPRelay
	cfg    *resume.Config

	mu      sync.Mutex
	streams []*quicStream // gateway-side links, in accept order
	wg      sync.WaitGroup
}

type quicEnvOpts struct {
	relay bool
	fast  bool // quicFastConfigs
}

func newQUICEnv(t *testing.T, o quicEnvOpts) *quicEnv {
	t.Helper()
	stls, ctls := quicTestTLS(t)
	qcfg, scfg := quicTestConfig(t), quicSessionConfig(t)
	if o.fast {
		qcfg, scfg = quicFastConfigs(t)
	}
	e := &quicEnv{t: t, cfg: scfg}
	ln, err := quicListen(t, stls, qcfg)
	if err != nil {
		t.Fatal(err)
	}
	e.ln = ln
	sc := resume.DefaultServerConfig()
	sc.Session = e.cfg
	// Every session of a test comes from one QUIC connection, hence one
	// source: up to 200 of them dial at once, before any is confirmed.
	sc.MaxUnconfirmedPerSource = 256
	e.srv, err = resume.NewServer(sc)
	if err != nil {
		t.Fatal(err)
	}
	target := e.ln.Addr().String()
	if o.relay {
		relay, err := faultnet.NewUDPRelay(target)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(relay.Close)
		e.relay = relay
		target = e.relay.Addr()
	}
	d, err := quicNewDialer(t, target, ctls, qcfg)
	if err != nil {
		t.Fatal(err)
	}
	e.dialer = d

	e.wg.Add(2)
	go func() { // links
		defer e.wg.Done()
		for {
			c, err := e.ln.Accept()
			if err != nil {
				return
			}
			e.mu.Lock()
			e.streams = append(e.streams, c.(*quicStream))
			e.mu.Unlock()
			e.wg.Add(1)
			go func() { defer e.wg.Done(); e.srv.ServeLink(c) }()
		}
	}()
	go func() { // sessions: echo
		defer e.wg.Done()
		for {
			c, err := e.srv.Accept()
			if err != nil {
				return
			}
			e.wg.Add(1)
			go func() {
				defer e.wg.Done()
				if _, err := io.Copy(c, c); err != nil {
					e.t.Logf("gateway echo %v: %v (stats %+v)", c.SessionID(), err, c.Stats())
				}
				c.CloseWrite()
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		e.dialer.Close()
		e.ln.Close()
		e.srv.Close()
		if e.relay != nil {
			e.relay.Close()
		}
		e.wg.Wait()
	})
	return e
}

func (e *quicEnv) dial() *resume.Conn {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := resume.Dial(ctx, e.dialer.Dial, "r", e.cfg)
	if err != nil {
		e.t.Fatalf("resume.Dial over QUIC: %v", err)
	}
	return c
}

func (e *quicEnv) lastStream() *quicStream {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.streams) == 0 {
		return nil
	}
	return e.streams[len(e.streams)-1]
}

// quicParallel runs n sessions with run(i, conn) and fails on the first
// error, within limit.
func quicParallel(t *testing.T, e *quicEnv, conns []*resume.Conn, limit time.Duration, run func(i int, c *resume.Conn) error) {
	t.Helper()
	errs := make(chan error, len(conns))
	for i, c := range conns {
		go func() { errs <- run(i, c) }()
	}
	timeout := time.After(limit)
	for range conns {
		select {
		case err := <-errs:
			if err != nil {
				t.Fatal(err)
			}
		case <-timeout:
			t.Fatalf("sessions did not finish within %v", limit)
		}
	}
}

func quicCloseAll(conns []*resume.Conn) {
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() { c.Close() })
	}
	wg.Wait()
}

// ---------------------------------------------------------------------------
// Configuration and TLS.

func TestQUICConfigValidate(t *testing.T) {
	if err := DefaultQUICConfig().Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	if err := DefaultQUICConfig().CheckLiveness(resume.DefaultLivenessTimeout); err != nil {
		t.Fatalf("defaults vs lifeline liveness: %v", err)
	}
	if err := DefaultQUICConfig().CheckLiveness(15 * time.Second); err == nil {
		t.Fatal("CheckLiveness accepted an idle timeout below the liveness timeout")
	}
	bad := map[string]func(*QUICConfig){
		"zero idle":          func(c *QUICConfig) { c.IdleTimeout = 0 },
		"negative keepalive": func(c *QUICConfig) { c.KeepAlivePeriod = -1 },
		"keepalive >= idle":  func(c *QUICConfig) { c.KeepAlivePeriod = c.IdleTimeout },
		"zero handshake":     func(c *QUICConfig) { c.HandshakeTimeout = 0 },
		"zero streams":       func(c *QUICConfig) { c.MaxIncomingStreams = 0 },
		"too many streams":   func(c *QUICConfig) { c.MaxIncomingStreams = 1<<60 + 1 },
	}
	for name, mod := range bad {
		c := DefaultQUICConfig()
		mod(&c)
		if c.Validate() == nil {
			t.Errorf("%s: Validate accepted it", name)
		}
		if _, err := quicListen(t, nil, c); err == nil {
			t.Errorf("%s: listenQUIC accepted it", name)
		}
	}
}

func TestQUICKnown(t *testing.T) {
	if !Known("quic") || !slices.Contains(Names(), "quic") || !UsesTLS("quic") {
		t.Fatalf("transport quic is not known: %v", Names())
	}
}

// TestQUICTLS: the pin admits the right certificate only; verification is
// never skipped silently; ALPN is enforced.
func TestQUICTLS(t *testing.T) {
	quicNoLeaks(t)
	stls, ctls := quicTestTLS(t)
	qcfg := quicTestConfig(t)
	ln, err := quicListen(t, stls, qcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	defer func() {
		ln.Close()
		for c := range accepted {
			c.Close()
		}
	}()

	dialOnce := func(tc *tls.Config) error {
		d, err := quicNewDialer(t, addr, tc, qcfg)
		if err != nil {
			return err
		}
		defer d.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		c, err := d.Dial(ctx)
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		select {
		case s := <-accepted:
			buf := make([]byte, 4)
			s.SetReadDeadline(time.Now().Add(3 * time.Second))
			if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "ping" {
				return fmt.Errorf("gateway read %q, %v", buf, err)
			}
			s.Close()
		case <-ctx.Done():
			return errors.New("gateway accepted no stream")
		}
		return nil
	}

	if err := dialOnce(ctls); err != nil {
		t.Fatalf("pinned dial: %v", err)
	}
	wrong := []byte(quicCertFP)
	if wrong[0] == '0' {
		wrong[0] = '1'
	} else {
		wrong[0] = '0'
	}
	if err := dialOnce(PinnedTLS(string(wrong), "")); err == nil {
		t.Fatal("dial with a wrong pin succeeded")
	} else {
		t.Logf("wrong pin: %v", err)
	}
	if err := dialOnce(PinnedTLS("not-a-fingerprint", "")); err == nil {
		t.Fatal("dial with a malformed pin succeeded")
	}
	// System roots do not know a self-signed certificate.
	if err := dialOnce(nil); err == nil {
		t.Fatal("dial without a pin accepted a self-signed certificate")
	}
	if _, err := quicNewDialer(t, addr, &tls.Config{InsecureSkipVerify: true}, qcfg); err == nil {
		t.Fatal("newQUICDialer accepted InsecureSkipVerify without a pin")
	}
	// A client that does not speak lifeline/1 is refused in the handshake.
	raw := ctls.Clone()
	raw.NextProtos = []string{"h3"}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if qc, err := quic.DialAddr(ctx, addr, raw, &quic.Config{HandshakeIdleTimeout: time.Second}); err == nil {
		qc.CloseWithError(0, "")
		t.Fatal("a client with ALPN h3 was accepted")
	} else if !strings.Contains(err.Error(), "application protocol") {
		t.Logf("ALPN refusal: %v", err)
	}
	if _, err := quicListen(t, nil, qcfg); err == nil {
		t.Fatal("listenQUIC without TLS config succeeded")
	}
	// A gateway config that hands out its certificate per handshake (as a
	// reloading CertStore does), without ALPN and allowing TLS 1.2, works:
	// listenQUIC fixes up what GetConfigForClient returns.
	dyn := &tls.Config{MinVersion: tls.VersionTLS12, GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return &tls.Config{MinVersion: tls.VersionTLS12, Certificates: stls.Certificates}, nil
	}}
	ln2, d2 := quicListenDial(t, dyn, ctls, qcfg)
	c2, s2, err := quicStreamPair(t, ln2, d2)
	if err != nil {
		t.Fatalf("dial a gateway using GetConfigForClient: %v", err)
	}
	c2.Close()
	s2.Close()
	if _, err := quicListen(t, &tls.Config{}, qcfg); err == nil {
		t.Fatal("listenQUIC without certificate succeeded")
	}
}

// A QUIC listener whose quic-go listener stops (not by Close) makes Accept
// fail, so that the gateway's Serve returns and the process can end,
// instead of blocking for ever: a gateway that takes no new links.
func TestQUICListenerDeathNotSilent(t *testing.T) {
	tc, _ := quicTestTLS(t)
	ll, err := quicListen(t, tc, DefaultQUICConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ll.Close()
	ll.ln.Close()
	res := make(chan error, 1)
	go func() {
		c, err := ll.Accept()
		if c != nil {
			c.Close()
		}
		res <- err
	}()
	select {
	case err := <-res:
		if err == nil || errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after the listener died: %v, want an error that is not a Close", err)
		}
		t.Logf("Accept: %v", err)
	case <-time.After(10 * time.Second):
		ll.Close() // unblocks the Accept for goleak
		<-res
		t.Fatal("Accept still blocked 10s after the QUIC listener died")
	}
}

// The quic transport logs to Config.Logger, in its format (JSON here),
// and nothing to slog's default logger.
func TestQUICLogsToConfigLogger(t *testing.T) {
	quicNoLeaks(t)
	var def, sink logSink
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&def, nil)))
	defer slog.SetDefault(old)
	stls, ctls := quicTestTLS(t)
	qcfg := quicTestConfig(t)
	log := slog.New(slog.NewJSONHandler(&sink, nil))
	ln, err := Listen(Config{Name: "quic", Addr: "127.0.0.1:0", TLS: stls, QUIC: &qcfg, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d, err := NewDialer(Config{Name: "quic", Addr: ln.Addr().String(), TLS: ctls, QUIC: &qcfg, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	c, s, err := quicStreamPair(t, ln, d)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	s.Close()
	d.Close()
	if got := sink.String(); !strings.Contains(got, `"msg":"quic: connected"`) {
		t.Errorf("the logger given got %q, want a JSON \"quic: connected\" line", got)
	}
	if got := def.String(); got != "" {
		t.Errorf("slog's default logger got %q", got)
	}
}

// logSink is a log destination safe for concurrent writes.
type logSink struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logSink) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logSink) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// ---------------------------------------------------------------------------
// The stream as a net.Conn.

// quicStreamPair returns both ends of one stream.
func quicStreamPair(t testing.TB, ln net.Listener, d Dialer) (client, server net.Conn, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c1, err := d.Dial(ctx)
	if err != nil {
		return nil, nil, err
	}
	// The gateway sees a stream when its first byte arrives.
	if _, err := c1.Write([]byte{0}); err != nil {
		c1.Close()
		return nil, nil, err
	}
	c2, err := ln.Accept()
	if err != nil {
		c1.Close()
		return nil, nil, err
	}
	if _, err := io.ReadFull(c2, make([]byte, 1)); err != nil {
		c1.Close()
		c2.Close()
		return nil, nil, err
	}
	return c1, c2, nil
}

func quicPlainPair(t *testing.T, qcfg QUICConfig) (*quicListener, *quicDialer) {
	t.Helper()
	stls, ctls := quicTestTLS(t)
	ln, err := quicListen(t, stls, qcfg)
	if err != nil {
		t.Fatal(err)
	}
	d, err := quicNewDialer(t, ln.Addr().String(), ctls, qcfg)
	if err != nil {
		ln.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close(); ln.Close() })
	return ln, d
}

// TestQUICStreamConn runs the net.Conn conformance suite on a stream.
func TestQUICStreamConn(t *testing.T) {
	quicNoLeaks(t)
	ln, d := quicPlainPair(t, quicTestConfig(t))
	nettest.TestConn(t, func() (c1, c2 net.Conn, stop func(), err error) {
		c1, c2, err = quicStreamPair(t, ln, d)
		if err != nil {
			return nil, nil, nil, err
		}
		return c1, c2, func() { c1.Close(); c2.Close() }, nil
	})
}

// TestQUICStreamSemantics: a peer's reset surfaces as an error (not EOF);
// Close unblocks a pending Read and a Write blocked on flow control.
func TestQUICStreamSemantics(t *testing.T) {
	quicNoLeaks(t)
	ln, d := quicPlainPair(t, quicTestConfig(t))

	t.Run("peer reset is a read error", func(t *testing.T) {
		c, s, err := quicStreamPair(t, ln, d)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		defer s.Close()
		s.(*quicStream).str.CancelWrite(0x77)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 10))
		var se *quic.StreamError
		if !errors.As(err, &se) || !se.Remote || se.ErrorCode != 0x77 {
			t.Fatalf("Read after peer reset: %v, want a remote *quic.StreamError 0x77", err)
		}
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("Read after peer reset: %v does not match ECONNRESET", err)
		}
	})
	t.Run("peer close: EOF, then writes fail", func(t *testing.T) {
		c, s, err := quicStreamPair(t, ln, d)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := s.Write([]byte("last words")); err != nil {
			t.Fatal(err)
		}
		s.Close() // FIN now, STOP_SENDING after the grace
		deadline := time.Now().Add(5 * time.Second)
		c.SetDeadline(deadline)
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "last words" {
			t.Fatalf("read %q, %v; want the data, then EOF", got, err)
		}
		start := time.Now()
		for {
			if _, err := c.Write(make([]byte, 1024)); err != nil {
				var se *quic.StreamError
				if !errors.As(err, &se) || !se.Remote || !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("Write after peer Close: %v, want a remote *quic.StreamError and ECONNRESET", err)
				}
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		if d := time.Since(start); d > quicCloseGrace+2*time.Second {
			t.Fatalf("writes failed only after %v", d)
		}
	})
	t.Run("close unblocks read", func(t *testing.T) {
		c, s, err := quicStreamPair(t, ln, d)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		done := make(chan error, 1)
		go func() { _, err := c.Read(make([]byte, 10)); done <- err }()
		time.Sleep(50 * time.Millisecond)
		c.Close()
		select {
		case err := <-done:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Read after Close: %v, want net.ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not unblock Read")
		}
	})
	t.Run("close unblocks a flow-controlled write", func(t *testing.T) {
		c, s, err := quicStreamPair(t, ln, d)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close() // never reads: the window fills
		done := make(chan error, 1)
		go func() {
			buf := make([]byte, 1<<20)
			for {
				if _, err := c.Write(buf); err != nil {
					done <- err
					return
				}
			}
		}()
		time.Sleep(300 * time.Millisecond)
		select {
		case err := <-done:
			t.Fatalf("Write failed before Close: %v", err)
		default:
		}
		c.Close()
		select {
		case err := <-done:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Write after Close: %v, want net.ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not unblock Write")
		}
		// The gateway side learns it: its Read fails.
		s.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.Copy(io.Discard, s); err == nil {
			t.Fatal("gateway read a clean EOF after a reset")
		}
	})
	t.Run("connection close fails every stream", func(t *testing.T) {
		var cs, ss []net.Conn
		for range 3 {
			c, s, err := quicStreamPair(t, ln, d)
			if err != nil {
				t.Fatal(err)
			}
			cs, ss = append(cs, c), append(ss, s)
		}
		ln.connections()[0].CloseWithError(0x42, "test")
		for i, c := range cs {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := c.Read(make([]byte, 1))
			var ae *quic.ApplicationError
			if !errors.As(err, &ae) || ae.ErrorCode != 0x42 {
				t.Errorf("stream %d: Read %v, want the connection's ApplicationError 0x42", i, err)
			}
			c.Close()
			ss[i].Close()
		}
		// The next Dial makes a new connection.
		c, s, err := quicStreamPair(t, ln, d)
		if err != nil {
			t.Fatalf("dial after connection close: %v", err)
		}
		c.Close()
		s.Close()
		if n := d.dials.Load(); n != 2 {
			t.Fatalf("%d connections dialed, want 2", n)
		}
	})
}

// TestQUICListenerClose: Close ends Accept, the connections and all
// goroutines; the client's streams fail.
func TestQUICListenerClose(t *testing.T) {
	quicNoLeaks(t)
	stls, ctls := quicTestTLS(t)
	qcfg := quicTestConfig(t)
	ln, err := quicListen(t, stls, qcfg)
	if err != nil {
		t.Fatal(err)
	}
	d, err := quicNewDialer(t, ln.Addr().String(), ctls, qcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	c, s, err := quicStreamPair(t, ln, d)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	defer c.Close()
	acceptErr := make(chan error, 1)
	go func() { _, err := ln.Accept(); acceptErr <- err }()
	ln.Close()
	if err := <-acceptErr; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, io.EOF) {
		t.Fatalf("client Read after gateway Close: %v, want a connection error", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := d.Dial(ctx); err == nil {
		t.Fatal("Dial to a closed gateway succeeded")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Dial(context.Background()); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Dial after Close: %v, want net.ErrClosed", err)
	}
}

// ---------------------------------------------------------------------------
// The session engine over QUIC links.

// (a) Byte-exact transfer both ways through several sessions, all on one
// connection.
func TestQUICSessionsEcho(t *testing.T) {
	quicNoLeaks(t)
	e := newQUICEnv(t, quicEnvOpts{})
	const sessions, size = 6, 1 << 20
	conns := make([]*resume.Conn, sessions)
	for i := range conns {
		conns[i] = e.dial()
	}
	defer quicCloseAll(conns)
	quicParallel(t, e, conns, 60*time.Second, func(i int, c *resume.Conn) error {
		return faultnet.Echo{Seed: uint64(i), Size: size, MaxWrite: 16 << 10}.Run(c)
	})
	if n := e.dialer.dials.Load(); n != 1 {
		t.Fatalf("%d QUIC connections for %d sessions, want 1", n, sessions)
	}
	for i, c := range conns {
		if st := c.Stats(); st.Resumes != 0 || st.LinkFailures != 0 {
			t.Errorf("session %d: %d resumes, %d link failures on a clean path", i, st.Resumes, st.LinkFailures)
		}
	}
}

// (b) NAT rebinding mid-stream: QUIC follows the new address by itself; the
// sessions never notice (no resume, no link failure).
func TestQUICNATRebinding(t *testing.T) {
	quicNoLeaks(t)
	e := newQUICEnv(t, quicEnvOpts{relay: true})
	const sessions, size = 4, 1 << 20
	conns := make([]*resume.Conn, sessions)
	for i := range conns {
		conns[i] = e.dial()
	}
	defer quicCloseAll(conns)
	gate := make(chan struct{})
	var marked sync.WaitGroup
	marked.Add(sessions)
	var before string
	go func() {
		marked.Wait() // every session has data flowing
		before = e.ln.connections()[0].RemoteAddr().String()
		if _, err := e.relay.Rebind(); err != nil {
			t.Error(err)
		}
		time.Sleep(100 * time.Millisecond)          // data in flight on the new path
		if _, err := e.relay.Rebind(); err != nil { // and once more
			t.Error(err)
		}
		close(gate)
	}()
	quicParallel(t, e, conns, 60*time.Second, func(i int, c *resume.Conn) error {
		return faultnet.Echo{Seed: uint64(100 + i), Size: size, MaxWrite: 16 << 10,
			HoldAt: size * 3 / 4, Hold: gate,
			MarkAt: size / 4, Mark: marked.Done}.Run(c)
	})
	if n := e.relay.Rebinds(); n != 2 {
		t.Fatalf("%d rebinds, want 2", n)
	}
	after := e.ln.connections()[0].RemoteAddr().String()
	t.Logf("gateway saw the client at %s, after rebinding at %s", before, after)
	if after == before || e.relay.Upstreams() != 3 {
		t.Fatalf("the gateway did not see the client move (%s -> %s, %d source ports)", before, after, e.relay.Upstreams())
	}
	for i, c := range conns {
		if st := c.Stats(); st.Resumes != 0 || st.LinkFailures != 0 {
			t.Errorf("session %d: %d resumes, %d link failures across a NAT rebinding (QUIC should absorb it)", i, st.Resumes, st.LinkFailures)
		}
	}
	for i, s := range e.srv.Sessions() {
		if st := s.Stats(); st.Resumes != 0 {
			t.Errorf("gateway session %d: %d resumes", i, st.Resumes)
		}
	}
	if n := e.dialer.dials.Load(); n != 1 {
		t.Fatalf("%d QUIC connections, want 1", n)
	}
}

// (c) A blackhole shorter than QUIC's idle timeout keeps the connection
// (the sessions may resume on new streams of it); a longer one kills it and
// the sessions resume on one new connection. Both byte-exact.
func TestQUICBlackhole(t *testing.T) {
	for _, tc := range []struct {
		name    string
		drop    time.Duration
		dials   int64
		resumes bool
	}{
		// Longer than lifeline's liveness (600 ms), so the sessions move
		// to new streams, but short enough that QUIC's first probe after
		// the outage (exponential PTO backoff: at most about twice the
		// outage) arrives within the 2 s idle timeout.
		{"shorter than idle timeout", 800 * time.Millisecond, 1, true},
		{"longer than idle timeout", 3500 * time.Millisecond, 2, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			quicNoLeaks(t)
			e := newQUICEnv(t, quicEnvOpts{relay: true, fast: true})
			const sessions, size = 4, 512 << 10
			conns := make([]*resume.Conn, sessions)
			for i := range conns {
				conns[i] = e.dial()
			}
			defer quicCloseAll(conns)
			gate := make(chan struct{})
			var marked sync.WaitGroup
			marked.Add(sessions)
			go func() {
				marked.Wait()
				e.relay.Drop(tc.drop)
				time.Sleep(tc.drop / 3)
				close(gate) // write more while the path is down
			}()
			start := time.Now()
			quicParallel(t, e, conns, 60*time.Second, func(i int, c *resume.Conn) error {
				return faultnet.Echo{Seed: uint64(200 + i), Size: size, MaxWrite: 16 << 10,
					HoldAt: size / 2, Hold: gate,
					MarkAt: size / 4, Mark: marked.Done}.Run(c)
			})
			t.Logf("drop %v: done in %v, %d QUIC connections, %d packets dropped",
				tc.drop, time.Since(start).Round(time.Millisecond), e.dialer.dials.Load(), e.relay.Dropped())
			if e.relay.Dropped() == 0 {
				t.Fatal("the relay dropped nothing")
			}
			if n := e.dialer.dials.Load(); n != tc.dials {
				t.Fatalf("%d QUIC connections, want %d", n, tc.dials)
			}
			for i, c := range conns {
				st := c.Stats()
				t.Logf("session %d: resumes %d, link failures %d", i, st.Resumes, st.LinkFailures)
				if tc.resumes && st.Resumes == 0 {
					t.Errorf("session %d did not resume after a %v blackhole (liveness is %v)", i, tc.drop, e.cfg.LivenessTimeout)
				}
			}
		})
	}
}

// (d) 200 sessions over one connection; the gateway kills the connection;
// all 200 resume on one new connection, byte-exact.
func TestQUICManySessionsConnectionKill(t *testing.T) {
	quicNoLeaks(t)
	e := newQUICEnv(t, quicEnvOpts{})
	const sessions, size = 200, 64 << 10
	conns := make([]*resume.Conn, sessions)
	var wg sync.WaitGroup
	var dialErr error
	var mu sync.Mutex
	for i := range conns {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			c, err := resume.Dial(ctx, e.dialer.Dial, "r", e.cfg)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				dialErr = err
				return
			}
			conns[i] = c
		})
	}
	wg.Wait()
	if dialErr != nil {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		t.Fatal(dialErr)
	}
	defer quicCloseAll(conns)
	if n := e.dialer.dials.Load(); n != 1 {
		t.Fatalf("%d QUIC connections for %d concurrent sessions, want 1", n, sessions)
	}
	gate := make(chan struct{})
	var marked sync.WaitGroup
	marked.Add(sessions)
	go func() {
		marked.Wait() // half of every session's data is through
		qcs := e.ln.connections()
		if len(qcs) != 1 {
			t.Errorf("gateway holds %d connections, want 1", len(qcs))
		}
		for _, qc := range qcs {
			qc.CloseWithError(0x42, "test: connection killed")
		}
		close(gate)
	}()
	start := time.Now()
	quicParallel(t, e, conns, 90*time.Second, func(i int, c *resume.Conn) error {
		return faultnet.Echo{Seed: uint64(300 + i), Size: size, MaxWrite: 16 << 10,
			HoldAt: size / 2, Hold: gate,
			MarkAt: size / 2, Mark: marked.Done}.Run(c)
	})
	t.Logf("%d sessions resumed and finished in %v", sessions, time.Since(start).Round(time.Millisecond))
	if n := e.dialer.dials.Load(); n != 2 {
		t.Fatalf("%d QUIC connections, want 2 (one shared redial)", n)
	}
	for i, c := range conns {
		if st := c.Stats(); st.Resumes < 1 {
			t.Fatalf("session %d: %d resumes after its connection was killed", i, st.Resumes)
		}
	}
}

// (e) A stream reset by the gateway is a link failure; the session resumes
// on a new stream of the same connection, byte-exact.
func TestQUICStreamResetResumes(t *testing.T) {
	quicNoLeaks(t)
	e := newQUICEnv(t, quicEnvOpts{})
	c := e.dial()
	defer c.Close()
	const size = 2 << 20
	gate := make(chan struct{})
	var reset *quicStream
	err := faultnet.Echo{Seed: 400, Size: size, MaxWrite: 16 << 10,
		HoldAt: size / 2, Hold: gate,
		MarkAt: size / 4, Mark: func() {
			reset = e.lastStream()
			reset.str.CancelWrite(0x77) // RESET_STREAM to the client
			close(gate)
		}}.Run(c)
	if err != nil {
		t.Fatal(err)
	}
	st := c.Stats()
	if st.Resumes < 1 || st.LinkFailures < 1 {
		t.Fatalf("after a stream reset: %d resumes, %d link failures; want >= 1 each", st.Resumes, st.LinkFailures)
	}
	if n := e.dialer.dials.Load(); n != 1 {
		t.Fatalf("%d QUIC connections, want 1 (a stream reset does not kill the connection)", n)
	}
	if e.lastStream() == reset {
		t.Fatal("no new stream after the reset")
	}
}

// ---------------------------------------------------------------------------
// Benchmarks.

const quicBenchSize = 32 << 20

// BenchmarkQUICThroughput copies quicBenchSize bytes one way, per
// iteration: "bare" on a raw quic-go stream, "lifeline" through a session
// over a QUIC link, "lifeline-tcp" through a session over loopback TCP.
func BenchmarkQUICThroughput(b *testing.B) {
	qcfg := DefaultQUICConfig()
	scfg := resume.DefaultConfig()

	b.Run("bare", func(b *testing.B) {
		stls, ctls := quicTestTLS(b)
		ln, d := quicListenDial(b, stls, ctls, qcfg)
		c, s, err := quicStreamPair(b, ln, d)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		defer s.Close()
		quicBenchCopy(b, c.(*quicStream).str, s.(*quicStream).str)
	})
	b.Run("lifeline", func(b *testing.B) {
		stls, ctls := quicTestTLS(b)
		ln, err := quicListen(b, stls, qcfg)
		if err != nil {
			b.Fatal(err)
		}
		d, err := quicNewDialer(b, ln.Addr().String(), ctls, qcfg)
		if err != nil {
			b.Fatal(err)
		}
		quicBenchSession(b, func(srv *resume.Server) func() {
			done := make(chan struct{})
			go func() {
				defer close(done)
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					go srv.ServeLink(c)
				}
			}()
			return func() { d.Close(); ln.Close(); <-done }
		}, d.Dial, scfg)
	})
	b.Run("lifeline-tcp", func(b *testing.B) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		var nd net.Dialer
		dial := func(ctx context.Context) (net.Conn, error) { return nd.DialContext(ctx, "tcp", ln.Addr().String()) }
		quicBenchSession(b, func(srv *resume.Server) func() {
			done := make(chan struct{})
			go func() { srv.Serve(ln); close(done) }()
			return func() { ln.Close(); <-done }
		}, dial, scfg)
	})
}

// quicBenchSession sets up a gateway (serve feeds it links and returns a
// stop function) and one session, then copies client -> gateway.
func quicBenchSession(b *testing.B, serve func(*resume.Server) func(), dial resume.DialFunc, cfg *resume.Config) {
	sc := resume.DefaultServerConfig()
	sc.Session = cfg
	srv, err := resume.NewServer(sc)
	if err != nil {
		b.Fatal(err)
	}
	stop := serve(srv)
	defer func() { srv.Close(); stop() }()
	c, err := resume.Dial(context.Background(), dial, "bench", cfg)
	if err != nil {
		b.Fatal(err)
	}
	s, err := srv.Accept()
	if err != nil {
		b.Fatal(err)
	}
	quicBenchCopy(b, c, s)
	c.Reset(resume.CodeAppReset, "bench done")
	s.Reset(resume.CodeAppReset, "bench done")
}

func quicBenchCopy(b *testing.B, w io.Writer, r io.Reader) {
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	rbuf := make([]byte, 64<<10)
	transfer := func(size int) {
		errc := make(chan error, 1)
		go func() {
			for left := size; left > 0; left -= len(buf) {
				if _, err := w.Write(buf[:min(left, len(buf))]); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
		for got := 0; got < size; {
			n, err := r.Read(rbuf)
			if err != nil {
				b.Fatalf("read after %d: %v", got, err)
			}
			got += n
		}
		if err := <-errc; err != nil {
			b.Fatal(err)
		}
	}
	// Warm up: congestion window, flow-control auto-tuning, buffers.
	transfer(quicBenchSize / 2)
	b.SetBytes(quicBenchSize)
	for b.Loop() {
		transfer(quicBenchSize)
	}
}

// quicListenDial starts a QUIC link listener and a dialer to it, both
// closed when the test ends.
func quicListenDial(t testing.TB, stls, ctls *tls.Config, qcfg QUICConfig) (net.Listener, Dialer) {
	t.Helper()
	ln, err := quicListen(t, stls, qcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	d, err := quicNewDialer(t, ln.Addr().String(), ctls, qcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return ln, d
}
