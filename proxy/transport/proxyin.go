package transport

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/lifeline-proxy/lifeline/resume"
)

// PROXY protocol in: a gateway behind an L4 load balancer (HAProxy, Envoy,
// a cloud NLB) sees the balancer's address on every link. The balancer
// can prepend a PROXY protocol header (v1 text or v2 binary) naming the
// client it accepted; a listener wrapped here reads it, and its links
// return that client as RemoteAddr, so that logs, the admin API, the
// session server's per-source caps and throttles and the PROXY header the
// gateway sends upstream all see the real client.
//
// Trust is by source address only: a header is believed from the
// configured sources and refused from anyone else, since a client that
// could set its own address could dodge every per-source limit and spoof
// the address the upstream logs. A trusted source must send one: accepting
// links without a header from the balancer would give all its clients the
// balancer's address, and so one shared throttle, silently.
//
// The header sits below TLS (the balancer does not terminate it), so the
// tls transport wraps its TCP listener before TLS. QUIC runs over UDP,
// where these headers do not apply.

// ProxyIn configures PROXY protocol on a tcp or tls link listener.
type ProxyIn struct {
	// From lists the sources (the balancers) whose connections must open
	// with a PROXY header. A header from any other source is refused.
	From []netip.Prefix
	// ReadHeaderTimeout bounds the wait for a trusted source's header
	// (0: DefaultProxyHeaderTimeout).
	ReadHeaderTimeout time.Duration
	// Refused, if set, counts a connection refused for its header, by
	// one of ProxyRefusalReasons.
	Refused func(reason string)
}

// DefaultProxyHeaderTimeout bounds the wait for a PROXY header when
// ProxyIn.ReadHeaderTimeout is 0. A balancer sends it with its first
// packet, so this only ends connections that never will.
const DefaultProxyHeaderTimeout = 5 * time.Second

// Reasons a connection is refused for its PROXY header.
const (
	// ProxyRefusedUntrusted: a header from a source not in From.
	ProxyRefusedUntrusted = "untrusted_header"
	// ProxyRefusedMissing: a trusted source's connection did not open
	// with a header.
	ProxyRefusedMissing = "missing_header"
	// ProxyRefusedTimeout: a trusted source sent no complete header
	// within the timeout.
	ProxyRefusedTimeout = "header_timeout"
	// ProxyRefusedBad: a trusted source's header did not parse.
	ProxyRefusedBad = "bad_header"
)

// ProxyRefusalReasons lists the reasons, for a metric's labels.
var ProxyRefusalReasons = []string{ProxyRefusedUntrusted, ProxyRefusedMissing, ProxyRefusedTimeout, ProxyRefusedBad}

// ErrProxyHeader is what Read returns on a link refused for its PROXY
// header (wrapped, with the reason).
var ErrProxyHeader = errors.New("PROXY protocol header refused")

// ParseProxyFrom parses a comma-separated list of CIDR prefixes or single
// IP addresses ("10.0.0.0/8,192.0.2.7").
func ParseProxyFrom(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			return nil, fmt.Errorf("PROXY protocol sources %q: empty entry", s)
		}
		if p, err := netip.ParsePrefix(f); err == nil {
			if p != p.Masked() {
				return nil, fmt.Errorf("PROXY protocol source %q: host bits set (did you mean %s?)", f, p.Masked())
			}
			out = append(out, unmapPrefix(p))
			continue
		}
		a, err := netip.ParseAddr(f)
		if err != nil || a.Zone() != "" {
			return nil, fmt.Errorf("PROXY protocol source %q: want a CIDR prefix (10.0.0.0/8) or an IP address", f)
		}
		a = a.Unmap()
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// unmapPrefix turns ::ffff:a.b.c.d/n (n >= 96) into a.b.c.d/(n-96), so
// that it matches IPv4 sources, which are compared unmapped.
func unmapPrefix(p netip.Prefix) netip.Prefix {
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p
}

func (p *ProxyIn) validate() error {
	if len(p.From) == 0 {
		return errors.New("PROXY protocol: no trusted sources")
	}
	if p.ReadHeaderTimeout < 0 {
		return errors.New("PROXY protocol: negative header timeout")
	}
	return nil
}

// trusts reports whether a header is expected from addr.
func (p *ProxyIn) trusts(addr net.Addr) bool {
	ta, ok := addr.(*net.TCPAddr)
	if !ok {
		return false
	}
	ip, ok := netip.AddrFromSlice(ta.IP)
	if !ok {
		return false
	}
	ip = ip.Unmap()
	for _, pre := range p.From {
		if pre.Contains(ip) {
			return true
		}
	}
	return false
}

// proxyListener wraps a TCP listener (tuned already, below TLS).
type proxyListener struct {
	net.Listener
	cfg     ProxyIn
	timeout time.Duration
	log     *slog.Logger

	mu      sync.Mutex
	closed  bool
	reading map[*proxyConn]struct{} // trusted links waiting for their header
	lastLog time.Time
	quiet   int // refusals not logged since lastLog
}

func newProxyListener(l net.Listener, cfg ProxyIn, log *slog.Logger) *proxyListener {
	t := cfg.ReadHeaderTimeout
	if t == 0 {
		t = DefaultProxyHeaderTimeout
	}
	return &proxyListener{Listener: l, cfg: cfg, timeout: t, log: log, reading: map[*proxyConn]struct{}{}}
}

// Accept returns at once: the header is read by the link's own goroutine
// (RemoteAddr or the first Read), never by the accept loop, so a silent
// connection holds up no one.
func (l *proxyListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &proxyConn{Conn: c, l: l, trusted: l.cfg.trusts(c.RemoteAddr())}, nil
}

// Close also ends the links still waiting for their header: their wait
// runs before the session server has them under its own deadline, and
// the server's Close waits for them.
func (l *proxyListener) Close() error {
	err := l.Listener.Close()
	l.mu.Lock()
	l.closed = true
	for c := range l.reading {
		c.Conn.Close()
	}
	l.mu.Unlock()
	return err
}

func (l *proxyListener) startReading(c *proxyConn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.reading[c] = struct{}{}
	return true
}

// doneReading reports whether the listener was still open.
func (l *proxyListener) doneReading(c *proxyConn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.reading, c)
	return !l.closed
}

// refused counts a refusal and logs it, at most once a second: a
// misconfigured balancer, or someone probing, must not flood the log.
func (l *proxyListener) refused(c *proxyConn, reason string, err error) {
	if l.cfg.Refused != nil {
		l.cfg.Refused(reason)
	}
	l.mu.Lock()
	now := time.Now()
	if now.Sub(l.lastLog) < time.Second {
		l.quiet++
		l.mu.Unlock()
		return
	}
	quiet := l.quiet
	l.lastLog, l.quiet = now, 0
	l.mu.Unlock()
	l.log.Warn("link refused: PROXY protocol header", "reason", reason, "remote", c.Conn.RemoteAddr(),
		"listen", l.Addr(), "err", err, "not_logged_before", quiet)
}

var (
	_ resume.LinkSocket = (*proxyConn)(nil)
	_ resume.Middlebox  = (*proxyConn)(nil)
)

// proxyConn is a link accepted by a proxyListener. Its header is read
// once, by the first of RemoteAddr (trusted sources only) and Read.
type proxyConn struct {
	net.Conn // the TCP connection
	l        *proxyListener
	trusted  bool

	once   sync.Once
	remote net.Addr      // the header's source, else the socket's peer
	br     *bufio.Reader // bytes read past the header; nil once drained (reader's)
	// drained: br was emptied, so the socket may be read directly
	// (Socket).
	drained atomic.Bool
	failed  atomic.Pointer[error]

	dl       sync.Mutex
	userRead time.Time // the read deadline the link's user set
	hdrRead  time.Time // the header's deadline, while it is read
}

// proxyBufSize holds a whole v1 header line (107 bytes at most), which
// go-proxyproto needs buffered at once, and a v2 header without large
// TLVs.
const proxyBufSize = 256

func (c *proxyConn) header() {
	c.remote = c.Conn.RemoteAddr()
	c.br = bufio.NewReaderSize(c.Conn, proxyBufSize)
	if !c.trusted {
		// Under the user's deadline (the session server's handshake
		// deadline): a lifeline preamble or a TLS ClientHello shows
		// at its first byte that it is not a PROXY header.
		if proxySignature(c.br) {
			c.fail(ProxyRefusedUntrusted, errors.New("header from a source not in --proxy-protocol-from"))
		}
		return
	}
	if !c.l.startReading(c) {
		c.setFailed(net.ErrClosed)
		c.Conn.Close()
		return
	}
	c.setHeaderDeadline(time.Now().Add(c.l.timeout))
	h, err := c.readHeader()
	c.setHeaderDeadline(time.Time{})
	if !c.l.doneReading(c) {
		// The listener closed under the read: not the peer's fault.
		c.setFailed(net.ErrClosed)
		c.Conn.Close()
		return
	}
	var ne net.Error
	switch {
	case err == io.EOF:
		// Connected and closed without a byte: a balancer's plain TCP
		// health check. Nothing to refuse, nothing to log.
		c.setFailed(io.EOF)
		c.Conn.Close()
	case errors.As(err, &ne) && ne.Timeout():
		c.fail(ProxyRefusedTimeout, fmt.Errorf("no PROXY header within %v", c.l.timeout))
	case errors.Is(err, proxyproto.ErrNoProxyProtocol):
		c.fail(ProxyRefusedMissing, errors.New("a source in --proxy-protocol-from sent no PROXY header"))
	case err != nil:
		c.fail(ProxyRefusedBad, err)
	case h.Command.IsLocal():
		// LOCAL: the balancer's own connection (a health check);
		// it has no client, so it keeps the balancer's address.
	default:
		if src, ok := h.SourceAddr.(*net.TCPAddr); ok {
			c.remote = src
		}
		// An UNKNOWN (v1) or UNSPEC (v2) family carries no address:
		// the balancer's stands.
	}
}

// readHeader reads the header of a trusted source. A connection closed
// before its first byte gives io.EOF.
func (c *proxyConn) readHeader() (*proxyproto.Header, error) {
	if _, err := c.br.Peek(1); err != nil {
		return nil, err
	}
	return proxyproto.Read(c.br)
}

// proxySignature reports whether br starts with a PROXY v1 or v2
// signature, reading only as far as needed to tell.
func proxySignature(br *bufio.Reader) bool {
	b, err := br.Peek(1)
	if err != nil {
		return false
	}
	var sig []byte
	switch b[0] {
	case proxyproto.SIGV1[0]:
		sig = proxyproto.SIGV1
	case proxyproto.SIGV2[0]:
		sig = proxyproto.SIGV2
	default:
		return false
	}
	b, _ = br.Peek(len(sig))
	return bytes.Equal(b, sig)
}

func (c *proxyConn) fail(reason string, err error) {
	c.setFailed(fmt.Errorf("%w (%s): %v", ErrProxyHeader, reason, err))
	// Counted before the close, so that whoever sees the close sees
	// the count.
	c.l.refused(c, reason, err)
	c.Conn.Close()
}

func (c *proxyConn) setFailed(err error) { c.failed.Store(&err) }

func (c *proxyConn) err() error {
	if p := c.failed.Load(); p != nil {
		return *p
	}
	return nil
}

// setHeaderDeadline sets (t non-zero) or lifts the header's deadline,
// keeping to an earlier one the user set.
func (c *proxyConn) setHeaderDeadline(t time.Time) {
	c.dl.Lock()
	defer c.dl.Unlock()
	c.hdrRead = t
	c.Conn.SetReadDeadline(c.effective())
}

// effective is the read deadline to set on the socket (c.dl held).
func (c *proxyConn) effective() time.Time {
	t := c.userRead
	if !c.hdrRead.IsZero() && (t.IsZero() || c.hdrRead.Before(t)) {
		t = c.hdrRead
	}
	return t
}

// RemoteAddr is the client the header names. For a trusted source it
// waits for the header (bounded by the header timeout).
func (c *proxyConn) RemoteAddr() net.Addr {
	if !c.trusted {
		return c.Conn.RemoteAddr()
	}
	c.once.Do(c.header)
	return c.remote
}

func (c *proxyConn) Read(b []byte) (int, error) {
	c.once.Do(c.header)
	if err := c.err(); err != nil {
		return 0, err
	}
	if c.br != nil {
		if c.br.Buffered() > 0 {
			n, err := c.br.Read(b)
			if c.br.Buffered() == 0 {
				c.br = nil
				c.drained.Store(true)
			}
			return n, err
		}
		c.br = nil
		c.drained.Store(true)
	}
	n, err := c.Conn.Read(b)
	return n, c.masked(err)
}

// Socket gives the session engine the TCP socket once the header and
// every byte read past it have been returned by Read (resume.LinkSocket):
// from then on the link reads and writes the socket itself, with the
// fast paths of a plain TCP link (errors of those direct reads and writes
// name the balancer's address, not the client's).
func (c *proxyConn) Socket() *net.TCPConn {
	if !c.drained.Load() || c.err() != nil {
		return nil
	}
	tc, _ := c.Conn.(*net.TCPConn)
	return tc
}

// ViaMiddlebox reports a link from a trusted source, a load balancer
// (resume.Middlebox): the link's TCP connection ends there, so the gateway
// probes it while idle with PING frames, which reach the client through
// the balancer and count against its idle timeout, not with the kernel's
// keepalive, which stops at the balancer.
func (c *proxyConn) ViaMiddlebox() bool { return c.trusted }

// NetConn is the TCP connection: from an untrusted source, which sent no
// header, it runs to the client itself.
func (c *proxyConn) NetConn() net.Conn { return c.Conn }

// masked names the client the header named, not the balancer, in a
// socket error: the gateway logs a link's errors, and the balancer's
// address in them would read as a client's.
func (c *proxyConn) masked(err error) error {
	oe, ok := err.(*net.OpError)
	if !ok || !c.trusted || oe.Addr == nil {
		return err
	}
	m := *oe
	m.Addr = c.RemoteAddr()
	return &m
}

// Write does not wait for the header (the gateway writes only after it
// has read), but fails once the header was refused.
func (c *proxyConn) Write(b []byte) (int, error) {
	if err := c.err(); err != nil {
		return 0, err
	}
	n, err := c.Conn.Write(b)
	return n, c.masked(err)
}

func (c *proxyConn) SetDeadline(t time.Time) error {
	c.dl.Lock()
	defer c.dl.Unlock()
	c.userRead = t
	if err := c.Conn.SetWriteDeadline(t); err != nil {
		return err
	}
	return c.Conn.SetReadDeadline(c.effective())
}

func (c *proxyConn) SetReadDeadline(t time.Time) error {
	c.dl.Lock()
	defer c.dl.Unlock()
	c.userRead = t
	return c.Conn.SetReadDeadline(c.effective())
}
