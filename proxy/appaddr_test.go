package proxy

import (
	"net"
	"testing"
	"time"
)

// The PROXY header a route sends upstream names the application when the
// client states its address and the gateway trusts it, and the link's
// client (here the balancer's PROXY source) otherwise.
func TestAppAddrUpstream(t *testing.T) {
	linkSrc := &net.TCPAddr{IP: net.IPv4(198, 51, 100, 40), Port: 4040}
	for _, tc := range []struct {
		name              string
		sendApp, trustApp bool
		wantApp           bool // upstream sees the application's address
	}{
		{"stated and trusted", true, true, true},
		{"stated, not trusted", true, false, false},
		{"trusted, not stated", false, true, false},
		{"neither", false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up, sources := proxyUpstream(t)
			s := newPPStack(t, ppOpts{src: fixedSrc(linkSrc), sendApp: tc.sendApp, trustApp: tc.trustApp,
				routes: []Route{{Name: "default", Upstream: up, ConnectTimeout: time.Second, ProxyProtocol: 1}}})
			app := dialApp(t, s.appAddr)
			defer app.Close()
			exchange(t, app, 20000)
			appAddr := app.LocalAddr().String()
			want := linkSrc.String()
			if tc.wantApp {
				want = appAddr
			}
			select {
			case got := <-sources:
				if got != want {
					t.Fatalf("upstream PROXY source %s, want %s (application %s, link %s)", got, want, appAddr, linkSrc)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("upstream got no connection")
			}
			ss := s.gw.Sessions()
			if len(ss) != 1 {
				t.Fatalf("sessions %+v", ss)
			}
			wantPeer := ""
			if tc.sendApp {
				wantPeer = appAddr
			}
			if ss[0].Peer != linkSrc.String() || ss[0].AppPeer != wantPeer || ss[0].AppPeerTrusted != tc.wantApp {
				t.Fatalf("session peer %q app_peer %q trusted %v; want %s, %q, %v",
					ss[0].Peer, ss[0].AppPeer, ss[0].AppPeerTrusted, linkSrc, wantPeer, tc.wantApp)
			}
			// The client's own listing has no app_peer (App is the
			// application there).
			if cs := s.client.Sessions(); len(cs) != 1 || cs[0].AppPeer != "" || cs[0].App != appAddr {
				t.Fatalf("client sessions %+v", cs)
			}
		})
	}
}
