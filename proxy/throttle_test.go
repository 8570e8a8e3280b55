package proxy

import (
	"crypto/ecdh"
	"crypto/rand"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// A gateway that answers a new session's HELLO with THROTTLED (here: too
// many unconfirmed sessions from the sidecar's address) delays the
// application's connection instead of resetting it: the sidecar retries
// within the reconnect timeout and the session opens once the gateway has
// room. Before, any REJECT reset the application at once.
func TestThrottledHelloIsRetried(t *testing.T) {
	sc := defaultServerForTest()
	sc.Session.HandshakeTimeout = 400 * time.Millisecond // unconfirmed sessions go after this
	sc.MaxUnconfirmedPerSource = 2
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t), server: sc, noRelay: true})

	// Two HELLOs from 127.0.0.1 that never confirm fill the source's cap.
	for i := 0; i < 2; i++ {
		c, err := net.Dial("tcp", s.gwAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		k, _ := ecdh.X25519().GenerateKey(rand.Reader)
		b, _ := frame.AppendHello(frame.AppendPreamble(nil), &frame.Hello{Key: [32]byte(k.PublicKey().Bytes()),
			ReconnectTimeout: 10000, Buffer: 1 << 20, Route: "default"})
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
		fr := frame.NewReader(c, 4096)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if h, err := fr.Next(); err != nil || h.Type != frame.TypeWelcome {
			t.Fatalf("filler HELLO %d: %v %v", i, h.Type, err)
		}
	}
	start := time.Now()
	app := dialApp(t, s.appAddr)
	defer app.Close()
	app.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := app.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5)
	if _, err := io.ReadFull(app, got); err != nil {
		t.Fatalf("application after a THROTTLED HELLO: %v (want the echo once the gateway has room)", err)
	}
	if string(got) != "hello" {
		t.Fatalf("echo %q", got)
	}
	if waited := time.Since(start); waited < 200*time.Millisecond {
		t.Fatalf("echo after %v: the HELLO was never throttled, the test proves nothing", waited)
	}
	m := get(t, s.gwAdmin(t), "/metrics")
	if !strings.Contains(m, `lifeline_refusals_total{reason="unconfirmed_limit"}`) {
		t.Fatalf("no unconfirmed_limit refusal counted:\n%s", m)
	}
}
