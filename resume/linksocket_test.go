//go:build linux

package resume

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// layeredConn is a LinkSocket as the gateway's PROXY protocol reader is
// one: it strips a header line through a small read-ahead buffer, which
// also takes the first bytes after the header.
type layeredConn struct {
	*net.TCPConn
	br      *bufio.Reader
	header  string
	drained atomic.Bool
	socket  atomic.Int32 // Socket calls that returned the socket
}

func (c *layeredConn) Read(p []byte) (int, error) {
	if c.br == nil && !c.drained.Load() {
		c.br = bufio.NewReaderSize(c.TCPConn, 256)
		line, err := c.br.ReadString('\n')
		if err != nil {
			return 0, err
		}
		c.header = line
	}
	if c.br != nil {
		if c.br.Buffered() > 0 {
			n, err := c.br.Read(p)
			if c.br.Buffered() == 0 {
				c.br = nil
				c.drained.Store(true)
			}
			return n, err
		}
		c.br = nil
		c.drained.Store(true)
	}
	return c.TCPConn.Read(p)
}

func (c *layeredConn) Socket() *net.TCPConn {
	if !c.drained.Load() {
		return nil
	}
	c.socket.Add(1)
	return c.TCPConn
}

// layeredListener accepts layeredConns, under TLS if tc is set.
type layeredListener struct {
	net.Listener
	tc    *tls.Config
	conns chan *layeredConn
}

func (l *layeredListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	lc := &layeredConn{TCPConn: c.(*net.TCPConn)}
	select {
	case l.conns <- lc:
	default:
	}
	if l.tc != nil {
		return tls.Server(TLSSocket(lc), l.tc), nil
	}
	return lc, nil
}

// layeredEnv is a gateway behind a layeredListener; the client writes
// the header line before anything else on each link (before TLS, as a
// balancer's PROXY header comes).
func layeredEnv(t *testing.T, sc *ServerConfig, useTLS bool) (*env, chan *layeredConn) {
	t.Helper()
	srv, err := NewServer(sc)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ll := &layeredListener{Listener: ln, conns: make(chan *layeredConn, 16)}
	if useTLS {
		ll.tc = &tls.Config{Certificates: []tls.Certificate{testCert(t)}}
	}
	done := make(chan struct{})
	go func() { srv.Serve(ll); close(done) }()
	addr := ln.Addr().String()
	dial := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		raw, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		if _, err := raw.Write([]byte("HEADER from a balancer\n")); err != nil {
			raw.Close()
			return nil, err
		}
		if !useTLS {
			return raw, nil
		}
		c := tls.Client(TLSSocket(raw), &tls.Config{InsecureSkipVerify: true}) // the test checks parking, not the certificate
		if err := c.HandshakeContext(ctx); err != nil {
			raw.Close()
			return nil, err
		}
		return c, nil
	}
	return &env{t: t, srv: srv, dial: dial, stop: func() { srv.Close(); <-done }}, ll.conns
}

// A gateway link read through a layer of its own (a PROXY protocol
// reader, LinkSocket) gets the socket once the layer has given up what it
// read ahead: its idle reader parks in the poller as a plain link's does,
// over tcp and tls, and the bytes the layer had read ahead (the start of
// the handshake) and every byte after are delivered exactly, through a
// link break too.
func TestLinkSocketReaderParks(t *testing.T) {
	for _, useTLS := range []bool{false, true} {
		name := "tcp"
		if useTLS {
			name = "tls"
		}
		t.Run(name, func(t *testing.T) {
			fds := openFDs(t)
			cfg := testConfig()
			e, conns := layeredEnv(t, serverConfig(cfg), useTLS)
			c, s := e.pair(cfg)
			lc := <-conns
			roundTrip(t, c, s, "a")
			roundTrip(t, s, c, "b")
			waitIdle(t, c, s, 1)
			if lc.header != "HEADER from a balancer\n" {
				t.Fatalf("layer read header %q", lc.header)
			}
			if lc.socket.Load() == 0 {
				t.Fatal("the link never took the socket from the layer")
			}

			big := make([]byte, 1<<20)
			for i := range big {
				big[i] = byte(i * 13)
			}
			roundTrip(t, c, s, string(big))
			roundTrip(t, s, c, string(big[:300<<10]))
			waitIdle(t, c, s, 1)

			before := c.Stats().Resumes
			c.Kill()
			waitFor(t, 5*time.Second, "resumed", func() bool { return c.Stats().Resumes > before && c.State() == StateActive })
			roundTrip(t, c, s, "after the break")
			roundTrip(t, s, c, "and back")
			waitIdle(t, c, s, 1)

			closeBoth(c, s)
			e.stop()
			waitNoLeaks(t, fds)
		})
	}
}
