package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
)

// The header that starts every forwarded link's stream (docs/cluster.md):
//
//	"LLFW" version(1) owner(4) network(1) addrLen(1) addr bindingLen(1) binding
//
// owner is the node id the entry node meant the link for (the owner
// refuses one meant for another id, e.g. after a restart under another
// name at the same address); network is 't' (the client's link came over
// TCP or TLS) or 'u' (QUIC), or 0 with an empty addr when the address is
// not an IP one; addr is the client's address as "ip:port"; binding is the
// link's TLS channel binding (empty on a tcp link). The replay bytes
// follow, then the link's bytes.
const (
	fwdMagic      = "LLFW"
	fwdVersion    = 1
	fwdFixedLen   = 4 + 1 + 4 + 1 + 1
	maxFwdAddr    = 64 // "[v6%zone]:port" fits
	maxFwdBinding = 64 // resume binds with 32 bytes of TLS exporter
)

type forwardHeader struct {
	Owner   NodeID
	Remote  net.Addr // *net.TCPAddr, *net.UDPAddr, or nil
	Binding []byte
}

// appendForwardHeader appends h's encoding to b.
func appendForwardHeader(b []byte, h forwardHeader) ([]byte, error) {
	var network byte
	var addr string
	switch a := h.Remote.(type) {
	case *net.TCPAddr:
		network, addr = 't', a.AddrPort().String()
	case *net.UDPAddr:
		network, addr = 'u', a.AddrPort().String()
	}
	if len(addr) > maxFwdAddr {
		return nil, fmt.Errorf("forward header: address %q too long", addr)
	}
	if len(h.Binding) > maxFwdBinding {
		return nil, fmt.Errorf("forward header: binding of %d bytes (at most %d)", len(h.Binding), maxFwdBinding)
	}
	b = append(b, fwdMagic...)
	b = append(b, fwdVersion)
	b = append(b, h.Owner[:]...)
	b = append(b, network, byte(len(addr)))
	b = append(b, addr...)
	b = append(b, byte(len(h.Binding)))
	return append(b, h.Binding...), nil
}

var errFwdHeader = errors.New("bad forward header")

// readForwardHeader reads one header from r, exactly its bytes: what
// follows stays in r. Every length is checked against its bound before
// anything is allocated for it.
func readForwardHeader(r io.Reader) (forwardHeader, error) {
	var h forwardHeader
	var fixed [fwdFixedLen]byte
	if _, err := io.ReadFull(r, fixed[:]); err != nil {
		return h, fmt.Errorf("%w: %w", errFwdHeader, err)
	}
	if string(fixed[:4]) != fwdMagic {
		return h, fmt.Errorf("%w: magic %q", errFwdHeader, fixed[:4])
	}
	if fixed[4] != fwdVersion {
		return h, fmt.Errorf("%w: version %d (this node speaks %d)", errFwdHeader, fixed[4], fwdVersion)
	}
	copy(h.Owner[:], fixed[5:9])
	network, n := fixed[9], int(fixed[10])
	if n > maxFwdAddr {
		return h, fmt.Errorf("%w: address of %d bytes", errFwdHeader, n)
	}
	// The address and the binding's length in one read.
	buf := make([]byte, n+1)
	if _, err := io.ReadFull(r, buf); err != nil {
		return h, fmt.Errorf("%w: %w", errFwdHeader, err)
	}
	switch network {
	case 't', 'u':
		ap, err := netip.ParseAddrPort(string(buf[:n]))
		if err != nil {
			return h, fmt.Errorf("%w: address %q", errFwdHeader, buf[:n])
		}
		if network == 't' {
			h.Remote = net.TCPAddrFromAddrPort(ap)
		} else {
			h.Remote = net.UDPAddrFromAddrPort(ap)
		}
	case 0:
		if n != 0 {
			return h, fmt.Errorf("%w: address without a network", errFwdHeader)
		}
	default:
		return h, fmt.Errorf("%w: network %#02x", errFwdHeader, network)
	}
	bl := int(buf[n])
	if bl > maxFwdBinding {
		return h, fmt.Errorf("%w: binding of %d bytes", errFwdHeader, bl)
	}
	if bl > 0 {
		h.Binding = make([]byte, bl)
		if _, err := io.ReadFull(r, h.Binding); err != nil {
			return h, fmt.Errorf("%w: %w", errFwdHeader, err)
		}
	}
	return h, nil
}
