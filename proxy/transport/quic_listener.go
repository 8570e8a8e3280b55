package transport

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"

	"github.com/quic-go/quic-go"
)

// The quic transport's gateway side.

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

	graces    graceTimers // of the streams it accepted
	closeOnce sync.Once
}

// listenQUIC listens on the UDP address cfg.Addr. Each QUIC stream a
// client opens is one link, returned by Accept. cfg.TLS must hold the
// gateway's certificate; it is cloned, with NextProtos set to QUICALPN and
// TLS 1.3 as the minimum. NAT rebinding and client migration are followed
// by quic-go: a client's streams survive an address change.
func listenQUIC(cfg Config) (*quicListener, error) {
	qcfg := cfg.quic()
	if err := qcfg.Validate(); err != nil {
		return nil, err
	}
	tc, err := gatewayTLS("quic", cfg.TLS)
	if err != nil {
		return nil, err
	}
	ua, err := net.ResolveUDPAddr("udp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("quic: %w", err)
	}
	listenUDP := net.ListenUDP
	if cfg.ListenUDP != nil {
		listenUDP = cfg.ListenUDP
	}
	udp, err := listenUDP("udp", ua)
	if err != nil {
		return nil, fmt.Errorf("quic: %w", err)
	}
	log := cfg.logger()
	checkUDPBuffers(log)
	tr := &quic.Transport{Conn: udp, StatelessResetKey: statelessResetKey(cfg.TLS)}
	ln, err := tr.Listen(tc, qcfg.quicConfig(true))
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
		c := newQUICStream(str, qc, &l.graces)
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
// socket, ends the close graces of its streams, and returns when the
// listener's goroutines and timers have finished.
func (l *quicListener) Close() error {
	l.closeOnce.Do(func() {
		l.mu.Lock()
		l.cancel()
		l.mu.Unlock()
		l.ln.Close()
		l.wg.Wait()
		l.graces.stop()
		l.tr.Close()
		l.udp.Close()
	})
	return nil
}

func (l *quicListener) Addr() net.Addr { return l.udp.LocalAddr() }
