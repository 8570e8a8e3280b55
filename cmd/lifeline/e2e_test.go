package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// e2e is a gateway and a client as separate processes with a fault relay
// on the link between them.
type e2e struct {
	gw, cl  *proc
	relay   *faultnet.Relay
	gwAddr  string
	appAddr map[string]string // route -> client listen address
}

// startE2E runs a gateway with the given routes (name -> upstream) and a
// client listener per route, all from one config file each.
func startE2E(t *testing.T, routes map[string]string, extra ...string) *e2e {
	var gcfg bytes.Buffer
	fmt.Fprintf(&gcfg, "gateway:\n  listen: 127.0.0.1:0\n  transport: tcp\n  ping_interval: 100ms\n  liveness_timeout: 600ms\n  handshake_timeout: 2s\n  connect_timeout: 1s\n  routes:\n")
	for name, up := range routes {
		fmt.Fprintf(&gcfg, "    - name: %s\n      upstream: %s\n", name, up)
	}
	gw := startProc(t, append([]string{"gateway", "--config", writeFile(t, "gw.yaml", gcfg.String())}, extra...)...)
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	relay, err := faultnet.NewRelay("127.0.0.1:0", gwAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relay.Close() })
	e := &e2e{gw: gw, relay: relay, gwAddr: gwAddr, appAddr: map[string]string{}}
	var ccfg bytes.Buffer
	fmt.Fprintf(&ccfg, "client:\n  listeners:\n")
	for name := range routes {
		a := freeAddr(t)
		e.appAddr[name] = a
		fmt.Fprintf(&ccfg, "    - listen: %s\n      gateway: %s\n      route: %s\n      transport: tcp\n      ping_interval: 100ms\n      liveness_timeout: 600ms\n      handshake_timeout: 2s\n      reconnect_timeout: 30s\n", a, relay.Addr(), name)
	}
	e.cl = startProc(t, "client", "--config", writeFile(t, "cl.yaml", ccfg.String()))
	for range routes {
		e.cl.waitLog("client listening", 30*time.Second)
	}
	return e
}

func randomData(n int, seed uint64) []byte {
	b := make([]byte, n)
	var key [32]byte
	key[0] = byte(seed)
	key[1] = byte(seed >> 8)
	rand.NewChaCha8(key).Read(b)
	return b
}

// echoCheck sends data in random chunks, reads the echo until EOF after
// its own half-close, and compares.
func echoCheck(addr string, data []byte, seed uint64) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(90 * time.Second))
	rng := rand.New(rand.NewPCG(seed, 3))
	werr := make(chan error, 1)
	go func() {
		rest := data
		for len(rest) > 0 {
			n := min(len(rest), 1+rng.IntN(32<<10))
			if _, err := c.Write(rest[:n]); err != nil {
				werr <- err
				return
			}
			rest = rest[n:]
		}
		werr <- c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("read after %d bytes: %w", len(got), err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if !bytes.Equal(got, data) {
		return fmt.Errorf("echo differs: got %d bytes, want %d, first difference at %d", len(got), len(data), faultnet.FirstDiff(got, data))
	}
	return nil
}

// Twenty sessions of random data both ways through the real binaries while
// the link is reset, closed and blackholed again and again; then
// half-close in both directions and reset propagation, on the same
// processes.
func TestBinaryEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	upFin := make(chan string, 1)
	upReset := make(chan error, 1)
	routes := map[string]string{
		"echo": testnet.EchoServer(t),
		// Sends a greeting and its FIN first, then reads until the app's FIN.
		"greet": testnet.TCPServer(t, func(c *net.TCPConn) {
			c.Write([]byte("hello, app"))
			c.CloseWrite()
			b, _ := io.ReadAll(c)
			upFin <- string(b)
		}),
		// Reports how its read ended (the app will reset).
		"sink": testnet.TCPServer(t, func(c *net.TCPConn) {
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			_, err := io.Copy(io.Discard, c)
			upReset <- err
		}),
		// Resets the connection after 4 bytes.
		"rst": testnet.TCPServer(t, func(c *net.TCPConn) {
			io.ReadFull(c, make([]byte, 4))
			c.SetLinger(0)
		}),
	}
	e := startE2E(t, routes)

	t.Run("data_through_breaks", func(t *testing.T) {
		const sessions = 20
		stop := make(chan struct{})
		breaks := 0
		var bwg sync.WaitGroup
		bwg.Add(1)
		go func() {
			defer bwg.Done()
			tk := time.NewTicker(300 * time.Millisecond)
			defer tk.Stop()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-tk.C:
				}
				if e.relay.Break(faultnet.Modes[i%3]) > 0 {
					breaks++
				}
			}
		}()
		var wg sync.WaitGroup
		errs := make(chan error, sessions)
		for i := range sessions {
			wg.Add(1)
			go func() {
				defer wg.Done()
				// Rounds of fresh sessions for a few seconds, so that
				// sessions live through breaks of every kind.
				start := time.Now()
				for round := 0; round < 2 || time.Since(start) < 4*time.Second; round++ {
					seed := uint64(i*100 + round)
					data := randomData(1<<20+i*1237, seed)
					if err := echoCheck(e.appAddr["echo"], data, seed); err != nil {
						errs <- fmt.Errorf("session %d round %d: %w", i, round, err)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(stop)
		bwg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if breaks < 3 {
			t.Errorf("only %d breaks hit a link", breaks)
		}
		if n := e.cl.count("session resumed"); n == 0 {
			t.Errorf("no resume logged by the client")
		}
		t.Logf("%d breaks, %d client resume lines", breaks, e.cl.count("session resumed"))
	})

	t.Run("half_close_upstream_first", func(t *testing.T) {
		c, err := net.Dial("tcp", e.appAddr["greet"])
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		b, err := io.ReadAll(c) // ends with the upstream's FIN
		if err != nil || string(b) != "hello, app" {
			t.Fatalf("read %q, %v", b, err)
		}
		e.relay.Reset()
		c.Write([]byte("bye "))
		c.Write([]byte("upstream"))
		c.(*net.TCPConn).CloseWrite()
		select {
		case got := <-upFin:
			if got != "bye upstream" {
				t.Fatalf("upstream got %q", got)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("upstream never got the app's FIN")
		}
	})

	t.Run("half_close_app_first", func(t *testing.T) {
		// The echo route: app sends then FINs; the echo comes back in full
		// after the app's FIN, then the upstream's FIN arrives as EOF.
		data := randomData(300000, 99)
		if err := echoCheck(e.appAddr["echo"], data, 99); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("app_reset", func(t *testing.T) {
		c, err := net.Dial("tcp", e.appAddr["sink"])
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("data before the reset"))
		time.Sleep(300 * time.Millisecond)
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		select {
		case err := <-upReset:
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("upstream read ended with %v, want ECONNRESET", err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("upstream never saw the reset")
		}
	})

	t.Run("upstream_reset", func(t *testing.T) {
		c, err := net.Dial("tcp", e.appAddr["rst"])
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("four"))
		testnet.ExpectReset(t, c, 20*time.Second)
	})
}
