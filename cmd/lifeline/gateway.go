package main

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"strings"

	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// startGateway assembles a gateway from its config section and starts
// serving its link listeners; a listener's fatal error goes to failed.
// It returns the certificate stores that SIGHUP reloads.
func startGateway(g *gatewayFile, log *slog.Logger, metrics proxy.Metrics, failed chan<- error) (*proxy.Gateway, []*transport.CertStore, error) {
	sess, err := g.sessionFile.sessionConfigFor(g.Transport)
	if err != nil {
		return nil, nil, usageError{err}
	}
	sess.Logger = log
	warnQUICIdle(log, g.Transport, sess.LivenessTimeout)
	sc := resume.DefaultServerConfig()
	sc.Session = sess
	var logLimits func()
	sc.MaxSessions, sc.MemoryBudget, logLimits = gatewayLimits(g, log)
	if g.MaxHandshakes > 0 {
		sc.MaxHandshakes = g.MaxHandshakes
	}
	routes, err := gatewayRoutes(g, log)
	if err != nil {
		return nil, nil, usageError{err}
	}
	var store *transport.CertStore
	var id *transport.GatewayIdentity
	var tc *tls.Config
	if transport.UsesTLS(g.Transport) && g.TLS.Cert == "" {
		// No certificate: a self-signed one, made once and kept in the
		// state directory, whose fingerprint clients pin (--tls-pin).
		// Clients never skip verification.
		if tc, id, err = gatewayIdentity(g); err != nil {
			return nil, nil, err
		}
	} else if store, err = tlsStore(g.Transport, g.TLS); err != nil {
		return nil, nil, err
	} else if store != nil {
		c, err := store.ServerConfig()
		if err != nil {
			return nil, nil, err
		}
		tc = c
	}
	cl, logNode, err := startCluster(g.NodeID, g.Listen, g.Cluster, sc, log, metrics)
	if err != nil {
		return nil, nil, err
	}
	gw, err := proxy.NewGateway(proxy.GatewayConfig{Routes: routes, Server: sc, Logger: log, Metrics: metrics, Cluster: cl,
		TrustAppAddr: trustAppAddr(g)})
	if err != nil {
		if cl != nil {
			cl.Close()
		}
		return nil, nil, usageError{err}
	}
	pin := proxyIn(g, sess.HandshakeTimeout, metrics)
	// Every listener is opened before any serves: one that cannot be
	// fails the start.
	var lls []net.Listener
	for _, addr := range g.Listen {
		ll, err := listenLink(transport.Config{Name: g.Transport, Addr: addr, TLS: tc, Logger: log, ProxyIn: pin})
		if err != nil {
			for _, l := range lls {
				l.Close()
			}
			gw.Close()
			return nil, nil, fmt.Errorf("cannot listen on %s: %s", addr, errText(err))
		}
		lls = append(lls, ll)
	}
	names := make([]string, 0, len(routes))
	for _, r := range routes {
		names = append(names, r.Name+"="+r.Upstream)
	}
	for _, ll := range lls {
		if testHookListener != nil {
			ll = testHookListener(ll)
		}
		go func() {
			if err := gw.Serve(ll); err != nil {
				listenerFailed(failed, fmt.Errorf("gateway listener %s: %w", ll.Addr(), err))
			}
		}()
		log.Info("gateway listening", "addr", ll.Addr().String(), "transport", g.Transport, "routes", strings.Join(names, ","),
			"reconnect_timeout", sess.ReconnectTimeout, "mtls", g.TLS.CA != "", "proxy_protocol_from", strings.Join(g.ProxyProtocolFrom, ","))
	}
	logLimits()
	logNode()
	if id != nil {
		logGatewayPin(log, id, g.Transport, lls[0].Addr())
	}
	for _, addr := range g.Listen {
		warnPlaintext(log, g.Transport, "listen", addr)
	}
	var stores []*transport.CertStore
	if store != nil {
		stores = append(stores, store)
	}
	return gw, stores, nil
}

// gatewayRoutes builds the gateway's routes from its config section, each
// with its session settings (the gateway's, overridden by the route's);
// at start and at every config reload.
func gatewayRoutes(g *gatewayFile, log *slog.Logger) ([]proxy.Route, error) {
	var routes []proxy.Route
	for _, r := range g.Routes {
		ct := r.ConnectTimeout.D
		if !r.ConnectTimeout.Set && g.ConnectTimeout.Set {
			ct = g.ConnectTimeout.D
		}
		rs, err := g.sessionFile.over(r.sessionFile).sessionConfigFor(g.Transport)
		if err != nil {
			return nil, fmt.Errorf("route %q: %w", r.Name, err)
		}
		rs.Logger = log
		routes = append(routes, proxy.Route{Name: r.Name, Upstream: r.Upstream, ConnectTimeout: ct,
			ProxyProtocol: r.ProxyProtocol, Session: rs})
	}
	return routes, nil
}
