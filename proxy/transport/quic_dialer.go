package transport

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"

	"github.com/quic-go/quic-go"
)

// The quic transport's client side.

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

	dials  atomic.Int64 // successful connections, for tests and logs
	graces graceTimers  // of the streams it opened
}

// quicDial is one dial in progress that many Dials may wait for.
type quicDial struct {
	done chan struct{}
	conn *quic.Conn
	err  error
}

// newQUICDialer returns a dialer for the gateway at cfg.Addr (host:port,
// UDP). It dials nothing until the first Dial. cfg.TLS is cloned, with
// NextProtos set to QUICALPN and TLS 1.3 as the minimum; nil verifies the
// gateway against the system roots. For a gateway with a self-signed
// certificate use PinnedTLS. InsecureSkipVerify without a pin
// (VerifyPeerCertificate or VerifyConnection) is refused.
func newQUICDialer(cfg Config) (*quicDialer, error) {
	qcfg := cfg.quic()
	if err := qcfg.Validate(); err != nil {
		return nil, err
	}
	host, port, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("quic: gateway address: %w", err)
	}
	tc, err := clientTLS("quic", cfg.TLS, host)
	if err != nil {
		return nil, err
	}
	log := cfg.logger()
	checkUDPBuffers(log)
	d := &quicDialer{
		addr: cfg.Addr, host: host, port: port, tls: tc,
		qconf: qcfg.quicConfig(false), log: log,
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
			return newQUICStream(str, qc, &d.graces), nil
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
// sessions' links fail), ends the close graces of its streams, and
// returns when the dialer's goroutines and timers have finished. Dial
// fails afterwards.
func (d *quicDialer) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		d.wg.Wait()
		d.graces.stop()
		return nil
	}
	d.closed = true
	d.cancel()
	d.mu.Unlock()
	d.wg.Wait()
	d.graces.stop()
	return nil
}
