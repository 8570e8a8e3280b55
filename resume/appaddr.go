package resume

import (
	"fmt"
	"net/netip"
)

// The application's own address: a client sidecar may state, in HELLO,
// the address of the application whose connection the session carries,
// so that the gateway can name it to the upstream (a PROXY protocol
// header) instead of the sidecar's. The gateway only stores it; whether
// to believe it is the proxy's decision.

// DialOptions are the per-session settings of DialWith.
type DialOptions struct {
	// AppAddr, if set, is sent in HELLO: the application's address as
	// "ip:port" (netip.AddrPort's form, no IPv6 zone). A gateway of a
	// build before this field refuses such a HELLO (VALIDATION).
	AppAddr string
}

// PeerAppAddr is the application's address the client stated in HELLO
// ("ip:port"), on either end ("" when none was sent). On a gateway it is
// the client's claim: trust it only as far as the client is trusted.
func (c *Conn) PeerAppAddr() string {
	// Set before the Conn is handed out and never changed.
	return c.s.appAddr
}

// parseAppAddr checks an application address and returns its canonical
// form; "" stays "".
func parseAppAddr(s string) (string, error) {
	if s == "" {
		return "", nil
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil || ap.Addr().Zone() != "" {
		return "", fmt.Errorf("application address %.64q: want ip:port", s)
	}
	return ap.String(), nil
}
