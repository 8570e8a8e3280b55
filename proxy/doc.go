// Package proxy is lifeline's client sidecar and gateway: TCP listeners for
// applications, routes to upstream services, link transports (tcp, tls,
// quic) and the splice that joins an application's TCP connection to a
// resumable session (package resume) with TCP semantics end to end: a FIN
// arrives as a FIN after all data, a reset as a reset.
//
// A gateway in front of a service, and a client sidecar next to the
// application, in one program:
//
//	gw, _ := proxy.NewGateway(proxy.GatewayConfig{
//		Routes: []proxy.Route{{Name: "redis", Upstream: "127.0.0.1:6379"}},
//	})
//	links, _ := proxy.Listen("tcp", "0.0.0.0:7000", nil)
//	go gw.Serve(links)
//
//	dialer, _ := proxy.NewDialer("tcp", "gw.example.net:7000", nil)
//	cl := proxy.NewClient(proxy.ClientConfig{})
//	apps, _ := net.Listen("tcp", "127.0.0.1:6380")
//	go cl.Serve(apps, proxy.ClientRoute{Route: "redis", Dialer: dialer,
//		Session: resume.DefaultConfig(), Gateway: "gw.example.net:7000"})
package proxy
