package proxy

import (
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

// hoEchoes runs n verified echo sessions through addr until stop; wait
// returns their errors.
type hoEchoes struct {
	stop     chan struct{}
	verified []*atomic.Int64
	errs     chan error
	wg       sync.WaitGroup
}

func startEchoes(addr string, n int) *hoEchoes {
	e := &hoEchoes{stop: make(chan struct{}), errs: make(chan error, n)}
	for i := range n {
		v := new(atomic.Int64)
		e.verified = append(e.verified, v)
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			ec := faultnet.Echo{Seed: uint64(7 + i), Stop: e.stop, MaxWrite: 2 << 10, MaxPause: 5 * time.Millisecond, Verified: v, Timeout: 20 * time.Second}
			if err := ec.Dial(addr); err != nil {
				e.errs <- fmt.Errorf("session %d: %w", i, err)
			}
		}()
	}
	return e
}

// progress waits until every session has verified more than it had.
func (e *hoEchoes) progress(t *testing.T, what string) {
	t.Helper()
	before := make([]int64, len(e.verified))
	for i, v := range e.verified {
		before[i] = v.Load()
	}
	waitFor(t, what, 20*time.Second, func() bool {
		for i, v := range e.verified {
			if v.Load() <= before[i] {
				return false
			}
		}
		return true
	})
}

func (e *hoEchoes) finish(t *testing.T) {
	t.Helper()
	close(e.stop)
	e.wg.Wait()
	close(e.errs)
	for err := range e.errs {
		t.Error(err)
	}
}

// A hand-over that is rolled back on either side: every session goes
// on, byte-exact, and nothing leaks.
func TestHandoverRollback(t *testing.T) {
	for _, side := range []string{"gateway", "client"} {
		t.Run(side, func(t *testing.T) {
			s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
			e := startEchoes(s.appAddr, 8)
			e.progress(t, "echo before")
			for round := range 2 {
				var h *Handover
				var err error
				if side == "gateway" {
					h, err = s.gw.FreezeForHandover(5 * time.Second)
				} else {
					h, err = s.client.FreezeForHandover(5 * time.Second)
				}
				if err != nil {
					t.Fatal(err)
				}
				if h.Len() != 8 {
					t.Fatalf("round %d: %d sessions frozen, want 8", round, h.Len())
				}
				recs, err := h.Records()
				if err != nil {
					t.Fatal(err)
				}
				for _, r := range recs {
					if r.Kind != RecordSession || r.File == nil || len(r.Snapshot) == 0 || r.Route != "default" {
						t.Errorf("record %+v", r)
					}
					if side == "client" && r.Listen != s.appAddr {
						t.Errorf("client record names listener %q, want %q", r.Listen, s.appAddr)
					}
					r.File.Close()
				}
				time.Sleep(100 * time.Millisecond) // frozen: nothing moves
				h.Rollback()
				e.progress(t, fmt.Sprintf("echo after rollback %d", round))
			}
			e.finish(t)
		})
	}
}

// The client's sessions go over to a second client in the same process:
// the first forgets them, the second resumes them to the gateway, and
// every byte arrives once.
func TestHandoverClientCommit(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	e := startEchoes(s.appAddr, 6)
	e.progress(t, "echo before")

	// The second client serves a paused listener (as a new process
	// does); the records name the first's address, which stands for the
	// same inherited socket.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pl := NewPausableListener(ln)
	pl.Pause(0)
	d, err := transport.NewDialer(transport.Config{Name: "tcp", Addr: s.relay.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	c2 := NewClient(ClientConfig{Logger: testLogger(t)})
	defer c2.Close()
	go c2.Serve(pl, ClientRoute{Route: "default", Dialer: d, Session: fastConfig(), Gateway: s.relay.Addr()})

	h, err := s.client.FreezeForHandover(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	recs, err := h.Records()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		r.Listen = pl.Addr().String()
	}
	// A record for a listener the second client does not have is
	// refused, and nothing is kept.
	bad := *recs[0]
	bad.Listen = "127.0.0.1:1"
	badFile, err := dupFile(recs[0])
	if err != nil {
		t.Fatal(err)
	}
	bad.File = badFile
	if _, err := c2.RestoreHandover([]*HandoverRecord{&bad}); err == nil || !strings.Contains(err.Error(), "not in this client's config") {
		t.Fatalf("unknown listener: %v", err)
	}
	taken, err := c2.RestoreHandover(recs)
	if err != nil {
		t.Fatal(err)
	}
	if taken.Len() != 6 {
		t.Fatalf("%d restored", taken.Len())
	}
	h.Commit()
	if n := len(s.client.Sessions()); n != 0 {
		t.Fatalf("first client still lists %d sessions", n)
	}
	taken.Start()
	pl.Resume()
	e.progress(t, "echo through the second client")
	if n := len(c2.Sessions()); n != 6 {
		t.Errorf("second client lists %d sessions", n)
	}
	e.finish(t)
}

// A gateway refuses records for a route it does not have.
func TestHandoverGatewayUnknownRoute(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	e := startEchoes(s.appAddr, 2)
	e.progress(t, "echo before")
	h, err := s.gw.FreezeForHandover(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	recs, err := h.Records()
	if err != nil {
		t.Fatal(err)
	}
	gw2, err := NewGateway(GatewayConfig{Routes: []Route{{Name: "other", Upstream: "127.0.0.1:1"}}, Server: defaultServerForTest()})
	if err != nil {
		t.Fatal(err)
	}
	defer gw2.Close()
	if _, err := gw2.RestoreHandover(recs); err == nil || !strings.Contains(err.Error(), `route "default"`) {
		t.Fatalf("unknown route: %v", err)
	}
	h.Rollback()
	e.progress(t, "echo after the refusal")
	e.finish(t)
}

func dupFile(r *HandoverRecord) (*os.File, error) {
	c, err := net.FileConn(r.File)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.(*net.TCPConn).File()
}

// A session handed over with one direction ended keeps it ended: the
// application's FIN, already passed into the session, is not passed
// twice (the client's new splice must not read the socket again), and
// the rest of the other direction arrives, then its FIN.
func TestHandoverHalfClosed(t *testing.T) {
	for _, side := range []string{"gateway-rollback", "client-commit"} {
		t.Run(side, func(t *testing.T) {
			gotEOF := make(chan string, 1)
			release := make(chan struct{})
			up := testnet.TCPServer(t, func(c *net.TCPConn) {
				b, _ := io.ReadAll(c) // until the application's FIN
				gotEOF <- string(b)
				<-release
				c.Write([]byte("reply to " + string(b)))
				c.CloseWrite()
			})
			var once sync.Once
			t.Cleanup(func() { once.Do(func() { close(release) }) }) // before the server's own
			s := newStack(t, stackOpts{upstream: up})
			app := dialApp(t, s.appAddr)
			defer app.Close()
			app.Write([]byte("request"))
			app.CloseWrite()
			select {
			case b := <-gotEOF:
				if b != "request" {
					t.Fatalf("upstream got %q", b)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the FIN did not reach the upstream")
			}
			var h *Handover
			var err error
			if side == "gateway-rollback" {
				h, err = s.gw.FreezeForHandover(5 * time.Second)
			} else {
				h, err = s.client.FreezeForHandover(5 * time.Second)
			}
			if err != nil {
				t.Fatal(err)
			}
			recs, err := h.Records()
			if err != nil || len(recs) != 1 {
				t.Fatalf("%d records, %v", len(recs), err)
			}
			r := recs[0]
			// The client's splice passed the application's FIN on; the
			// gateway's passed the session's FIN to the upstream.
			if side == "client-commit" && (!r.UpDone || r.DownDone) || side == "gateway-rollback" && (r.UpDone || !r.DownDone) {
				t.Fatalf("record: up done %v, down done %v", r.UpDone, r.DownDone)
			}
			if side == "gateway-rollback" {
				r.File.Close()
				h.Rollback()
			} else {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				d, err := transport.NewDialer(transport.Config{Name: "tcp", Addr: s.relay.Addr()})
				if err != nil {
					t.Fatal(err)
				}
				c2 := NewClient(ClientConfig{Logger: testLogger(t)})
				defer c2.Close()
				go c2.Serve(ln, ClientRoute{Route: "default", Dialer: d, Session: fastConfig(), Gateway: s.relay.Addr()})
				r.Listen = ln.Addr().String()
				taken, err := c2.RestoreHandover(recs)
				if err != nil {
					t.Fatal(err)
				}
				h.Commit()
				taken.Start()
			}
			once.Do(func() { close(release) })
			app.SetReadDeadline(time.Now().Add(10 * time.Second))
			b, err := io.ReadAll(app)
			if err != nil || string(b) != "reply to request" {
				t.Fatalf("application read %q, %v", b, err)
			}
		})
	}
}

// A client with an application whose session is still opening (its
// gateway unreachable) does not hand over: the freeze fails after its
// wait, nothing is frozen, and the session opens once the path is back.
func TestHandoverClientOpening(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	e := startEchoes(s.appAddr, 2)
	e.progress(t, "echo before")
	s.relay.SetDown(true)
	done := make(chan error, 1)
	go func() {
		done <- faultnet.Echo{Seed: 99, Size: 10000, Timeout: 20 * time.Second}.Dial(s.appAddr)
	}()
	waitFor(t, "the new session to be opening", 5*time.Second, func() bool { return s.client.handling.Load() > 0 })
	start := time.Now()
	h, err := s.client.FreezeForHandover(300 * time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "still opening") {
		t.Fatalf("freeze with a session opening: %v, %v", h, err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("the freeze gave up after %v", d)
	}
	for _, x := range s.client.tracker.list() {
		if x.conn.Frozen() {
			t.Fatalf("session %s left frozen", x.conn.SessionID())
		}
	}
	s.relay.SetDown(false)
	if err := <-done; err != nil {
		t.Fatalf("the opening session: %v", err)
	}
	e.progress(t, "echo after")
	e.finish(t)
}
