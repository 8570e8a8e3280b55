package proxy

import (
	"bytes"
	"io"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// While the gateway cannot be reached, a new session's open is retried
// for up to the reconnect timeout (20 s here). An application that gives
// up meanwhile (closes without sending anything) is dropped within a
// backoff step, not held with its descriptor for the rest of the timeout:
// when descriptors ran out, those held ones are what every new session
// waits for. One that stays, silent or with data sent, keeps waiting and
// gets through, byte for byte, once the gateway is back.
func TestOpenDropsAnApplicationThatLeft(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	s.relay.SetDown(true)

	stays := dialApp(t, s.appAddr)
	defer stays.Close()
	early := []byte("sent before the session opened;")
	if _, err := stays.Write(early); err != nil {
		t.Fatal(err)
	}
	silent := dialApp(t, s.appAddr)
	defer silent.Close()
	leaves := dialApp(t, s.appAddr)
	waitFor(t, "three sessions opening", 5*time.Second, func() bool { return s.client.opening.Load() == 3 })
	leaves.Close()
	start := time.Now()
	waitFor(t, "the one that left to be dropped", 5*time.Second, func() bool { return s.client.opening.Load() == 2 })
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("dropped after %v", d)
	}
	time.Sleep(300 * time.Millisecond) // several more backoff steps
	if n := s.client.opening.Load(); n != 2 {
		t.Fatalf("%d sessions opening; the two applications still there must stay", n)
	}

	s.relay.SetDown(false)
	rest := []byte("and after.")
	if _, err := stays.Write(rest); err != nil {
		t.Fatal(err)
	}
	want := append(append([]byte{}, early...), rest...)
	got := make([]byte, len(want))
	stays.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(stays, got); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("echo %q, %v; want %q", got, err, want)
	}
	silent.Write([]byte("x"))
	b := make([]byte, 1)
	silent.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(silent, b); err != nil || b[0] != 'x' {
		t.Fatalf("silent application after the gateway came back: %q, %v", b, err)
	}
}
