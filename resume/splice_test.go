//go:build linux

package resume

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection: app plays the
// proxy's application socket (the sink), peer the application.
func tcpPair(t testing.TB) (app, peer *net.TCPConn) {
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
	d, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a := <-ch
	if a == nil {
		t.Fatal("accept failed")
	}
	return a.(*net.TCPConn), d.(*net.TCPConn)
}

func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// checkNoPipes checks that no splice pipe is open, nor any descriptor left
// beyond those open at the start (before).
func checkNoPipes(t *testing.T, before int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		open := closeIdlePipes()
		fds := openFDs(t)
		if open == 0 && fds <= before {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d splice pipes still open; %d descriptors, %d before", open, fds, before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type delivered struct {
	n   int64
	err error
}

// deliver makes s deliver to a fresh TCP socket and returns the
// application's end and where DeliverTo's end is reported.
func deliver(t testing.TB, s *Conn) (*net.TCPConn, chan delivered) {
	app, peer := tcpPair(t)
	done := make(chan delivered, 1)
	s.DeliverTo(app, func(n int64, err error) {
		if err == nil {
			app.CloseWrite() // the peer reads the rest, then EOF
		}
		app.Close()
		done <- delivered{n, err}
	})
	t.Cleanup(func() { app.Close(); peer.Close() })
	return peer, done
}

func spliceConfig() *Config {
	cfg := testConfig()
	cfg.PingInterval = 20 * time.Millisecond
	cfg.LivenessTimeout = 300 * time.Millisecond
	return cfg
}

// TestSpliceDelivers: a gateway's tcp link splices what the client sends
// to the gateway's TCP sink, byte for byte, and leaves no pipe open.
func TestSpliceDelivers(t *testing.T) {
	closeIdlePipes()
	before := openFDs(t)
	cfg := spliceConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	c, s := e.pair(cfg)
	peer, done := deliver(t, s)

	data := stream(1, 16<<20)
	werr := make(chan error, 1)
	go func() {
		err := writeRandomly(c, data, rand.New(rand.NewPCG(1, 2)))
		if err == nil {
			err = c.CloseWrite()
		}
		werr <- err
	}()
	got, err := io.ReadAll(peer)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("received %d bytes, want %d, first difference at %d", len(got), len(data), firstDiff(got, data))
	}
	d := <-done
	if d.err != nil || d.n != int64(len(data)) {
		t.Fatalf("DeliverTo ended with %d, %v; want %d, nil", d.n, d.err, len(data))
	}
	st := s.Stats()
	t.Logf("spliced %d of %d bytes", st.BytesSpliced, len(data))
	// How much depends on how fast the application reads (what its
	// socket does not take goes through the buffer): on a loaded machine,
	// less than half.
	if st.BytesSpliced == 0 {
		t.Errorf("spliced none of %d bytes: the splice path was not taken", len(data))
	}
	c.Close()
	s.Close()
	peer.Close()
	e.stop()
	checkNoPipes(t, before)
}

// TestSpliceNotForOtherSinks: a sink that is not a TCP socket, or a link
// that is not one, gets the copy path.
func TestSpliceNotForOtherSinks(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  func(testing.TB, *ServerConfig, func(net.Conn) net.Conn) *env
		tcp  bool
	}{{"pipe sink", tcpEnv, false}, {"pipe link", memEnv, true}} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := spliceConfig()
			e := tc.env(t, serverConfig(cfg), nil)
			defer e.stop()
			c, s := e.pair(cfg)
			var r io.Reader
			done := make(chan delivered, 1)
			if tc.tcp {
				peer, d := deliver(t, s)
				r, done = peer, d
			} else {
				a, b := net.Pipe()
				defer b.Close()
				s.DeliverTo(a, func(n int64, err error) { a.Close(); done <- delivered{n, err} })
				r = b
			}
			data := stream(2, 2<<20)
			go func() { c.Write(data); c.CloseWrite() }()
			got, _ := io.ReadAll(r)
			if !bytes.Equal(got, data) {
				t.Fatalf("received %d bytes, want %d", len(got), len(data))
			}
			<-done
			if n := s.Stats().BytesSpliced; n != 0 {
				t.Errorf("spliced %d bytes; want none", n)
			}
			c.Close()
			s.Close()
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestSpliceLinkFaults: links that break mid-payload (close and reset, at
// random byte positions, so inside a splice step too) and gateway-initiated
// migrations (a retired link's reader is stopped by a past deadline) while
// the gateway splices: every stream arrives byte for byte.
func TestSpliceLinkFaults(t *testing.T) {
	closeIdlePipes()
	before := openFDs(t)
	const sessions = 4
	size := 8 << 20
	if testing.Short() {
		size = 2 << 20
	}
	cfg := spliceConfig()
	cfg.BufferSize = 256 << 10
	cfg.DisconnectedBufferSize = 1 << 20
	e := tcpEnv(t, serverConfig(cfg), func(c net.Conn) net.Conn {
		m := faultClose
		if rand.IntN(2) == 0 {
			m = faultReset
		}
		return newFaultConn(c, 4<<10+rand.Int64N(400<<10), m)
	})
	acc := startAcceptor(e.srv)
	var wg sync.WaitGroup
	errs := make(chan error, sessions)
	var spliced, failures uint64
	var mu sync.Mutex
	for i := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- func() error {
				c, err := Dial(t.Context(), e.dial, "test", cfg)
				if err != nil {
					return err
				}
				defer c.Close()
				s, err := acc.get(c.SessionID())
				if err != nil {
					return err
				}
				defer s.Close()
				peer, done := deliver(t, s)
				defer peer.Close()
				data := stream(uint64(10+i), size)
				stop := make(chan struct{})
				defer close(stop)
				go func() { // migrations racing the faults
					for {
						select {
						case <-stop:
							return
						case <-time.After(time.Duration(20+rand.IntN(40)) * time.Millisecond):
							s.GoAway("test")
						}
					}
				}()
				werr := make(chan error, 1)
				go func() {
					err := writeRandomly(c, data, rand.New(rand.NewPCG(uint64(i), 3)))
					if err == nil {
						err = c.CloseWrite()
					}
					werr <- err
				}()
				peer.SetReadDeadline(time.Now().Add(60 * time.Second))
				got, err := io.ReadAll(peer)
				if err != nil {
					return fmt.Errorf("session %d: read: %w", i, err)
				}
				if err := <-werr; err != nil {
					return fmt.Errorf("session %d: write: %w", i, err)
				}
				if !bytes.Equal(got, data) {
					return fmt.Errorf("session %d: received %d bytes, want %d, first difference at %d", i, len(got), len(data), firstDiff(got, data))
				}
				if d := <-done; d.err != nil || d.n != int64(size) {
					return fmt.Errorf("session %d: DeliverTo ended with %d, %v", i, d.n, d.err)
				}
				st := s.Stats()
				mu.Lock()
				spliced += st.BytesSpliced
				failures += uint64(st.LinkFailures + st.Resumes)
				mu.Unlock()
				return nil
			}()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	t.Logf("spliced %d of %d bytes; link failures and resumes: %d", spliced, sessions*size, failures)
	if spliced == 0 {
		t.Error("nothing spliced")
	}
	if failures < sessions*5 {
		t.Errorf("only %d link failures and resumes", failures)
	}
	e.stop()
	checkNoPipes(t, before)
}

// TestSpliceSlowApp: an application that stops reading fills its socket;
// the link's reader must not wait for it (PINGs and ACKs keep flowing, the
// link survives its liveness timeout): what the socket does not take goes
// from the pipe into the receive buffer, and the pump writes it later.
func TestSpliceSlowApp(t *testing.T) {
	closeIdlePipes()
	before := openFDs(t)
	cfg := spliceConfig()
	cfg.LivenessTimeout = 150 * time.Millisecond
	cfg.BufferSize = 1 << 20
	e := tcpEnv(t, serverConfig(cfg), nil)
	c, s := e.pair(cfg)
	app, peer := tcpPair(t)
	app.SetWriteBuffer(16 << 10)
	peer.SetReadBuffer(16 << 10)
	done := make(chan delivered, 1)
	s.DeliverTo(app, func(n int64, err error) { app.CloseWrite(); done <- delivered{n, err} })
	defer app.Close()
	defer peer.Close()

	data := stream(3, 8<<20)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.CloseWrite()
		}
		werr <- err
	}()
	var got []byte
	buf := make([]byte, 64<<10)
	for len(got) < len(data) {
		if len(got) > 0 && len(got)%(2<<20) < len(buf) {
			// Stall well past the liveness timeout, several times.
			time.Sleep(400 * time.Millisecond)
		}
		peer.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := peer.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			t.Fatalf("after %d bytes: %v", len(got), err)
		}
	}
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("first difference at %d", firstDiff(got, data))
	}
	if d := <-done; d.err != nil || d.n != int64(len(data)) {
		t.Fatalf("DeliverTo ended with %d, %v", d.n, d.err)
	}
	st := s.Stats()
	t.Logf("spliced %d of %d bytes, %d link failures", st.BytesSpliced, len(data), st.LinkFailures)
	if st.LinkFailures != 0 {
		t.Errorf("%d link failures: the reader waited for the application", st.LinkFailures)
	}
	if st.BytesSpliced == 0 || st.BytesSpliced == uint64(len(data)) {
		t.Errorf("spliced %d of %d bytes: want some spliced, some through the buffer", st.BytesSpliced, len(data))
	}
	c.Close()
	s.Close()
	e.stop()
	app.Close()
	peer.Close()
	checkNoPipes(t, before)
}

// TestSpliceAppReset: the application resets its connection while the
// gateway splices to it: DeliverTo reports the error, nothing hangs and
// no pipe stays open.
func TestSpliceAppReset(t *testing.T) {
	closeIdlePipes()
	before := openFDs(t)
	cfg := spliceConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	c, s := e.pair(cfg)
	app, peer := tcpPair(t)
	done := make(chan delivered, 1)
	s.DeliverTo(app, func(n int64, err error) { done <- delivered{n, err} })

	data := stream(4, 32<<20)
	go func() { c.Write(data) }()
	if _, err := io.ReadFull(peer, make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	peer.SetLinger(0)
	peer.Close()
	select {
	case d := <-done:
		if d.err == nil {
			t.Errorf("DeliverTo ended with %d, nil; want the reset", d.n)
		}
		t.Logf("DeliverTo ended with %d, %v; spliced %d", d.n, d.err, s.Stats().BytesSpliced)
	case <-time.After(10 * time.Second):
		t.Fatal("DeliverTo did not end after the application's reset")
	}
	s.Reset(CodeAppReset, "application reset")
	app.Close()
	if _, err := io.Copy(io.Discard, c); err == nil {
		t.Error("client read no error after the reset")
	} else if !errors.As(err, new(*Error)) {
		t.Errorf("client read %v; want an *Error", err)
	}
	c.Close()
	e.stop()
	checkNoPipes(t, before)
}

// TestSpliceStalledLinkHoldsNoPipe: a link that goes silent in the middle
// of a DATA payload leaves its reader waiting in the poller for the rest;
// it must not hold a pipe meanwhile (descriptors: 9,000 sessions at 20,000).
func TestSpliceStalledLinkHoldsNoPipe(t *testing.T) {
	closeIdlePipes()
	before := openFDs(t)
	cfg := spliceConfig()
	cfg.LivenessTimeout = time.Second
	links := make(chan *faultConn, 8)
	first := true
	e := tcpEnv(t, serverConfig(cfg), func(c net.Conn) net.Conn {
		if !first {
			return c
		}
		first = false
		f := newFaultConn(c, 200<<10+1000, faultBlackhole) // inside a frame
		links <- f
		return f
	})
	c, s := e.pair(cfg)
	peer, done := deliver(t, s)
	defer peer.Close()
	data := stream(5, 1<<20)
	go func() { c.Write(data); c.CloseWrite() }()
	f := <-links
	<-f.broken
	time.Sleep(300 * time.Millisecond) // the gateway has read what arrived
	if n := closeIdlePipes(); n != 0 {
		t.Errorf("%d pipes open while the link is stalled mid-frame", n)
	}
	if st := s.Stats(); st.BytesSpliced == 0 {
		t.Errorf("nothing spliced before the stall")
	}
	got, err := io.ReadAll(peer) // after the liveness timeout and a resume
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("received %d bytes (%v), want %d; first difference at %d", len(got), err, len(data), firstDiff(got, data))
	}
	<-done
	c.Close()
	s.Close()
	peer.Close()
	e.stop()
	checkNoPipes(t, before)
}

// socketSource returns a TCP socket that delivers data and then a FIN,
// written in random pieces: what a proxy's ReadFrom reads an application
// from. The caller closes it.
func socketSource(t testing.TB, data []byte, seed uint64) *net.TCPConn {
	src, app := tcpPair(t)
	go func() {
		defer app.Close()
		if writeRandomly(app, data, rand.New(rand.NewPCG(seed, 7))) == nil {
			app.CloseWrite()
		}
	}()
	return src
}

// TestSpliceSendLinkFaults: a gateway's ReadFrom from a TCP socket sends
// bulk over its tcp links by splice (tee into a second pipe, one copy into
// the replay buffer) while the links break mid-payload and the gateway
// migrates them: every stream arrives byte for byte, and most bytes went
// the splice path.
func TestSpliceSendLinkFaults(t *testing.T) {
	closeIdlePipes()
	before := openFDs(t)
	const sessions = 4
	size := 8 << 20
	if testing.Short() {
		size = 2 << 20
	}
	cfg := spliceConfig()
	cfg.BufferSize = 1 << 20
	cfg.DisconnectedBufferSize = 2 << 20
	e := tcpEnv(t, serverConfig(cfg), func(c net.Conn) net.Conn {
		m := faultClose
		if rand.IntN(2) == 0 {
			m = faultReset
		}
		return newFaultConn(c, 4<<10+rand.Int64N(2<<20), m)
	})
	acc := startAcceptor(e.srv)
	var wg sync.WaitGroup
	errs := make(chan error, sessions)
	var splicedOut, failures uint64
	var mu sync.Mutex
	for i := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- func() error {
				c, err := Dial(t.Context(), e.dial, "test", cfg)
				if err != nil {
					return err
				}
				defer c.Close()
				s, err := acc.get(c.SessionID())
				if err != nil {
					return err
				}
				defer s.Close()
				data := stream(uint64(20+i), size)
				src := socketSource(t, data, uint64(i))
				stop := make(chan struct{})
				defer close(stop)
				go func() { // migrations racing the faults
					for {
						select {
						case <-stop:
							return
						case <-time.After(time.Duration(50+rand.IntN(100)) * time.Millisecond):
							s.GoAway("test")
						}
					}
				}()
				werr := make(chan error, 1)
				go func() {
					defer src.Close()
					n, err := s.ReadFrom(src)
					if err == nil && n != int64(size) {
						err = fmt.Errorf("ReadFrom read %d bytes, want %d", n, size)
					}
					if err == nil {
						err = s.CloseWrite()
					}
					werr <- err
				}()
				c.SetReadDeadline(time.Now().Add(60 * time.Second))
				got, err := io.ReadAll(c)
				if err != nil {
					return fmt.Errorf("session %d: read: %w", i, err)
				}
				if err := <-werr; err != nil {
					return fmt.Errorf("session %d: write: %w", i, err)
				}
				if !bytes.Equal(got, data) {
					return fmt.Errorf("session %d: received %d bytes, want %d, first difference at %d", i, len(got), len(data), firstDiff(got, data))
				}
				st := s.Stats()
				mu.Lock()
				splicedOut += st.BytesSplicedOut
				failures += uint64(st.LinkFailures + st.Resumes)
				mu.Unlock()
				return nil
			}()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	t.Logf("sent %d of %d bytes by splice; link failures and resumes: %d", splicedOut, sessions*size, failures)
	if splicedOut == 0 {
		t.Error("nothing sent by splice")
	}
	if failures < sessions*2 {
		t.Errorf("only %d link failures and resumes", failures)
	}
	e.stop()
	checkNoPipes(t, before)
}

// TestSpliceSendBothWays: bulk both ways between two ReadFroms from TCP
// sockets and two DeliverTos to TCP sockets, no faults: byte for byte, the
// gateway's bulk mostly by splice, and a request stream after it (small
// writes) is echoed as it comes.
func TestSpliceSendBothWays(t *testing.T) {
	closeIdlePipes()
	before := openFDs(t)
	cfg := spliceConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	c, s := e.pair(cfg)
	const size = 16 << 20
	up, down := stream(31, size), stream(32, size)
	cPeer, cDone := deliver(t, c)
	sPeer, sDone := deliver(t, s)
	werr := make(chan error, 2)
	for _, w := range []struct {
		conn *Conn
		data []byte
	}{{c, up}, {s, down}} {
		src := socketSource(t, w.data, uint64(len(w.data)))
		go func() {
			defer src.Close()
			_, err := w.conn.ReadFrom(src)
			if err == nil {
				err = w.conn.CloseWrite()
			}
			werr <- err
		}()
	}
	gotUp, gotDown := make(chan []byte, 1), make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(sPeer); gotUp <- b }()
	go func() { b, _ := io.ReadAll(cPeer); gotDown <- b }()
	for range 2 {
		if err := <-werr; err != nil {
			t.Fatal(err)
		}
	}
	if b := <-gotUp; !bytes.Equal(b, up) {
		t.Fatalf("up: received %d bytes, want %d, first difference at %d", len(b), size, firstDiff(b, up))
	}
	if b := <-gotDown; !bytes.Equal(b, down) {
		t.Fatalf("down: received %d bytes, want %d, first difference at %d", len(b), size, firstDiff(b, down))
	}
	for _, d := range []chan delivered{cDone, sDone} {
		if r := <-d; r.err != nil || r.n != size {
			t.Fatalf("DeliverTo ended with %d, %v", r.n, r.err)
		}
	}
	cs, ss := c.Stats(), s.Stats()
	t.Logf("sent by splice: client %d, gateway %d of %d each", cs.BytesSplicedOut, ss.BytesSplicedOut, size)
	if cs.BytesSplicedOut < size/4 || ss.BytesSplicedOut < size/4 {
		t.Errorf("sent by splice: client %d, gateway %d of %d each; want most", cs.BytesSplicedOut, ss.BytesSplicedOut, size)
	}
	c.Close()
	s.Close()
	cPeer.Close()
	sPeer.Close()
	e.stop()
	checkNoPipes(t, before)
}
