package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/testnet"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
)

// The binary over QUIC: a gateway without a certificate makes a
// self-signed one and logs its fingerprint; a client that pins it gets
// through, byte for byte; a client with a wrong pin does not.
func TestBinaryQUICSelfSignedPinned(t *testing.T) {
	up := testnet.EchoServer(t)
	gw := startProc(t, "gateway", "--transport", "quic", "--listen", "127.0.0.1:0", "--upstream", up)
	fp, _ := gw.waitLog(gatewayPinMsg, 30*time.Second)["sha256"].(string)
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

// The real binaries over QUIC through a UDP fault relay: the client's
// source port changes mid-stream (NAT rebinding: no lifeline resume
// needed) and the path drops every packet for longer than lifeline's
// liveness timeout (sessions resume on new streams); every byte checked.
func TestBinaryQUICFaults(t *testing.T) {
	up := testnet.EchoServer(t)
	cfgs := "  ping_interval: 200ms\n  liveness_timeout: 800ms\n  handshake_timeout: 2s\n"
	gw := startProc(t, "gateway", "--config", writeFile(t, "gw.yaml",
		"gateway:\n  listen: 127.0.0.1:0\n  transport: quic\n"+cfgs+"  routes:\n    - {name: echo, upstream: "+up+"}\n"))
	fp, _ := gw.waitLog(gatewayPinMsg, 30*time.Second)["sha256"].(string)
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	relay, err := faultnet.NewUDPRelay(gwAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	app := freeAddr(t)
	cl := startProc(t, "client", "--config", writeFile(t, "cl.yaml",
		"client:\n  listeners:\n    - listen: "+app+"\n      gateway: "+relay.Addr()+"\n      route: echo\n      transport: quic\n      tls: {pin: "+fp+"}\n      reconnect_timeout: 30s\n"+strings.ReplaceAll(cfgs, "  ", "      ")))
	cl.waitLog("client listening", 30*time.Second)

	const sessions = 6
	errs := make(chan error, sessions+1)
	start := time.Now()
	// One session lives across all the faults, so that the blackout
	// always meets a busy link (the rounds below may all be between
	// sessions then, waiting in the client's open retry).
	steadyUp := make(chan struct{})
	go func() { errs <- steadyEcho(app, 3500*time.Millisecond, steadyUp) }()
	select {
	case <-steadyUp:
	case <-time.After(10 * time.Second):
		t.Fatal("the steady session did not start")
	}
	for i := range sessions {
		go func() {
			// Rounds until the faults are over, so sessions live across them.
			for round := uint64(0); round < 2 || time.Since(start) < 3500*time.Millisecond && round < 200; round++ {
				if err := echoCheck(app, randomData(1<<20, uint64(i)*1000+round), round); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	time.Sleep(400 * time.Millisecond)
	if n, err := relay.Rebind(); err != nil || n == 0 {
		t.Fatalf("rebind: %d clients, %v", n, err)
	}
	time.Sleep(400 * time.Millisecond)
	relay.Drop(1500 * time.Millisecond) // > the 800 ms liveness timeout
	for range sessions + 1 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if n := cl.count("session resumed"); n == 0 {
		t.Errorf("no session resumed after a %v blackout (liveness 800ms)", 1500*time.Millisecond)
	}
}

// steadyEcho holds one connection through addr for d, sending 4 KB of
// counted bytes every 20 ms and checking each echo; up is closed after the
// first echo.
func steadyEcho(addr string, d time.Duration, up chan<- struct{}) error {
	signalled := false
	defer func() {
		if !signalled {
			close(up)
		}
	}()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(d + 60*time.Second))
	out, in := make([]byte, 4096), make([]byte, 4096)
	end := time.Now().Add(d)
	for i := 0; ; i++ {
		for j := range out {
			out[j] = byte(i*7 + j)
		}
		if _, err := c.Write(out); err != nil {
			return fmt.Errorf("steady session, chunk %d: write: %w", i, err)
		}
		if _, err := io.ReadFull(c, in); err != nil {
			return fmt.Errorf("steady session, chunk %d: read: %w", i, err)
		}
		if !bytes.Equal(in, out) {
			return fmt.Errorf("steady session, chunk %d: echo differs at %d", i, faultnet.FirstDiff(in, out))
		}
		if i == 0 {
			close(up)
			signalled = true
		}
		if time.Now().After(end) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
}
