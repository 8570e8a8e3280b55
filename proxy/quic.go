package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
)

func init() {
	registerTransport("quic", transportFactory{
		Listen: func(addr string, tc *tls.Config) (LinkListener, error) {
			return ListenQUIC(addr, tc, DefaultQUICConfig())
		},
		Dial: func(addr string, tc *tls.Config) (LinkDialer, error) {
			return NewQUICDialer(addr, tc, DefaultQUICConfig())
		},
	})
}

// QUICALPN is the ALPN protocol both ends of a lifeline QUIC connection
// must negotiate. A connection that negotiated anything else is closed.
const QUICALPN = "lifeline/1"

// Application error codes on QUIC connections and streams.
const (
	quicCodeClosed quic.ApplicationErrorCode = 0x0 // orderly: listener or dialer closed
	quicCodeALPN   quic.ApplicationErrorCode = 0x1 // peer did not negotiate QUICALPN

	// quicStreamClosed is sent in STOP_SENDING / RESET_STREAM when a link
	// is closed locally. The peer's Read or Write fails with a
	// *quic.StreamError carrying it: for the session engine, a link failure.
	quicStreamClosed quic.StreamErrorCode = 0x100
)

// QUICConfig tunes the QUIC transport under lifeline links. Start from
// DefaultQUICConfig.
//
// How the timers relate to the session engine's liveness (resume.Config:
// PingInterval 1 s, LivenessTimeout 4 s by default):
//
//   - Every session PINGs after a second of silence, so a QUIC connection
//     that carries at least one session is never idle while its path works.
//     Lifeline, not QUIC, decides per session that a link is dead (4 s), and
//     resumes it on a new stream.
//   - IdleTimeout is how long QUIC keeps a connection whose path is silent.
//     It must be longer than the engine's LivenessTimeout, so that an outage
//     between the two is healed by resuming every session on a new stream of
//     the same connection (one RTT, no new QUIC handshake, no stampede of
//     handshakes), and only a longer outage costs a new connection. (QUIC
//     backs off retransmissions exponentially: after an outage of D the
//     first packet through may come about 2·D after it began, so a
//     connection surely survives outages up to IdleTimeout/2.) It is also the longest a dead connection (a path that
//     never comes back, a gateway that restarted with another stateless
//     reset key) can hold up resumes, so it should not be much longer.
//     10 s = 2.5 × the 4 s liveness.
//   - KeepAlivePeriod (client only) makes an idle connection, one with no
//     sessions, send a packet now and then: it keeps NAT bindings alive
//     (home NATs drop UDP mappings after 30 s or less) and lets QUIC find a
//     dead path on its own, so the next session does not dial into a dead
//     connection. quic-go sends it at min(KeepAlivePeriod, IdleTimeout/2).
//     2 s gives four keep-alives per IdleTimeout: one lost packet does not
//     kill an idle connection.
type QUICConfig struct {
	// IdleTimeout closes a connection after this long without a packet from
	// the peer. The effective value is the smaller of the two peers'.
	IdleTimeout time.Duration
	// KeepAlivePeriod is how often an otherwise silent client sends a
	// packet (0: never). Must be below IdleTimeout.
	KeepAlivePeriod time.Duration
	// HandshakeTimeout aborts a QUIC handshake after this long without a
	// packet from the peer (and any handshake after twice this long).
	HandshakeTimeout time.Duration
	// MaxIncomingStreams is how many links (streams) one client connection
	// may hold open on the gateway at once: the number of sessions a client
	// sidecar can run over one connection, plus the few that are moving to
	// a new stream. A client beyond it waits in Dial.
	MaxIncomingStreams int64
	// MaxStreamReceiveWindow and MaxConnectionReceiveWindow cap QUIC's flow
	// control windows (auto-tuned up to these values). 0: quic-go's
	// defaults, 6 MB per stream and 15 MB per connection. The session
	// engine's own window (resume.Config.BufferSize, 2 MiB) bounds what one
	// session has in flight anyway.
	MaxStreamReceiveWindow     uint64
	MaxConnectionReceiveWindow uint64
	// Logger receives transport events (connections, the UDP buffer
	// warning). nil: slog.Default().
	Logger *slog.Logger
}

// Defaults; see QUICConfig for why.
const (
	DefaultQUICIdleTimeout        = 10 * time.Second
	DefaultQUICKeepAlivePeriod    = 2 * time.Second
	DefaultQUICHandshakeTimeout   = 5 * time.Second
	DefaultQUICMaxIncomingStreams = 4096
)

// DefaultQUICConfig returns the defaults.
func DefaultQUICConfig() QUICConfig {
	return QUICConfig{
		IdleTimeout:        DefaultQUICIdleTimeout,
		KeepAlivePeriod:    DefaultQUICKeepAlivePeriod,
		HandshakeTimeout:   DefaultQUICHandshakeTimeout,
		MaxIncomingStreams: DefaultQUICMaxIncomingStreams,
	}
}

// Validate reports the first setting that cannot work.
func (c QUICConfig) Validate() error {
	switch {
	case c.IdleTimeout <= 0:
		return fmt.Errorf("quic: IdleTimeout %v must be positive", c.IdleTimeout)
	case c.KeepAlivePeriod < 0:
		return fmt.Errorf("quic: KeepAlivePeriod %v is negative", c.KeepAlivePeriod)
	case c.KeepAlivePeriod >= c.IdleTimeout:
		return fmt.Errorf("quic: KeepAlivePeriod %v must be below IdleTimeout %v", c.KeepAlivePeriod, c.IdleTimeout)
	case c.HandshakeTimeout <= 0:
		return fmt.Errorf("quic: HandshakeTimeout %v must be positive", c.HandshakeTimeout)
	case c.MaxIncomingStreams <= 0 || c.MaxIncomingStreams > 1<<60:
		return fmt.Errorf("quic: MaxIncomingStreams %d must be in [1, 2^60]", c.MaxIncomingStreams)
	}
	return nil
}

// CheckLiveness reports a problem when IdleTimeout does not exceed the
// session engine's liveness timeout: QUIC would then close connections
// before lifeline decides per session, and every outage longer than
// IdleTimeout would cost a new handshake. Not fatal; log it.
func (c QUICConfig) CheckLiveness(livenessTimeout time.Duration) error {
	if c.IdleTimeout <= livenessTimeout {
		return fmt.Errorf("quic: IdleTimeout %v should exceed the session liveness timeout %v (2-3x is right)", c.IdleTimeout, livenessTimeout)
	}
	return nil
}

func (c QUICConfig) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.Default()
	}
	return c.Logger
}

func (c QUICConfig) quicConfig(server bool) *quic.Config {
	qc := &quic.Config{
		HandshakeIdleTimeout:       c.HandshakeTimeout,
		MaxIdleTimeout:             c.IdleTimeout,
		MaxStreamReceiveWindow:     c.MaxStreamReceiveWindow,
		MaxConnectionReceiveWindow: c.MaxConnectionReceiveWindow,
		MaxIncomingUniStreams:      -1, // lifeline uses bidirectional streams only
		MaxIncomingStreams:         -1, // the gateway never opens streams
	}
	if server {
		qc.MaxIncomingStreams = c.MaxIncomingStreams
	} else {
		qc.KeepAlivePeriod = c.KeepAlivePeriod
	}
	return qc
}

// ---------------------------------------------------------------------------
// Links: one QUIC stream as a net.Conn.

// quicStream is a QUIC stream as a link, with TCP-like semantics:
//
//   - Close sends a FIN after what was written (a RESET_STREAM instead when
//     a Write is blocked, so that it returns at once), unblocks a pending
//     Read, and after quicCloseGrace aborts reading (STOP_SENDING), which
//     releases the stream for good. The grace lets the peer read our last
//     frames and the FIN before its own writes start failing, as a TCP
//     peer reads up to the FIN before a write of its own draws an RST.
//   - A peer's RESET_STREAM or STOP_SENDING, or its CONNECTION_CLOSE, fails
//     Read and Write with an error that wraps the *quic.StreamError (or
//     *quic.ApplicationError) and syscall.ECONNRESET: the session engine
//     sees a peer reset, as on TCP. The peer's FIN reads as io.EOF.
//   - Our connection's death (idle timeout, stateless reset) fails every
//     stream with quic-go's error. Flow control blocks Write (backpressure).
type quicStream struct {
	str *quic.Stream
	qc  *quic.Conn

	closed  atomic.Bool
	mu      sync.Mutex
	writing int // Writes in progress, under mu
}

// quicCloseGrace is how long a closed link keeps accepting (and dropping)
// the peer's data before it sends STOP_SENDING.
const quicCloseGrace = time.Second

func newQUICStream(str *quic.Stream, qc *quic.Conn) *quicStream {
	return &quicStream{str: str, qc: qc}
}

// peerError marks the peer's cancellations as connection resets.
func peerError(err error) error {
	var se *quic.StreamError
	var ae *quic.ApplicationError
	if errors.As(err, &se) && se.Remote || errors.As(err, &ae) && ae.Remote {
		return fmt.Errorf("%w (%w)", err, syscall.ECONNRESET)
	}
	return err
}

func (s *quicStream) Read(p []byte) (int, error) {
	if s.closed.Load() {
		return 0, net.ErrClosed
	}
	n, err := s.str.Read(p)
	if err != nil {
		if s.closed.Load() {
			return n, net.ErrClosed
		}
		err = peerError(err)
	}
	return n, err
}

func (s *quicStream) Write(p []byte) (int, error) {
	s.mu.Lock()
	if s.closed.Load() {
		s.mu.Unlock()
		return 0, net.ErrClosed
	}
	s.writing++
	s.mu.Unlock()
	n, err := s.str.Write(p)
	s.mu.Lock()
	s.writing--
	s.mu.Unlock()
	if err != nil {
		if s.closed.Load() {
			return n, net.ErrClosed
		}
		err = peerError(err)
	}
	return n, err
}

func (s *quicStream) Close() error {
	s.mu.Lock()
	if s.closed.Swap(true) {
		s.mu.Unlock()
		return nil
	}
	busy := s.writing > 0
	s.mu.Unlock()
	s.str.SetReadDeadline(time.Unix(1, 0)) // wakes a pending Read
	if busy {
		// quic-go's Close does not unblock a Write waiting for flow
		// control credit; a reset does.
		s.str.CancelWrite(quicStreamClosed)
	} else {
		s.str.Close() // FIN after what was written; no Write can start now
	}
	time.AfterFunc(quicCloseGrace, func() { s.str.CancelRead(quicStreamClosed) })
	return nil
}

// ExportKeyingMaterial exports keying material from the TLS session of
// the link's QUIC connection (the TLS exporter, RFC 8446 section 7.5;
// RFC 9001 section 7), as (*tls.ConnectionState).ExportKeyingMaterial
// does for a TLS link. The session engine binds its HELLO and RESUME
// proofs to the link with it, so that a proof recorded on one connection
// is worthless on another. Both ends of a connection export the same
// bytes; every stream of one connection does too (they share its TLS
// session, which no one else can open streams on), and two connections
// export different bytes.
func (s *quicStream) ExportKeyingMaterial(label string, context []byte, length int) ([]byte, error) {
	cs := s.qc.ConnectionState().TLS
	return cs.ExportKeyingMaterial(label, context, length)
}

func (s *quicStream) LocalAddr() net.Addr                { return s.qc.LocalAddr() }
func (s *quicStream) RemoteAddr() net.Addr               { return s.qc.RemoteAddr() }
func (s *quicStream) SetWriteDeadline(t time.Time) error { return s.str.SetWriteDeadline(t) }

func (s *quicStream) SetReadDeadline(t time.Time) error {
	if s.closed.Load() {
		return nil // keep the deadline Close set
	}
	return s.str.SetReadDeadline(t)
}

func (s *quicStream) SetDeadline(t time.Time) error {
	s.SetReadDeadline(t)
	return s.SetWriteDeadline(t)
}

// ---------------------------------------------------------------------------
// Gateway side.

// quicListener accepts QUIC connections and yields each of their streams
// as a link.
type quicListener struct {
	udp *net.UDPConn
	tr  *quic.Transport
	ln  *quic.Listener
	log *slog.Logger

	ctx     context.Context
	cancel  context.CancelFunc
	streams chan net.Conn
	wg      sync.WaitGroup
	// dead is closed when the QUIC listener stopped accepting connections
	// for a reason other than Close; deadErr says why. Accept then
	// returns it, so that the gateway does not live on unable to take new
	// links.
	dead    chan struct{}
	deadErr error

	mu    sync.Mutex
	conns map[*quic.Conn]struct{}

	closeOnce sync.Once
}

// ListenQUIC listens on the UDP address addr. Each QUIC stream a client
// opens is one link, returned by Accept. tlsConf must hold the gateway's
// certificate (see SelfSignedTLS); it is cloned, with NextProtos set to
// QUICALPN and TLS 1.3 as the minimum. NAT rebinding and client migration
// are followed by quic-go: a client's streams survive an address change.
func ListenQUIC(addr string, tlsConf *tls.Config, cfg QUICConfig) (LinkListener, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if tlsConf == nil {
		return nil, errors.New("quic: the gateway needs a tls.Config with a certificate (see SelfSignedTLS)")
	}
	if len(tlsConf.Certificates) == 0 && tlsConf.GetCertificate == nil && tlsConf.GetConfigForClient == nil {
		return nil, errors.New("quic: the gateway's tls.Config has no certificate")
	}
	tc := quicTLS(tlsConf)
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("quic: %w", err)
	}
	udp, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, fmt.Errorf("quic: %w", err)
	}
	log := cfg.logger()
	checkUDPBuffers(log)
	tr := &quic.Transport{Conn: udp, StatelessResetKey: statelessResetKey(tlsConf)}
	ln, err := tr.Listen(tc, cfg.quicConfig(true))
	if err != nil {
		tr.Close()
		udp.Close()
		return nil, fmt.Errorf("quic: %w", err)
	}
	l := &quicListener{
		udp: udp, tr: tr, ln: ln, log: log,
		streams: make(chan net.Conn),
		dead:    make(chan struct{}),
		conns:   make(map[*quic.Conn]struct{}),
	}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	l.wg.Add(1)
	go l.acceptConns()
	return l, nil
}

func (l *quicListener) acceptConns() {
	defer l.wg.Done()
	for {
		qc, err := l.ln.Accept(l.ctx)
		if err != nil {
			if l.ctx.Err() == nil {
				l.log.Error("quic: listener stopped", "err", err)
				// Not wrapped: quic-go's errors here wrap net.ErrClosed,
				// and this is no Close of ours but a listener that died.
				l.deadErr = fmt.Errorf("quic listener stopped: %v", err)
				close(l.dead)
			}
			return
		}
		if p := qc.ConnectionState().TLS.NegotiatedProtocol; p != QUICALPN {
			l.log.Warn("quic: connection refused", "remote", qc.RemoteAddr(), "alpn", p)
			qc.CloseWithError(quicCodeALPN, "ALPN "+QUICALPN+" required")
			continue
		}
		l.mu.Lock()
		if l.ctx.Err() != nil {
			l.mu.Unlock()
			qc.CloseWithError(quicCodeClosed, "gateway closing")
			return
		}
		l.conns[qc] = struct{}{}
		l.wg.Add(1)
		l.mu.Unlock()
		go l.acceptStreams(qc)
	}
}

func (l *quicListener) acceptStreams(qc *quic.Conn) {
	defer l.wg.Done()
	defer func() {
		l.mu.Lock()
		delete(l.conns, qc)
		l.mu.Unlock()
	}()
	l.log.Debug("quic: connection", "remote", qc.RemoteAddr())
	for {
		str, err := qc.AcceptStream(l.ctx)
		if err != nil {
			if l.ctx.Err() != nil {
				qc.CloseWithError(quicCodeClosed, "gateway closing")
			} else {
				l.log.Debug("quic: connection ended", "remote", qc.RemoteAddr(), "err", err)
			}
			return
		}
		c := newQUICStream(str, qc)
		select {
		case l.streams <- c:
		case <-l.ctx.Done():
			c.Close()
			qc.CloseWithError(quicCodeClosed, "gateway closing")
			return
		}
	}
}

// Accept returns the next stream any client opened.
func (l *quicListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.streams:
		return c, nil
	case <-l.ctx.Done():
		return nil, &net.OpError{Op: "accept", Net: "quic", Addr: l.udp.LocalAddr(), Err: net.ErrClosed}
	case <-l.dead:
		return nil, &net.OpError{Op: "accept", Net: "quic", Addr: l.udp.LocalAddr(), Err: l.deadErr}
	}
}

// Close closes every connection (the clients see CONNECTION_CLOSE) and the
// socket, and returns when the listener's goroutines have exited.
func (l *quicListener) Close() error {
	l.closeOnce.Do(func() {
		l.mu.Lock()
		l.cancel()
		l.mu.Unlock()
		l.ln.Close()
		l.wg.Wait()
		l.tr.Close()
		l.udp.Close()
	})
	return nil
}

func (l *quicListener) Addr() net.Addr { return l.udp.LocalAddr() }

// connections returns the live connections (for tests).
func (l *quicListener) connections() []*quic.Conn {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]*quic.Conn, 0, len(l.conns))
	for qc := range l.conns {
		out = append(out, qc)
	}
	return out
}

// ---------------------------------------------------------------------------
// Client side.

// quicDialer shares one QUIC connection among all the sessions of a client
// sidecar: every Dial is a new stream on it. When the connection dies
// (idle timeout, CONNECTION_CLOSE, stateless reset) the next Dial makes a
// new one, and concurrent Dials wait for that same new connection.
type quicDialer struct {
	addr  string
	host  string
	port  string
	tls   *tls.Config
	qconf *quic.Config
	log   *slog.Logger

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // connection watchers and dials

	mu      sync.Mutex
	conn    *quic.Conn // current connection; nil or dead: dial a new one
	dialing *quicDial  // dial in progress
	closed  bool

	dials atomic.Int64 // successful connections, for tests and logs
}

// quicDial is one dial in progress that many Dials may wait for.
type quicDial struct {
	done chan struct{}
	conn *quic.Conn
	err  error
}

// NewQUICDialer returns a LinkDialer for the gateway at addr (host:port,
// UDP). It dials nothing until the first Dial. tlsConf is cloned, with
// NextProtos set to QUICALPN and TLS 1.3 as the minimum; nil verifies the
// gateway against the system roots. For a gateway with a self-signed
// certificate use PinnedTLS. InsecureSkipVerify without a pin
// (VerifyPeerCertificate or VerifyConnection) is refused.
func NewQUICDialer(addr string, tlsConf *tls.Config, cfg QUICConfig) (LinkDialer, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("quic: gateway address: %w", err)
	}
	if tlsConf == nil {
		tlsConf = &tls.Config{}
	}
	if tlsConf.InsecureSkipVerify && tlsConf.VerifyPeerCertificate == nil && tlsConf.VerifyConnection == nil {
		return nil, errors.New("quic: InsecureSkipVerify without a certificate pin would accept any gateway; use PinnedTLS")
	}
	tc := quicTLS(tlsConf)
	if tc.ServerName == "" {
		tc.ServerName = host
	}
	log := cfg.logger()
	checkUDPBuffers(log)
	d := &quicDialer{
		addr: addr, host: host, port: port, tls: tc,
		qconf: cfg.quicConfig(false), log: log,
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	return d, nil
}

// Dial opens a new stream on the shared connection, dialing the connection
// first if there is none or it is dead.
func (d *quicDialer) Dial(ctx context.Context) (net.Conn, error) {
	for attempt := 0; ; attempt++ {
		qc, err := d.connection(ctx)
		if err != nil {
			return nil, err
		}
		str, err := qc.OpenStreamSync(ctx)
		if err == nil {
			return newQUICStream(str, qc), nil
		}
		if ctx.Err() != nil || attempt > 0 {
			return nil, fmt.Errorf("quic: open stream: %w", err)
		}
		// The connection died under us (its streams fail before its
		// context is done): forget it and try once on a new one.
		d.forget(qc)
	}
}

// connection returns a live connection, dialing one if needed. Concurrent
// callers share one dial.
func (d *quicDialer) connection(ctx context.Context) (*quic.Conn, error) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil, net.ErrClosed
	}
	if d.conn != nil && d.conn.Context().Err() == nil {
		qc := d.conn
		d.mu.Unlock()
		return qc, nil
	}
	call := d.dialing
	if call == nil {
		call = &quicDial{done: make(chan struct{})}
		d.dialing = call
		d.wg.Add(1)
		go d.dial(call)
	}
	d.mu.Unlock()
	select {
	case <-call.done:
		return call.conn, call.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// dial makes a new connection from a new UDP socket (a fresh source port
// also gets past a NAT that lost our mapping). It runs on its own, bounded
// by the handshake timeout and Close, so a Dial whose context ends does not
// cancel it for the others waiting.
func (d *quicDialer) dial(call *quicDial) {
	defer d.wg.Done()
	qc, cleanup, err := d.dialConn()
	d.mu.Lock()
	d.dialing = nil
	if err == nil && d.closed {
		err = net.ErrClosed
		qc.CloseWithError(quicCodeClosed, "client closing")
	}
	if err != nil {
		if cleanup != nil {
			cleanup()
		}
		call.err = fmt.Errorf("quic: dial %s: %w", d.addr, err)
		d.mu.Unlock()
		close(call.done)
		return
	}
	d.conn = qc
	d.wg.Add(1)
	d.mu.Unlock()
	n := d.dials.Add(1)
	d.log.Info("quic: connected", "gateway", d.addr, "remote", qc.RemoteAddr(), "local", qc.LocalAddr(), "connection", n)
	go d.watch(qc, cleanup)
	call.conn = qc
	close(call.done)
}

func (d *quicDialer) dialConn() (*quic.Conn, func(), error) {
	ctx, cancel := context.WithTimeout(d.ctx, 2*d.qconf.HandshakeIdleTimeout)
	defer cancel()
	ua, err := d.resolve(ctx)
	if err != nil {
		return nil, nil, err
	}
	network := "udp4"
	if ua.IP.To4() == nil {
		network = "udp6"
	}
	udp, err := net.ListenUDP(network, nil)
	if err != nil {
		return nil, nil, err
	}
	tr := &quic.Transport{Conn: udp}
	cleanup := func() {
		tr.Close()
		udp.Close()
	}
	qc, err := tr.Dial(ctx, ua, d.tls, d.qconf)
	if err != nil {
		return nil, cleanup, err
	}
	if p := qc.ConnectionState().TLS.NegotiatedProtocol; p != QUICALPN {
		qc.CloseWithError(quicCodeALPN, "ALPN "+QUICALPN+" required")
		return nil, cleanup, fmt.Errorf("gateway negotiated ALPN %q, not %q", p, QUICALPN)
	}
	return qc, cleanup, nil
}

func (d *quicDialer) resolve(ctx context.Context) (*net.UDPAddr, error) {
	port, err := net.DefaultResolver.LookupPort(ctx, "udp", d.port)
	if err != nil {
		return nil, err
	}
	if ip := net.ParseIP(d.host); ip != nil {
		return &net.UDPAddr{IP: ip, Port: port}, nil
	}
	ips, err := net.DefaultResolver.LookupIPAddr(ctx, d.host)
	if err != nil {
		return nil, err
	}
	if len(ips) == 0 {
		return nil, fmt.Errorf("no address for %s", d.host)
	}
	return &net.UDPAddr{IP: ips[0].IP, Zone: ips[0].Zone, Port: port}, nil
}

// watch releases a connection's socket when the connection ends, or ends
// it when the dialer closes.
func (d *quicDialer) watch(qc *quic.Conn, cleanup func()) {
	defer d.wg.Done()
	select {
	case <-qc.Context().Done():
		d.log.Info("quic: connection lost", "gateway", d.addr, "err", context.Cause(qc.Context()))
	case <-d.ctx.Done():
		qc.CloseWithError(quicCodeClosed, "client closing")
	}
	d.forget(qc)
	cleanup()
}

func (d *quicDialer) forget(qc *quic.Conn) {
	d.mu.Lock()
	if d.conn == qc {
		d.conn = nil
	}
	d.mu.Unlock()
}

// Close closes the connection (the gateway sees CONNECTION_CLOSE; the
// sessions' links fail) and returns when the dialer's goroutines have
// exited. Dial fails afterwards.
func (d *quicDialer) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		d.wg.Wait()
		return nil
	}
	d.closed = true
	d.cancel()
	d.mu.Unlock()
	d.wg.Wait()
	return nil
}

// ---------------------------------------------------------------------------
// TLS.

// quicTLS clones c for QUIC: ALPN QUICALPN only, TLS 1.3 (QUIC requires it).
func quicTLS(c *tls.Config) *tls.Config {
	tc := c.Clone()
	tc.NextProtos = []string{QUICALPN}
	tc.MinVersion = tls.VersionTLS13
	if tc.MaxVersion != 0 && tc.MaxVersion < tls.VersionTLS13 {
		tc.MaxVersion = 0
	}
	// A per-handshake config (certificate reloading, mTLS) must say the
	// same, or ALPN fails.
	if get := tc.GetConfigForClient; get != nil {
		tc.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			c, err := get(hello)
			if err != nil || c == nil {
				return c, err
			}
			return quicTLS(c), nil
		}
	}
	return tc
}

// statelessResetKey derives the gateway's stateless reset key from its
// private key, so that a restarted gateway with the same certificate can
// reset the connections of the previous process at once (the clients then
// redial instead of waiting for their idle timeout). Without a key that
// can be exported, a random key still resets connections this process
// forgot.
func statelessResetKey(tc *tls.Config) *quic.StatelessResetKey {
	var key quic.StatelessResetKey
	if len(tc.Certificates) > 0 && tc.Certificates[0].PrivateKey != nil {
		if der, err := x509.MarshalPKCS8PrivateKey(tc.Certificates[0].PrivateKey); err == nil {
			m := hmac.New(sha256.New, der)
			m.Write([]byte("lifeline quic stateless reset key v1"))
			copy(key[:], m.Sum(nil))
			return &key
		}
	}
	rand.Read(key[:])
	return &key
}

// SelfSignedTLS returns a gateway TLS config with a new self-signed ECDSA
// P-256 certificate, and the certificate's SHA-256 fingerprint in hex for
// clients to pin (PinnedTLS, --tls-pin). The fingerprint is logged. A new
// certificate, hence a new fingerprint, is made on every call: a gateway
// that must keep its pin across restarts uses LoadOrCreateGatewayCert.
func SelfSignedTLS() (*tls.Config, string, error) {
	cert, err := newSelfSignedCert()
	if err != nil {
		return nil, "", err
	}
	fp := CertFingerprint(cert.Leaf.Raw)
	slog.Info("generated a self-signed gateway certificate; clients must pin it", "sha256", fp, "flag", "--tls-pin "+fp)
	return SelfSignedServerTLS(cert), fp, nil
}

// newSelfSignedCert makes a self-signed ECDSA P-256 gateway certificate,
// valid for ten years.
func newSelfSignedCert() (tls.Certificate, error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "lifeline gateway"},
		DNSNames:              []string{"lifeline-gateway"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		return tls.Certificate{}, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv, Leaf: leaf}, nil
}

// SelfSignedServerTLS is a gateway TLS config serving cert (a self-signed
// certificate that clients pin), for the tls and quic transports.
func SelfSignedServerTLS(cert tls.Certificate) *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{QUICALPN},
	}
}

// CertFingerprint is the lowercase hex SHA-256 of a DER certificate, the
// form PinnedTLS takes.
func CertFingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// ParseFingerprint accepts a SHA-256 fingerprint as 64 hex digits, upper
// or lower case, optionally separated by colons ("AB:CD:...").
func ParseFingerprint(s string) ([]byte, error) {
	h := strings.ReplaceAll(strings.TrimSpace(s), ":", "")
	b, err := hex.DecodeString(h)
	if err != nil || len(b) != sha256.Size {
		return nil, fmt.Errorf("tls pin %q: want the certificate's SHA-256 as 64 hex digits", s)
	}
	return b, nil
}

// PinnedTLS returns a client TLS config that accepts exactly the gateway
// certificate whose SHA-256 is fingerprintHex (see ParseFingerprint for the
// accepted forms). The usual chain and name checks are replaced by the pin
// check, which runs on every handshake, resumed ones included: the
// connection fails unless the gateway's leaf certificate matches. A
// malformed fingerprint makes every handshake fail. serverName is sent as
// SNI (may be empty).
func PinnedTLS(fingerprintHex, serverName string) *tls.Config {
	want, perr := ParseFingerprint(fingerprintHex)
	check := func(certs []*x509.Certificate) error {
		if perr != nil {
			return perr
		}
		sum := sha256.Sum256(certs[0].Raw)
		if subtle.ConstantTimeCompare(sum[:], want) != 1 {
			return certVerifyError(certs, fmt.Errorf("gateway certificate sha256 %x does not match the pin %x", sum, want))
		}
		return nil
	}
	return &tls.Config{
		ServerName: serverName,
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{QUICALPN},
		// Chain verification is off only because the pin check below
		// replaces it; it is never off without it.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return errors.New("tls: gateway sent no certificate")
			}
			leaf, err := x509.ParseCertificate(raw[0])
			if err != nil {
				return fmt.Errorf("tls: gateway certificate: %w", err)
			}
			return check([]*x509.Certificate{leaf})
		},
		// VerifyPeerCertificate is skipped on resumed sessions;
		// VerifyConnection is not.
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("tls: gateway sent no certificate")
			}
			return check(cs.PeerCertificates)
		},
	}
}

// ---------------------------------------------------------------------------
// UDP buffers.

// wantUDPBuffer is what quic-go's documentation asks of net.core.rmem_max
// and wmem_max (quic-go itself requests 7 MiB per socket).
const wantUDPBuffer = 7500000

var udpBufferOnce sync.Once

// checkUDPBuffers warns once per process when the kernel caps UDP socket
// buffers below what quic-go wants: bursts are then dropped by the kernel
// and throughput suffers.
func checkUDPBuffers(log *slog.Logger) {
	udpBufferOnce.Do(func() {
		rmem, rerr := readSysctlInt("/proc/sys/net/core/rmem_max")
		wmem, werr := readSysctlInt("/proc/sys/net/core/wmem_max")
		if rerr != nil || werr != nil {
			return // not Linux, or no /proc: nothing to say
		}
		if rmem >= wantUDPBuffer && wmem >= wantUDPBuffer {
			return
		}
		log.Warn("quic: kernel UDP buffer limits are low; QUIC throughput may suffer. Fix: "+
			"sysctl -w net.core.rmem_max=7500000 && sysctl -w net.core.wmem_max=7500000 "+
			"(persist in /etc/sysctl.d/); see docs/quic.md",
			"rmem_max", rmem, "wmem_max", wmem, "want", wantUDPBuffer)
	})
}

func readSysctlInt(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}
