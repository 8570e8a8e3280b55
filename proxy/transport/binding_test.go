package transport

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"
)

// linkExporter finds a link's TLS exporter the way the session engine
// does: a *tls.Conn's connection state, or a conn with the method itself.
// A link hidden behind a wrapper that has neither has no channel binding.
func linkExporter(t *testing.T, c net.Conn) func(label string, context []byte, length int) ([]byte, error) {
	t.Helper()
	if tc, ok := c.(*tls.Conn); ok {
		return func(label string, context []byte, length int) ([]byte, error) {
			cs := tc.ConnectionState()
			return cs.ExportKeyingMaterial(label, context, length)
		}
	}
	if e, ok := c.(interface {
		ExportKeyingMaterial(label string, context []byte, length int) ([]byte, error)
	}); ok {
		return e.ExportKeyingMaterial
	}
	t.Fatalf("link %T has no TLS exporter: resume cannot bind its proofs to it", c)
	return nil
}

func exportBinding(t *testing.T, c net.Conn) []byte {
	t.Helper()
	b, err := linkExporter(t, c)("EXPORTER-lifeline-binding-test", []byte("ctx"), 32)
	if err != nil {
		t.Fatalf("export on %T: %v", c, err)
	}
	if len(b) != 32 || bytes.Equal(b, make([]byte, 32)) {
		t.Fatalf("export on %T: %x", c, b)
	}
	return b
}

// linkPair opens one link with d, sends a byte so the gateway sees it,
// and returns both ends after their handshakes.
func linkPair(t *testing.T, ln net.Listener, d Dialer) (client, server net.Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	type accepted struct {
		c   net.Conn
		err error
	}
	ach := make(chan accepted, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			// A gateway's TLS link shakes hands on its first Read.
			c.SetDeadline(time.Now().Add(10 * time.Second))
			_, err = io.ReadFull(c, make([]byte, 1))
			c.SetDeadline(time.Time{})
		}
		ach <- accepted{c, err}
	}()
	cl, err := d.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	if _, err := cl.Write([]byte{1}); err != nil {
		t.Fatal(err)
	}
	a := <-ach
	if a.err != nil {
		t.Fatal(a.err)
	}
	t.Cleanup(func() { a.c.Close() })
	return cl, a.c
}

// The session engine binds HELLO and RESUME proofs to TLS and QUIC links
// with the TLS exporter: both ends of a link must export the same bytes,
// and another connection different ones, or a recorded proof could be
// replayed from another socket (issue 8, item 3). Both sides' links must
// expose the exporter directly (a *tls.Conn, or the method on the QUIC
// stream), not behind a wrapper that hides it.
func TestLinksExportChannelBindingMaterial(t *testing.T) {
	stls, ctls := quicTestTLS(t)

	t.Run("tls", func(t *testing.T) {
		ln, err := Listen(Config{Name: "tls", Addr: "127.0.0.1:0", TLS: stls})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		d, err := NewDialer(Config{Name: "tls", Addr: ln.Addr().String(), TLS: ctls})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		c1, s1 := linkPair(t, ln, d)
		c2, s2 := linkPair(t, ln, d)
		a, b := exportBinding(t, c1), exportBinding(t, s1)
		if !bytes.Equal(a, b) {
			t.Fatalf("one TLS link, two exports: client %x, gateway %x", a, b)
		}
		x, y := exportBinding(t, c2), exportBinding(t, s2)
		if !bytes.Equal(x, y) {
			t.Fatalf("second TLS link: client %x, gateway %x", x, y)
		}
		if bytes.Equal(a, x) {
			t.Fatalf("two TLS links export the same material %x", a)
		}
	})

	t.Run("quic", func(t *testing.T) {
		qcfg := quicTestConfig(t)
		ln, d := quicListenDial(t, stls, ctls, qcfg)
		c1, s1 := linkPair(t, ln, d)
		a, b := exportBinding(t, c1), exportBinding(t, s1)
		if !bytes.Equal(a, b) {
			t.Fatalf("one QUIC link, two exports: client %x, gateway %x", a, b)
		}
		// Another stream of the same connection shares its TLS session.
		c2, s2 := linkPair(t, ln, d)
		if x, y := exportBinding(t, c2), exportBinding(t, s2); !bytes.Equal(x, a) || !bytes.Equal(y, a) {
			t.Fatalf("second stream of one connection: client %x, gateway %x, want %x", x, y, a)
		}
		// Another connection: different material on both ends.
		d2, err := quicNewDialer(t, ln.Addr().String(), ctls, qcfg)
		if err != nil {
			t.Fatal(err)
		}
		defer d2.Close()
		c3, s3 := linkPair(t, ln, d2)
		x, y := exportBinding(t, c3), exportBinding(t, s3)
		if !bytes.Equal(x, y) {
			t.Fatalf("second QUIC connection: client %x, gateway %x", x, y)
		}
		if bytes.Equal(x, a) {
			t.Fatalf("two QUIC connections export the same material %x", a)
		}
	})
}
