package resume

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// FuzzGatewayLink feeds arbitrary bytes to a gateway as a new link: it
// must answer (REJECT or a handshake reply) or close, never panic or hang,
// and stay usable for the next client.
func FuzzGatewayLink(f *testing.F) {
	_, pub, _ := newKey()
	hello, _ := frame.AppendHello(frame.AppendPreamble(nil), &frame.Hello{Key: pub, ReconnectTimeout: 1000, Buffer: 1 << 20, Route: "r"})
	f.Add(hello)
	f.Add(append(hello, frame.AppendU64(nil, frame.TypePing, 7)...))
	f.Add(append(hello, 0x01, 0, 0, 3, 'a', 'b', 'c'))
	f.Add(frame.AppendResume(frame.AppendPreamble(nil), &frame.Resume{Counter: 1}))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add(append(frame.AppendPreamble(nil), 0x10, 0xff, 0xff, 0xff))
	f.Add([]byte{})

	cfg := DefaultConfig()
	cfg.HandshakeTimeout = 200 * time.Millisecond
	sc := serverConfig(cfg)
	sc.FailureBurst = 1 << 30
	srv, err := NewServer(sc)
	if err != nil {
		f.Fatal(err)
	}
	defer srv.Close()
	go func() {
		for {
			c, err := srv.Accept()
			if err != nil {
				return
			}
			go c.Reset(CodeAppReset, "fuzz")
		}
	}()
	f.Fuzz(func(t *testing.T, in []byte) {
		a, b := net.Pipe()
		done := make(chan struct{})
		go func() { srv.ServeLink(b); close(done) }()
		a.SetDeadline(time.Now().Add(2 * time.Second))
		go func() { a.Write(in) }()
		io.Copy(io.Discard, a) // until the gateway closes or the deadline
		a.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("ServeLink did not return")
		}
	})
}

// FuzzClientHandshake answers a client's HELLO with arbitrary bytes: Dial
// must return a Conn or an error within its handshake timeout, never panic.
func FuzzClientHandshake(f *testing.F) {
	var w frame.Welcome
	w.Key = [32]byte{9} // the X25519 base point: a valid public key
	f.Add(frame.AppendWelcome(nil, &w))
	f.Add(frame.AppendCodeReason(nil, frame.TypeReject, frame.CodeNotFound, "no"))
	f.Add(frame.AppendU64(nil, frame.TypePing, 1))
	f.Add([]byte{0x11, 0, 0, 1, 0})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		cfg := DefaultConfig()
		cfg.HandshakeTimeout = 200 * time.Millisecond
		cfg.ReconnectTimeout = 0
		dial := func(ctx context.Context) (net.Conn, error) {
			a, b := net.Pipe()
			go func() {
				defer b.Close()
				b.SetDeadline(time.Now().Add(time.Second))
				fr := frame.NewReader(b, 4096)
				if _, err := fr.ReadPreamble(); err != nil {
					return
				}
				if h, err := fr.Next(); err != nil || h.Type != frame.TypeHello {
					return
				} else if _, err := fr.Payload(h); err != nil {
					return
				}
				b.Write(in)
				io.Copy(io.Discard, b)
			}()
			return a, nil
		}
		c, err := Dial(context.Background(), dial, "r", cfg)
		if err == nil {
			c.Reset(CodeAppReset, "fuzz")
		}
	})
}
