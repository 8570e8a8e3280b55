package transport

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"

	"github.com/lifeline-proxy/lifeline/resume"
)

// The tls transport: a link is a *tls.Conn over TCP, TLS 1.2 or 1.3 (see
// tlsConfigFor). Listener and dialer are in this file.

type tlsListener struct {
	net.Listener
	tc *tls.Config
}

func listenTLS(cfg Config) (net.Listener, error) {
	tc, err := gatewayTLS("tls", cfg.TLS)
	if err != nil {
		return nil, err
	}
	// Any PROXY header comes before the ClientHello: it is read below TLS.
	l, err := listenStream(cfg)
	if err != nil {
		return nil, err
	}
	return &tlsListener{Listener: l, tc: tc}, nil
}

// Accept returns the TLS connection before its handshake: the handshake
// runs on the first Read, inside the session engine's handshake deadline,
// so a slow or silent peer cannot hold up Accept.
func (l *tlsListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tuneTCP(c)
	return tls.Server(resume.TLSSocket(c), l.tc), nil
}

type tlsDialer struct {
	addr string
	tc   *tls.Config
	d    net.Dialer
}

func newTLSDialer(cfg Config) (Dialer, error) {
	host, _, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("gateway address %q: %w", cfg.Addr, err)
	}
	tc, err := clientTLS("tls", cfg.TLS, host)
	if err != nil {
		return nil, err
	}
	return &tlsDialer{addr: cfg.Addr, tc: tc}, nil
}

func (d *tlsDialer) Dial(ctx context.Context) (net.Conn, error) {
	raw, err := d.d.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, err
	}
	tuneTCP(raw)
	c := tls.Client(resume.TLSSocket(raw), d.tc)
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", d.addr, err)
	}
	return c, nil
}

func (d *tlsDialer) Close() error { return nil }
