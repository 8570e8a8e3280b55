//go:build linux

package resume

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// feedSource is the SocketSource a proxy hands to NewFeed, counting what
// the feed read.
type feedSource struct {
	c *net.TCPConn
	n atomic.Int64
}

func (f *feedSource) TCPConn() *net.TCPConn   { return f.c }
func (f *feedSource) Consumed(n int, _ error) { f.n.Add(int64(n)) }
func (f *feedSource) Read(p []byte) (int, error) {
	n, err := f.c.Read(p)
	f.n.Add(int64(n))
	return n, err
}

// feedGoroutines counts goroutines running a Feed's reads.
func feedGoroutines() int { return goroutinesIn("resume.(*Feed)") }

func feedParked(f *Feed) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.id != 0
}

type feedEnd struct {
	n   int64
	err error
}

func startFeed(t *testing.T, c *Conn, app *net.TCPConn) (*Feed, *feedSource, chan feedEnd) {
	t.Helper()
	src := &feedSource{c: app}
	ended := make(chan feedEnd, 2) // 2: a second call would show
	f := c.NewFeed(src, func(n int64, err error) { ended <- feedEnd{n, err} })
	return f, src, ended
}

func waitFeedParked(t *testing.T, f *Feed) {
	t.Helper()
	waitFor(t, 5*time.Second, "the feed parked in the shared poller, no goroutine reading", func() bool {
		return feedParked(f) && feedGoroutines() == 0
	})
}

func waitFeedEnd(t *testing.T, ended chan feedEnd) feedEnd {
	t.Helper()
	select {
	case e := <-ended:
		select {
		case e2 := <-ended:
			t.Fatalf("done called twice: %+v, then %+v", e, e2)
		case <-time.After(50 * time.Millisecond):
		}
		return e
	case <-time.After(5 * time.Second):
		t.Fatal("the feed never ended")
	}
	return feedEnd{}
}

// A Feed keeps no goroutine while its socket is quiet, and every byte
// written to the socket, small or bulk (the splice path), reaches the
// peer in order; the application's FIN ends it with nil and the count.
func TestFeedParksBetweenReads(t *testing.T) {
	fds := openFDs(t)
	cfg := testConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	c, s := e.pair(cfg)
	app, peer := tcpPair(t)
	f, src, ended := startFeed(t, c, app)
	f.Start()
	waitFeedParked(t, f)

	var want bytes.Buffer
	read := func(n int) {
		t.Helper()
		got := make([]byte, n)
		if _, err := io.ReadFull(s, got); err != nil {
			t.Fatal(err)
		}
		w := want.Next(n)
		if !bytes.Equal(got, w) {
			t.Fatalf("peer got %q..., want %q...", got[:min(16, n)], w[:min(16, n)])
		}
	}
	for i, msg := range []string{"hello", "world", strings.Repeat("x", 300)} {
		peer.Write([]byte(msg))
		want.WriteString(msg)
		read(len(msg))
		if i < 2 {
			waitFeedParked(t, f)
		}
	}
	// Bulk: large reads turn on the splice path, which must give the
	// reads back to the poller once the socket is quiet again.
	bulk := make([]byte, 1<<20)
	for i := range bulk {
		bulk[i] = byte(i * 7 / 5)
	}
	go peer.Write(bulk)
	want.Write(bulk)
	read(len(bulk))
	waitFeedParked(t, f)

	peer.CloseWrite()
	end := waitFeedEnd(t, ended)
	total := int64(5 + 5 + 300 + len(bulk))
	if end.err != nil || end.n != total || src.n.Load() != total {
		t.Fatalf("feed ended with %d, %v (source counted %d); want %d, nil", end.n, end.err, src.n.Load(), total)
	}
	if feedParked(f) {
		t.Fatal("an ended feed is still registered")
	}
	// The write lock is free again: the session takes a Write and a FIN.
	if _, err := c.Write([]byte("!")); err != nil {
		t.Fatal(err)
	}
	read1 := make([]byte, 1)
	if _, err := io.ReadFull(s, read1); err != nil || read1[0] != '!' {
		t.Fatalf("after the feed: %q, %v", read1, err)
	}
	app.Close()
	peer.Close()
	closeBoth(c, s)
	e.stop()
	waitFor(t, 5*time.Second, "no registrations", func() bool { return readPoller.registered() == 0 })
	checkNoPipes(t, fds) // the bulk reads' splice pipes too
}

// A socket closed while its feed is parked would never wake it (epoll
// drops a closed descriptor silently): Unpark first, then the close ends
// the feed with net.ErrClosed. Unpark before Start does the same.
func TestFeedUnparkBeforeClose(t *testing.T) {
	fds := openFDs(t)
	cfg := testConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	c, s := e.pair(cfg)

	closed := func(app *net.TCPConn) { app.Close() }
	pastDeadline := func(app *net.TCPConn) { app.SetReadDeadline(time.Unix(1, 0)) }
	closedErr := func(err error) bool { return errors.Is(err, net.ErrClosed) }
	parkedThere := func(f *Feed) { waitFeedParked(t, f) }

	// Parked in the shared poller: a close, or a deadline, after Unpark.
	unparkCase(t, c, false, parkedThere, closed, closedErr)
	unparkCase(t, c, false, parkedThere, pastDeadline, isTimeout)
	// Unparked before it started: the first wait is a goroutine's.
	unparkCase(t, c, true, func(f *Feed) {
		waitFor(t, 5*time.Second, "a goroutine waiting", func() bool { return feedGoroutines() == 1 })
		if feedParked(f) {
			t.Fatal("an unparked feed registered")
		}
	}, closed, closedErr)

	// Unparked during the wait before parking, under the feed's own
	// deadline: the unparker's deadline or close is the one seen.
	defer func(d time.Duration) { idleBeforeShared = d }(idleBeforeShared)
	idleBeforeShared = time.Hour
	staged := func(f *Feed) {
		waitFor(t, 5*time.Second, "a goroutine waiting", func() bool { return feedGoroutines() == 1 })
	}
	unparkCase(t, c, false, staged, closed, closedErr)
	unparkCase(t, c, false, staged, pastDeadline, isTimeout)
	// ... and a deadline in the future, after which the feed's own
	// (cleared once the wait is over) must not end it early.
	app, peer := tcpPair(t)
	f, _, ended := startFeed(t, c, app)
	f.Start()
	staged(f)
	f.Unpark()
	app.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	t0 := time.Now()
	if end := waitFeedEnd(t, ended); !isTimeout(end.err) || time.Since(t0) < 150*time.Millisecond {
		t.Fatalf("feed ended with %v after %v, want a timeout after 200ms", end.err, time.Since(t0))
	}
	app.Close()
	peer.Close()

	closeBoth(c, s)
	e.stop()
	waitNoLeaks(t, fds)
}

// unparkCase starts a feed on a fresh socket pair (after an Unpark if
// early), waits for the state ready checks, Unparks it, applies end to the
// application's socket and checks that the feed ends with an error for
// which want is true.
func unparkCase(t *testing.T, c *Conn, early bool, ready func(*Feed), end func(*net.TCPConn), want func(error) bool) {
	t.Helper()
	app, peer := tcpPair(t)
	defer peer.Close()
	defer app.Close()
	f, _, ended := startFeed(t, c, app)
	if early {
		f.Unpark()
	}
	f.Start()
	ready(f)
	f.Unpark()
	if feedParked(f) {
		t.Fatal("still registered after Unpark")
	}
	end(app)
	if e := waitFeedEnd(t, ended); !want(e.err) {
		t.Fatalf("feed ended with %v", e.err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// The session's end wakes nothing in a parked feed (its owner resets the
// socket after Unpark); a write error after the session closed is
// reported to done, once.
func TestFeedSessionClosedUnderIt(t *testing.T) {
	fds := openFDs(t)
	cfg := testConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	c, s := e.pair(cfg)
	app, peer := tcpPair(t)
	f, _, ended := startFeed(t, c, app)
	f.Start()
	waitFeedParked(t, f)
	c.Reset(CodeAppReset, "gone")
	<-s.Done()
	// The next bytes find the session closed.
	peer.Write([]byte("late"))
	end := waitFeedEnd(t, ended)
	var re *Error
	if end.err == nil || (!errors.Is(end.err, ErrConnClosed) && !errors.As(end.err, &re)) {
		t.Fatalf("feed ended with %d, %v; want the session's error", end.n, end.err)
	}
	app.Close()
	peer.Close()
	s.Close()
	e.stop()
	waitNoLeaks(t, fds)
}
