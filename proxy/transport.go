package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// transportFactory makes the listening and dialing ends of one transport.
// tc is nil for transports that do not use TLS. Transports register
// themselves with registerTransport (QUIC does so from proxy/quic.go).
type transportFactory struct {
	Listen func(addr string, tc *tls.Config) (LinkListener, error)
	Dial   func(addr string, tc *tls.Config) (LinkDialer, error)
}

var (
	transportsMu sync.Mutex
	transports   = map[string]transportFactory{}
)

// registerTransport makes a transport available by name. It panics on a
// duplicate name (a programming error).
func registerTransport(name string, f transportFactory) {
	transportsMu.Lock()
	defer transportsMu.Unlock()
	if _, dup := transports[name]; dup {
		panic("proxy: transport " + name + " registered twice")
	}
	transports[name] = f
}

func init() {
	registerTransport("tcp", transportFactory{Listen: listenTCP, Dial: newTCPDialer})
	registerTransport("tls", transportFactory{Listen: listenTLS, Dial: newTLSDialer})
}

// Transports lists the transports compiled into this build.
func Transports() []string {
	transportsMu.Lock()
	defer transportsMu.Unlock()
	var out []string
	for name := range transports {
		out = append(out, name)
	}
	sort.Strings(out)
	return out
}

// KnownTransport reports whether name is a transport this program knows
// about, available in this build or not.
func KnownTransport(name string) bool {
	switch name {
	case "tcp", "tls", "quic":
		return true
	}
	return false
}

// TransportUsesTLS reports whether the transport needs TLS settings.
func TransportUsesTLS(name string) bool { return name != "tcp" }

func lookupTransport(name string) (transportFactory, error) {
	transportsMu.Lock()
	f, ok := transports[name]
	transportsMu.Unlock()
	if ok {
		return f, nil
	}
	if KnownTransport(name) {
		return f, fmt.Errorf("transport %q is not available in this build", name)
	}
	return f, fmt.Errorf("unknown transport %q (want one of tcp, tls, quic)", name)
}

// Listen opens a link listener for the named transport. tc must be set for
// every transport but tcp.
func Listen(transport, addr string, tc *tls.Config) (LinkListener, error) {
	f, err := lookupTransport(transport)
	if err != nil {
		return nil, err
	}
	return f.Listen(addr, tc)
}

// NewDialer returns a link dialer for the named transport.
func NewDialer(transport, addr string, tc *tls.Config) (LinkDialer, error) {
	f, err := lookupTransport(transport)
	if err != nil {
		return nil, err
	}
	return f.Dial(addr, tc)
}

// ---- TCP ----

type tcpListener struct{ net.Listener }

func listenTCP(addr string, _ *tls.Config) (LinkListener, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
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

func newTCPDialer(addr string, _ *tls.Config) (LinkDialer, error) {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return nil, fmt.Errorf("gateway address %q: %w", addr, err)
	}
	return &tcpDialer{addr: addr}, nil
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

// ---- TLS ----

type tlsListener struct {
	net.Listener
	tc *tls.Config
}

func listenTLS(addr string, tc *tls.Config) (LinkListener, error) {
	if tc == nil {
		return nil, errors.New("transport tls needs a certificate and key (--tls-cert, --tls-key)")
	}
	l, err := net.Listen("tcp", addr)
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
	return tls.Server(c, l.tc), nil
}

type tlsDialer struct {
	addr string
	tc   *tls.Config
	d    net.Dialer
}

func newTLSDialer(addr string, tc *tls.Config) (LinkDialer, error) {
	if tc == nil {
		return nil, errors.New("transport tls needs TLS settings")
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("gateway address %q: %w", addr, err)
	}
	tc = tc.Clone()
	if tc.ServerName == "" {
		tc.ServerName = host
	}
	return &tlsDialer{addr: addr, tc: tc}, nil
}

func (d *tlsDialer) Dial(ctx context.Context) (net.Conn, error) {
	raw, err := d.d.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, err
	}
	tuneTCP(raw)
	c := tls.Client(raw, d.tc)
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", d.addr, err)
	}
	return c, nil
}

func (d *tlsDialer) Close() error { return nil }

// ---- certificates ----

// TLSFiles names the PEM files of one TLS endpoint.
type TLSFiles struct {
	Cert       string `yaml:"cert"`
	Key        string `yaml:"key"`
	CA         string `yaml:"ca"`
	ServerName string `yaml:"server_name"`
	// Pin (client only) is the SHA-256 of the gateway's certificate, for
	// a gateway with a self-signed one; checked instead of a CA chain.
	Pin string `yaml:"pin"`
}

// Empty reports whether no TLS setting is given.
func (f TLSFiles) Empty() bool { return f == TLSFiles{} }

// CertStore holds a certificate and CA pool loaded from files, swapped
// atomically by Reload so that new handshakes use the new files while
// established links and sessions carry on.
type CertStore struct {
	files TLSFiles
	cert  atomic.Pointer[tls.Certificate]
	pool  atomic.Pointer[x509.CertPool]
}

// NewCertStore loads the files; a missing or bad file is an error naming it.
func NewCertStore(f TLSFiles) (*CertStore, error) {
	s := &CertStore{files: f}
	if err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Reload reads the files again. On error the previous material stays.
func (s *CertStore) Reload() error {
	f := s.files
	if (f.Cert == "") != (f.Key == "") {
		return errors.New("--tls-cert and --tls-key must be given together")
	}
	var cert *tls.Certificate
	if f.Cert != "" {
		c, err := tls.LoadX509KeyPair(f.Cert, f.Key)
		if err != nil {
			return fmt.Errorf("tls certificate %s / key %s: %w", f.Cert, f.Key, err)
		}
		cert = &c
	}
	var pool *x509.CertPool
	if f.CA != "" {
		pem, err := os.ReadFile(f.CA)
		if err != nil {
			return fmt.Errorf("tls CA: %w", err)
		}
		pool = x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("tls CA %s: no PEM certificate in file", f.CA)
		}
	}
	s.cert.Store(cert)
	s.pool.Store(pool)
	return nil
}

// ServerConfig is a gateway's TLS config: the current certificate, and
// client certificates required and verified when a CA is set (mTLS).
func (s *CertStore) ServerConfig() (*tls.Config, error) {
	if s.cert.Load() == nil {
		return nil, errors.New("gateway TLS needs --tls-cert and --tls-key")
	}
	base := &tls.Config{MinVersion: tls.VersionTLS12}
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		c := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: base.NextProtos}
		cert := s.cert.Load()
		c.Certificates = []tls.Certificate{*cert}
		if pool := s.pool.Load(); pool != nil {
			c.ClientCAs = pool
			c.ClientAuth = tls.RequireAndVerifyClientCert
		}
		return c, nil
	}
	// For transports that ignore GetConfigForClient.
	base.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.cert.Load(), nil }
	return base, nil
}

// ClientConfig is a client sidecar's TLS config: the gateway's certificate
// must match the pin, if one is set, or else chain to the CA (the system
// roots if none is set), and the client certificate, if any, is presented
// for mTLS. Verification is never skipped. A failure is a
// *tls.CertificateVerificationError (see CertVerifyFailure).
func (s *CertStore) ClientConfig() *tls.Config {
	c := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: s.files.ServerName}
	if s.files.Pin != "" {
		c = PinnedTLS(s.files.Pin, s.files.ServerName)
	} else if pool := s.pool.Load(); pool != nil {
		c.RootCAs = nil
		// Verify against the pool current at handshake time so a CA
		// reload applies to new links.
		c.InsecureSkipVerify = true
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("gateway sent no certificate")
			}
			opts := x509.VerifyOptions{Roots: s.pool.Load(), DNSName: cs.ServerName, Intermediates: x509.NewCertPool()}
			for _, ic := range cs.PeerCertificates[1:] {
				opts.Intermediates.AddCert(ic)
			}
			if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
				return certVerifyError(cs.PeerCertificates, err)
			}
			return nil
		}
	}
	c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		if cert := s.cert.Load(); cert != nil {
			return cert, nil
		}
		return &tls.Certificate{}, nil
	}
	return c
}
