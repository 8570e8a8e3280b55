package proxy

import (
	"net"
	"net/netip"

	"github.com/lifeline-proxy/lifeline/resume"
)

// The application's own address upstream. A route with ProxyProtocol
// names a source to the upstream: by default the client sidecar's
// address as the link shows it (a trusted balancer's PROXY header
// included), which is the machine the application runs on but not the
// application's socket. A client sidecar with SendAppAddr states its
// application's address in HELLO; the gateway passes that on only when it
// trusts the client to tell the truth (GatewayConfig.TrustAppAddr: mTLS
// links, or the operator's word), since whatever the upstream logs or
// filters by would otherwise be the client's to choose.

// dialOptions are a client session's HELLO options for the application
// connection app.
func dialOptions(app *net.TCPConn, r ClientRoute) resume.DialOptions {
	if !r.SendAppAddr {
		return resume.DialOptions{}
	}
	ta, ok := app.RemoteAddr().(*net.TCPAddr)
	if !ok {
		return resume.DialOptions{}
	}
	ap := ta.AddrPort()
	// A zone names an interface of the client's host: meaningless to
	// the upstream, and refused in HELLO.
	return resume.DialOptions{AppAddr: netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port()).String()}
}

// upstreamSource is the source the PROXY header to the upstream names for
// conn, whose link comes from link: the application's address the client
// stated, if any and trusted, else the link's.
func (g *Gateway) upstreamSource(conn *resume.Conn, link net.Addr) net.Addr {
	if !g.tracker.appTrusted {
		return link
	}
	ap, err := netip.ParseAddrPort(conn.PeerAppAddr()) // "" when none was stated
	if err != nil {
		return link
	}
	return net.TCPAddrFromAddrPort(ap)
}
