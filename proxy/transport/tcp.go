package transport

import (
	"context"
	"fmt"
	"net"
	"time"
)

// The tcp transport: a link is a TCP connection, unauthenticated and
// unencrypted. Listener, dialer and their socket options are small enough
// for one file.

type tcpListener struct{ net.Listener }

func listenTCP(cfg Config) (net.Listener, error) {
	return listenStream(cfg)
}

// listenStream opens the TCP listener of tcp and tls, reading PROXY
// headers if cfg.ProxyIn asks for it.
func listenStream(cfg Config) (net.Listener, error) {
	if cfg.ProxyIn != nil {
		if err := cfg.ProxyIn.validate(); err != nil {
			return nil, err
		}
	}
	listen := net.Listen
	if cfg.ListenTCP != nil {
		listen = cfg.ListenTCP
	}
	l, err := listen("tcp", cfg.Addr)
	if err != nil {
		return nil, err
	}
	if cfg.ProxyIn != nil {
		return newProxyListener(tcpListener{l}, *cfg.ProxyIn, cfg.logger()), nil
	}
	return tcpListener{l}, nil
}

func (l tcpListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tuneTCP(c)
	return c, nil
}

// tuneTCP sets the socket options of a link's TCP connection (tcp and tls).
func tuneTCP(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
		// The session engine has its own liveness check; keepalives only
		// help middleboxes keep their state for idle links.
		tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: 30 * time.Second, Interval: 10 * time.Second, Count: 3})
	}
}

type tcpDialer struct {
	addr string
	d    net.Dialer
}

func newTCPDialer(cfg Config) (Dialer, error) {
	if _, _, err := net.SplitHostPort(cfg.Addr); err != nil {
		return nil, fmt.Errorf("gateway address %q: %w", cfg.Addr, err)
	}
	return &tcpDialer{addr: cfg.Addr}, nil
}

func (d *tcpDialer) Dial(ctx context.Context) (net.Conn, error) {
	c, err := d.d.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, err
	}
	tuneTCP(c)
	return c, nil
}

func (d *tcpDialer) Close() error { return nil }
