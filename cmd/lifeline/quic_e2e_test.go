package main

import (
	"net"
	"strings"
	"testing"
	"time"
)

// The binary over QUIC: a gateway without a certificate makes a
// self-signed one and logs its fingerprint; a client that pins it gets
// through, byte for byte; a client with a wrong pin does not.
func TestBinaryQUICSelfSignedPinned(t *testing.T) {
	up := echoServer(t)
	gw := startProc(t, "gateway", "--transport", "quic", "--listen", "127.0.0.1:0", "--upstream", up)
	fp, _ := gw.waitLog("no --tls-cert: generated a self-signed gateway certificate; clients must pin it", 30*time.Second)["sha256"].(string)
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	if len(fp) != 64 {
		t.Fatalf("fingerprint %q", fp)
	}

	app := freeAddr(t)
	cl := startProc(t, "client", "--transport", "quic", "--listen", app, "--gateway", gwAddr, "--tls-pin", fp)
	cl.waitLog("client listening", 30*time.Second)
	data := randomData(512<<10, 7)
	if err := echoCheck(app, data, 7); err != nil {
		t.Fatalf("through QUIC with the pin: %v", err)
	}

	wrong := strings.Repeat("ab", 32)
	app2 := freeAddr(t)
	bad := startProc(t, "client", "--transport", "quic", "--listen", app2, "--gateway", gwAddr, "--tls-pin", wrong,
		"--reconnect-timeout", "0s", "--handshake-timeout", "1s")
	bad.waitLog("client listening", 30*time.Second)
	c, err := net.Dial("tcp", app2)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("hello"))
	if n, err := c.Read(make([]byte, 5)); err == nil {
		t.Fatalf("wrong pin: read %d bytes through an unverified gateway", n)
	}

	// A bad pin is refused before anything starts.
	code, _, stderr := runCLI("client", "--transport", "quic", "--listen", "127.0.0.1:0", "--gateway", gwAddr, "--tls-pin", "xyz")
	if code != 2 || !strings.Contains(stderr, "pin") {
		t.Fatalf("bad pin: exit %d, %q", code, stderr)
	}
}
