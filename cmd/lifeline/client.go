package main

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"

	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

// startClient assembles a client sidecar from its config section: one
// application listener and gateway dialer per listener entry, all opened
// before any serves. A listener's fatal error goes to failed. It returns
// the certificate stores that SIGHUP reloads.
// addrs gets each listener's address by its configured one (for reloads).
func startClient(c *clientFile, log *slog.Logger, metrics proxy.Metrics, failed chan<- error, addrs map[string]string) (*proxy.Client, []*transport.CertStore, error) {
	cl := proxy.NewClient(proxy.ClientConfig{Logger: log, Metrics: metrics, MaxRedials: c.MaxRedials})
	var stores []*transport.CertStore
	type pending struct {
		ln net.Listener
		r  proxy.ClientRoute
	}
	var ps []pending
	fail := func(err error) (*proxy.Client, []*transport.CertStore, error) {
		for _, p := range ps {
			p.ln.Close()
			p.r.Dialer.Close()
		}
		cl.Close()
		return nil, nil, err
	}
	for _, l := range c.Listeners {
		sess, err := l.sessionFile.sessionConfigFor(l.Transport)
		if err != nil {
			return fail(usageError{err})
		}
		sess.Logger = log
		warnQUICIdle(log, l.Transport, sess.LivenessTimeout)
		warnPlaintext(log, l.Transport, "gateway", l.Gateway)
		store, err := tlsStore(l.Transport, l.TLS)
		if err != nil {
			return fail(err)
		}
		var tc *tls.Config
		if store != nil {
			stores = append(stores, store)
			tc = store.ClientConfig()
		}
		tcfg := transport.Config{Name: l.Transport, Addr: l.Gateway, TLS: tc, Logger: log}
		d, err := transport.NewDialer(tcfg)
		if err != nil {
			return fail(err)
		}
		ln, err := appListen("tcp", l.Listen)
		if err != nil {
			d.Close()
			return fail(fmt.Errorf("cannot listen on %s: %s", l.Listen, errText(err)))
		}
		ps = append(ps, pending{ln, proxy.ClientRoute{Route: l.Route, Dialer: d, Session: sess, Gateway: l.Gateway,
			NewDialer: movedDialer(tcfg), SendAppAddr: l.SendAppAddr}})
	}
	for i, p := range ps {
		addrs[c.Listeners[i].Listen] = p.ln.Addr().String()
		ln := p.ln
		if testHookListener != nil {
			ln = testHookListener(ln)
		}
		go func() {
			if err := cl.Serve(ln, p.r); err != nil {
				listenerFailed(failed, fmt.Errorf("client listener %s: %w", ln.Addr(), err))
			}
		}()
		log.Info("client listening", "addr", p.ln.Addr().String(), "gateway", p.r.Gateway, "route", p.r.Route,
			"reconnect_timeout", p.r.Session.ReconnectTimeout)
	}
	return cl, stores, nil
}

// movedDialer makes the dialers for the other addresses of a gateway that
// a GOAWAY sends sessions to: the same transport and TLS settings as cfg,
// and the gateway's certificate still checked against the name cfg's is
// (the --tls-server-name, else the host of --gateway), since it is the
// same gateway.
func movedDialer(cfg transport.Config) func(addr string) (transport.Dialer, error) {
	return func(addr string) (transport.Dialer, error) {
		c := cfg
		c.Addr = addr
		if transport.UsesTLS(c.Name) && (c.TLS == nil || c.TLS.ServerName == "") {
			host, _, err := net.SplitHostPort(cfg.Addr)
			if err != nil {
				return nil, err
			}
			if c.TLS == nil {
				c.TLS = &tls.Config{}
			} else {
				c.TLS = c.TLS.Clone()
			}
			c.TLS.ServerName = host
		}
		return transport.NewDialer(c)
	}
}
