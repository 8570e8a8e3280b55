package proxy

import (
	"errors"
	"net"
	"strings"
	"testing"

	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// A gateway's routes and a client's route are checked in one place; a bad
// one is refused before anything starts.
func TestRoutesValidated(t *testing.T) {
	bad := resume.DefaultConfig()
	bad.BufferSize = 1
	for name, routes := range map[string][]Route{
		"no routes":      nil,
		"empty name":     {{Upstream: "127.0.0.1:1"}},
		"long name":      {{Name: strings.Repeat("r", 256), Upstream: "127.0.0.1:1"}},
		"no port":        {{Name: "r", Upstream: "127.0.0.1"}},
		"proxy protocol": {{Name: "r", Upstream: "127.0.0.1:1", ProxyProtocol: 3}},
		"session":        {{Name: "r", Upstream: "127.0.0.1:1", Session: bad}},
		"twice":          {{Name: "r", Upstream: "127.0.0.1:1"}, {Name: "r", Upstream: "127.0.0.1:2"}},
	} {
		if _, err := NewGateway(GatewayConfig{Routes: routes}); err == nil {
			t.Errorf("%s: NewGateway accepted %+v", name, routes)
		}
	}
	table, err := routeTable([]Route{{Name: "r", Upstream: "127.0.0.1:1"}})
	if err != nil || table["r"].ConnectTimeout != DefaultConnectTimeout {
		t.Fatalf("routeTable: %+v, %v; want the default connect timeout filled in", table, err)
	}

	d, _ := transport.NewDialer(transport.Config{Name: "tcp", Addr: "127.0.0.1:1"})
	for name, r := range map[string]ClientRoute{
		"empty route": {Dialer: d},
		"no dialer":   {Route: "r"},
		"session":     {Route: "r", Dialer: d, Session: bad},
	} {
		if err := r.Validate(); err == nil {
			t.Errorf("%s: ClientRoute.Validate accepted %+v", name, r)
		}
		cl := NewClient(ClientConfig{})
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		if err := cl.Serve(ln, r); err == nil {
			t.Errorf("%s: Client.Serve accepted %+v", name, r)
		}
		if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
			t.Errorf("%s: Serve left the listener open (%v)", name, err)
		}
		cl.Close()
	}
}

// The gateway's session server owns the link listeners: closing the
// gateway closes them, and a listener handed to a closed gateway is closed
// at once.
func TestGatewayClosesItsListeners(t *testing.T) {
	gw, err := NewGateway(GatewayConfig{Routes: []Route{{Name: "r", Upstream: "127.0.0.1:1"}}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- gw.Serve(ln) }()
	gw.Close()
	if err := <-served; err != nil {
		t.Fatalf("Serve after Close: %v, want nil", err)
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept on the gateway's listener after Close: %v, want net.ErrClosed", err)
	}
	late, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := gw.Serve(late); err != nil {
		t.Fatalf("Serve on a closed gateway: %v, want nil", err)
	}
	if _, err := late.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("a listener handed to a closed gateway is still open: %v", err)
	}
}
