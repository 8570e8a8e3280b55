package main

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestCLIErrors(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no command", nil, 2, ""},
		{"unknown command", []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"bad flag", []string{"gateway", "--bogus"}, 2, "flag provided but not defined: -bogus"},
		{"bad duration flag", []string{"client", "--listen", "127.0.0.1:1", "--gateway", "h:1", "--reconnect-timeout", "soon"}, 2, `bad duration "soon"`},
		{"missing upstream", []string{"gateway", "--listen", "127.0.0.1:0"}, 2, "--listen and --upstream are required"},
		{"no port", []string{"gateway", "--listen", "127.0.0.1", "--upstream", "127.0.0.1:1"}, 2, "want host:port"},
		{"bad transport", []string{"client", "--listen", "127.0.0.1:0", "--gateway", "h:1", "--transport", "carrier-pigeon"}, 2, "unknown transport"},
		{"mTLS CA without own cert", []string{"gateway", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--transport", "tls", "--tls-ca", "/ca.pem"}, 2, "needs the gateway's own"},
		{"cert without key", []string{"gateway", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--transport", "tls", "--tls-cert", "/c.pem"}, 2, "must be given together"},
		{"pin and CA", []string{"client", "--listen", "127.0.0.1:0", "--gateway", "h:1", "--transport", "quic", "--tls-ca", "/ca.pem", "--tls-pin", strings.Repeat("ab", 32)}, 2, "not both"},
		{"missing cert file", []string{"gateway", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--transport", "tls", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"}, 1, "/nonexistent.pem"},
		{"liveness below ping", []string{"client", "--listen", "127.0.0.1:0", "--gateway", "h:1", "--ping-interval", "2s", "--liveness-timeout", "1s"}, 2, "LivenessTimeout"},
		{"address in use", []string{"gateway", "--listen", busy.Addr().String(), "--upstream", "127.0.0.1:1"}, 1, "cannot listen on " + busy.Addr().String()},
		{"missing config", []string{"gateway", "--config", "/nonexistent.yaml"}, 2, "/nonexistent.yaml"},
		{"config with route flag", []string{"gateway", "--config", "x.yaml", "--upstream", "127.0.0.1:1"}, 2, "--upstream cannot be combined with --config"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, _, stderr := runCLI(c.args...)
			if code != c.code {
				t.Errorf("exit code %d, want %d (stderr %q)", code, c.code, stderr)
			}
			if c.want == "" {
				return
			}
			oneLineErr(t, stderr)
			if !strings.Contains(stderr, c.want) {
				t.Errorf("stderr %q lacks %q", stderr, c.want)
			}
		})
	}
}

func TestConfigFileErrors(t *testing.T) {
	cases := []struct{ name, yaml, want string }{
		{"unknown key", "gateway:\n  listen: 127.0.0.1:0\n  colour: blue\n  routes:\n    - name: a\n      upstream: 127.0.0.1:1\n", "line 3: field colour not found"},
		{"bad duration", "gateway:\n  listen: 127.0.0.1:0\n  reconnect_timeout: forever\n  routes:\n    - name: a\n      upstream: 127.0.0.1:1\n", `line 3: bad duration "forever"`},
		{"bad size", "gateway:\n  listen: 127.0.0.1:0\n  buffer: lots\n  routes:\n    - name: a\n      upstream: 127.0.0.1:1\n", `line 3: bad size "lots"`},
		{"duplicate route", "gateway:\n  listen: 127.0.0.1:0\n  routes:\n    - name: a\n      upstream: 127.0.0.1:1\n    - name: a\n      upstream: 127.0.0.1:2\n", `route "a" defined twice`},
		{"route too long", "gateway:\n  listen: 127.0.0.1:0\n  routes:\n    - name: " + strings.Repeat("r", 256) + "\n      upstream: 127.0.0.1:1\n", "longer than 255 bytes"},
		{"upstream without port", "gateway:\n  listen: 127.0.0.1:0\n  routes:\n    - name: a\n      upstream: localhost\n", `route "a" upstream`},
		{"no gateway section", "client:\n  listeners:\n    - listen: 127.0.0.1:0\n      gateway: h:1\n", "has no gateway section"},
		{"not yaml", "gateway: [\n", "config"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := writeFile(t, "c.yaml", c.yaml)
			code, _, stderr := runCLI("gateway", "--config", path)
			if code != 2 {
				t.Errorf("exit code %d, want 2", code)
			}
			oneLineErr(t, stderr)
			if !strings.Contains(stderr, c.want) {
				t.Errorf("stderr %q lacks %q", stderr, c.want)
			}
		})
	}
}

func TestHelpAndVersion(t *testing.T) {
	code, out, _ := runCLI("gateway", "--help")
	if code != 0 {
		t.Errorf("help exit %d", code)
	}
	for _, want := range []string{"-reconnect-timeout", "(default 1m0s)", "-buffer", "(default 2MiB)", "-transport", "-tls-ca", "-drain-timeout", "-upstream"} {
		if !strings.Contains(out, want) {
			t.Errorf("gateway --help lacks %q:\n%s", want, out)
		}
	}
	code, out, _ = runCLI("version")
	if code != 0 || !strings.HasPrefix(out, "lifeline ") {
		t.Errorf("version: %d %q", code, out)
	}
	code, out, _ = runCLI("help")
	if code != 0 || !strings.Contains(out, "lifeline demo") {
		t.Errorf("help: %d %q", code, out)
	}
}

func TestDemoShort(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for seconds")
	}
	code, out, stderr := runCLI("demo", "--duration", "3s", "--sessions", "4", "--break-every", "700ms")
	if code != 0 {
		t.Fatalf("demo exit %d:\n%s\n%s", code, out, stderr)
	}
	if !strings.Contains(out, "demo: PASS") {
		t.Fatalf("no PASS line:\n%s", out)
	}
	t.Log(out[strings.LastIndex(out, "demo: PASS"):])
}

// Route-level session settings override the gateway's, field by field
// (the seeds' per-connector configuration).
func TestPerRouteSessionSettings(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gw.yaml")
	os.WriteFile(path, []byte(`
gateway:
  listen: 127.0.0.1:0
  reconnect_timeout: 120s
  buffer: 4MiB
  routes:
    - {name: fast-fail, upstream: 127.0.0.1:1, reconnect_timeout: 0s}
    - {name: roaming, upstream: 127.0.0.1:2, reconnect_timeout: 10m, liveness_timeout: 10s}
    - {name: plain, upstream: 127.0.0.1:3}
`), 0o600)
	fc, err := loadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]struct {
		rt   time.Duration
		buf  int
		live time.Duration
	}{
		"fast-fail": {0, 4 << 20, 4 * time.Second},
		"roaming":   {10 * time.Minute, 4 << 20, 10 * time.Second},
		"plain":     {120 * time.Second, 4 << 20, 4 * time.Second},
	}
	for _, r := range fc.Gateway.Routes {
		c, err := fc.Gateway.sessionFile.over(r.sessionFile).sessionConfig()
		if err != nil {
			t.Fatal(err)
		}
		w := want[r.Name]
		if c.ReconnectTimeout != w.rt || c.BufferSize != w.buf || c.LivenessTimeout != w.live {
			t.Errorf("route %s: reconnect %v buffer %d liveness %v; want %+v", r.Name, c.ReconnectTimeout, c.BufferSize, c.LivenessTimeout, w)
		}
	}
}
