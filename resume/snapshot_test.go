package resume

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// endpoint is one application's hold on its session: the Conn in use,
// which a hand-over replaces. Readers and writers that get ErrFrozen wait
// for the next one and carry on where they were.
type endpoint struct {
	mu    sync.Mutex
	c     *Conn
	moved chan struct{} // closed when c is replaced
}

func newEndpoint(c *Conn) *endpoint { return &endpoint{c: c, moved: make(chan struct{})} }

func (e *endpoint) get() (*Conn, chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.c, e.moved
}

func (e *endpoint) set(c *Conn) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.c = c
	close(e.moved)
	e.moved = make(chan struct{})
}

// waitMoved waits for the hand-over that froze the session to finish.
func waitMoved(moved chan struct{}) error {
	select {
	case <-moved:
		return nil
	case <-time.After(20 * time.Second):
		return errors.New("frozen, and no new process took the session within 20 s")
	}
}

// send writes data through e in random pieces, pausing pace after each
// (so that hand-overs land mid-stream), across hand-overs.
func (e *endpoint) send(data []byte, r *rand.Rand, pace time.Duration) error {
	for off := 0; off < len(data); {
		time.Sleep(pace)
		c, moved := e.get()
		n, err := c.Write(data[off:min(len(data), off+1+r.IntN(32<<10))])
		off += n
		switch {
		case errors.Is(err, ErrFrozen):
			if err := waitMoved(moved); err != nil {
				return err
			}
		case err != nil:
			return err
		}
	}
	c, _ := e.get()
	return c.CloseWrite()
}

// receive reads until EOF across hand-overs and compares with want.
func (e *endpoint) receive(want []byte, progress *atomic.Int64) error {
	got := make([]byte, 0, len(want))
	buf := make([]byte, 16<<10)
	for {
		c, moved := e.get()
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		progress.Store(int64(len(got)))
		switch {
		case err == io.EOF:
			if !bytes.Equal(got, want) {
				return diffError(got, want)
			}
			return nil
		case errors.Is(err, ErrFrozen):
			if err := waitMoved(moved); err != nil {
				return err
			}
		case err != nil:
			return err
		}
	}
}

// readExactly reads len(want) bytes from c within 10 s and fails the test
// unless they are want.
func readExactly(t *testing.T, c *Conn, want string) {
	t.Helper()
	got := make([]byte, len(want))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
		t.Fatalf("session %v read %q, %v; want %q", c.SessionID(), got, err, want)
	}
}

func diffError(got, want []byte) error {
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	return fmt.Errorf("stream differs at byte %d: got %d bytes, want %d", i, len(got), len(want))
}

// gatewayProc is one gateway process: a Server on its own listener.
type gatewayProc struct {
	srv  *Server
	addr string
	done chan struct{}
}

func startGatewayProc(t *testing.T, sc *ServerConfig) *gatewayProc {
	t.Helper()
	srv, err := NewServer(sc)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &gatewayProc{srv: srv, addr: ln.Addr().String(), done: make(chan struct{})}
	go func() { srv.Serve(ln); close(g.done) }()
	return g
}

func (g *gatewayProc) close() {
	g.srv.Close()
	<-g.done
}

// handOverGateway moves every session of from to a new gateway process,
// the way an upgrade does: freeze, snapshot, restore, release, thaw.
// Clients are pointed at the new one through addr.
func handOverGateway(t *testing.T, from *gatewayProc, sc *ServerConfig, addr *atomic.Pointer[string], ends map[SessionID]*endpoint) *gatewayProc {
	t.Helper()
	frozen := from.srv.Freeze()
	to := startGatewayProc(t, sc)
	restored := make([]*Conn, 0, len(frozen))
	for _, c := range frozen {
		snap, err := c.Snapshot()
		if err != nil {
			t.Fatalf("snapshot: %v", err)
		}
		nc, err := to.srv.Restore(snap)
		if err != nil {
			t.Fatalf("restore: %v", err)
		}
		restored = append(restored, nc)
	}
	for _, c := range frozen {
		c.Release()
	}
	a := to.addr
	addr.Store(&a)
	to.srv.Thaw()
	for _, nc := range restored {
		if e := ends[nc.SessionID()]; e != nil {
			e.set(nc)
		}
	}
	from.close()
	return to
}

// handOverEnv is a gateway process that hand-overs replace, and a dial
// function that follows it (and fails while blocked: the path is down).
type handOverEnv struct {
	t       *testing.T
	sc      *ServerConfig
	gw      *gatewayProc
	addr    atomic.Pointer[string]
	blocked atomic.Bool
}

func newHandOverEnv(t *testing.T, cfg *Config) *handOverEnv {
	e := &handOverEnv{t: t, sc: serverConfig(cfg)}
	e.gw = startGatewayProc(t, e.sc)
	a := e.gw.addr
	e.addr.Store(&a)
	t.Cleanup(func() { e.gw.close() })
	return e
}

func (e *handOverEnv) dial(ctx context.Context) (net.Conn, error) {
	if e.blocked.Load() {
		return nil, errors.New("path down")
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", *e.addr.Load())
}

// handOver moves the gateway's sessions to a new process.
func (e *handOverEnv) handOver(ends map[SessionID]*endpoint) {
	e.gw = handOverGateway(e.t, e.gw, e.sc, &e.addr, ends)
}

// TestHandOverKeepsEveryByte streams data both ways through several
// sessions while the gateway is handed over to a new process three times
// and each client end twice; every byte arrives once and in order.
func TestHandOverKeepsEveryByte(t *testing.T) {
	// About 130 writes of 16 KiB on average per stream, 4 ms apart: the
	// streams run for about half a second plus the hand-overs.
	const sessions, size, pace = 4, 2 << 20, 4 * time.Millisecond
	cfg := testConfig()
	if os.Getenv("DEBUGLOG") != "" {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	e := newHandOverEnv(t, cfg)
	dial := e.dial

	type pair struct {
		client, gateway *endpoint
		up, down        []byte
		upGot, downGot  atomic.Int64
	}
	pairs := make([]*pair, sessions)
	gwEnds := map[SessionID]*endpoint{}
	for i := range pairs {
		c, err := Dial(context.Background(), dial, "r", cfg)
		if err != nil {
			t.Fatal(err)
		}
		s, err := e.gw.srv.Accept()
		if err != nil {
			t.Fatal(err)
		}
		p := &pair{client: newEndpoint(c), gateway: newEndpoint(s),
			up: stream(uint64(2*i), size), down: stream(uint64(2*i+1), size)}
		pairs[i] = p
		gwEnds[s.SessionID()] = p.gateway
	}
	errs := make(chan error, 4*sessions)
	var wg sync.WaitGroup
	for i, p := range pairs {
		wg.Add(4)
		go func() { defer wg.Done(); errs <- p.client.send(p.up, rand.New(rand.NewPCG(uint64(i), 1)), pace) }()
		go func() { defer wg.Done(); errs <- p.gateway.send(p.down, rand.New(rand.NewPCG(uint64(i), 2)), pace) }()
		go func() { defer wg.Done(); errs <- p.gateway.receive(p.up, &p.upGot) }()
		go func() { defer wg.Done(); errs <- p.client.receive(p.down, &p.downGot) }()
	}
	// Hand-overs at a quarter, half and three quarters of the stream:
	// gateway, then each client end.
	progress := func() int64 {
		least := int64(size)
		for _, p := range pairs {
			least = min(least, p.upGot.Load(), p.downGot.Load())
		}
		return least
	}
	handOvers := 0
	for step := 1; step <= 3; step++ {
		waitFor(t, 20*time.Second, "stream progress", func() bool { return progress() >= int64(step*size/4) })
		e.handOver(gwEnds)
		handOvers++
		if step == 3 {
			break
		}
		for _, p := range pairs {
			old, _ := p.client.get()
			if err := old.Freeze(); err != nil {
				t.Fatalf("client freeze: %v", err)
			}
			snap, err := old.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			nc, err := Restore(snap, dial, cfg)
			if err != nil {
				t.Fatal(err)
			}
			old.Release()
			nc.Thaw()
			p.client.set(nc)
			handOvers++
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range pairs {
		c, _ := p.client.get()
		s, _ := p.gateway.get()
		// A client hand-over right after a gateway one may catch the
		// client still reconnecting, and one resume then serves both.
		if st := c.Stats(); st.Resumes < 3 {
			t.Errorf("client %v resumed %d times, want at least 3 (one per gateway hand-over)", c.SessionID(), st.Resumes)
		}
		c.Close()
		s.Close()
	}
	t.Logf("%d hand-overs, %d sessions x %d bytes each way, byte-exact", handOvers, sessions, size)
}

// TestHandOverOfParkedSession: a session whose client is away when the
// gateway is handed over resumes into the new process later, with what
// was buffered on both sides.
func TestHandOverOfParkedSession(t *testing.T) {
	cfg := testConfig()
	e := newHandOverEnv(t, cfg)
	c, err := Dial(context.Background(), e.dial, "r", cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := e.gw.srv.Accept()
	if err != nil {
		t.Fatal(err)
	}
	e.blocked.Store(true)
	c.Kill()
	waitFor(t, 5*time.Second, "gateway parks", func() bool { return s.State() == StateDisconnected })
	// Bytes written on both ends while parked travel with the snapshot.
	if _, err := s.Write([]byte("to client while parked")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("to gateway while parked")); err != nil {
		t.Fatal(err)
	}
	ends := map[SessionID]*endpoint{s.SessionID(): newEndpoint(s)}
	e.handOver(ends)
	ns, _ := ends[s.SessionID()].get()
	if ns == s {
		t.Fatal("session not handed over")
	}
	defer ns.Close()
	e.blocked.Store(false)
	readExactly(t, ns, "to gateway while parked")
	readExactly(t, c, "to client while parked")
}

// TestFreezeThawInPlace: a hand-over that fails (the new process refuses
// the snapshot) thaws the sessions where they were, and nothing is lost.
func TestFreezeThawInPlace(t *testing.T) {
	cfg := testConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	defer e.stop()
	c, s := e.pair(cfg)
	defer c.Close()
	defer s.Close()
	if _, err := c.Write([]byte("one")); err != nil {
		t.Fatal(err)
	}
	frozen := e.srv.Freeze()
	if len(frozen) != 1 {
		t.Fatalf("Freeze returned %d sessions, want 1", len(frozen))
	}
	if !s.Frozen() {
		t.Fatal("session not frozen")
	}
	if _, err := s.Read(make([]byte, 8)); !errors.Is(err, ErrFrozen) {
		t.Fatalf("Read of a frozen session: %v, want ErrFrozen", err)
	}
	snap, err := s.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	binary.BigEndian.PutUint16(snap[4:], SnapshotVersion+1) // a format the new binary does not read
	other, err := NewServer(serverConfig(cfg))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := other.Restore(snap); !errors.Is(err, ErrSnapshotVersion) {
		t.Fatalf("Restore of another version: %v, want ErrSnapshotVersion", err)
	}
	// A HELLO while frozen is told to come back shortly.
	if _, err := Dial(context.Background(), e.dial, "r", cfg); !errors.Is(err, ErrThrottled) {
		t.Fatalf("Dial while frozen: %v, want THROTTLED", err)
	}
	e.srv.Thaw()
	if _, err := c.Write([]byte(" two")); err != nil {
		t.Fatal(err)
	}
	readExactly(t, s, "one two")
}

// TestRestoredUndeliveredSessionIsAccepted: a session frozen before the
// proxy took it by Accept is delivered by the new process's Accept once
// its client resumes.
func TestRestoredUndeliveredSessionIsAccepted(t *testing.T) {
	cfg := testConfig()
	e := newHandOverEnv(t, cfg)
	c, err := Dial(context.Background(), e.dial, "r", cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "confirmed", func() bool {
		for _, x := range e.gw.srv.Sessions() {
			if x.Confirmed() {
				return true
			}
		}
		return false
	})
	e.handOver(nil) // nobody called Accept on the old one
	acc := make(chan *Conn, 1)
	go func() {
		s, err := e.gw.srv.Accept()
		if err == nil {
			acc <- s
		}
		close(acc)
	}()
	var s *Conn
	select {
	case s = <-acc:
	case <-time.After(10 * time.Second):
		t.Fatal("restored session not delivered by Accept")
	}
	if s == nil || s.SessionID() != c.SessionID() {
		t.Fatalf("Accept gave %v", s)
	}
	defer s.Close()
	readExactly(t, s, "hello")
}

// TestRestoreRejectsCorruptSnapshots: offsets no session could have had
// are refused, not turned into a gap on the wire.
func TestRestoreRejectsCorruptSnapshots(t *testing.T) {
	cfg := testConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	defer e.stop()
	c, s := e.pair(cfg)
	defer c.Close()
	defer s.Close()
	if _, err := c.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	readExactly(t, s, "abc")
	if err := c.Freeze(); err != nil {
		t.Fatal(err)
	}
	snap, err := c.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Restore(snap, e.dial, cfg); err != nil {
		t.Fatalf("a good snapshot: %v", err)
	}
	for _, tc := range []struct {
		name string
		edit func([]byte) []byte
	}{
		{"truncated", func(b []byte) []byte { return b[:len(b)-1] }},
		{"trailing", func(b []byte) []byte { return append(b, 0) }},
		{"magic", func(b []byte) []byte { b[0] = 'X'; return b }},
		{"empty", func([]byte) []byte { return nil }},
	} {
		b := tc.edit(append([]byte(nil), snap...))
		if _, err := Restore(b, e.dial, cfg); err == nil {
			t.Errorf("%s: restored", tc.name)
		}
	}
	if _, err := e.srv.Restore(snap); err == nil {
		t.Error("a client's snapshot restored into a gateway")
	}
	c.Thaw()
}

// FuzzRestore: no snapshot, however corrupt, panics or restores a
// session whose offsets disagree with its buffers.
func FuzzRestore(f *testing.F) {
	cfg := testConfig()
	srv, err := NewServer(serverConfig(cfg))
	if err != nil {
		f.Fatal(err)
	}
	defer srv.Close()
	s := newSession(cfg)
	s.cl = newClientPart(nil)
	s.id = SessionID{1}
	s.route = "r"
	s.reconnectTimeout = time.Minute
	s.send.Write([]byte("unacked bytes"))
	s.send.highest = 5
	s.recv.Write([]byte("unread"))
	s.recv.window = 1 << 20
	f.Add(s.encode())
	s.gw, s.cl = &gatewayPart{srv: srv, confirmed: make(chan struct{}), source: "127.0.0.1"}, nil
	f.Add(s.encode())
	f.Add([]byte("LLSN\x00\x01"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if c, err := Restore(b, func(context.Context) (net.Conn, error) { return nil, errors.New("no") }, cfg); err == nil {
			if err := c.s.checkRestored(); err != nil {
				t.Fatal(err)
			}
			c.Release()
		}
		if c, err := srv.Restore(b); err == nil {
			c.Release()
		}
	})
}
