package resume

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"testing"

	"golang.org/x/net/nettest"
)

func TestBasicEcho(t *testing.T) {
	e := tcpEnv(t, serverConfig(testConfig()), nil)
	defer e.stop()
	c, s := e.pair(testConfig())
	msg := []byte("hello, lifeline")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(s, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("server read %q, %v", got, err)
	}
	if c.SessionID() != s.SessionID() {
		t.Fatalf("session ids differ: %v %v", c.SessionID(), s.SessionID())
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := s.Read(got); n != 0 || err != io.EOF {
		t.Fatalf("after CloseWrite: %d, %v; want EOF", n, err)
	}
	if _, err := s.Write([]byte("bye")); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	rest, err := io.ReadAll(c)
	if err != nil || string(rest) != "bye" {
		t.Fatalf("client read %q, %v", rest, err)
	}
	<-c.Done()
	<-s.Done()
	if c.State() != StateClosed || s.State() != StateClosed {
		t.Fatalf("states %v %v", c.State(), s.State())
	}
	c.Close()
	s.Close()
}

func makePipe(e *env) nettest.MakePipe {
	return func() (c1, c2 net.Conn, stop func(), err error) {
		c, s := e.pair(testConfig())
		// Close both at once, as two TCP endpoints would: each end's Close
		// discards what it did not read, which lets the other's flush end.
		return c, s, func() {
			done := make(chan struct{})
			go func() { c.Close(); close(done) }()
			s.Close()
			<-done
		}, nil
	}
}

func TestNettestMemory(t *testing.T) {
	e := memEnv(t, serverConfig(testConfig()), nil)
	defer e.stop()
	nettest.TestConn(t, makePipe(e))
}

func TestNettestTCP(t *testing.T) {
	e := tcpEnv(t, serverConfig(testConfig()), nil)
	defer e.stop()
	nettest.TestConn(t, makePipe(e))
}

func TestNettestCutLinks(t *testing.T) {
	e := tcpEnv(t, serverConfig(testConfig()), func(c net.Conn) net.Conn {
		return newCutConn(c, 2048+rand.Int64N(16<<10))
	})
	defer e.stop()
	nettest.TestConn(t, makePipe(e))
}
