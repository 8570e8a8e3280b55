package main

import (
	"fmt"
	"strings"
	"testing"
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
