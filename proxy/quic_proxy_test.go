package proxy

import (
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

// The proxy-level semantics of the TCP transport, over a QUIC link: many
// sessions byte-exact over one QUIC connection, half-close both ways, and
// resets both ways. (Link failures over QUIC, with a UDP fault relay, are
// in quic_test.go.)
func TestProxyOverQUIC(t *testing.T) {
	cert, err := transport.SelfSignedCert()
	if err != nil {
		t.Fatal(err)
	}
	srvTLS, fp := transport.ServerTLS(cert), transport.CertFingerprint(cert.Leaf.Raw)
	quicStack := func(t *testing.T, upstream string) *stack {
		return newStack(t, stackOpts{upstream: upstream, transport: "quic", noRelay: true,
			serverTLS: srvTLS, clientTLS: transport.PinnedTLS(fp, "")})
	}
	t.Run("echo", func(t *testing.T) {
		s := quicStack(t, testnet.EchoServer(t))
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for i := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := (faultnet.Echo{Seed: uint64(i), Size: 256<<10 + int64(i)*997, MaxWrite: 48 << 10}.Dial(s.appAddr)); err != nil {
					errs <- fmt.Errorf("session %d: %w", i, err)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
	t.Run("half_close_app_first", func(t *testing.T) {
		up := testnet.TCPServer(t, func(c *net.TCPConn) {
			b, err := io.ReadAll(c)
			if err != nil {
				return
			}
			fmt.Fprintf(c, "got %d", len(b))
			c.CloseWrite()
		})
		s := quicStack(t, up)
		c := dialApp(t, s.appAddr)
		defer c.Close()
		c.Write(make([]byte, 70000))
		c.CloseWrite()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if b, err := io.ReadAll(c); err != nil || string(b) != "got 70000" {
			t.Fatalf("reply %q, %v", b, err)
		}
	})
	t.Run("half_close_upstream_first", func(t *testing.T) {
		got := make(chan string, 1)
		up := testnet.TCPServer(t, func(c *net.TCPConn) {
			c.Write([]byte("hello"))
			c.CloseWrite()
			b, _ := io.ReadAll(c)
			got <- string(b)
		})
		s := quicStack(t, up)
		c := dialApp(t, s.appAddr)
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if b, err := io.ReadAll(c); err != nil || string(b) != "hello" {
			t.Fatalf("read %q, %v", b, err)
		}
		c.Write([]byte("still writing"))
		c.CloseWrite()
		select {
		case b := <-got:
			if b != "still writing" {
				t.Fatalf("upstream got %q", b)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("upstream never saw the FIN")
		}
	})
	t.Run("upstream_reset", func(t *testing.T) {
		up := testnet.TCPServer(t, func(c *net.TCPConn) {
			io.ReadFull(c, make([]byte, 5))
			c.SetLinger(0)
		})
		s := quicStack(t, up)
		c := dialApp(t, s.appAddr)
		defer c.Close()
		c.Write([]byte("hello"))
		testnet.ExpectReset(t, c, 10*time.Second)
	})
}
