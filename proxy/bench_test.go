package proxy

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// Throughput and latency of one connection over loopback: direct to the
// service, through a plain two-hop relay (two fault relays, each an io.Copy
// pair, as a stand-in for any TCP proxy pair), and through a lifeline
// client sidecar and gateway.

// sinkServer reads until EOF and answers the byte count.
func sinkServer(b *testing.B) string {
	return testnet.TCPServer(b, func(c *net.TCPConn) {
		n, _ := io.Copy(io.Discard, c)
		var buf [8]byte
		binary.BigEndian.PutUint64(buf[:], uint64(n))
		c.Write(buf[:])
		c.CloseWrite()
	})
}

func benchTargets(b *testing.B, upstream string) map[string]string {
	r2, err := faultnet.NewRelay("127.0.0.1:0", upstream)
	if err != nil {
		b.Fatal(err)
	}
	r1, err := faultnet.NewRelay("127.0.0.1:0", r2.Addr())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { r1.Close(); r2.Close() })
	sc := resume.DefaultServerConfig()
	cfg := resume.DefaultConfig()
	s := newStack(b, stackOpts{upstream: upstream, server: sc, cfg: cfg, noRelay: true})
	// A gateway behind a balancer: its listener reads PROXY headers (from
	// other sources than this client, which sends none).
	from, err := transport.ParseProxyFrom("192.0.2.0/24")
	if err != nil {
		b.Fatal(err)
	}
	sp := newStack(b, stackOpts{upstream: upstream, server: resume.DefaultServerConfig(), cfg: resume.DefaultConfig(), noRelay: true,
		proxyIn: &transport.ProxyIn{From: from, ReadHeaderTimeout: 5 * time.Second}})
	return map[string]string{"Direct": upstream, "Relay": r1.Addr(), "Lifeline": s.appAddr, "LifelineProxyIn": sp.appAddr}
}

func benchThroughput(b *testing.B, which string) {
	target := benchTargets(b, sinkServer(b))[which]
	const chunk = 64 << 10
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	c, err := net.Dial("tcp", target)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.(*net.TCPConn).CloseWrite()
	var got [8]byte
	if _, err := io.ReadFull(c, got[:]); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	if n := binary.BigEndian.Uint64(got[:]); n != uint64(b.N)*chunk {
		b.Fatalf("service got %d bytes, want %d", n, b.N*chunk)
	}
}

func BenchmarkThroughputDirect(b *testing.B)   { benchThroughput(b, "Direct") }
func BenchmarkThroughputRelay(b *testing.B)    { benchThroughput(b, "Relay") }
func BenchmarkThroughputLifeline(b *testing.B) { benchThroughput(b, "Lifeline") }
func BenchmarkThroughputLifelineProxyIn(b *testing.B) {
	benchThroughput(b, "LifelineProxyIn")
}

// 1-byte ping-pong: ns/op is one round trip.
func benchLatency(b *testing.B, which string) {
	target := benchTargets(b, testnet.EchoServer(b))[which]
	c, err := net.Dial("tcp", target)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	p := []byte{1}
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(p); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, p); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkLatencyDirect(b *testing.B)   { benchLatency(b, "Direct") }
func BenchmarkLatencyRelay(b *testing.B)    { benchLatency(b, "Relay") }
func BenchmarkLatencyLifeline(b *testing.B) { benchLatency(b, "Lifeline") }
func BenchmarkLatencyLifelineProxyIn(b *testing.B) {
	benchLatency(b, "LifelineProxyIn")
}
