// Package proxy is lifeline's client sidecar and gateway: TCP listeners for
// applications, routes to upstream services, and the splice that joins an
// application's TCP connection to a resumable session (package resume)
// with TCP semantics end to end: a FIN arrives as a FIN after all data, a
// reset as a reset. Links are carried by package transport (tcp, tls,
// quic).
//
// A gateway in front of a service, and a client sidecar next to the
// application, in one program:
//
//	gw, _ := proxy.NewGateway(proxy.GatewayConfig{
//		Routes: []proxy.Route{{Name: "redis", Upstream: "127.0.0.1:6379"}},
//	})
//	links, _ := transport.Listen(transport.Config{Name: "tcp", Addr: "0.0.0.0:7000"})
//	go gw.Serve(links)
//
//	dialer, _ := transport.NewDialer(transport.Config{Name: "tcp", Addr: "gw.example.net:7000"})
//	cl := proxy.NewClient(proxy.ClientConfig{})
//	apps, _ := net.Listen("tcp", "127.0.0.1:6380")
//	go cl.Serve(apps, proxy.ClientRoute{Route: "redis", Dialer: dialer,
//		Session: resume.DefaultConfig(), Gateway: "gw.example.net:7000"})
//
// GatewayAdmin and ClientAdmin serve the admin API (sessions listed,
// ended and moved, health, metrics; docs/operations.md).
//
// Over tls or quic, give both ends a TLS config: transport.CertStore for
// certificate files, transport.PinnedTLS for a client that pins a
// gateway's self-signed certificate.
package proxy
