// Package transport carries lifeline's links over tcp, tls or quic: a
// listener for a gateway and a dialer for a client sidecar, each made from
// a Config. Every link is a net.Conn whose Close unblocks a pending Read
// and Write. A tls link is a *tls.Conn and a quic link (one QUIC stream)
// has ExportKeyingMaterial, so that package resume can bind its proofs to
// the link (channel binding).
//
// The TLS settings of both, and the helpers that build them (certificate
// files reloaded on demand, pins, generated gateway certificates), are in
// tlsconfig.go.
package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
)

// Config chooses a transport and sets it up.
type Config struct {
	// Name is the transport: "tcp", "tls" or "quic".
	Name string
	// Addr is the address to listen on, or the gateway's (host:port) to
	// dial.
	Addr string
	// TLS is the TLS config of tls and quic (ignored by tcp). A gateway's
	// must hold a certificate (see CertStore.ServerConfig, ServerTLS); a
	// client's nil verifies the gateway against the system roots (see
	// CertStore.ClientConfig and PinnedTLS for the others). It is cloned,
	// and the clone is made to fit the transport: see tlsconfig.go.
	TLS *tls.Config
	// QUIC tunes the quic transport; nil: DefaultQUICConfig().
	QUIC *QUICConfig
	// Logger receives the transport's events (QUIC connections, the UDP
	// buffer warning); nil: slog.Default().
	Logger *slog.Logger
	// ListenTCP, if set, opens the TCP socket of a tcp or tls listener
	// instead of net.Listen (an upgrade in place passes listening sockets
	// to the next process).
	ListenTCP func(network, addr string) (net.Listener, error)
	// ListenUDP, if set, opens the UDP socket of a quic listener instead
	// of net.ListenUDP (an upgrade in place passes it on). Closing the
	// listener closes the *net.UDPConn it returned.
	ListenUDP func(network string, addr *net.UDPAddr) (*net.UDPConn, error)
	// ProxyIn, if set, makes a tcp or tls listener read PROXY protocol
	// headers from the sources it trusts (see proxyin.go). quic refuses
	// it: the header is a TCP stream's, not UDP's.
	ProxyIn *ProxyIn
}

func (c Config) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.Default()
	}
	return c.Logger
}

func (c Config) quic() QUICConfig {
	if c.QUIC == nil {
		return DefaultQUICConfig()
	}
	return *c.QUIC
}

// Dialer opens links from a client sidecar to a gateway. Close releases
// shared state (a QUIC connection) and fails the links it carries.
type Dialer interface {
	Dial(ctx context.Context) (net.Conn, error)
	Close() error
}

// names lists the transports, sorted.
var names = []string{"quic", "tcp", "tls"}

// Names lists the transports this program has.
func Names() []string { return slices.Clone(names) }

// Known reports whether name is a transport.
func Known(name string) bool { return slices.Contains(names, name) }

// UsesTLS reports whether the transport needs TLS settings.
func UsesTLS(name string) bool { return name != "tcp" }

func unknown(name string) error {
	return fmt.Errorf("unknown transport %q (want one of tcp, tls, quic)", name)
}

// Listen opens a gateway's link listener. Its Accept returns the links;
// its Close ends them too (for quic) and releases the socket.
func Listen(cfg Config) (net.Listener, error) {
	switch cfg.Name {
	case "tcp":
		return listenTCP(cfg)
	case "tls":
		return listenTLS(cfg)
	case "quic":
		if cfg.ProxyIn != nil {
			return nil, errors.New("PROXY protocol does not apply to the quic transport (UDP)")
		}
		l, err := listenQUIC(cfg)
		if err != nil {
			return nil, err
		}
		return l, nil
	}
	return nil, unknown(cfg.Name)
}

// NewDialer returns a client sidecar's dialer to the gateway at cfg.Addr.
// It dials nothing until its first Dial.
func NewDialer(cfg Config) (Dialer, error) {
	switch cfg.Name {
	case "tcp":
		return newTCPDialer(cfg)
	case "tls":
		return newTLSDialer(cfg)
	case "quic":
		d, err := newQUICDialer(cfg)
		if err != nil {
			return nil, err
		}
		return d, nil
	}
	return nil, unknown(cfg.Name)
}
