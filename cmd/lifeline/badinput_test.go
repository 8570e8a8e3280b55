package main

import (
	"errors"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// readReject reads what the gateway answers until it closes the link and
// returns the REJECT's code.
func readReject(t *testing.T, c net.Conn) frame.Code {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil && !strings.Contains(err.Error(), "reset") {
		t.Fatalf("read: %v (got %x)", err, b)
	}
	if len(b) < frame.HeaderLen {
		t.Fatalf("no REJECT before close: %x", b)
	}
	h, err := frame.ParseHeader(b)
	if err != nil || h.Type != frame.TypeReject {
		t.Fatalf("answer %x: %v, want REJECT", b, err)
	}
	cr, err := frame.ParseCodeReason(b[frame.HeaderLen : frame.HeaderLen+h.Len])
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("REJECT %v %q", cr.Code, cr.Reason)
	return cr.Code
}

func TestGatewayBadInput(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	gw := startProc(t, "gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", testnet.EchoServer(t), "--handshake-timeout", "500ms")
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	dial := func() net.Conn {
		c, err := net.Dial("tcp", gwAddr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}

	t.Run("garbage", func(t *testing.T) {
		c := dial()
		c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		if code := readReject(t, c); code != frame.CodeValidation {
			t.Fatalf("code %v, want VALIDATION", code)
		}
	})
	t.Run("oversize_header", func(t *testing.T) {
		c := dial()
		b := frame.AppendPreamble(nil)
		b = append(b, byte(frame.TypeHello), 0xff, 0xff, 0xff)
		c.Write(b)
		if code := readReject(t, c); code != frame.CodeValidation {
			t.Fatalf("code %v, want VALIDATION", code)
		}
	})
	t.Run("unknown_session", func(t *testing.T) {
		c := dial()
		r := &frame.Resume{Counter: 1}
		r.SessionID[0] = 42
		c.Write(frame.AppendResume(frame.AppendPreamble(nil), r))
		if code := readReject(t, c); code != frame.CodeNotFound {
			t.Fatalf("code %v, want NOT_FOUND", code)
		}
	})
	t.Run("silent_client", func(t *testing.T) {
		c := dial()
		start := time.Now()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.ReadAll(c)
		if d := time.Since(start); d < 400*time.Millisecond || d > 3*time.Second {
			t.Fatalf("silent link closed after %v (err %v), want about the 500ms handshake timeout", d, err)
		}
	})
	t.Run("still_serves", func(t *testing.T) {
		appAddr := freeAddr(t)
		cl := startProc(t, append([]string{"client", "--transport", "tcp", "--listen", appAddr, "--gateway", gwAddr}, fast...)...)
		cl.waitLog("client listening", 30*time.Second)
		if err := echoCheck(appAddr, randomData(100000, 5), 5); err != nil {
			t.Fatal(err)
		}
	})
}

// An upstream that refuses: the application sees a reset within the
// connect timeout, and the gateway logs why.
func TestUpstreamUnreachable(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	dead := freeAddr(t)
	gw := startProc(t, "gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", dead, "--connect-timeout", "1s")
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	appAddr := freeAddr(t)
	cl := startProc(t, "client", "--transport", "tcp", "--listen", appAddr, "--gateway", gwAddr)
	cl.waitLog("client listening", 30*time.Second)
	start := time.Now()
	c, err := net.Dial("tcp", appAddr)
	if err == nil {
		defer c.Close()
		testnet.ExpectReset(t, c, 5*time.Second)
	} else if !errors.Is(err, syscall.ECONNRESET) { // the reset can beat connect on loopback
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("reset after %v", d)
	}
	m := gw.waitLog("upstream connect failed", 5*time.Second)
	if !strings.Contains(m["err"].(string), "refused") {
		t.Errorf("log line does not say why: %v", m)
	}
}

// SIGTERM drains: new sessions are refused, an existing one goes on until
// it ends, then the gateway exits 0.
func TestDrainOnSIGTERM(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	gw := startProc(t, append([]string{"gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", testnet.EchoServer(t), "--drain-timeout", "20s"}, fast...)...)
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	appAddr := freeAddr(t)
	cl := startProc(t, append([]string{"client", "--transport", "tcp", "--listen", appAddr, "--gateway", gwAddr}, fast...)...)
	cl.waitLog("client listening", 30*time.Second)

	c, err := net.Dial("tcp", appAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 3)
	c.Write([]byte("one"))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "one" {
		t.Fatalf("%q %v", buf, err)
	}
	gw.cmd.Process.Signal(syscall.SIGTERM)
	gw.waitLog("draining", 5*time.Second)
	// A new session is refused (SHUTTING_DOWN), and the client dials
	// again instead of resetting its application: behind a load
	// balancer the next dial reaches a gateway that is not draining
	// (docs/cluster.md). Here there is none, so the application waits.
	c2, err := net.Dial("tcp", appAddr)
	if err != nil {
		t.Fatal(err)
	}
	gw.waitLog("session refused: draining", 5*time.Second)
	c2.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := c2.Read(buf); !isTimeout(err) {
		t.Fatalf("new session while draining: %v, want it kept waiting", err)
	}
	c2.Close()
	// The old one still works.
	c.Write([]byte("two"))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "two" {
		t.Fatalf("after SIGTERM: %q %v", buf, err)
	}
	c.(*net.TCPConn).CloseWrite()
	if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
		t.Fatalf("close: %q %v", rest, err)
	}
	if code := gw.wait(10 * time.Second); code != 0 {
		t.Fatalf("gateway exit code %d", code)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
