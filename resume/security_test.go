package resume

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// testCert is a throwaway self-signed certificate for TLS links.
func testCert(t testing.TB) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "gw"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{"gw"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// tlsGateway is tcpGateway over TLS; dial opens client links to it.
func tlsGateway(t testing.TB, sc *ServerConfig) (*Server, DialFunc) {
	t.Helper()
	srv, err := NewServer(sc)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{testCert(t)}})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { srv.Serve(ln); close(done) }()
	t.Cleanup(func() { srv.Close(); <-done })
	addr := ln.Addr().String()
	dial := func(ctx context.Context) (net.Conn, error) {
		d := tls.Dialer{Config: &tls.Config{InsecureSkipVerify: true}} // the test checks binding, not the certificate
		return d.DialContext(ctx, "tcp", addr)
	}
	return srv, dial
}

// tlsEnv is an env whose links are TLS over loopback.
func tlsEnv(t testing.TB) *env {
	srv, dial := tlsGateway(t, serverConfig(testConfig()))
	return &env{t: t, srv: srv, dial: dial, stop: func() {}}
}

// A RESUME recorded on one TLS connection (or anywhere the proof was seen)
// is worthless on another: the proof covers keying material only the two
// ends of the original connection can compute. The same RESUME with the
// binding of the connection it travels on is accepted, so the refusal is
// the binding's doing.
func TestResumeProofBoundToTLSLink(t *testing.T) {
	e := tlsEnv(t)
	dial := e.dial
	c, s := e.pair(testConfig())
	defer c.Close()
	defer s.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(s, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}

	ctx := context.Background()
	resumeOn := func(conn net.Conn, binding []byte, counter uint64) (frame.Header, []byte) {
		t.Helper()
		c.s.mu.Lock()
		cred := c.s.cl.cred
		received := c.s.recv.End()
		c.s.unlock()
		_, pub, _ := newKey()
		r := &frame.Resume{SessionID: c.s.id, Counter: counter, Key: pub, Received: received, Window: received + 1<<20}
		r.Proof = cred.resumeProof(r, binding)
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := conn.Write(frame.AppendResume(frame.AppendPreamble(nil), r)); err != nil {
			t.Fatal(err)
		}
		fr := frame.NewReader(conn, 4096)
		h, p, err := readHandshake(fr)
		if err != nil {
			t.Fatal(err)
		}
		return h, p
	}

	// Recorded on link Y, replayed on link X.
	y, err := dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer y.Close()
	by, err := linkBinding(ctx, y)
	if err != nil || len(by) != 32 {
		t.Fatalf("binding of a TLS link: %x, %v", by, err)
	}
	x, err := dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	h, p := resumeOn(x, by, 100)
	if reason := wantReject(t, h, p, frame.CodeAccessDenied); reason == "" {
		t.Fatal("REJECT without a reason")
	}
	// A proof made without a binding (as on plain TCP) does not pass on
	// a TLS link either.
	x2, err := dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer x2.Close()
	h, p = resumeOn(x2, nil, 101)
	wantReject(t, h, p, frame.CodeAccessDenied)

	// The same RESUME bound to the link it travels on is accepted.
	x3, err := dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer x3.Close()
	b3, err := linkBinding(ctx, x3)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(b3, by) {
		t.Fatal("two TLS connections export the same binding")
	}
	if h, _ := resumeOn(x3, b3, 102); h.Type != frame.TypeResumed {
		t.Fatalf("resume bound to its own link: got %v, want RESUMED", h.Type)
	}
}

// The real client resumes over TLS through any number of link losses:
// both ends compute the same binding.
func TestResumeOverTLSWithBinding(t *testing.T) {
	c, s := tlsEnv(t).pair(testConfig())
	defer c.Close()
	defer s.Close()
	var sent []byte
	for i := 0; i < 3; i++ {
		msg := bytes.Repeat([]byte{byte('a' + i)}, 10000)
		sent = append(sent, msg...)
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		c.Kill()
	}
	got := make([]byte, len(sent))
	s.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(s, got); err != nil {
		t.Fatalf("after resumes over TLS: %v", err)
	}
	if !bytes.Equal(got, sent) {
		t.Fatal("bytes differ after resumes over TLS")
	}
	if st := c.Stats(); st.Resumes < 1 {
		t.Fatalf("client resumed %d times, want at least 1", st.Resumes)
	}
}

// hostileHello opens a session on the wire, confirms it with a PING and
// then never reads or acknowledges anything.
func hostileHello(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_, pub, _ := newKey()
	b := frame.AppendPreamble(nil)
	b, _ = frame.AppendHello(b, &frame.Hello{Key: pub, ReconnectTimeout: 10000, Buffer: 8 << 20, Route: "r"})
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	fr := frame.NewReader(c, 4096)
	h, p, err := readHandshake(fr)
	if err != nil || h.Type != frame.TypeWelcome {
		t.Fatalf("HELLO: %v %q %v", h.Type, p, err)
	}
	if _, err := c.Write(frame.AppendU64(nil, frame.TypePing, 1)); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Time{})
	return c
}

// Sessions whose peers never acknowledge cannot take the gateway past its
// memory budget: buffer growth is charged as it happens and writers wait
// at the budget. Before, the budget was only checked at HELLO and each
// session grew to its own limit. An honest session still makes progress
// while the budget is exhausted, and the memory comes back when the
// hostile sessions go.
func TestMemoryBudgetBoundsSessionsThatNeverAck(t *testing.T) {
	const budget = 1 << 20
	const hostile = 12
	cfg := testConfig()
	cfg.BufferSize = 512 << 10 // 12 sessions could hold 6 MiB without the budget
	sc := serverConfig(cfg)
	sc.MemoryBudget = budget
	srv, addr := tcpGateway(t, sc)

	honest, err := Dial(context.Background(), dialTo(addr, nil), "r", testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer honest.Close()
	hs, err := srv.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer hs.Close()

	var wg sync.WaitGroup
	var written atomic.Int64
	stop := make(chan struct{})
	var conns []net.Conn
	var ups []*Conn
	for i := 0; i < hostile; i++ {
		conns = append(conns, hostileHello(t, addr))
		s, err := srv.Accept()
		if err != nil {
			t.Fatal(err)
		}
		ups = append(ups, s)
	}
	for _, s := range ups {
		wg.Add(1)
		go func() { // the upstream streams into a peer that never acks
			defer wg.Done()
			defer s.Reset(CodeAppReset, "test over")
			chunk := bytes.Repeat([]byte("u"), 16<<10)
			s.SetWriteDeadline(time.Now().Add(20 * time.Second))
			for written.Load() < 64<<20 {
				select {
				case <-stop:
					return
				default:
				}
				n, err := s.Write(chunk)
				written.Add(int64(n))
				if err != nil {
					return
				}
			}
		}()
	}
	// Bound: the budget, plus one chunk per session that the floor lets
	// each take, plus the honest session's buffers.
	bound := int64(budget + (hostile+1)*2*chunkSize + 2*cfg.BufferSize)
	deadline := time.Now().Add(10 * time.Second)
	for srv.MemoryInUse() < budget {
		if time.Now().After(deadline) {
			t.Fatalf("budget never reached: %d bytes in use", srv.MemoryInUse())
		}
		time.Sleep(5 * time.Millisecond)
	}
	// While the writers push, memory stays bounded; sample for a while.
	var peak int64
	for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); time.Sleep(2 * time.Millisecond) {
		peak = max(peak, srv.MemoryInUse())
	}
	if peak > bound {
		t.Fatalf("memory in use peaked at %d bytes, budget %d (bound with per-session floor %d)", peak, budget, bound)
	}
	// The honest session is not starved.
	msg := bytes.Repeat([]byte("h"), 200<<10)
	go func() { honest.Write(msg) }()
	got := make([]byte, len(msg))
	hs.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(hs, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("honest session under an exhausted budget: %v", err)
	}
	// New sessions are refused while the budget is exhausted.
	if _, err := Dial(context.Background(), dialTo(addr, nil), "r", testConfig()); !errors.Is(err, ErrLimit) {
		t.Fatalf("HELLO at the budget: %v, want LIMIT", err)
	}
	close(stop)
	for _, c := range conns {
		c.Close()
	}
	for _, s := range ups {
		s.Reset(CodeAppReset, "test over") // unblocks a writer waiting for memory
	}
	wg.Wait()
	deadline = time.Now().Add(10 * time.Second)
	for srv.MemoryInUse() > int64(2*cfg.BufferSize) {
		if time.Now().After(deadline) {
			t.Fatalf("memory not returned after the hostile sessions ended: %d bytes", srv.MemoryInUse())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Concurrent HELLOs cannot all pass a cap together: the check and the
// reservation are one step. (Before, up to MaxHandshakes HELLOs could read
// the count at once and all be admitted.)
func TestConcurrentHellosCannotOvershootUnconfirmedCap(t *testing.T) {
	const perSource = 4
	sc := serverConfig(testConfig())
	sc.MaxUnconfirmedPerSource = perSource
	_, addr := tcpGateway(t, sc)
	const n = 64
	var welcomes, throttled atomic.Int32
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			_, pub, _ := newKey()
			b, _ := frame.AppendHello(frame.AppendPreamble(nil), &frame.Hello{Key: pub, ReconnectTimeout: 10000, Buffer: 1 << 20, Route: "r"})
			<-start
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write(b); err != nil {
				t.Error(err)
				return
			}
			h, p, err := readHandshake(frame.NewReader(c, 4096))
			switch {
			case err != nil:
				t.Error(err)
			case h.Type == frame.TypeWelcome:
				// Never confirmed: it stays counted until the handshake
				// timeout, whatever happens to its link.
				welcomes.Add(1)
			case h.Type == frame.TypeReject:
				// THROTTLED, with the time the gateway needs to free a place.
				if r, _ := frame.ParseReject(p); r.Code == frame.CodeThrottled && r.RetryAfter == sc.Session.HandshakeTimeout {
					throttled.Add(1)
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	if w := welcomes.Load(); w > perSource || w == 0 {
		t.Fatalf("%d of %d concurrent HELLOs from one source got WELCOME, cap %d", w, n, perSource)
	}
	if got := welcomes.Load() + throttled.Load(); got != n {
		t.Fatalf("%d WELCOME + %d THROTTLED of %d HELLOs", welcomes.Load(), throttled.Load(), n)
	}
}

// A HELLO whose receive window is below one DATA frame is refused: the
// gateway could never send it a full frame (the spec's minimum is 64 KiB).
func TestHelloBufferBelowMinimumIsValidation(t *testing.T) {
	srv, addr := tcpGateway(t, serverConfig(testConfig()))
	_, pub, _ := newKey()
	b, _ := frame.AppendHello(frame.AppendPreamble(nil), &frame.Hello{Key: pub, ReconnectTimeout: 1000, Buffer: frame.MaxPayload - 1, Route: "r"})
	h, p := rawExchange(t, addr, b)
	if reason := wantReject(t, h, p, frame.CodeValidation); reason == "" {
		t.Fatal("REJECT without a reason")
	}
	if n := srv.NumSessions(); n != 0 {
		t.Fatalf("%d sessions after a refused HELLO", n)
	}
}

// Links that have not spoken are capped per source and in total, and the
// oldest goes first: a flood of silent sockets cannot keep out a client
// that speaks at once, and one source cannot take every place.
func TestPendingLinksEvictOldest(t *testing.T) {
	var p pendingLinks
	p.init(3, 2)
	conns := make([]net.Conn, 5)
	for i := range conns {
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		conns[i] = a
	}
	add := func(i int, src string) (*pendingLink, []net.Conn) { return p.add(conns[i], src) }
	a0, ev := add(0, "A")
	_, ev1 := add(1, "A")
	if len(ev)+len(ev1) != 0 {
		t.Fatal("evicted below the caps")
	}
	_, ev = add(2, "A") // A's third: its oldest goes
	if len(ev) != 1 || ev[0] != conns[0] {
		t.Fatalf("per-source cap evicted %v, want link 0", ev)
	}
	if p.done(a0) {
		t.Fatal("done reports an evicted link as still pending")
	}
	b3, ev := add(3, "B")
	if len(ev) != 0 || p.len() != 3 {
		t.Fatalf("evicted %v with %d pending", ev, p.len())
	}
	_, ev = add(4, "B") // the total cap: the oldest of all goes
	if len(ev) != 1 || ev[0] != conns[1] {
		t.Fatalf("total cap evicted %v, want link 1", ev)
	}
	if !p.done(b3) || p.len() != 2 {
		t.Fatalf("done on a pending link: %d left, want 2", p.len())
	}
}
