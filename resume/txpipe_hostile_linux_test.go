package resume

import (
	"context"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"
)

// Wire peers that take their window's worth of bulk and never acknowledge
// a byte (they answer PINGs, so their links stay alive) keep no send pipe:
// once the window is full the session reads on into the replay buffer,
// and that copied write takes the piped bytes back into memory (charged
// to the budget, as piped bytes already were), so the pipe goes back to
// the pool. With the process's cap at two pipes, four such peers each get
// exactly their window, byte for byte, and not a byte more; none of their
// sessions holds a pipe after; the pipes stay under the cap throughout; an
// honest session after them streams its whole MiB byte-exact; and once
// every session is reset no pipe is left open.
func TestNeverAckingPeersKeepNoSendPipe(t *testing.T) {
	closeIdlePipes()
	defer func(old int) { maxTxPipePages = old }(maxTxPipePages)
	pages := txPipeSize / os.Getpagesize()
	maxTxPipePages = 2 * pages

	g := startHGW(t, serverConfig(testConfig()))
	const (
		win    = 256 << 10 // each hostile peer's window
		stream = 1 << 20   // what each upstream sends
		peers  = 4
	)
	var wg sync.WaitGroup
	defer wg.Wait()
	over := make(chan struct{})
	defer close(over)
	// feed sends n bytes of seed's pattern from a TCP socket into c with
	// ReadFrom, as a gateway's upstream does: bulk from a socket is what
	// goes through the send pipes.
	feed := func(c *Conn, seed uint64, n int) {
		up, src := tcpPair(t)
		wg.Add(2)
		go func() {
			defer wg.Done()
			defer up.Close()
			for off := 0; off < n; off += 64 << 10 {
				if _, err := up.Write(fill(seed, uint64(off), min(64<<10, n-off))); err != nil {
					return
				}
			}
			<-over // no FIN before the end: a stream that goes on
		}()
		go func() {
			defer wg.Done()
			defer src.Close()
			c.ReadFrom(src)
		}()
	}
	inPipes := func() (n int) {
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, c := range g.conns {
			c.s.mu.Lock()
			if c.s.send.tx != nil {
				n++
			}
			c.s.mu.Unlock()
		}
		return n
	}
	// checkCap samples the pipes' pages (from this goroutine: pump calls
	// it for every frame) and keeps the worst over the cap.
	overCap := 0
	checkCap := func() {
		pipePool.mu.Lock()
		p := pipePool.txPages
		pipePool.mu.Unlock()
		if p > maxTxPipePages {
			overCap = max(overCap, p)
		}
	}

	var hostile []*Conn
	var links []*hlink
	for i := range peers {
		l := hdial(t, g.addr, hopts{})
		s := mustHello(t, l, "hold", win)
		c := g.conn(t, s.id)
		seed := uint64(0x5EED0 + i)
		feed(c, seed, stream)
		st := &hstream{want: patFunc(seed)}
		// Read the window, answer PINGs, never ACK.
		cr, err := l.pump(st, 10*time.Second, func() bool { checkCap(); return st.off >= win }, nil)
		if err != nil || cr != nil {
			t.Fatalf("peer %d: first %d bytes: %v, RESET %v", i, win, err, cr)
		}
		if err := st.err(); err != nil {
			t.Fatalf("peer %d: %v", i, err)
		}
		// Nothing past the window, however long the peer waits.
		cr, err = l.pump(st, 300*time.Millisecond, func() bool { checkCap(); return false }, nil)
		if cr != nil {
			t.Fatalf("peer %d: RESET %v %q while it only failed to ACK", i, cr.Code, cr.Reason)
		}
		if st.off != win || st.total != win {
			t.Fatalf("peer %d: gateway sent %d bytes (%d on this link) to a window of %d (%v)", i, st.off, st.total, win, err)
		}
		var held int
		waitFor(t, 5*time.Second, "the session reads on into its replay buffer", func() bool {
			c.s.mu.Lock()
			defer c.s.mu.Unlock()
			held = c.s.send.Len()
			return held > win
		})
		c.s.mu.Lock()
		piped, acked := c.s.send.tx != nil, c.s.send.acked
		c.s.mu.Unlock()
		if piped {
			t.Fatalf("peer %d: its session holds a send pipe with the window full and %d bytes held", i, held)
		}
		if acked != 0 {
			t.Fatalf("peer %d: the gateway counts %d bytes acknowledged by a peer that sent no ACK", i, acked)
		}
		hostile = append(hostile, c)
		links = append(links, l)
	}
	if n := inPipes(); n != 0 {
		t.Fatalf("%d of %d never-acknowledging peers' sessions hold a send pipe, want 0", n, peers)
	}
	pipePool.mu.Lock()
	used := pipePool.txPages
	pipePool.mu.Unlock()
	if used == 0 {
		t.Fatal("no send pipe was ever opened: the bulk did not take the pipe path")
	}
	checkCap()

	// An honest client's session: its bulk is copied (no pipe left), and
	// arrives whole.
	hc, err := Dial(context.Background(), func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", g.addr)
	}, "hold", testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	gc := g.conn(t, hc.SessionID())
	const honestSeed = 0x40E57
	feed(gc, honestSeed, stream)
	hc.SetReadDeadline(time.Now().Add(20 * time.Second))
	got := make([]byte, stream)
	if _, err := io.ReadFull(hc, got); err != nil {
		t.Fatalf("honest session after %d never-acknowledging peers: %v", peers, err)
	}
	for i, b := range got {
		if b != pat(honestSeed, uint64(i)) {
			t.Fatalf("honest session: byte %d is %#x, want %#x", i, b, pat(honestSeed, uint64(i)))
		}
	}
	checkCap()
	if overCap > 0 {
		t.Fatalf("send pipes reached %d pages, over the cap of %d", overCap, maxTxPipePages)
	}

	for i, c := range hostile {
		links[i].close()
		c.Reset(CodeAppReset, "test over")
		<-c.Done()
	}
	gc.Reset(CodeAppReset, "test over")
	<-gc.Done()
	waitFor(t, 5*time.Second, "every send pipe given back", func() bool { return inPipes() == 0 })
	if n := closeIdlePipes(); n != 0 {
		t.Fatalf("%d pipes still open after every session ended", n)
	}
	if got := pipePool.txPages; got != 0 {
		t.Fatalf("txPages = %d with no session left, want 0", got)
	}
}
