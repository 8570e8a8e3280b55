package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

func TestProxyProtocolFromUsage(t *testing.T) {
	gw := []string{"gateway", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"}
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"quic", []string{"--transport", "quic", "--proxy-protocol-from", "10.0.0.0/8"}, "does not apply to --transport quic"},
		{"bad CIDR", []string{"--transport", "tcp", "--proxy-protocol-from", "10.0.0.0/33"}, "proxy_protocol_from"},
		{"host bits", []string{"--transport", "tcp", "--proxy-protocol-from", "10.0.0.1/8"}, "did you mean 10.0.0.0/8"},
		{"name", []string{"--transport", "tcp", "--proxy-protocol-from", "lb.example.net"}, "want a CIDR prefix"},
		{"empty", []string{"--transport", "tcp", "--proxy-protocol-from", ""}, "empty entry"},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, _, stderr := runCLI(append(gw, c.args...)...)
			if code != 2 {
				t.Fatalf("exit code %d, want 2 (stderr %q)", code, stderr)
			}
			oneLineErr(t, stderr)
			if !strings.Contains(stderr, c.want) {
				t.Fatalf("stderr %q lacks %q", stderr, c.want)
			}
		})
	}
}

func TestProxyProtocolFromConfig(t *testing.T) {
	const base = "gateway:\n  listen: 127.0.0.1:0\n  transport: %s\n  proxy_protocol_from: %s\n  routes:\n    - {name: a, upstream: 127.0.0.1:1}\n"
	for _, c := range []struct {
		transport, from, want string // want "": valid
	}{
		{"tcp", "10.0.0.0/8", ""},
		{"tls", "[10.0.0.0/8, 192.0.2.7, '2001:db8::/32']", ""},
		{"tcp", "'10.0.0.0/8,192.0.2.7'", ""},
		{"quic", "[10.0.0.0/8]", "does not apply to --transport quic"},
		{"tcp", "[10.0.0.0/8, nonsense]", "proxy_protocol_from"},
	} {
		fc, err := parseConfig("gw.yaml", []byte(fmt.Sprintf(base, c.transport, c.from)))
		if err != nil {
			t.Fatalf("%s: %v", c.from, err)
		}
		err = validateGateway(fc.withDefaults().Gateway)
		if c.want == "" {
			if err != nil {
				t.Errorf("%s over %s: %v", c.from, c.transport, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s over %s: %v, want an error with %q", c.from, c.transport, err, c.want)
		}
	}
}

func TestTrustAppAddrRule(t *testing.T) {
	for _, c := range []struct {
		g    gatewayFile
		want bool
	}{
		{gatewayFile{Transport: "tls"}, false},
		{gatewayFile{Transport: "tls", TLS: transport.TLSFiles{CA: "ca.pem"}}, true},
		{gatewayFile{Transport: "quic", TLS: transport.TLSFiles{CA: "ca.pem"}}, true},
		{gatewayFile{Transport: "tcp", TrustClientAppAddr: true}, true},
		{gatewayFile{Transport: "tls", TrustClientAppAddr: true}, true},
	} {
		if got := trustAppAddr(&c.g); got != c.want {
			t.Errorf("%+v: trust %v, want %v", c.g, got, c.want)
		}
	}
}

// The application's address reaches the upstream's PROXY header through
// the binaries: with mTLS, with --trust-client-app-addr, and not without
// either (the client sidecar's address then).
func TestBinaryAppAddrUpstream(t *testing.T) {
	dir := t.TempDir()
	ca, caKey, caPath := testnet.WriteCA(t, dir, "ca")
	gc, gk := testnet.WriteLeaf(t, dir, "gateway", ca, caKey, 2)
	cc, ck := testnet.WriteLeaf(t, dir, "client", ca, caKey, 3)
	for _, c := range []struct {
		name       string
		gw, cl     []string
		appVisible bool
	}{
		{"mtls", []string{"--transport", "tls", "--tls-cert", gc, "--tls-key", gk, "--tls-ca", caPath},
			[]string{"--transport", "tls", "--tls-ca", caPath, "--tls-cert", cc, "--tls-key", ck}, true},
		{"trust flag", []string{"--transport", "tcp", "--trust-client-app-addr"}, []string{"--transport", "tcp"}, true},
		{"untrusted", []string{"--transport", "tcp"}, []string{"--transport", "tcp"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			sources := make(chan string, 4)
			up := testnet.TCPServer(t, func(conn *net.TCPConn) {
				br := bufio.NewReader(conn)
				h, err := proxyproto.Read(br)
				if err != nil {
					sources <- "error: " + err.Error()
					return
				}
				sources <- h.SourceAddr.String()
				io.Copy(conn, br)
			})
			gw := startProc(t, append(append([]string{"gateway", "--listen", "127.0.0.1:0", "--upstream", up,
				"--proxy-protocol", "2", "--state-dir", t.TempDir()}, fast...), c.gw...)...)
			gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
			appAddr := freeAddr(t)
			cl := startProc(t, append(append([]string{"client", "--listen", appAddr, "--gateway", gwAddr, "--send-app-addr"}, fast...), c.cl...)...)
			cl.waitLog("client listening", 30*time.Second)
			app, err := net.DialTimeout("tcp", appAddr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer app.Close()
			app.SetDeadline(time.Now().Add(10 * time.Second))
			app.Write([]byte("hello"))
			b := make([]byte, 5)
			if _, err := io.ReadFull(app, b); err != nil || string(b) != "hello" {
				t.Fatalf("echo %q, %v", b, err)
			}
			var got string
			select {
			case got = <-sources:
			case <-time.After(5 * time.Second):
				t.Fatal("upstream got no connection")
			}
			// The proxy's line (with the link), not resume's.
			var start map[string]any
			waitFor(t, "the gateway's session start line", 5*time.Second, func() bool {
				gw.mu.Lock()
				defer gw.mu.Unlock()
				for _, m := range gw.logs {
					if m["msg"] == "session start" && m["link"] != nil {
						start = m
					}
				}
				return start != nil
			})
			if c.appVisible {
				if got != app.LocalAddr().String() {
					t.Fatalf("upstream PROXY source %s, want the application's %s", got, app.LocalAddr())
				}
			} else {
				host, _, _ := net.SplitHostPort(got)
				if got == app.LocalAddr().String() || host != "127.0.0.1" {
					t.Fatalf("upstream PROXY source %s, want the client sidecar's link address", got)
				}
			}
			if start["app_peer"] != app.LocalAddr().String() {
				t.Fatalf("gateway session start app_peer %v, want %s", start["app_peer"], app.LocalAddr())
			}
		})
	}
}
