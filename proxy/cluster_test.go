package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

var (
	testKey  = []byte("0123456789abcdef0123456789abcdef-test")
	otherKey = []byte("fedcba9876543210fedcba9876543210-other")
)

// newTestCluster starts a node listening on loopback.
func newTestCluster(t *testing.T, name string, key []byte, peers ...string) *Cluster {
	t.Helper()
	c, err := NewCluster(ClusterConfig{NodeName: name, Key: key, Listen: "127.0.0.1:0", Peers: peers,
		ForwardTimeout: 500 * time.Millisecond, IdleTimeout: 900 * time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// waitPeer waits until c's peer at addr is up (or its first attempt
// failed, when up is false) and returns its state.
func waitPeer(t *testing.T, c *Cluster, addr string, up bool) PeerInfo {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, p := range c.Peers() {
			if p.Addr == addr && (p.Up == up && (up || p.Err != "")) {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("peer %s of %s not up=%v: %+v", addr, c.Name(), up, c.Peers())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-ch
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

type served struct {
	link    net.Conn
	binding []byte
}

// TestClusterForward forwards a link from node a to node b and checks what
// b's server gets (the client's address, the binding, the replay bytes
// then the link's) and that bytes flow both ways until either end closes.
func TestClusterForward(t *testing.T) {
	b := newTestCluster(t, "node-b", testKey)
	got := make(chan served, 1)
	b.SetServe(func(link net.Conn, binding []byte) { got <- served{link, binding} })
	a := newTestCluster(t, "node-a", testKey, b.Addr().String())
	waitPeer(t, a, b.Addr().String(), true)

	client, entry := tcpPair(t) // client's link, as the entry node has it
	remote := &net.TCPAddr{IP: net.ParseIP("203.0.113.7"), Port: 40001}
	binding := bytes.Repeat([]byte{0xb1}, 32)
	if err := a.ForwardTo(b.ID(), entry, []byte("REPLAY:"), remote, binding); err != nil {
		t.Fatal(err)
	}
	var s served
	select {
	case s = <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("owner never got the link")
	}
	defer s.link.Close()
	if s.link.RemoteAddr().String() != remote.String() {
		t.Errorf("owner sees the client at %v, want %v", s.link.RemoteAddr(), remote)
	}
	if !bytes.Equal(s.binding, binding) {
		t.Errorf("binding %x, want %x", s.binding, binding)
	}
	// Client to owner: the replay, then what the client sends.
	payload := bytes.Repeat([]byte("0123456789"), 100_000) // 1 MB
	go client.Write(payload)
	want := append([]byte("REPLAY:"), payload...)
	buf := make([]byte, len(want))
	s.link.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(s.link, buf); err != nil || !bytes.Equal(buf, want) {
		t.Fatalf("owner read %d bytes, err %v, equal %v", len(buf), err, bytes.Equal(buf, want))
	}
	// Owner to client, then the owner closes: the client reads it all and
	// then EOF.
	go func() {
		s.link.Write(payload)
		s.link.Close()
	}()
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	back, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(back, payload) {
		t.Fatalf("client read %d bytes (want %d), err %v", len(back), len(payload), err)
	}
}

// TestClusterForwardClientCloses: the client's close reaches the owner as
// an end of stream.
func TestClusterForwardClientCloses(t *testing.T) {
	b := newTestCluster(t, "node-b", testKey)
	got := make(chan served, 1)
	b.SetServe(func(link net.Conn, binding []byte) { got <- served{link, binding} })
	a := newTestCluster(t, "node-a", testKey, b.Addr().String())
	waitPeer(t, a, b.Addr().String(), true)
	client, entry := tcpPair(t)
	if err := a.ForwardTo(b.ID(), entry, nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	s := <-got
	defer s.link.Close()
	if s.link.RemoteAddr() != nil {
		t.Errorf("remote %v, want none", s.link.RemoteAddr())
	}
	client.Write([]byte("bye"))
	client.Close()
	s.link.SetReadDeadline(time.Now().Add(5 * time.Second))
	b2, err := io.ReadAll(s.link)
	if err != nil || string(b2) != "bye" {
		t.Fatalf("owner read %q, %v; want bye then EOF", b2, err)
	}
}

// TestClusterWrongKey: peers with different keys refuse each other, and a
// forward to the other node is refused at once.
func TestClusterWrongKey(t *testing.T) {
	b := newTestCluster(t, "node-b", otherKey)
	b.SetServe(func(link net.Conn, binding []byte) { t.Error("a link got through"); link.Close() })
	a := newTestCluster(t, "node-a", testKey, b.Addr().String())
	p := waitPeer(t, a, b.Addr().String(), false)
	if !strings.Contains(p.Err, "authentic") {
		t.Errorf("peer error %q, want an authentication failure", p.Err)
	}
	_, entry := tcpPair(t)
	start := time.Now()
	err := a.ForwardTo(NodeIDOf("node-b"), entry, nil, nil, nil)
	var og *OwnerGoneError
	if !errors.As(err, &og) {
		t.Fatalf("forward: %v, want OwnerGoneError", err)
	}
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Errorf("forward refused after %v, want at once", d)
	}
}

// rawDial connects to a cluster node without authenticating.
func rawDial(t *testing.T, addr net.Addr) *quic.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, addr.String(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{ClusterALPN}}, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	return qc
}

func exporter(t *testing.T, qc *quic.Conn) []byte {
	t.Helper()
	exp, err := exporterOf(qc)
	if err != nil {
		t.Fatal(err)
	}
	return exp
}

// authAnswer sends msg on a new stream of qc and returns the node's
// status byte (0: accepted), or -1 if the node closed without one.
func authAnswer(t *testing.T, qc *quic.Conn, msg []byte) int {
	t.Helper()
	str, err := qc.OpenStreamSync(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	str.SetDeadline(time.Now().Add(3 * time.Second))
	str.Write(msg)
	var st [1]byte
	if _, err := io.ReadFull(str, st[:]); err != nil {
		return -1
	}
	return int(st[0])
}

// TestClusterAuthReplay: a dialer's proof is bound to its connection. A
// proof computed for (recorded on) one connection is refused on another,
// while the right proof on that other one is accepted.
func TestClusterAuthReplay(t *testing.T) {
	b := newTestCluster(t, "node-b", testKey)
	qc1 := rawDial(t, b.Addr())
	defer qc1.CloseWithError(0, "")
	recorded := authDialerMsg(testKey, exporter(t, qc1), "node-a")
	if st := authAnswer(t, qc1, recorded); st != 0 {
		t.Fatalf("genuine proof answered %d, want 0", st)
	}
	qc2 := rawDial(t, b.Addr())
	defer qc2.CloseWithError(0, "")
	if st := authAnswer(t, qc2, recorded); st == 0 {
		t.Fatal("a proof replayed on another connection was accepted")
	}
	// The connection is closed after the refusal.
	select {
	case <-qc2.Context().Done():
	case <-time.After(3 * time.Second):
		t.Error("connection with a replayed proof still open")
	}
	// The wrong key on its own connection is refused too.
	qc3 := rawDial(t, b.Addr())
	defer qc3.CloseWithError(0, "")
	if st := authAnswer(t, qc3, authDialerMsg(otherKey, exporter(t, qc3), "node-a")); st == 0 {
		t.Fatal("a proof with the wrong key was accepted")
	}
	// A listener's proof reflected back as a dialer's is refused: the
	// role is in the MAC.
	qc4 := rawDial(t, b.Addr())
	defer qc4.CloseWithError(0, "")
	msg := append([]byte(authMagic), authVersion, byte(len("node-a")))
	msg = append(msg, "node-a"...)
	msg = append(msg, clusterMAC(testKey, roleListener, exporter(t, qc4), []byte("node-a"))...)
	if st := authAnswer(t, qc4, msg); st == 0 {
		t.Fatal("a listener-role proof was accepted from a dialer")
	}
}

// TestClusterOwnerGone: once a peer is known to be down, a forward to it
// is refused at once; while its death is not yet known (killed without a
// word: its socket just went silent), within the forward timeout.
func TestClusterOwnerGone(t *testing.T) {
	b := newTestCluster(t, "node-b", testKey)
	b.SetServe(func(link net.Conn, binding []byte) { link.Close() })
	a := newTestCluster(t, "node-a", testKey, b.Addr().String())
	waitPeer(t, a, b.Addr().String(), true)

	// Kill b's socket under it: no CONNECTION_CLOSE goes out, as with
	// SIGKILL.
	b.udp.Close()
	_, entry := tcpPair(t)
	start := time.Now()
	err := a.ForwardTo(b.ID(), entry, []byte("x"), nil, nil)
	d := time.Since(start)
	var og *OwnerGoneError
	if !errors.As(err, &og) || og.Node != b.ID() {
		t.Fatalf("forward to a silent owner: %v, want OwnerGoneError", err)
	}
	if d > a.timeout+200*time.Millisecond {
		t.Errorf("silent owner found gone after %v, want within the forward timeout %v", d, a.timeout)
	}
	t.Logf("silent owner: refused after %v (forward timeout %v): %v", d.Round(time.Millisecond), a.timeout, err)

	// After the idle timeout the peer is down, and forwards fail at once.
	waitPeer(t, a, b.Addr().String(), false)
	start = time.Now()
	err = a.ForwardTo(b.ID(), entry, nil, nil, nil)
	if d := time.Since(start); !errors.As(err, &og) || d > 20*time.Millisecond {
		t.Fatalf("forward to a down owner: %v after %v, want OwnerGoneError at once", err, d)
	}
	t.Logf("down owner: refused after %v: %v", time.Since(start), err)

	// An id no peer has: at once as well.
	start = time.Now()
	err = a.ForwardTo(NodeIDOf("nobody"), entry, nil, nil, nil)
	if d := time.Since(start); !errors.As(err, &og) || d > 20*time.Millisecond {
		t.Fatalf("forward to an unknown node: %v after %v, want OwnerGoneError at once", err, d)
	}
}

// TestClusterOwnerClosed: a node that closes (a drain's end, a crash the
// kernel reports) tells its peers at once.
func TestClusterOwnerClosed(t *testing.T) {
	b := newTestCluster(t, "node-b", testKey)
	a := newTestCluster(t, "node-a", testKey, b.Addr().String())
	waitPeer(t, a, b.Addr().String(), true)
	b.Close()
	waitPeer(t, a, b.Addr().String(), false)
	_, entry := tcpPair(t)
	start := time.Now()
	err := a.ForwardTo(b.ID(), entry, nil, nil, nil)
	if d := time.Since(start); err == nil || d > 20*time.Millisecond {
		t.Fatalf("forward to a closed node: %v after %v", err, d)
	}
	if !strings.Contains(err.Error(), "owner node "+b.ID().String()+" is gone") {
		t.Errorf("error %q does not name the owner", err)
	}
}

// collidingNames finds two node names whose ids are equal (a birthday
// search over 2^32 ids: some 10^5 names).
func collidingNames() (string, string) {
	seen := map[NodeID]string{}
	for i := 0; ; i++ {
		n := fmt.Sprintf("node-%d", i)
		id := NodeIDOf(n)
		if o, ok := seen[id]; ok {
			return o, n
		}
		seen[id] = n
	}
}

// TestClusterNodeIDCollision: two nodes whose names hash to the same id
// refuse each other, each logging why.
func TestClusterNodeIDCollision(t *testing.T) {
	n1, n2 := collidingNames()
	b := newTestCluster(t, n2, testKey)
	a := newTestCluster(t, n1, testKey, b.Addr().String())
	p := waitPeer(t, a, b.Addr().String(), false)
	if !strings.Contains(p.Err, "another --node-id") {
		t.Errorf("peer error %q, want the collision named", p.Err)
	}
	// Never up afterwards either.
	time.Sleep(300 * time.Millisecond)
	for _, p := range a.Peers() {
		if p.Up {
			t.Fatalf("colliding peer up: %+v", p)
		}
	}
}

// TestClusterSelfPeer: every node may be given the same peer list, its
// own address included.
func TestClusterSelfPeer(t *testing.T) {
	b := newTestCluster(t, "node-b", testKey)
	a, err := NewCluster(ClusterConfig{NodeName: "node-b", Key: testKey, Listen: "127.0.0.1:0", Peers: []string{b.Addr().String()}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		ps := a.Peers()
		if ps[0].Self {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("own address not recognised: %+v", ps)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestNodeName(t *testing.T) {
	for _, bad := range []string{"", "a b", "naïve", strings.Repeat("x", 256)} {
		if ValidateNodeName(bad) == nil {
			t.Errorf("node name %q accepted", bad)
		}
	}
	if err := ValidateNodeName("gw-1.eu-west"); err != nil {
		t.Error(err)
	}
	// The id is SHA-256's first 4 bytes: stable across versions.
	if got := NodeIDOf("gw-1").String(); got != "f5135b27" {
		t.Errorf("NodeIDOf(gw-1) = %s", got)
	}
}

func TestForwardHeaderRoundTrip(t *testing.T) {
	for _, h := range []forwardHeader{
		{Owner: NodeID{1, 2, 3, 4}},
		{Owner: NodeID{9, 9, 9, 9}, Remote: &net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 5}, Binding: bytes.Repeat([]byte{7}, 32)},
		{Owner: NodeID{0xff, 0, 0, 1}, Remote: &net.UDPAddr{IP: net.ParseIP("2001:db8::1"), Port: 65535, Zone: "eth0"}},
	} {
		b, err := appendForwardHeader(nil, h)
		if err != nil {
			t.Fatal(err)
		}
		r := bytes.NewReader(append(b, "rest"...))
		got, err := readForwardHeader(r)
		if err != nil {
			t.Fatal(err)
		}
		rest, _ := io.ReadAll(r)
		if got.Owner != h.Owner || fmt.Sprint(got.Remote) != fmt.Sprint(h.Remote) || !bytes.Equal(got.Binding, h.Binding) || string(rest) != "rest" {
			t.Errorf("round trip of %+v: %+v, rest %q", h, got, rest)
		}
	}
	if _, err := appendForwardHeader(nil, forwardHeader{Binding: make([]byte, 65)}); err == nil {
		t.Error("oversized binding encoded")
	}
}

// FuzzForwardHeader: the decoder never reads past its header, never
// panics, and what it accepts encodes back to the bytes it read.
func FuzzForwardHeader(f *testing.F) {
	for _, h := range []forwardHeader{
		{Owner: NodeID{1, 2, 3, 4}},
		{Owner: NodeID{9, 9, 9, 9}, Remote: &net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 5}, Binding: bytes.Repeat([]byte{7}, 32)},
		{Remote: &net.UDPAddr{IP: net.ParseIP("2001:db8::1"), Port: 443}},
	} {
		b, _ := appendForwardHeader(nil, h)
		f.Add(append(b, "tail"...))
	}
	f.Add([]byte("LLFW\x01\x00\x00\x00\x00t\xff"))
	f.Add([]byte("LLFW\x01\x00\x00\x00\x00x\x00\x00"))
	f.Add([]byte("LLFW\x02"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		h, err := readForwardHeader(r)
		if err != nil {
			if !errors.Is(err, errFwdHeader) {
				t.Fatalf("error %v does not wrap errFwdHeader", err)
			}
			return
		}
		used := len(b) - r.Len()
		enc, err := appendForwardHeader(nil, h)
		if err != nil {
			t.Fatalf("accepted header does not encode: %v", err)
		}
		// Addresses are canonicalised ("::ffff:1.2.3.4" and the like),
		// so compare by decoding the encoding again.
		h2, err := readForwardHeader(bytes.NewReader(enc))
		if err != nil || h2.Owner != h.Owner || fmt.Sprint(h2.Remote) != fmt.Sprint(h.Remote) || !bytes.Equal(h2.Binding, h.Binding) {
			t.Fatalf("re-encoding changed %+v to %+v (%v)", h, h2, err)
		}
		if len(enc) > used {
			t.Fatalf("encoding of %d bytes from a header of %d", len(enc), used)
		}
	})
}
