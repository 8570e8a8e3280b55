package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// With --log-format json every line a quic gateway and a quic client
// write is JSON, the QUIC transport's own lines included (the UDP buffer
// warning, "quic: connected": they went to slog's default text logger
// before), and the gateway's generated certificate is logged on one line.
func TestQUICLogsFollowLogFormatAndCertificateLoggedOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	up := testnet.EchoServer(t)
	state := filepath.Join(t.TempDir(), "state")
	gw := startProc(t, "gateway", "--transport", "quic", "--listen", "127.0.0.1:0", "--upstream", up, "--state-dir", state)
	fp, _ := gw.waitLog(gatewayPinMsg, 30*time.Second)["sha256"].(string)
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	app := freeAddr(t)
	cl := startProc(t, "client", "--transport", "quic", "--listen", app, "--gateway", gwAddr, "--tls-pin", fp)
	cl.waitLog("client listening", 30*time.Second)
	if err := echoCheck(app, randomData(64<<10, 5), 5); err != nil {
		t.Fatal(err)
	}
	cl.waitLog("quic: connected", 10*time.Second)
	for _, p := range []*proc{gw, cl} {
		for _, line := range strings.Split(strings.TrimSpace(p.output()), "\n") {
			if !json.Valid([]byte(line)) {
				t.Errorf("%s wrote a line that is not JSON: %q", p.cmd.Args[1], line)
			}
		}
	}
	n := 0
	for _, line := range strings.Split(gw.output(), "\n") {
		if strings.Contains(line, fp) {
			n++
		}
	}
	if len(fp) != 64 || n != 1 {
		t.Errorf("the gateway logged its fingerprint %q on %d lines, want one", fp, n)
	}
}
