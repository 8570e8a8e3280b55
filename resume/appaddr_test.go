package resume

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

func TestAppAddrInHello(t *testing.T) {
	e := tcpEnv(t, serverConfig(testConfig()), nil)
	defer e.stop()
	for _, tc := range []struct{ sent, want string }{
		{"", ""},
		{"10.1.2.3:54321", "10.1.2.3:54321"},
		{"[2001:DB8::7]:80", "[2001:db8::7]:80"}, // canonical form
	} {
		c, err := DialWith(context.Background(), e.dial, "test", DialOptions{AppAddr: tc.sent}, testConfig())
		if err != nil {
			t.Fatalf("DialWith(%q): %v", tc.sent, err)
		}
		s, err := e.srv.Accept()
		if err != nil {
			t.Fatal(err)
		}
		if got := s.PeerAppAddr(); got != tc.want {
			t.Errorf("gateway PeerAppAddr %q, want %q", got, tc.want)
		}
		if got := c.PeerAppAddr(); got != tc.want {
			t.Errorf("client PeerAppAddr %q, want %q", got, tc.want)
		}
		// The session works as any other.
		go c.Write([]byte("ping"))
		b := make([]byte, 4)
		s.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(s, b); err != nil || string(b) != "ping" {
			t.Fatalf("read %q, %v", b, err)
		}
		c.Close()
		s.Close()
	}
}

func TestAppAddrBadOnClient(t *testing.T) {
	dialed := false
	dial := func(ctx context.Context) (net.Conn, error) { dialed = true; return nil, errors.New("no") }
	for _, a := range []string{"10.1.2.3", "host:80", "[fe80::1%eth0]:80", "10.1.2.3:99999"} {
		if _, err := DialWith(context.Background(), dial, "r", DialOptions{AppAddr: a}, testConfig()); err == nil {
			t.Errorf("DialWith(AppAddr %q): no error", a)
		}
	}
	if dialed {
		t.Error("dialed with a bad application address")
	}
}

// A HELLO whose application address does not parse is refused with
// VALIDATION, before any session exists.
func TestAppAddrBadOnGateway(t *testing.T) {
	e := tcpEnv(t, serverConfig(testConfig()), nil)
	defer e.stop()
	for _, a := range []string{"not an address", "10.1.2.3", "[fe80::1%eth0]:80"} {
		c, err := e.dial(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		h := &frame.Hello{ReconnectTimeout: 1000, Buffer: 1 << 20, Route: "test", App: a}
		_, pub, _ := newKey()
		h.Key = pub
		b, _ := frame.AppendHello(frame.AppendPreamble(nil), h)
		c.Write(b)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		fr := frame.NewReader(c, 4096)
		fh, p, err := readHandshake(fr)
		c.Close()
		if err != nil || fh.Type != frame.TypeReject {
			t.Fatalf("app %q: %v %v, want REJECT", a, fh.Type, err)
		}
		var re *Error
		if err := rejectError(p, SessionID{}); !errors.As(err, &re) || re.Code != frame.CodeValidation {
			t.Fatalf("app %q: %v, want VALIDATION", a, err)
		}
	}
	if n := e.srv.NumSessions(); n != 0 {
		t.Fatalf("%d sessions after refused HELLOs", n)
	}
}
