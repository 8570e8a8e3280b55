//go:build linux

// Hostile wire clients (issue 8): hand-written peers on loopback that
// speak the frame protocol byte by byte and do what no well-behaved
// lifeline peer does: ACK what the current link never wrote, RESUME from
// stale or bogus points, flood the gateway with HELLOs that never confirm
// or sockets that never speak. Every test checks bytes and states.
//
// Linux only: the tests use source addresses 127.0.0.2.. (routable on
// Linux's loopback without configuration) and set SO_RCVBUF before
// connect.

package resume

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
	"golang.org/x/sys/unix"
)

// ---------------------------------------------------------------------
// The wire client.

// hopts shapes a wire client's socket.
type hopts struct {
	rcvbuf int    // SO_RCVBUF, set before connect (0: the kernel's default)
	src    string // source IP ("127.0.0.2"); "": whatever the kernel picks
}

// hlink is one raw TCP link spoken by hand: frames in, frames out.
type hlink struct {
	c   *net.TCPConn
	fr  *frame.Reader
	wmu sync.Mutex
}

// hdialErr dials addr with o; for goroutines, which may not call t.Fatal.
func hdialErr(addr string, o hopts) (*hlink, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	if o.src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(o.src)}
	}
	if o.rcvbuf > 0 {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, o.rcvbuf)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	// A small read-ahead, so that not reading really leaves the bytes in
	// the kernel (and the gateway's writer blocked).
	return &hlink{c: c.(*net.TCPConn), fr: frame.NewReader(c, 4096)}, nil
}

func hdial(t testing.TB, addr string, o hopts) *hlink {
	t.Helper()
	l, err := hdialErr(addr, o)
	if err != nil {
		t.Fatalf("dial %s (source %q): %v", addr, o.src, err)
	}
	t.Cleanup(l.close)
	return l
}

func (l *hlink) close() { l.c.Close() }

func (l *hlink) send(b []byte) error {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	l.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := l.c.Write(b)
	return err
}

func (l *hlink) ack(received, window uint64, flags uint8) error {
	return l.send(frame.AppendAck(nil, frame.Ack{Received: received, Window: window, Flags: flags}))
}

func (l *hlink) ping(v uint64) error { return l.send(frame.AppendU64(nil, frame.TypePing, v)) }

// data sends p as DATA frames of at most MaxPayload.
func (l *hlink) data(p []byte) error {
	var b []byte
	for len(p) > 0 {
		n := min(len(p), frame.MaxPayload)
		b = append(frame.AppendDataHeader(b, n), p[:n]...)
		p = p[n:]
	}
	return l.send(b)
}

// hframe is one frame read whole (a DATA payload included).
type hframe struct {
	typ frame.Type
	p   []byte
}

func (f hframe) codeReason() frame.CodeReason {
	cr, _ := frame.ParseCodeReason(f.p)
	return cr
}

// next reads one frame within d. After a timeout the link is unusable (the
// reader may be inside a frame).
func (l *hlink) next(d time.Duration) (hframe, error) {
	l.c.SetReadDeadline(time.Now().Add(d))
	h, err := l.fr.Next()
	if err != nil {
		return hframe{}, err
	}
	if h.Type == frame.TypeData {
		p := make([]byte, h.Len)
		for n := 0; n < h.Len; {
			k, err := l.fr.ReadData(p[n:])
			n += k
			if err != nil {
				return hframe{}, err
			}
		}
		return hframe{h.Type, p}, nil
	}
	p, err := l.fr.Payload(h)
	if err != nil {
		return hframe{}, err
	}
	return hframe{h.Type, append([]byte(nil), p...)}, nil
}

// hsess is what a wire client knows of its session, across links.
type hsess struct {
	id      SessionID
	cred    credential
	counter uint64
	welcome *frame.Welcome
}

// hello sends the preamble and HELLO and reads the answer within d: the
// session on WELCOME, or the REJECT.
func (l *hlink) hello(route string, buffer uint32, d time.Duration) (*hsess, *frame.CodeReason, error) {
	priv, pub, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	b, err := frame.AppendHello(frame.AppendPreamble(nil),
		&frame.Hello{Key: pub, ReconnectTimeout: 60000, Buffer: buffer, Route: route})
	if err != nil {
		return nil, nil, err
	}
	if err := l.send(b); err != nil {
		return nil, nil, fmt.Errorf("send HELLO: %w", err)
	}
	f, err := l.next(d)
	if err != nil {
		return nil, nil, fmt.Errorf("await WELCOME: %w", err)
	}
	switch f.typ {
	case frame.TypeReject:
		cr := f.codeReason()
		return nil, &cr, nil
	case frame.TypeWelcome:
	default:
		return nil, nil, fmt.Errorf("%v instead of WELCOME or REJECT", f.typ)
	}
	w, err := frame.ParseWelcome(f.p)
	if err != nil {
		return nil, nil, err
	}
	secret, err := shared(priv, w.Key)
	if err != nil {
		return nil, nil, err
	}
	sid := SessionID(w.SessionID)
	return &hsess{id: sid, cred: hInitialCredential(secret, sid, pub, w.Key), welcome: w}, nil, nil
}

// mustHello opens a session on route and confirms it with a PING.
func mustHello(t testing.TB, l *hlink, route string, buffer uint32) *hsess {
	t.Helper()
	s, cr, err := l.hello(route, buffer, 5*time.Second)
	if err != nil {
		t.Fatalf("HELLO: %v", err)
	}
	if cr != nil {
		t.Fatalf("HELLO refused: %v %q", cr.Code, cr.Reason)
	}
	if err := l.ping(1); err != nil {
		t.Fatal(err)
	}
	return s
}

// resume sends the preamble and a RESUME with a valid proof, and reads the
// answer: RESUMED (whose proof it checks; the credential rotates) or REJECT.
func (l *hlink) resume(s *hsess, received, window uint64, flags uint8) (*frame.Resumed, *frame.CodeReason, error) {
	priv, pub, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	s.counter++
	r := &frame.Resume{SessionID: s.id, Counter: s.counter, Key: pub, Received: received, Window: window, Flags: flags}
	r.Proof = hResumeProof(s.cred, r)
	if err := l.send(frame.AppendResume(frame.AppendPreamble(nil), r)); err != nil {
		return nil, nil, fmt.Errorf("send RESUME: %w", err)
	}
	f, err := l.next(5 * time.Second)
	if err != nil {
		return nil, nil, fmt.Errorf("await RESUMED: %w", err)
	}
	switch f.typ {
	case frame.TypeReject:
		cr := f.codeReason()
		return nil, &cr, nil
	case frame.TypeResumed:
	default:
		return nil, nil, fmt.Errorf("%v instead of RESUMED or REJECT", f.typ)
	}
	d, err := frame.ParseResumed(f.p)
	if err != nil {
		return nil, nil, err
	}
	if !verify(hResumedProof(s.cred, r, d), d.Proof) {
		return nil, nil, errors.New("RESUMED proof does not verify")
	}
	secret, err := shared(priv, d.Key)
	if err != nil {
		return nil, nil, err
	}
	s.cred = s.cred.rotate(secret, s.id, r.Counter)
	return d, nil, nil
}

// hstream checks received DATA against what this session's stream must
// hold at each offset.
type hstream struct {
	want     func(off uint64) byte
	off      uint64 // stream offset of the next DATA byte on the current link
	high     uint64 // highest offset received on any link
	total    int    // DATA bytes received
	bad      int    // of which not this session's
	firstBad uint64
	sample   []byte // the received bytes from the first bad one on
}

func (st *hstream) data(p []byte) {
	for i, b := range p {
		if b != st.want(st.off+uint64(i)) {
			if st.bad == 0 {
				st.firstBad = st.off + uint64(i)
			}
			st.bad++
		}
		if st.bad > 0 && len(st.sample) < 40 {
			st.sample = append(st.sample, b)
		}
	}
	st.off += uint64(len(p))
	st.total += len(p)
	st.high = max(st.high, st.off)
}

func (st *hstream) err() error {
	if st.bad == 0 {
		return nil
	}
	what := "foreign"
	if bytes.Contains(st.sample, []byte("MARKER")) {
		what = "foreign (another session's marker)"
	}
	return fmt.Errorf("%d of %d DATA bytes received were %s: first at stream offset %d: %q",
		st.bad, st.total, what, st.firstBad, st.sample)
}

// pump reads frames into st until done holds (nil, nil), a RESET arrives
// (it is returned), or the link fails or d passes (the error). It answers
// PINGs and passes every frame to on, if set.
func (l *hlink) pump(st *hstream, d time.Duration, done func() bool, on func(hframe) error) (*frame.CodeReason, error) {
	deadline := time.Now().Add(d)
	for !done() {
		left := time.Until(deadline)
		if left <= 0 {
			return nil, fmt.Errorf("timed out after %v with the stream at %d", d, st.off)
		}
		f, err := l.next(left)
		if err != nil {
			return nil, fmt.Errorf("link failed with the stream at %d: %w", st.off, err)
		}
		switch f.typ {
		case frame.TypeData:
			st.data(f.p)
		case frame.TypeReset:
			cr := f.codeReason()
			return &cr, nil
		case frame.TypePing:
			l.send(frame.AppendU64(nil, frame.TypePong, 0))
		}
		if on != nil {
			if err := on(f); err != nil {
				return nil, err
			}
		}
	}
	return nil, nil
}

// pat is the byte at off of the deterministic stream seed.
func pat(seed, off uint64) byte {
	x := seed*0x9e3779b97f4a7c15 ^ (off>>3)*0xbf58476d1ce4e5b9
	x ^= x >> 31
	x *= 0x94d049bb133111eb
	x ^= x >> 29
	return byte(x >> (8 * (off & 7)))
}

func fill(seed, off uint64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = pat(seed, off+uint64(i))
	}
	return b
}

func patFunc(seed uint64) func(uint64) byte { return func(o uint64) byte { return pat(seed, o) } }

// eventually polls cond every 2 ms until it holds or d passes.
func eventually(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(2 * time.Millisecond)
	}
	return true
}

func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	if !eventually(d, cond) {
		t.Fatalf("%s: not within %v", what, d)
	}
}

// ---------------------------------------------------------------------
// The gateway under attack: a real Server on loopback whose sessions, by
// route, echo ("echo"), stream a marker ("mark..."), or wait for the test
// to drive them (anything else).

type hgw struct {
	srv   *Server
	addr  string
	mu    sync.Mutex
	conns map[SessionID]*Conn
	wg    sync.WaitGroup
}

func startHGW(t testing.TB, sc *ServerConfig) *hgw { return startHGWSndbuf(t, sc, 0) }

// startHGWSndbuf gives the gateway's link sockets an SO_SNDBUF of sndbuf
// bytes (0: the kernel's). On loopback Linux grows a socket's send buffer
// to megabytes, so a 256 KiB writev would land in the kernel at once even
// towards a peer that reads nothing; a small one keeps the writev blocked
// on the replay buffer's chunks, as on a real path.
func startHGWSndbuf(t testing.TB, sc *ServerConfig, sndbuf int) *hgw {
	t.Helper()
	srv, err := NewServer(sc)
	if err != nil {
		t.Fatal(err)
	}
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener = tl
	if sndbuf > 0 {
		ln = sndbufListener{tl, sndbuf}
	}
	g := &hgw{srv: srv, addr: ln.Addr().String(), conns: map[SessionID]*Conn{}}
	served := make(chan struct{})
	go func() { srv.Serve(ln); close(served) }()
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		for {
			c, err := srv.Accept()
			if err != nil {
				return
			}
			g.add(c)
		}
	}()
	t.Cleanup(func() { srv.Close(); <-served; g.wg.Wait() })
	return g
}

type sndbufListener struct {
	net.Listener
	n int
}

func (l sndbufListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		err = c.(*net.TCPConn).SetWriteBuffer(l.n)
	}
	return c, err
}

func (g *hgw) add(c *Conn) {
	g.mu.Lock()
	g.conns[c.SessionID()] = c
	g.mu.Unlock()
	route := c.Route()
	switch {
	case route == "echo":
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			c.WriteTo(c)
			c.Close()
		}()
	case strings.HasPrefix(route, "mark"):
		unit := markerUnit(route)
		buf := bytes.Repeat(unit, (32<<10)/len(unit))
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			for i := 0; i < 1<<20; i++ { // bounded: 32 GiB
				if _, err := c.Write(buf); err != nil {
					break
				}
			}
			c.Close()
		}()
	}
}

// conn is the gateway side of session id, once accepted.
func (g *hgw) conn(t testing.TB, id SessionID) *Conn {
	t.Helper()
	var c *Conn
	waitFor(t, 5*time.Second, "gateway accepts session "+id.String(), func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		c = g.conns[id]
		return c != nil
	})
	return c
}

func markerUnit(route string) []byte { return []byte("<" + route + "-MARKER>") }

// hmarker is a real client of a marker session: it reads the stream and
// checks every byte is its own marker.
type hmarker struct {
	c    *Conn
	unit []byte
	got  atomic.Int64
	err  atomic.Pointer[error]
	done chan struct{}
}

func (g *hgw) marker(t testing.TB, route string) *hmarker {
	t.Helper()
	dial := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", g.addr)
	}
	c, err := Dial(context.Background(), dial, route, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	m := &hmarker{c: c, unit: markerUnit(route), done: make(chan struct{})}
	go m.read()
	t.Cleanup(func() { c.Reset(CodeAppReset, "test over"); <-m.done })
	return m
}

func (m *hmarker) read() {
	defer close(m.done)
	buf := make([]byte, 64<<10)
	var off uint64
	for {
		n, err := m.c.Read(buf)
		for i := range n {
			if want := m.unit[(off+uint64(i))%uint64(len(m.unit))]; buf[i] != want {
				e := fmt.Errorf("marker session %s: byte at %d is %q, want %q: %q",
					m.unit, off+uint64(i), buf[i], want, buf[i:min(n, i+40)])
				m.err.Store(&e)
				return
			}
		}
		off += uint64(n)
		m.got.Add(int64(n))
		if err != nil {
			return
		}
	}
}

func (m *hmarker) check(t testing.TB) {
	t.Helper()
	if e := m.err.Load(); e != nil {
		t.Error(*e)
	}
}

// waitProgress waits until the marker sessions together have received n
// more bytes, or d passes.
func waitProgress(ms []*hmarker, n int64, d time.Duration) bool {
	sum := func() (s int64) {
		for _, m := range ms {
			s += m.got.Load()
		}
		return s
	}
	start := sum()
	return eventually(d, func() bool { return sum()-start >= n })
}

// wantEnded waits for the gateway side of a session to end and checks its
// error is an *Error with code.
func wantEnded(t testing.TB, c *Conn, code frame.Code) {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatalf("gateway session still %v, want it ended with %v", c.State(), code)
	}
	var e *Error
	if err := c.Err(); !errors.As(err, &e) || e.Code != code {
		t.Fatalf("gateway session ended with %v, want an *Error with %v", c.Err(), code)
	}
}

// ---------------------------------------------------------------------
// 1. Session isolation.

// The reproduction of the cross-session leak, step by step: a
// client makes the gateway replay 512 KiB into a socket that does not
// read, acknowledges half of it while the writev still sends from those
// chunks, and another session streams its marker meanwhile. Every byte
// the attacker then reads must be its own.
func TestHostileAckCannotReadOtherSessionsBytes(t *testing.T) {
	g := startHGWSndbuf(t, serverConfig(testConfig()), 8<<10)
	mk := g.marker(t, "markB")

	const total = 512 << 10
	const win = 8 << 20
	const seed = 0xA11CE
	old := hdial(t, g.addr, hopts{})
	sa := mustHello(t, old, "echo", win)

	// Echo 512 KiB through A and read it all, without ever ACKing.
	st := &hstream{want: patFunc(seed)}
	sent := make(chan error, 1)
	go func() { sent <- old.data(fill(seed, 0, total)) }()
	cr, err := old.pump(st, 10*time.Second, func() bool { return st.off >= total }, nil)
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if err != nil || cr != nil {
		t.Fatalf("echo of %d bytes: %v, RESET %v", total, err, cr)
	}
	if err := st.err(); err != nil {
		t.Fatalf("before the attack: %v", err)
	}
	gc := g.conn(t, sa.id)

	// RESUME with received=0 from a socket with a 4 KiB receive buffer, and
	// do not read: the gateway's writev of the replay blocks.
	nl := hdial(t, g.addr, hopts{rcvbuf: 4 << 10})
	d, rej, err := nl.resume(sa, 0, win, 0)
	if err != nil {
		t.Fatal(err)
	}
	if rej != nil {
		t.Fatalf("RESUME(received=0): REJECT %v %q", rej.Code, rej.Reason)
	}
	old.close()
	if d.Received != total {
		t.Fatalf("RESUMED.received %d, want %d", d.Received, total)
	}
	st.off = resendOf(d, 0)
	if st.off != 0 {
		t.Fatalf("RESUMED resends from %d; nothing was acknowledged, want 0", st.off)
	}
	// ACK 256 KiB: as much as the blocked writev collected, none of which
	// has reached us on this link.
	if err := nl.ack(256<<10, win, 0); err != nil {
		t.Fatal(err)
	}
	// Session B streams its marker meanwhile, churning the chunk pool.
	if !waitProgress([]*hmarker{mk}, 4<<20, 3*time.Second) {
		t.Logf("marker session moved only %d bytes", mk.got.Load())
	}

	// Now read everything the gateway sends on the resumed link.
	cr, err = nl.pump(st, 10*time.Second, func() bool { return st.off >= total }, nil)
	if err := st.err(); err != nil {
		t.Fatalf("replay after the hostile ACK: %v", err)
	}
	switch {
	case cr != nil:
		if cr.Code != frame.CodeValidation {
			t.Fatalf("session ended with RESET %v %q; only VALIDATION is acceptable", cr.Code, cr.Reason)
		}
		wantEnded(t, gc, frame.CodeValidation)
		t.Logf("outcome: RESET VALIDATION (%q) after %d bytes, all the session's own", cr.Reason, st.total)
	case err != nil:
		t.Fatalf("resumed link: %v (no RESET)", err)
	default:
		// It goes on: one more echo, byte-exact.
		if err := nl.data(fill(seed, total, 1000)); err != nil {
			t.Fatal(err)
		}
		cr, err = nl.pump(st, 5*time.Second, func() bool { return st.off >= total+1000 }, nil)
		if err != nil || cr != nil {
			t.Fatalf("after the replay: %v, RESET %v", err, cr)
		}
		if err := st.err(); err != nil {
			t.Fatal(err)
		}
		if s := gc.State(); s != StateActive {
			t.Fatalf("gateway session %v, want ACTIVE", s)
		}
		t.Logf("outcome: the session continued; %d bytes received, all its own", st.total)
	}
	mk.check(t)
}

// hround counts what one hostile client did.
type hround struct {
	rounds, resumes, acks, resets, sessions int
	verified                                int
}

// TestConcurrentAckWriteResumeNeverLeaks races hostile ACKs, writes and
// resumes on random tiny receive buffers against sessions streaming
// distinct markers, and checks that no byte ever crosses sessions.
func TestConcurrentAckWriteResumeNeverLeaks(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	cfg := testConfig()
	cfg.BufferSize = 1 << 20
	g := startHGWSndbuf(t, serverConfig(cfg), 8<<10)
	ms := []*hmarker{g.marker(t, "markC"), g.marker(t, "markD")}

	const clients = 2
	var rounds atomic.Int64
	deadline := time.Now().Add(10 * time.Second)
	var wg sync.WaitGroup
	res := make([]hround, clients)
	errs := make([]error, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(i)))
			errs[i] = hostileRounds(g, ms, r, uint64(i+1)<<32, &rounds, 30, deadline, &res[i])
		}()
	}
	wg.Wait()
	var sum hround
	for i, err := range errs {
		if err != nil {
			t.Errorf("hostile client %d: %v", i, err)
		}
		sum.rounds += res[i].rounds
		sum.resumes += res[i].resumes
		sum.acks += res[i].acks
		sum.resets += res[i].resets
		sum.sessions += res[i].sessions
		sum.verified += res[i].verified
	}
	for _, m := range ms {
		m.check(t)
	}
	t.Logf("%d rounds, %d sessions, %d hostile resumes, %d hostile ACKs, %d VALIDATION resets, %d bytes checked, markers %d+%d bytes",
		sum.rounds, sum.sessions, sum.resumes, sum.acks, sum.resets, sum.verified, ms[0].got.Load(), ms[1].got.Load())
	if sum.rounds < 5 || sum.resumes == 0 || sum.verified == 0 {
		t.Errorf("too little happened: %+v", sum)
	}
}

// hostileRounds runs rounds of one hostile client: random upstream
// writes echoed back, random ACKs (never above what it received, often
// leaving a backlog unacknowledged), and random resumes from random points
// on sockets with tiny receive buffers, ACKing right after RESUMED, before
// reading anything on the new link: mostly within the first write batch
// the gateway replays (what its blocked writev is sending), sometimes
// anywhere up to what was received.
func hostileRounds(g *hgw, ms []*hmarker, r *rand.Rand, seed uint64, rounds *atomic.Int64, maxRounds int64, deadline time.Time, out *hround) error {
	const win = 8 << 20
	const backlog = 640 << 10 // most unacknowledged bytes we keep (the gateway's buffer is 1 MiB)
	var links []*hlink
	defer func() {
		for _, l := range links {
			l.close()
		}
	}()
	var (
		l       *hlink
		s       *hsess
		st      *hstream
		upSent  uint64 // next upstream offset to send on l
		peerWin uint64 // the gateway accepts upstream up to here
		lastAck uint64 // highest ACK sent
	)
	open := func() error {
		nl, err := hdialErr(g.addr, hopts{})
		if err != nil {
			return err
		}
		links = append(links, nl)
		ns, cr, err := nl.hello("echo", win, 5*time.Second)
		if err != nil {
			return err
		}
		if cr != nil {
			return fmt.Errorf("HELLO: REJECT %v %q", cr.Code, cr.Reason)
		}
		if err := nl.ping(1); err != nil {
			return err
		}
		seed++
		l, s, st = nl, ns, &hstream{want: patFunc(seed)}
		upSent, lastAck, peerWin = 0, 0, uint64(ns.welcome.Buffer)
		out.sessions++
		return nil
	}
	defer func() {
		if st != nil {
			out.verified += st.total
		}
	}()
	randIn := func(lo, hi uint64) uint64 { return lo + r.Uint64N(hi-lo+1) }
	ack := func(a uint64) error {
		lastAck = max(lastAck, a)
		out.acks++
		return l.ack(lastAck, st.high+win, 0)
	}
	if err := open(); err != nil {
		return err
	}
	for rounds.Add(1) <= maxRounds && time.Now().Before(deadline) {
		out.rounds++
		ended := false
		if r.IntN(3) != 0 && st.high > lastAck {
			out.resumes++
			from := randIn(lastAck, st.high)
			nl, err := hdialErr(g.addr, hopts{rcvbuf: 2 << 10 << r.IntN(4)})
			if err != nil {
				return err
			}
			links = append(links, nl)
			d, cr, err := nl.resume(s, from, st.high+win, 0)
			if err != nil {
				return fmt.Errorf("RESUME(received=%d): %w", from, err)
			}
			if cr != nil {
				if cr.Code != frame.CodeValidation {
					return fmt.Errorf("RESUME(received=%d) of a live session: REJECT %v %q", from, cr.Code, cr.Reason)
				}
				ended = true // a hostile ACK earlier ended it: acceptable
			} else {
				if got := resendOf(d, from); got != from {
					return fmt.Errorf("RESUME(received=%d) after ACKs up to %d: RESUMED resends from %d", from, lastAck, got)
				}
				if r.IntN(2) == 0 {
					l.close() // else left open: the gateway retires it
				}
				l, st.off, upSent = nl, from, d.Received
				peerWin = max(peerWin, d.Window)
				// RESUME.received acknowledges like an ACK (the gateway may
				// free below it): a later resume may not start below it.
				lastAck = max(lastAck, from)
				hi := st.high
				if r.IntN(4) != 0 {
					hi = min(hi, from+writeBatch)
				}
				for k := 1 + r.IntN(3); k > 0; k-- {
					if err := ack(randIn(lastAck, hi)); err != nil {
						return err
					}
				}
				// Do not read while the marker sessions churn the pool.
				waitProgress(ms, 1<<20, 300*time.Millisecond)
			}
		}
		if !ended {
			// New upstream bytes, within the gateway's window; the echo
			// comes back.
			if end := min(upSent+uint64(1+r.IntN(256<<10)), peerWin); end > upSent {
				if err := l.data(fill(seed, upSent, int(end-upSent))); err != nil {
					return fmt.Errorf("send upstream [%d, %d): %w", upSent, end, err)
				}
				upSent = end
			}
			on := func(f hframe) error {
				switch f.typ {
				case frame.TypeAck:
					if a, err := frame.ParseAck(f.p); err == nil {
						peerWin = max(peerWin, a.Window)
					}
				case frame.TypeData:
					switch {
					case st.high-lastAck > backlog:
						return ack(st.high - backlog/2)
					case r.IntN(4) == 0:
						return ack(randIn(lastAck, st.high))
					}
				}
				return nil
			}
			cr, err := l.pump(st, 5*time.Second, func() bool { return st.off >= upSent }, on)
			if err := st.err(); err != nil {
				return err
			}
			switch {
			case cr != nil && cr.Code == frame.CodeValidation:
				ended = true
			case cr != nil:
				return fmt.Errorf("RESET %v %q", cr.Code, cr.Reason)
			case err != nil:
				return err
			default:
				// Leave a random backlog unacknowledged for the next resume.
				if err := ack(randIn(lastAck, st.high)); err != nil {
					return err
				}
			}
		}
		if ended {
			out.resets++
			out.verified += st.total
			if err := open(); err != nil {
				return err
			}
		}
	}
	return nil
}

// ---------------------------------------------------------------------
// 1b. Offsets beyond what was ever sent.

// An ACK, or a RESUME, for bytes the gateway never handed to any socket
// is a protocol violation (VALIDATION) that ends the session; the old
// check was against bytes written by the application or merely collected
// for a write.
func TestAckForBytesNeverSentIsValidation(t *testing.T) {
	g := startHGW(t, serverConfig(testConfig()))
	const win = 64 << 10 // the client's window: the gateway can send no more
	const seed = 0xB0B

	open := func() (*hlink, *hsess, *Conn, *hstream) {
		l := hdial(t, g.addr, hopts{})
		s := mustHello(t, l, "hold", win)
		c := g.conn(t, s.id)
		// The application writes 256 KiB; the window lets 64 KiB out.
		if _, err := c.Write(fill(seed, 0, 256<<10)); err != nil {
			t.Fatal(err)
		}
		st := &hstream{want: patFunc(seed)}
		if cr, err := l.pump(st, 5*time.Second, func() bool { return st.off >= win }, nil); err != nil || cr != nil {
			t.Fatalf("first %d bytes: %v, RESET %v", win, err, cr)
		}
		if err := st.err(); err != nil {
			t.Fatal(err)
		}
		return l, s, c, st
	}

	t.Run("ACK", func(t *testing.T) {
		l, _, c, st := open()
		// 128 KiB: written by the application, never put on any link.
		if err := l.ack(128<<10, win, 0); err != nil {
			t.Fatal(err)
		}
		cr, err := l.pump(st, 5*time.Second, func() bool { return false }, nil)
		if cr == nil {
			t.Fatalf("ACK for 128 KiB when %d bytes were sent: no RESET (%v); stream at %d", win, err, st.off)
		}
		if cr.Code != frame.CodeValidation {
			t.Fatalf("ACK beyond what was sent: RESET %v %q, want VALIDATION", cr.Code, cr.Reason)
		}
		if st.off != win {
			t.Fatalf("gateway sent %d bytes, beyond the window %d", st.off, win)
		}
		// Then the gateway closes the link.
		if f, err := l.next(5 * time.Second); err == nil {
			t.Fatalf("after RESET: %v, want the link closed", f.typ)
		}
		wantEnded(t, c, frame.CodeValidation)
	})

	t.Run("RESUME", func(t *testing.T) {
		_, s, c, _ := open()
		nl := hdial(t, g.addr, hopts{})
		d, cr, err := nl.resume(s, 128<<10, 128<<10+win, 0)
		if err != nil {
			t.Fatal(err)
		}
		if cr == nil {
			t.Fatalf("RESUME(received=128 KiB) when %d bytes were sent: RESUMED (received %d, window %d), want REJECT VALIDATION",
				win, d.Received, d.Window)
		}
		if cr.Code != frame.CodeValidation {
			t.Fatalf("RESUME beyond what was sent: REJECT %v %q, want VALIDATION", cr.Code, cr.Reason)
		}
		wantEnded(t, c, frame.CodeValidation)
	})
}

// ---------------------------------------------------------------------
// 2. Handshake floods.

// refusals counts ServerConfig.OnRefuse calls by code.
type refusals struct {
	mu      sync.Mutex
	byCode  map[frame.Code]int
	reasons map[string]int
}

func countRefusals(sc *ServerConfig) *refusals {
	r := &refusals{byCode: map[frame.Code]int{}, reasons: map[string]int{}}
	setOnRefuse(sc, func(reason string, code frame.Code) {
		r.mu.Lock()
		r.byCode[code]++
		r.reasons[reason]++
		r.mu.Unlock()
	})
	return r
}

func (r *refusals) code(c frame.Code) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.byCode[c]
}

func (r *refusals) total() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, k := range r.byCode {
		n += k
	}
	return n
}

func (r *refusals) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return fmt.Sprint(r.reasons)
}

func answerString(cr *frame.CodeReason) string {
	if cr == nil {
		return "WELCOME"
	}
	return fmt.Sprintf("REJECT %v %q", cr.Code, cr.Reason)
}

// echoSome sends n more upstream bytes and reads their echo.
func echoSome(t testing.TB, l *hlink, st *hstream, seed uint64, from uint64, n int) {
	t.Helper()
	if err := l.data(fill(seed, from, n)); err != nil {
		t.Fatal(err)
	}
	end := from + uint64(n)
	cr, err := l.pump(st, 5*time.Second, func() bool { return st.off >= end }, nil)
	if err != nil || cr != nil {
		t.Fatalf("echo up to %d: %v, RESET %v", end, err, cr)
	}
	if err := st.err(); err != nil {
		t.Fatal(err)
	}
}

// MaxHandshakes+50 HELLOs whose sockets close right after WELCOME must not
// hold the handshake slots: another client's HELLO gets WELCOME at once, a
// parked session's owner resumes, and the unconfirmed sessions are gone
// after the handshake timeout.
func TestUnconfirmedHellosDoNotLockOutHandshakes(t *testing.T) {
	cfg := testConfig()
	// Long enough that a flood HELLO on a loaded CI machine (the whole
	// suite under -race on 2 cores) is answered before its link's
	// handshake deadline closes it (500 ms was not, about 1 run in 10).
	cfg.HandshakeTimeout = 2 * time.Second
	cfg.ReconnectTimeout = 30 * time.Second
	sc := serverConfig(cfg)
	ref := countRefusals(sc)
	g := startHGW(t, sc)
	flood := sc.MaxHandshakes + 50
	const seed = 0x0A

	// A confirmed session, parked: its link dropped.
	owner := hdial(t, g.addr, hopts{})
	so := mustHello(t, owner, "echo", 1<<20)
	st := &hstream{want: patFunc(seed)}
	echoSome(t, owner, st, seed, 0, 10000)
	gc := g.conn(t, so.id)
	owner.close()
	waitFor(t, 5*time.Second, "owner's session parked", func() bool { return gc.State() == StateDisconnected })

	// The flood, 32 at a time, from 5 source addresses (62 each: under the
	// per-source cap of unconfirmed sessions, so that more than
	// MaxHandshakes of them exist at once).
	const sources = 5
	type answer struct {
		welcome bool
		code    frame.Code
		err     error
	}
	answers := make(chan answer, flood)
	sem := make(chan struct{}, 32)
	start := time.Now()
	for i := range flood {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			l, err := hdialErr(g.addr, hopts{src: fmt.Sprintf("127.0.1.%d", 1+i%sources)})
			if err != nil {
				answers <- answer{err: err}
				return
			}
			defer l.close()
			s, cr, err := l.hello("echo", 1<<20, 10*time.Second)
			switch {
			case err != nil:
				answers <- answer{err: err}
			case cr != nil:
				answers <- answer{code: cr.Code}
			default:
				answers <- answer{welcome: s != nil}
			}
		}()
	}
	welcomes, throttled := 0, 0
	for i := range flood {
		select {
		case a := <-answers:
			switch {
			case a.err != nil:
				t.Fatalf("flood HELLO: %v", a.err)
			case a.welcome:
				welcomes++
			case a.code == frame.CodeThrottled:
				throttled++
			default:
				t.Fatalf("flood HELLO: REJECT %v, want WELCOME or THROTTLED", a.code)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("flood: %d of %d HELLOs unanswered after 30 s", flood-i, flood)
		}
	}
	t.Logf("flood of %d HELLOs in %v: %d WELCOME, %d THROTTLED; refusals %v",
		flood, time.Since(start).Round(time.Millisecond), welcomes, throttled, ref)

	// Another source's HELLO is served at once.
	t0 := time.Now()
	legit := hdial(t, g.addr, hopts{src: "127.0.0.2"})
	_, cr, err := legit.hello("echo", 1<<20, 10*time.Second)
	el := time.Since(t0)
	if err != nil {
		t.Fatalf("legitimate HELLO after the flood: %v (after %v)", err, el)
	}
	if cr != nil {
		t.Fatalf("legitimate HELLO after the flood: REJECT %v %q after %v", cr.Code, cr.Reason, el)
	}
	if el > cfg.HandshakeTimeout/2 {
		t.Fatalf("legitimate HELLO answered after %v; handshake timeout is %v", el, cfg.HandshakeTimeout)
	}
	if err := legit.ping(1); err != nil {
		t.Fatal(err)
	}
	stl := &hstream{want: patFunc(seed + 1)}
	echoSome(t, legit, stl, seed+1, 0, 1000)

	// The parked session's owner resumes, from a flooder's address.
	t0 = time.Now()
	nl := hdial(t, g.addr, hopts{src: "127.0.1.1"})
	d, rej, err := nl.resume(so, st.high, st.high+1<<20, 0)
	if err != nil {
		t.Fatalf("owner's RESUME after the flood: %v", err)
	}
	if rej != nil {
		t.Fatalf("owner's RESUME after the flood: REJECT %v %q after %v", rej.Code, rej.Reason, time.Since(t0))
	}
	if d.Received != 10000 {
		t.Fatalf("RESUMED.received %d, want 10000", d.Received)
	}
	st.off = resendOf(d, st.high)
	echoSome(t, nl, st, seed, 10000, 5000)

	// The unconfirmed sessions go within the handshake timeout.
	waitFor(t, cfg.HandshakeTimeout+3*time.Second, "no unconfirmed sessions", func() bool { return unconfirmed(g.srv) == 0 })
	waitFor(t, 2*time.Second, "only the two real sessions left", func() bool { return g.srv.NumSessions() == 2 })
	if ref.code(frame.CodeThrottled) < throttled {
		t.Fatalf("%d HELLOs THROTTLED, OnRefuse counted %d (%v)", throttled, ref.code(frame.CodeThrottled), ref)
	}
}

// Sockets that connect and say nothing must not delay anyone's HELLO.
func TestSilentSocketsDoNotDelayHello(t *testing.T) {
	cfg := testConfig()
	cfg.HandshakeTimeout = 5 * time.Second
	g := startHGW(t, serverConfig(cfg))
	silent := make([]*hlink, 0, 300)
	for range 300 {
		silent = append(silent, hdial(t, g.addr, hopts{}))
	}
	t0 := time.Now()
	l := hdial(t, g.addr, hopts{src: "127.0.0.2"})
	_, cr, err := l.hello("echo", 1<<20, 10*time.Second)
	el := time.Since(t0)
	if err != nil {
		t.Fatalf("HELLO behind 300 silent sockets: %v after %v", err, el)
	}
	if cr != nil {
		t.Fatalf("HELLO behind 300 silent sockets: REJECT %v %q after %v", cr.Code, cr.Reason, el)
	}
	if el > time.Second {
		t.Fatalf("HELLO behind 300 silent sockets answered after %v (handshake timeout %v)", el, cfg.HandshakeTimeout)
	}
	l.ping(1)
	const seed = 0x51
	echoSome(t, l, &hstream{want: patFunc(seed)}, seed, 0, 1000)
	t.Logf("HELLO answered in %v", el)
	for _, s := range silent {
		s.close()
	}
}

// A link that stops inside its first frame, because the client went
// silent until the handshake timeout or because the gateway closed under
// it (a shutdown, the end of a hand-over, with RESUMEs in flight), is
// closed without a REJECT: VALIDATION would tell a client that merely
// met a slow path or a restart to end its session, and a client whose
// RESUME met the old process's close would lose it (TestHandOverKeepsEveryByte
// did, in about one run in ten).
func TestHandshakeCutIsNotValidation(t *testing.T) {
	// pendingUnread waits until the gateway's only link in its handshake
	// has n bytes left unread in its socket (0: it read what came, and
	// waits inside the frame header).
	pendingUnread := func(t *testing.T, srv *Server, n int) {
		t.Helper()
		waitFor(t, 5*time.Second, fmt.Sprintf("gateway has read all but %d bytes", n), func() bool {
			srv.pending.mu.Lock()
			defer srv.pending.mu.Unlock()
			if srv.pending.all.Len() != 1 {
				return false
			}
			rc, err := srv.pending.all.Front().Value.(*pendingLink).conn.(*net.TCPConn).SyscallConn()
			if err != nil {
				return false
			}
			unread := -1
			rc.Control(func(fd uintptr) { unread, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
			return unread == n
		})
	}
	// cutResume sends the preamble and the first two bytes of a RESUME
	// frame's header: a handshake cut inside its first frame.
	cutResume := func(l *hlink) {
		b := frame.AppendResume(frame.AppendPreamble(nil), &frame.Resume{Counter: 1})
		if err := l.send(b[:frame.PreambleLen+2]); err != nil {
			t.Fatal(err)
		}
	}
	// closedWithoutReject reads the link to its end: no frame may come.
	closedWithoutReject := func(t *testing.T, l *hlink, d time.Duration) {
		t.Helper()
		f, err := l.next(d)
		if err == nil {
			t.Fatalf("gateway sent %v %v %q; want the link closed without a frame", f.typ, f.codeReason().Code, f.codeReason().Reason)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("link still open after %v", d)
		}
	}

	t.Run("silent until the timeout", func(t *testing.T) {
		cfg := testConfig()
		cfg.HandshakeTimeout = 300 * time.Millisecond
		sc := serverConfig(cfg)
		refs := countRefusals(sc)
		g := startHGW(t, sc)
		l := hdial(t, g.addr, hopts{})
		cutResume(l)
		pendingUnread(t, g.srv, 0)
		closedWithoutReject(t, l, 5*time.Second)
		waitFor(t, time.Second, "the refusal counted", func() bool { return refs.total() == 1 })
		if n := refs.code(frame.CodeNone); n != 1 {
			t.Fatalf("refusals %v: want one with code NONE (no REJECT)", refs)
		}
	})
	t.Run("gateway closed under it", func(t *testing.T) {
		cfg := testConfig()
		sc := serverConfig(cfg)
		refs := countRefusals(sc)
		g := startHGW(t, sc)
		l := hdial(t, g.addr, hopts{})
		cutResume(l)
		pendingUnread(t, g.srv, 0) // the preamble read, the header begun
		g.srv.Close()
		closedWithoutReject(t, l, 5*time.Second)
		if n := refs.total(); n != 0 {
			t.Fatalf("refusals %v: a shutdown refuses nobody", refs)
		}
	})
}

// Unconfirmed sessions are capped per source address and in total; a
// refused HELLO gets REJECT THROTTLED and is counted; another source is not
// affected, and a confirmed session no longer counts.
func TestUnconfirmedCappedPerSource(t *testing.T) {
	cfg := testConfig()
	cfg.HandshakeTimeout = 5 * time.Second // they stay unconfirmed for the test
	sc := serverConfig(cfg)
	const perSource, total = 8, 12
	setUnconfirmedCaps(sc, perSource, total)
	ref := countRefusals(sc)
	g := startHGW(t, sc)

	hello := func(src string) (*hlink, *frame.CodeReason) {
		t.Helper()
		l := hdial(t, g.addr, hopts{src: src})
		_, cr, err := l.hello("echo", 1<<20, 5*time.Second)
		if err != nil {
			t.Fatalf("HELLO from %s: %v", src, err)
		}
		return l, cr
	}
	var held []*hlink
	for i := range perSource {
		l, cr := hello("127.0.0.1")
		if cr != nil {
			t.Fatalf("HELLO %d of %d from 127.0.0.1: REJECT %v %q", i+1, perSource, cr.Code, cr.Reason)
		}
		held = append(held, l)
	}
	for i := range 3 {
		if _, cr := hello("127.0.0.1"); cr == nil || cr.Code != frame.CodeThrottled {
			t.Fatalf("HELLO %d from 127.0.0.1 beyond its %d unconfirmed: %s, want REJECT THROTTLED", perSource+i+1, perSource, answerString(cr))
		}
	}
	for i := range total - perSource {
		if _, cr := hello("127.0.0.2"); cr != nil {
			t.Fatalf("HELLO %d from 127.0.0.2 (another source): REJECT %v %q", i+1, cr.Code, cr.Reason)
		}
	}
	if n := unconfirmed(g.srv); n != total {
		t.Fatalf("Unconfirmed() = %d, want %d", n, total)
	}
	// The total cap.
	_, cr := hello("127.0.0.3")
	if cr == nil || (cr.Code != frame.CodeThrottled && cr.Code != frame.CodeLimit) {
		t.Fatalf("HELLO from a third source beyond %d unconfirmed in total: %s, want REJECT THROTTLED or LIMIT", total, answerString(cr))
	}
	t.Logf("total cap: REJECT %v %q", cr.Code, cr.Reason)
	waitFor(t, 2*time.Second, "4 refusals counted", func() bool { return ref.total() >= 4 })
	if n := ref.total(); n != 4 || ref.code(frame.CodeThrottled) < 3 {
		t.Fatalf("OnRefuse calls: %d (%v), THROTTLED %d; want 4 for 4 REJECTs", n, ref, ref.code(frame.CodeThrottled))
	}

	// Once one of them confirms, its source may open another.
	if err := held[0].ping(1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "a confirmed session leaves the unconfirmed count", func() bool { return unconfirmed(g.srv) == total-1 })
	if _, cr := hello("127.0.0.1"); cr != nil {
		t.Fatalf("HELLO from 127.0.0.1 after one of its sessions confirmed: REJECT %v %q", cr.Code, cr.Reason)
	}
}

// ---------------------------------------------------------------------
// 3. Resume throttling.

// Bogus RESUMEs from a source must not lock out the owner of a session
// behind the same address: a RESUME with a valid proof is served.
func TestBogusResumesDoNotThrottleOwner(t *testing.T) {
	g := startHGW(t, serverConfig(testConfig()))
	const seed = 0x0E
	owner := hdial(t, g.addr, hopts{src: "127.0.0.1"})
	so := mustHello(t, owner, "echo", 1<<20)
	st := &hstream{want: patFunc(seed)}
	echoSome(t, owner, st, seed, 0, 100<<10)
	if err := owner.ack(50<<10, st.high+1<<20, 0); err != nil {
		t.Fatal(err)
	}
	gc := g.conn(t, so.id)

	const bogus = 120
	codes := map[frame.Code]int{}
	var last frame.Code
	for range bogus {
		r := &frame.Resume{Counter: 1}
		crand.Read(r.SessionID[:])
		crand.Read(r.Key[:])
		crand.Read(r.Proof[:])
		l := hdial(t, g.addr, hopts{src: "127.0.0.1"})
		if err := l.send(frame.AppendResume(frame.AppendPreamble(nil), r)); err != nil {
			t.Fatal(err)
		}
		f, err := l.next(5 * time.Second)
		if err != nil || f.typ != frame.TypeReject {
			t.Fatalf("bogus RESUME: %v %v, want REJECT", f.typ, err)
		}
		last = f.codeReason().Code
		codes[last]++
		l.close()
	}
	if codes[frame.CodeNotFound]+codes[frame.CodeThrottled] != bogus || codes[frame.CodeThrottled] < bogus-20 || last != frame.CodeThrottled {
		t.Fatalf("bogus RESUMEs answered %v; want NOT_FOUND, then THROTTLED past the burst", codes)
	}

	// The owner, same address, valid proof: RESUMED, and the stream goes on.
	nl := hdial(t, g.addr, hopts{src: "127.0.0.1"})
	d, rej, err := nl.resume(so, st.high, st.high+1<<20, 0)
	if err != nil {
		t.Fatal(err)
	}
	if rej != nil {
		t.Fatalf("owner's RESUME after %d bogus ones from its address (%v): REJECT %v %q", bogus, codes, rej.Code, rej.Reason)
	}
	if d.Received != 100<<10 {
		t.Fatalf("RESUMED.received %d, want %d", d.Received, 100<<10)
	}
	st.off = resendOf(d, st.high)
	echoSome(t, nl, st, seed, 100<<10, 50<<10)
	if gc.State() != StateActive || gc.Stats().Resumes != 1 {
		t.Fatalf("gateway session %v after %d resumes", gc.State(), gc.Stats().Resumes)
	}
}

// ---------------------------------------------------------------------
// 4. GOAWAY migration races.

// fakeGW is a hand-written gateway for a real client: it accepts links
// and lets the test speak on them.
type fakeGW struct {
	ln    net.Listener
	links chan *hlink
	done  chan struct{}
}

func startFakeGW(t testing.TB) *fakeGW {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeGW{ln: ln, links: make(chan *hlink, 8), done: make(chan struct{})}
	go func() {
		defer close(f.done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.links <- &hlink{c: c.(*net.TCPConn), fr: frame.NewReader(c, 4096)}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-f.done
		close(f.links)
		for l := range f.links {
			l.close()
		}
	})
	return f
}

func (f *fakeGW) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", f.ln.Addr().String())
}

// accept returns the next link with its preamble checked and its first
// frame read.
func (f *fakeGW) accept(t testing.TB) (*hlink, hframe) {
	t.Helper()
	var l *hlink
	select {
	case l = <-f.links:
	case <-time.After(5 * time.Second):
		t.Fatal("the client dialed no link")
	}
	t.Cleanup(l.close)
	l.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	v, err := l.fr.ReadPreamble()
	if err != nil || v != frame.Version {
		t.Fatalf("preamble: version %d, %v", v, err)
	}
	h, err := l.next(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return l, h
}

// until reads frames on l until one satisfies match, and returns it.
func (l *hlink) until(t testing.TB, what string, match func(hframe) bool) hframe {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		f, err := l.next(time.Until(deadline))
		if err != nil {
			t.Fatalf("waiting for %s: %v", what, err)
		}
		if f.typ == frame.TypeReset {
			cr := f.codeReason()
			t.Fatalf("waiting for %s: RESET %v %q", what, cr.Code, cr.Reason)
		}
		if match(f) {
			return f
		}
	}
}

func isAck(received uint64, flags uint8) func(hframe) bool {
	return func(f hframe) bool {
		if f.typ != frame.TypeAck {
			return false
		}
		a, err := frame.ParseAck(f.p)
		return err == nil && a.Received == received && a.Flags == flags
	}
}

// (7a) The gateway sends GOAWAY; the client RESUMEs on a new link; then
// the old link still delivers DATA and CLOSE_WRITE, and the new one
// replays them from the RESUME's point. The duplicates must be skipped,
// not taken for DATA after CLOSE_WRITE: the application reads every byte,
// then EOF, and the session is not aborted.
func TestHalfCloseDuringMigrationDoesNotAbort(t *testing.T) {
	fg := startFakeGW(t)
	cfg := testConfig()
	type dialed struct {
		c   *Conn
		err error
	}
	dc := make(chan dialed, 1)
	go func() {
		c, err := Dial(context.Background(), fg.dial, "r", cfg)
		dc <- dialed{c, err}
	}()

	// Link 1: HELLO/WELCOME by hand.
	l1, hf := fg.accept(t)
	if hf.typ != frame.TypeHello {
		t.Fatalf("%v instead of HELLO", hf.typ)
	}
	hello, err := frame.ParseHello(hf.p)
	if err != nil {
		t.Fatal(err)
	}
	priv, pub, _ := newKey()
	w := &frame.Welcome{Key: pub, ReconnectTimeout: 10000, Buffer: 1 << 20}
	crand.Read(w.SessionID[:])
	secret, err := shared(priv, hello.Key)
	if err != nil {
		t.Fatal(err)
	}
	sid := SessionID(w.SessionID)
	cred := hInitialCredential(secret, sid, hello.Key, pub)
	if err := l1.send(frame.AppendWelcome(nil, w)); err != nil {
		t.Fatal(err)
	}
	dr := <-dc
	if dr.err != nil {
		t.Fatal(dr.err)
	}
	c := dr.c
	const seed = 0x7A
	const r0, total = 1000, 6000
	want := fill(seed, 0, total)
	type read struct {
		b   []byte
		err error
	}
	rc := make(chan read, 1)
	go func() {
		b, err := io.ReadAll(c)
		rc <- read{b, err}
	}()

	// R0 bytes on link 1, acknowledged: the client holds them.
	if err := l1.data(want[:r0]); err != nil {
		t.Fatal(err)
	}
	l1.until(t, "ACK of the first bytes on link 1", isAck(r0, 0))
	// GOAWAY: the client dials link 2 and RESUMEs from R0.
	goaway, _ := frame.AppendGoAway(nil, frame.GoAway{Code: frame.CodeNone, Reason: "move"})
	if err := l1.send(goaway); err != nil {
		t.Fatal(err)
	}
	l2, rf := fg.accept(t)
	if rf.typ != frame.TypeResume {
		t.Fatalf("%v instead of RESUME", rf.typ)
	}
	r, err := frame.ParseResume(rf.p)
	if err != nil {
		t.Fatal(err)
	}
	if !verify(hResumeProof(cred, r), r.Proof) || r.SessionID != w.SessionID {
		t.Fatal("RESUME proof does not verify")
	}
	if r.Received != r0 {
		t.Fatalf("RESUME.received %d, want %d", r.Received, r0)
	}
	// Only now: the rest and CLOSE_WRITE on the OLD link, which the
	// client takes (it acknowledges the FIN there).
	if err := l1.data(want[r0:]); err != nil {
		t.Fatal(err)
	}
	if err := l1.send(frame.AppendU64(nil, frame.TypeCloseWrite, total)); err != nil {
		t.Fatal(err)
	}
	l1.until(t, "ACK_FIN on the old link", isAck(total, frame.AckFin))
	// RESUMED on link 2, resending from R0: the same DATA and CLOSE_WRITE.
	_, gpub, _ := newKey()
	d := newResumed(gpub, 0, 1<<20, 0, r0)
	d.Proof = hResumedProof(cred, r, d)
	b := frame.AppendResumed(nil, d)
	for p := want[r0:]; len(p) > 0; {
		n := min(len(p), 1500)
		b = append(frame.AppendDataHeader(b, n), p[:n]...)
		p = p[n:]
	}
	b = frame.AppendU64(b, frame.TypeCloseWrite, total)
	if err := l2.send(b); err != nil {
		t.Fatal(err)
	}

	// The application reads every byte, then EOF.
	var got read
	select {
	case got = <-rc:
	case <-time.After(5 * time.Second):
		t.Fatalf("application read nothing to EOF within 5 s (state %v, err %v)", c.State(), c.Err())
	}
	if got.err != nil {
		t.Fatalf("application read %d bytes, then %v; want all %d then EOF (the session was aborted)", len(got.b), got.err, total)
	}
	if !bytes.Equal(got.b, want) {
		t.Fatalf("application read %d bytes, want %d (equal prefix %v)", len(got.b), total, bytes.HasPrefix(want, got.b))
	}
	// On link 2 the client re-acknowledges the FIN; no RESET.
	l2.until(t, "ACK_FIN on the new link", isAck(total, frame.AckFin))
	if s, err := c.State(), c.Err(); s != StateActive || err != nil {
		t.Fatalf("client session %v, %v after the migration; want ACTIVE", s, err)
	}
	// An orderly end: the client half-closes, we acknowledge and close.
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	l2.until(t, "the client's CLOSE_WRITE", func(f hframe) bool { return f.typ == frame.TypeCloseWrite })
	if err := l2.ack(0, 1<<20+total, frame.AckFin); err != nil {
		t.Fatal(err)
	}
	// As a gateway does once both directions are closed and acknowledged:
	// close the link (a FIN, so that the ACK is read first).
	l2.c.CloseWrite()
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatalf("client did not end after both directions closed and the gateway closed the link (state %v)", c.State())
	}
	l2.close()
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := c.Err(); err != nil {
		t.Fatalf("session ended with %v, want an orderly end", err)
	}
}

// (7b) A RESUME built before the client acknowledged more on the old link
// arrives after the gateway freed those bytes: RESUMED, resending from what
// was acknowledged, not BUFFER_LOST.
func TestStaleResumeAfterOldLinkAcksIsNotBufferLost(t *testing.T) {
	g := startHGW(t, serverConfig(testConfig()))
	const seed = 0x7B
	const n, total, stale = 128 << 10, 256 << 10, 64 << 10
	old := hdial(t, g.addr, hopts{})
	s := mustHello(t, old, "hold", 1<<20)
	gc := g.conn(t, s.id)
	if _, err := gc.Write(fill(seed, 0, total)); err != nil {
		t.Fatal(err)
	}
	st := &hstream{want: patFunc(seed)}
	if cr, err := old.pump(st, 5*time.Second, func() bool { return st.off >= total }, nil); err != nil || cr != nil {
		t.Fatalf("first %d bytes: %v, RESET %v", total, err, cr)
	}
	// ACK N on the old link; the gateway frees the bytes below it.
	if err := old.ack(n, total+1<<20, 0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "gateway frees the acknowledged bytes", func() bool { return gc.Stats().Buffered <= total-n })

	// The stale RESUME, from a new socket.
	nl := hdial(t, g.addr, hopts{})
	d, rej, err := nl.resume(s, stale, total+1<<20, 0)
	if err != nil {
		t.Fatal(err)
	}
	if rej != nil {
		t.Fatalf("RESUME(received=%d) after ACK %d on the old link: REJECT %v %q, want RESUMED resending from %d",
			stale, n, rej.Code, rej.Reason, n)
	}
	if got := resendOf(d, stale); got != n {
		t.Fatalf("RESUMED resends from %d, want %d (the ACK on the old link)", got, n)
	}
	st.off = n
	if cr, err := nl.pump(st, 5*time.Second, func() bool { return st.off >= total }, nil); err != nil || cr != nil {
		t.Fatalf("replay from %d: %v, RESET %v", n, err, cr)
	}
	if _, err := gc.Write(fill(seed, total, 1000)); err != nil {
		t.Fatal(err)
	}
	if cr, err := nl.pump(st, 5*time.Second, func() bool { return st.off >= total+1000 }, nil); err != nil || cr != nil {
		t.Fatalf("after the resume: %v, RESET %v", err, cr)
	}
	if err := st.err(); err != nil {
		t.Fatal(err)
	}
	if gc.State() != StateActive {
		t.Fatalf("gateway session %v, want ACTIVE", gc.State())
	}
}

// ---------------------------------------------------------------------
// The API issue 8 adds, in one place.

func hInitialCredential(secret []byte, sid SessionID, clientKey, serverKey [frame.KeyLen]byte) credential {
	return initialCredential(secret, sid, clientKey, serverKey, nil) // nil: plain TCP, no TLS binding
}

func hResumeProof(c credential, r *frame.Resume) [frame.ProofLen]byte { return c.resumeProof(r, nil) }

func hResumedProof(c credential, r *frame.Resume, d *frame.Resumed) [frame.ProofLen]byte {
	return c.resumedProof(r, d, nil)
}

// resendOf is where DATA on the resumed link starts.
func resendOf(d *frame.Resumed, _ uint64) uint64 { return d.Resend }

func newResumed(key [frame.KeyLen]byte, received, window uint64, flags uint8, resend uint64) *frame.Resumed {
	return &frame.Resumed{Key: key, Received: received, Window: window, Flags: flags, Resend: resend}
}

func unconfirmed(srv *Server) int { return srv.Unconfirmed() }

func setUnconfirmedCaps(sc *ServerConfig, perSource, total int) {
	sc.MaxUnconfirmedPerSource, sc.MaxUnconfirmed = perSource, total
}

func setOnRefuse(sc *ServerConfig, f func(reason string, code frame.Code)) { sc.OnRefuse = f }
