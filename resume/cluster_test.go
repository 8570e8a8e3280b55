package resume

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// remoteConn reports a chosen remote address, as a forwarded link that
// carries the client's real address does.
type remoteConn struct {
	net.Conn
	remote net.Addr
}

func (c remoteConn) RemoteAddr() net.Addr { return c.remote }

// cluster is two gateways (nodes 1 and 2) and a client dialer that sends
// each new link to the node next picks. A node forwards a RESUME for the
// other's session over an in-memory pipe, the way the proxy's peer
// streams do: Replay first, then both ways.
type cluster struct {
	t     *testing.T
	nodes [2]*Server
	next  atomic.Int32 // node index the next link goes to
	// down, when set for a node index, makes forwarding to it fail at
	// once (the owner is gone).
	down      [2]atomic.Bool
	forwarded [2]atomic.Int32 // links each node forwarded
	relays    sync.WaitGroup
}

func newCluster(t *testing.T, cfg *Config) *cluster {
	cl := &cluster{t: t}
	for i := range cl.nodes {
		sc := serverConfig(cfg)
		sc.NodeID = NodeID{0, 0, 0, byte(i + 1)}
		from := i
		sc.Forward = func(f *ForeignResume) error { return cl.forward(from, f) }
		srv, err := NewServer(sc)
		if err != nil {
			t.Fatal(err)
		}
		cl.nodes[i] = srv
	}
	t.Cleanup(func() {
		for _, n := range cl.nodes {
			n.Close()
		}
		cl.relays.Wait()
	})
	return cl
}

func (cl *cluster) forward(from int, f *ForeignResume) error {
	owner := int(f.Node[3]) - 1
	if owner < 0 || owner >= len(cl.nodes) || cl.down[owner].Load() {
		return &Error{Code: frame.CodeNotFound, Reason: "owner node " + f.Node.String() + " is gone"}
	}
	cl.forwarded[from].Add(1)
	a, b := net.Pipe()
	cl.relays.Add(3)
	go func() {
		defer cl.relays.Done()
		cl.nodes[owner].ServeForwarded(remoteConn{b, f.Remote}, f.Binding)
	}()
	go func() { // client -> owner: what was read already, then the rest
		defer cl.relays.Done()
		if _, err := a.Write(f.Replay); err == nil {
			io.Copy(a, f.Conn)
		}
		a.Close()
		f.Conn.Close()
	}()
	go func() {
		defer cl.relays.Done()
		io.Copy(f.Conn, a)
		f.Conn.Close()
		a.Close()
	}()
	return nil
}

func (cl *cluster) dial(ctx context.Context) (net.Conn, error) {
	a, b := net.Pipe()
	go cl.nodes[cl.next.Load()].ServeLink(b)
	return a, nil
}

// TestResumeForwardedToOwnerNode: a session opened on node 1 resumes
// through node 2, which forwards the link; the bytes before and after are
// exact and node 1 still holds the session.
func TestResumeForwardedToOwnerNode(t *testing.T) {
	cl := newCluster(t, testConfig())
	var link atomic.Pointer[net.Conn]
	dial := func(ctx context.Context) (net.Conn, error) {
		c, err := cl.dial(ctx)
		if err == nil {
			link.Store(&c)
		}
		return c, err
	}
	c, err := Dial(context.Background(), dial, "r", testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := c.SessionID().Node(); got != (NodeID{0, 0, 0, 1}) {
		t.Fatalf("session id %x names node %v, want 00000001", c.SessionID(), got)
	}
	s, err := cl.nodes[0].Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	echo := func(msg []byte) {
		t.Helper()
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(s, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("gateway read %q, %v; want %q", got, err, msg)
		}
		if _, err := s.Write(got); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("client read %q, %v; want %q", got, err, msg)
		}
	}
	echo([]byte("before"))
	for i := range 3 {
		cl.next.Store(1) // the balancer now sends links to node 2
		before := c.Stats().Resumes
		(*link.Load()).Close()
		waitFor(t, 10*time.Second, "resume through node 2", func() bool { return c.Stats().Resumes > before && c.State() == StateActive })
		echo([]byte{'a' + byte(i), 'f', 't', 'e', 'r'})
	}
	if n := cl.forwarded[1].Load(); n != 3 {
		t.Fatalf("node 2 forwarded %d links, want 3", n)
	}
	if n := cl.nodes[1].NumSessions(); n != 0 {
		t.Fatalf("node 2 holds %d sessions, want 0: the state never leaves its owner", n)
	}
}

// TestResumeForGoneOwnerIsNotFoundAtOnce: a resume through node 2 for a
// session of node 1, which is gone, ends the client's session with
// NOT_FOUND at the first attempt, not after the reconnect timeout.
func TestResumeForGoneOwnerIsNotFoundAtOnce(t *testing.T) {
	cfg := testConfig()
	cfg.ReconnectTimeout = time.Minute
	cfg.LingerTimeout = 100 * time.Millisecond // the gateway end's Close at the end has nobody to linger for
	cl := newCluster(t, cfg)
	var link atomic.Pointer[net.Conn]
	dial := func(ctx context.Context) (net.Conn, error) {
		c, err := cl.dial(ctx)
		if err == nil {
			link.Store(&c)
		}
		return c, err
	}
	c, err := Dial(context.Background(), dial, "r", cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := cl.nodes[0].Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	cl.down[0].Store(true)
	cl.next.Store(1)
	start := time.Now()
	(*link.Load()).Close()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the session did not end within 10 s of its owner going")
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("NOT_FOUND took %v", took)
	}
	var e *Error
	if !errors.As(c.Err(), &e) || e.Code != frame.CodeNotFound {
		t.Fatalf("session ended with %v, want NOT_FOUND", c.Err())
	}
}

// TestForwardedLinkCannotOpenOrChainSessions: a forwarded link must carry
// a RESUME, and a forwarded RESUME for a session the owner does not hold
// is refused there, never forwarded again.
func TestForwardedLinkCannotOpenOrChainSessions(t *testing.T) {
	cl := newCluster(t, testConfig())
	exchange := func(b []byte) (frame.Header, []byte) {
		a, bb := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			cl.nodes[0].ServeForwarded(bb, nil)
		}()
		defer func() { a.Close(); <-done }()
		go a.Write(b)
		fr := frame.NewReader(a, 1<<16)
		h, err := fr.Next()
		if err != nil {
			t.Fatal(err)
		}
		p, err := fr.Payload(h)
		if err != nil {
			t.Fatal(err)
		}
		return h, append([]byte(nil), p...)
	}
	hello, _ := frame.AppendHello(frame.AppendPreamble(nil), &frame.Hello{Buffer: 1 << 20, Route: "r"})
	h, p := exchange(hello)
	wantReject(t, h, p, frame.CodeValidation)

	var r frame.Resume
	r.SessionID[frame.SessionIDLen-1] = 2 // node 2's, unknown here
	r.Counter = 1
	h, p = exchange(frame.AppendResume(frame.AppendPreamble(nil), &r))
	wantReject(t, h, p, frame.CodeNotFound)
	if n := cl.forwarded[0].Load(); n != 0 {
		t.Fatalf("node 1 forwarded a forwarded link %d times", n)
	}
}
