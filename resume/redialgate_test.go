package resume

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The gate lets limit attempts in, queues the rest in order of arrival,
// hands a place straight to the first waiting attempt, and a cancelled
// ticket never runs.
func TestRedialGateOrderAndCancel(t *testing.T) {
	g := NewRedialGate(2)
	ran := make(chan int, 10)
	for range 2 {
		if in, _ := g.enter(func() { t.Error("a first-come attempt was queued") }); !in {
			t.Fatal("an attempt under the limit was queued")
		}
	}
	var tickets []*redialTicket
	for i := range 4 {
		in, tk := g.enter(func() { ran <- i })
		if in || tk == nil {
			t.Fatalf("attempt %d over the limit got in", i)
		}
		tickets = append(tickets, tk)
	}
	if !g.cancel(tickets[1]) {
		t.Fatal("cancel of a waiting ticket failed")
	}
	if g.cancel(tickets[1]) {
		t.Fatal("a ticket cancelled twice")
	}
	if g.Waiting() != 3 || g.Running() != 2 {
		t.Fatalf("waiting %d running %d, want 3 and 2", g.Waiting(), g.Running())
	}
	g.leave() // the place passes to attempt 0
	if got := <-ran; got != 0 {
		t.Fatalf("first to run: %d, want 0", got)
	}
	if g.cancel(tickets[0]) {
		t.Fatal("cancel of a ticket that ran succeeded")
	}
	g.leave()
	if got := <-ran; got != 2 {
		t.Fatalf("next to run: %d, want 2 (1 was cancelled)", got)
	}
	g.leave()
	if got := <-ran; got != 3 {
		t.Fatalf("next to run: %d, want 3", got)
	}
	if g.Running() != 2 || g.Waiting() != 0 {
		t.Fatalf("running %d waiting %d, want 2 and 0", g.Running(), g.Waiting())
	}
	g.leave()
	g.leave()
	if g.Running() != 0 {
		t.Fatalf("running %d after every attempt left, want 0", g.Running())
	}
	select {
	case i := <-ran:
		t.Fatalf("attempt %d ran after all", i)
	default:
	}
}

// A mass outage: sessions that share a gate of 3 never have more than 3
// attempts dialing at once, every one resumes once the gateway is back
// with its bytes intact, and a session closed while its attempt waits at
// the gate closes at once (without waiting for its turn).
func TestRedialGateCapsAMassReconnect(t *testing.T) {
	cfg := testConfig()
	cfg.Redials = NewRedialGate(3)
	e := tcpEnv(t, serverConfig(cfg), nil)
	var down atomic.Bool
	var inFlight, most atomic.Int32
	var mu sync.Mutex
	links := map[net.Conn]bool{}
	dial := func(ctx context.Context) (net.Conn, error) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		time.Sleep(2 * time.Millisecond) // a dial takes a moment: attempts overlap
		if down.Load() {
			return nil, errors.New("gateway down")
		}
		c, err := e.dial(ctx)
		if err == nil {
			mu.Lock()
			links[c] = true
			mu.Unlock()
		}
		return c, err
	}
	const n = 20
	var cs, ss []*Conn
	for range n {
		c, err := Dial(context.Background(), dial, "test", cfg)
		if err != nil {
			t.Fatal(err)
		}
		s, err := e.srv.Accept()
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, c, s, "before")
		cs, ss = append(cs, c), append(ss, s)
	}
	most.Store(0)
	down.Store(true)
	mu.Lock()
	for c := range links {
		// Shut down, not closed: the link breaks as a network failure
		// would break it, and the reader (parked in the shared poller,
		// with nothing outstanding to ping for) learns it from a hang-up
		// on its socket. A descriptor closed under a parked reader
		// would only leave the poller silently.
		tc := c.(*net.TCPConn)
		tc.CloseRead()
		tc.CloseWrite()
	}
	clear(links)
	mu.Unlock()
	waitFor(t, 5*time.Second, "every session reconnecting, some waiting at the gate", func() bool {
		for _, c := range cs {
			if c.State() == StateActive {
				return false
			}
		}
		return cfg.Redials.Waiting() > 0
	})
	// One of them closed while it waits its turn: at once.
	t0 := time.Now()
	closed := cs[n-1]
	closed.Reset(CodeAppReset, "gone")
	if d := time.Since(t0); d > time.Second {
		t.Fatalf("Reset of a waiting session took %v", d)
	}
	cs, ss = cs[:n-1], ss[:n-1]
	// Its Reset dialed once more, outside the gate, to deliver the RESET
	// (a last word, not an attempt): count from after it.
	time.Sleep(50 * time.Millisecond)
	most.Store(0)
	time.Sleep(300 * time.Millisecond) // attempts back off to 50 ms: many rounds
	down.Store(false)
	for i, c := range cs {
		waitFor(t, 10*time.Second, "resumed", func() bool { return c.State() == StateActive })
		roundTrip(t, c, ss[i], "after")
		roundTrip(t, ss[i], c, "and back")
	}
	if m := most.Load(); m > 3 || m < 2 {
		t.Fatalf("at most %d attempts dialed at once, want 2 or 3 (the gate's 3)", m)
	}
	waitFor(t, 5*time.Second, "the gate empty", func() bool { return cfg.Redials.Running() == 0 && cfg.Redials.Waiting() == 0 })
	for i := range cs {
		closeBoth(cs[i], ss[i])
	}
	e.stop()
}
