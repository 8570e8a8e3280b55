package proxy

import (
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// TestIdleMeasure (LIFELINE_IDLE_MEASURE=1; N sessions from
// LIFELINE_IDLE_N, default 1000) says what an idle session costs in one
// process that holds both its client sidecar and its gateway: heap and
// stack bytes and goroutines per session, net of the same number of
// direct connections to the same echo service (the application's and the
// upstream's sockets and the echo goroutines); LIFELINE_IDLE_TLS=1 over
// the tls transport; LIFELINE_IDLE_PROXY=1 with the gateway's listener
// reading PROXY protocol headers. LIFELINE_IDLE_HEAP=FILE
// writes a heap profile (inuse) with the sessions held. It is a
// measurement for docs/bench.md, not a check.
func TestIdleMeasure(t *testing.T) {
	if os.Getenv("LIFELINE_IDLE_MEASURE") == "" {
		t.Skip("LIFELINE_IDLE_MEASURE=1 to run")
	}
	if os.Getenv("LIFELINE_IDLE_HEAP") != "" {
		defer func(r int) { runtime.MemProfileRate = r }(runtime.MemProfileRate)
		runtime.MemProfileRate = 1 // name every allocation
	}
	n := 1000
	if v, err := strconv.Atoi(os.Getenv("LIFELINE_IDLE_N")); err == nil && v > 0 {
		n = v
	}
	echo := testnet.EchoServer(t)
	sc := resume.DefaultServerConfig()
	// LIFELINE_IDLE_PARK=1: the links go through a relay, which is then
	// reset and refuses new links, and what is measured is the parked
	// sessions (the relay's own goroutines are gone by then).
	park := os.Getenv("LIFELINE_IDLE_PARK") != ""
	o := stackOpts{upstream: echo, server: sc, cfg: resume.DefaultConfig(), noRelay: !park,
		log: slog.New(slog.DiscardHandler)}
	if os.Getenv("LIFELINE_IDLE_TLS") != "" {
		// LIFELINE_IDLE_TLS=1: over the tls transport.
		o.transport = "tls"
		o.serverTLS, o.clientTLS = idleTLS(t)
	}
	if os.Getenv("LIFELINE_IDLE_PROXY") != "" {
		// LIFELINE_IDLE_PROXY=1: the gateway's listener reads PROXY
		// headers (from sources other than the client, which sends none).
		from, err := transport.ParseProxyFrom("192.0.2.0/24")
		if err != nil {
			t.Fatal(err)
		}
		o.proxyIn = &transport.ProxyIn{From: from, ReadHeaderTimeout: 5 * time.Second}
	}
	s := newStack(t, o)

	open := func(addr string) []net.Conn {
		cs := make([]net.Conn, 0, n)
		b := []byte{1}
		for range n {
			c, err := net.DialTimeout("tcp", addr, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.Write(b); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(c, b); err != nil {
				t.Fatal(err)
			}
			cs = append(cs, c)
		}
		return cs
	}
	type reading struct {
		heap, stack, sys uint64
		goroutines       int
	}
	read := func() reading {
		time.Sleep(500 * time.Millisecond) // acks and timers settle
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return reading{m.HeapInuse, m.StackInuse, m.Sys - m.HeapReleased, runtime.NumGoroutine()}
	}
	closeAll := func(cs []net.Conn) {
		for _, c := range cs {
			c.Close()
		}
	}

	r0 := read()
	direct := open(echo)
	r1 := read()
	closeAll(direct)
	waitFor(t, "echo goroutines to end", 5*time.Second, func() bool { return runtime.NumGoroutine() <= r0.goroutines })
	r2 := read()
	held := open(s.appAddr)
	r3 := read()
	if park {
		s.relay.SetDown(true)
		s.relay.Reset()
		waitFor(t, "every session parked", 20*time.Second, func() bool {
			for _, si := range s.gw.Sessions() {
				if si.State != "DISCONNECTED" {
					return false
				}
			}
			for _, si := range s.client.Sessions() {
				if si.State != "DISCONNECTED" && si.State != "RECONNECTING" {
					return false
				}
			}
			return true
		})
		r3 = read()
		t.Logf("parked (the links reset at the relay, new ones refused):")
	}
	if f := os.Getenv("LIFELINE_IDLE_HEAP"); f != "" {
		out, err := os.Create(f)
		if err != nil {
			t.Fatal(err)
		}
		pprof.Lookup("heap").WriteTo(out, 0)
		out.Close()
	}
	if f := os.Getenv("LIFELINE_IDLE_GOROUTINES"); f != "" {
		out, err := os.Create(f)
		if err != nil {
			t.Fatal(err)
		}
		pprof.Lookup("goroutine").WriteTo(out, 1)
		out.Close()
	}
	per := func(a, b uint64) string { return fmt.Sprintf("%.1f KB", (float64(b)-float64(a))/float64(n)/1024) }
	// Net of the direct connections: what client and gateway add.
	net := func(dBase, dHeld, lBase, lHeld uint64) string {
		d := (float64(dHeld) - float64(dBase)) / float64(n)
		l := (float64(lHeld) - float64(lBase)) / float64(n)
		return fmt.Sprintf("%.1f KB", (l-d)/1024)
	}
	t.Logf("%d sessions; direct connections: heap %s, stack %s, goroutines %.2f per connection",
		n, per(r0.heap, r1.heap), per(r0.stack, r1.stack), float64(r1.goroutines-r0.goroutines)/float64(n))
	t.Logf("through lifeline (client + gateway in this process): heap %s, stack %s, goroutines %.2f per session",
		per(r2.heap, r3.heap), per(r2.stack, r3.stack), float64(r3.goroutines-r2.goroutines)/float64(n))
	t.Logf("lifeline's own (net of direct): heap %s, stack %s, goroutines %.2f, heap+stack %s per session (both ends)",
		net(r0.heap, r1.heap, r2.heap, r3.heap), net(r0.stack, r1.stack, r2.stack, r3.stack),
		float64((r3.goroutines-r2.goroutines)-(r1.goroutines-r0.goroutines))/float64(n),
		net(r0.heap+r0.stack, r1.heap+r1.stack, r2.heap+r2.stack, r3.heap+r3.stack))
	s.relay.SetDown(false)
	closeAll(held)
	waitFor(t, "sessions to end", 20*time.Second, func() bool { return len(s.gw.Sessions()) == 0 })
}

// idleTLS is a gateway and a client TLS configuration from a throwaway CA.
func idleTLS(t *testing.T) (server, client *tls.Config) {
	dir := t.TempDir()
	ca, caKey, caPath := testnet.WriteCA(t, dir, "ca")
	gc, gk := testnet.WriteLeaf(t, dir, "gateway", ca, caKey, 2)
	gs, err := transport.NewCertStore(transport.TLSFiles{Cert: gc, Key: gk})
	if err != nil {
		t.Fatal(err)
	}
	server, err = gs.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	cs, err := transport.NewCertStore(transport.TLSFiles{CA: caPath})
	if err != nil {
		t.Fatal(err)
	}
	return server, cs.ClientConfig()
}
