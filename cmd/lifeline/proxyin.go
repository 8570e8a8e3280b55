package main

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

// PROXY protocol in (--proxy-protocol-from, proxy_protocol_from): the
// gateway behind a load balancer; see transport.ProxyIn.

// proxyFromFlag is --proxy-protocol-from as the file holds it.
func proxyFromFlag(v string, set bool) addrList {
	if !set {
		return nil
	}
	return addrList{v}
}

// checkProxyFrom checks a gateway section's proxy_protocol_from.
func checkProxyFrom(g *gatewayFile) error {
	if len(g.ProxyProtocolFrom) == 0 {
		return nil
	}
	if g.Transport == "quic" {
		return errors.New("gateway: --proxy-protocol-from (proxy_protocol_from) does not apply to --transport quic: " +
			"PROXY protocol headers are for TCP streams, and a load balancer in front of QUIC forwards UDP datagrams")
	}
	if _, err := transport.ParseProxyFrom(strings.Join(g.ProxyProtocolFrom, ",")); err != nil {
		return fmt.Errorf("gateway: proxy_protocol_from: %v", err)
	}
	return nil
}

// trustAppAddr reports whether a gateway believes the application
// addresses its clients state: every link is mTLS-authenticated (a client
// certificate verified against --tls-ca), or the operator says so.
func trustAppAddr(g *gatewayFile) bool {
	return g.TrustClientAppAddr || transport.UsesTLS(g.Transport) && g.TLS.CA != ""
}

// proxyIn is the link listeners' PROXY protocol setting (nil: off). The
// header's wait is bounded by the handshake timeout, which bounds the
// rest of a link's opening too. g was checked (checkProxyFrom).
func proxyIn(g *gatewayFile, handshake time.Duration, metrics proxy.Metrics) *transport.ProxyIn {
	if len(g.ProxyProtocolFrom) == 0 {
		return nil
	}
	from, _ := transport.ParseProxyFrom(strings.Join(g.ProxyProtocolFrom, ","))
	pin := &transport.ProxyIn{From: from, ReadHeaderTimeout: handshake}
	if pm, ok := metrics.(*proxy.PromMetrics); ok {
		pin.Refused = pm.ProxyProtocolRefusals()
	}
	return pin
}
