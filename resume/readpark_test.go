//go:build linux

package resume

import (
	"bytes"
	"io"
	"runtime"
	"strings"
	"testing"
	"time"
)

// readerGoroutines counts goroutines running a link's reader.
func readerGoroutines() int { return goroutinesIn("resume.(*link).readFrames") }

// goroutinesIn counts goroutines whose stack holds fn.
func goroutinesIn(fn string) int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, fn) {
			n++
		}
	}
	return n
}

// parked reports whether the session's current link has its reader in the
// shared poller.
func parked(c *Conn) bool {
	s := c.s
	s.mu.Lock()
	l := s.link
	s.unlock()
	if l == nil {
		return false
	}
	l.rp.mu.Lock()
	defer l.rp.mu.Unlock()
	return l.rp.id != 0
}

// waitIdle waits until both ends' readers are parked in the shared poller
// and no reader goroutine runs.
func waitIdle(t *testing.T, c, s *Conn, sessions int) {
	t.Helper()
	waitFor(t, 5*time.Second, "idle readers parked in the shared poller", func() bool {
		return parked(c) && parked(s) && readerGoroutines() == 0 && readPoller.registered() == 2*sessions
	})
}

func roundTrip(t *testing.T, from, to *Conn, msg string) {
	t.Helper()
	if _, err := from.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(to, got); err != nil || !bytes.Equal(got, []byte(msg)) {
		t.Fatalf("read %q, %v; want %q", got, err, msg)
	}
}

// closeBoth closes both ends at once (each waits for the other's ACK).
func closeBoth(c, s *Conn) {
	done := make(chan struct{})
	go func() { c.Close(); close(done) }()
	s.Close()
	<-done
}

// waitNoLeaks waits until nothing is registered, the epoll instance is
// closed and the descriptors are back to want.
func waitNoLeaks(t *testing.T, want int) {
	t.Helper()
	waitFor(t, 5*time.Second, "registrations and descriptors released", func() bool {
		return readPoller.registered() == 0 && readerGoroutines() == 0 && openFDs(t) <= want
	})
}

// An idle session keeps no reader goroutine on either end; data from
// either side, a link break and Close still reach the parked readers.
func TestIdleReaderParks(t *testing.T) {
	fds := openFDs(t)
	cfg := testConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	c, s := e.pair(cfg)
	roundTrip(t, c, s, "a")
	roundTrip(t, s, c, "b")
	waitIdle(t, c, s, 1)

	roundTrip(t, c, s, "from the client")
	waitIdle(t, c, s, 1)
	roundTrip(t, s, c, "from the gateway")
	waitIdle(t, c, s, 1)

	// A link break: the client's side is closed (its parked reader is
	// woken by link.close), the gateway's reader sees EOF from the poller.
	before := c.Stats().Resumes
	c.Kill()
	waitFor(t, 5*time.Second, "resumed", func() bool { return c.Stats().Resumes > before && c.State() == StateActive })
	roundTrip(t, c, s, "after the break")
	roundTrip(t, s, c, "and back")
	waitIdle(t, c, s, 1)

	closeBoth(c, s)
	e.stop()
	waitNoLeaks(t, fds)
}

// A hand-over's Freeze closes the links of parked readers, which must
// return (Snapshot and the next process wait for that); Thaw resumes.
func TestIdleReaderFreeze(t *testing.T) {
	fds := openFDs(t)
	cfg := testConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	c, s := e.pair(cfg)
	roundTrip(t, c, s, "a")
	waitIdle(t, c, s, 1)
	if n := len(e.srv.Freeze()); n != 1 {
		t.Fatalf("Freeze: %d sessions", n)
	}
	if _, err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "gateway link's reader done", func() bool {
		s.s.mu.Lock()
		l := s.s.last
		s.s.unlock()
		return l != nil && isClosed(l.readerDone)
	})
	e.srv.Thaw()
	waitFor(t, 5*time.Second, "resumed", func() bool { return c.Stats().Resumes > 0 && s.State() == StateActive })
	roundTrip(t, c, s, "thawed")
	waitIdle(t, c, s, 1)
	closeBoth(c, s)
	e.stop()
	waitNoLeaks(t, fds)
}

// A GOAWAY migration retires the gateway's old link with a past read
// deadline, which must reach its reader parked in the shared poller.
func TestIdleReaderRetired(t *testing.T) {
	fds := openFDs(t)
	cfg := testConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	c, s := e.pair(cfg)
	roundTrip(t, c, s, "a")
	waitIdle(t, c, s, 1)
	s.s.mu.Lock()
	old := s.s.link
	s.s.unlock()
	if err := s.GoAway("move"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "migrated", func() bool { return c.Stats().Resumes > 0 })
	waitFor(t, 5*time.Second, "the retired link's reader done", func() bool { return isClosed(old.readerDone) })
	roundTrip(t, c, s, "moved")
	waitIdle(t, c, s, 1)
	closeBoth(c, s)
	e.stop()
	waitNoLeaks(t, fds)
}

// A client's Reset waits for the gateway to close the link under a read
// deadline set by finish; the gateway's parked reader reads the RESET.
func TestIdleReaderReset(t *testing.T) {
	fds := openFDs(t)
	cfg := testConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	c, s := e.pair(cfg)
	roundTrip(t, c, s, "a")
	waitIdle(t, c, s, 1)
	c.Reset(CodeAppReset, "bye")
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("gateway never saw the RESET")
	}
	s.Close()
	e.stop()
	waitNoLeaks(t, fds)
}

// Many idle sessions: one registration per link, no reader goroutines,
// and every session still echoes.
func TestIdleReaderMany(t *testing.T) {
	fds := openFDs(t)
	cfg := testConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	const n = 50
	var cs, ss []*Conn
	for range n {
		c, s := e.pair(cfg)
		roundTrip(t, c, s, "x")
		cs, ss = append(cs, c), append(ss, s)
	}
	waitFor(t, 5*time.Second, "all parked", func() bool {
		return readPoller.registered() == 2*n && readerGoroutines() == 0
	})
	for i := range n {
		roundTrip(t, cs[i], ss[i], "ping")
		roundTrip(t, ss[i], cs[i], "pong")
	}
	for i := range n {
		closeBoth(cs[i], ss[i])
	}
	e.stop()
	waitNoLeaks(t, fds)
}

// An ACK that comes in the middle of a request/response stream (AckDelay
// after a request) leaves the reader waiting in its goroutine, as DATA
// does: parked after it, the next answer would take the shared poller's
// dispatcher. Once the stream is quiet the reader parks as before.
func TestAckMidStreamKeepsTheReaderOut(t *testing.T) {
	cfg := testConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	defer e.stop()
	c, s := e.pair(cfg)
	defer closeBoth(c, s)
	observed := false
	for attempt := 0; attempt < 5 && !observed; attempt++ {
		roundTrip(t, c, s, "request")
		roundTrip(t, s, c, "answer")
		// The gateway's ACK of the request reaches the client's reader
		// about AckDelay after the request, with DATA (the answer) just
		// before it.
		waitFor(t, 5*time.Second, "the request acknowledged", func() bool {
			c.s.mu.Lock()
			defer c.s.unlock()
			return c.s.send.acked == c.s.send.next
		})
		acked := time.Now()
		time.Sleep(10 * time.Millisecond) // well past the old park-at-once
		p := parked(c)
		if time.Since(acked) > idleBeforeShared/2 {
			continue // this machine was too slow to tell: try again
		}
		if p {
			t.Fatalf("the client's reader parked in the shared poller %v after an ACK mid-stream (AckDelay %v after the request)",
				time.Since(acked), cfg.AckDelay)
		}
		observed = true
	}
	if !observed {
		t.Fatal("could not check the reader within idleBeforeShared/2 of the ACK in 5 attempts")
	}
	waitIdle(t, c, s, 1)
}
