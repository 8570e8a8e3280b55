//go:build linux

package resume

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// keepaliveOpts reads the kernel keepalive of the session's current link.
func keepaliveOpts(t *testing.T, c *Conn) (on, idle, intvl, cnt int) {
	t.Helper()
	s := c.s
	s.mu.Lock()
	l := s.link
	s.unlock()
	if l == nil {
		t.Fatal("no link")
	}
	sc, ok := l.sock.(syscall.Conn)
	if !ok {
		t.Fatalf("link socket %T", l.sock)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) {
		on, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE)
		idle, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
		intvl, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPINTVL)
		cnt, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPCNT)
	})
	return
}

// An idle TCP link is probed by the kernel on the keepalive schedule
// (client after KeepaliveInterval, gateway after twice it, every
// PingInterval, LivenessTimeout's worth of probes) and sends no PING of
// its own; with KeepalivePing, or a sub-second interval, it pings.
func TestKernelKeepalive(t *testing.T) {
	for _, tc := range []struct {
		name        string
		interval    time.Duration
		liveness    time.Duration
		ping        bool
		wantKernel  bool
		clientIdle  int
		gatewayIdle int
		count       int
	}{
		// PingInterval 250 ms rounds to the kernel's one second; 2 s
		// of liveness would be two probes, but it takes at least
		// minKernelProbes; 15 s is fifteen.
		{"kernel", time.Second, 2 * time.Second, false, true, 1, 2, minKernelProbes},
		{"kernel-long-liveness", 2 * time.Second, 15 * time.Second, false, true, 2, 4, 15},
		{"ping", time.Second, 2 * time.Second, true, false, 0, 0, 0},
		{"subsecond", 300 * time.Millisecond, 2 * time.Second, false, false, 0, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.PingInterval = 250 * time.Millisecond
			cfg.LivenessTimeout = tc.liveness
			cfg.KeepaliveInterval = tc.interval
			cfg.KeepalivePing = tc.ping
			e := tcpEnv(t, serverConfig(cfg), nil)
			defer e.stop()
			c, s := e.pair(cfg)
			defer closeBoth(c, s)
			for _, end := range []struct {
				name string
				c    *Conn
				idle int
			}{{"client", c, tc.clientIdle}, {"gateway", s, tc.gatewayIdle}} {
				on, idle, intvl, cnt := keepaliveOpts(t, end.c)
				if !tc.wantKernel {
					continue
				}
				if on != 1 || idle != end.idle || intvl != 1 || cnt != tc.count {
					t.Errorf("%s: SO_KEEPALIVE %d, idle %d s, interval %d s, count %d; want 1, %d, 1, %d", end.name, on, idle, intvl, cnt, end.idle, tc.count)
				}
			}
			// The client's first PING (it confirms the session and
			// measures the RTT) is answered; no DATA was sent, so the
			// links are idle from then on, and a PING-probed client
			// pings again after one interval.
			waitFor(t, 5*time.Second, "the first PONG", func() bool { return c.Stats().RTT > 0 })
			cp0, sp0 := pingsSent(c), pingsSent(s)
			quiet := tc.interval*5/2 + 200*time.Millisecond
			if tc.wantKernel {
				// An absence: only a span of time shows it, here
				// past the gateway's first keepalive (2 intervals).
				time.Sleep(quiet)
				if cp, sp := pingsSent(c), pingsSent(s); cp != cp0 || sp != sp0 {
					t.Errorf("kernel-probed links sent PINGs: client at %d (first %d), gateway at %d (first %d)", cp, cp0, sp, sp0)
				}
			} else {
				waitFor(t, quiet, "the client's keepalive PING", func() bool { return pingsSent(c) > cp0 })
			}
			if st := c.Stats(); st.LinkFailures != 0 || st.State != StateActive {
				t.Errorf("client: %+v", st)
			}
			roundTrip(t, c, s, "after the idle spell")
			roundTrip(t, s, c, "and back")
		})
	}
}

// netns runs functions on one OS thread in a network namespace of its own,
// so that the sockets they create live there: the test can take the
// namespace's loopback down under established connections, which drops
// every packet (a dead path that no peer's kernel answers).
type netns struct {
	fns  chan func()
	done chan struct{}
}

func newNetns(t *testing.T) *netns {
	t.Helper()
	n := &netns{fns: make(chan func()), done: make(chan struct{})}
	errc := make(chan error, 1)
	go func() {
		defer close(n.done)
		// The thread never returns to the pool: it ends with the
		// goroutine, namespace and all.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- nil
		for f := range n.fns {
			f()
		}
	}()
	if err := <-errc; err != nil {
		t.Skipf("no network namespace (needs CAP_SYS_ADMIN): %v", err)
	}
	t.Cleanup(func() { close(n.fns); <-n.done })
	n.setLoopback(t, true)
	return n
}

// run runs f in the namespace and returns when it has.
func (n *netns) run(f func()) {
	done := make(chan struct{})
	n.fns <- func() { f(); close(done) }
	<-done
}

func (n *netns) setLoopback(t *testing.T, up bool) {
	t.Helper()
	var err error
	n.run(func() {
		fd, e := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if e != nil {
			err = e
			return
		}
		defer unix.Close(fd)
		ifr, e := unix.NewIfreq("lo")
		if e != nil {
			err = e
			return
		}
		if e := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); e != nil {
			err = e
			return
		}
		flags := ifr.Uint16()
		if up {
			flags |= unix.IFF_UP
		} else {
			flags &^= unix.IFF_UP
		}
		ifr.SetUint16(flags)
		err = unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
	})
	if err != nil {
		t.Fatalf("loopback up=%v: %v", up, err)
	}
}

// netnsPair is a session over TCP in a network namespace of its own
// (newNetns), and the client's log.
func netnsPair(t *testing.T, cfg *Config) (ns *netns, c, s *Conn, clog *syncBuffer) {
	t.Helper()
	ns = newNetns(t)
	clog = new(syncBuffer)
	ccfg := *cfg
	ccfg.Logger = slogText(clog)
	srv, err := NewServer(serverConfig(cfg))
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	ns.run(func() { ln, err = net.Listen("tcp", "127.0.0.1:0") })
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { srv.Serve(ln); close(served) }()
	t.Cleanup(func() { srv.Close(); <-served })
	addr := ln.Addr().String()
	dial := func(ctx context.Context) (net.Conn, error) {
		var c net.Conn
		var err error
		ns.run(func() {
			// The socket is made on the namespace's thread; only the
			// connect may wait, and it fails at once while lo is down.
			c, err = (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "tcp", addr)
		})
		return c, err
	}
	c, err = Dial(context.Background(), dial, "test", &ccfg)
	if err != nil {
		t.Fatal(err)
	}
	s, err = srv.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeBoth(c, s) })
	return ns, c, s, clog
}

// On a kernel-probed TCP link the attention window costs one PING once the
// client has its answer (the client's, PingInterval after it; none from
// the gateway), and leaves the kernel's idle schedule alone; a client
// still waiting for its answer pings (the gateway does not).
func TestKernelLinkAttention(t *testing.T) {
	cfg := testConfig()
	cfg.PingInterval = time.Second
	cfg.LivenessTimeout = 3 * time.Second
	cfg.KeepaliveInterval = time.Minute
	e := tcpEnv(t, serverConfig(cfg), nil)
	defer e.stop()
	c, s := e.pair(cfg)
	defer closeBoth(c, s)
	waitFor(t, 5*time.Second, "the first PONG", func() bool { return c.Stats().RTT > 0 })
	cp0, sp0 := pingsSent(c), pingsSent(s)
	roundTrip(t, c, s, "request")
	roundTrip(t, s, c, "answer")
	answered := time.Now()
	waitFor(t, 3*cfg.PingInterval, "the client's PING after the answer", func() bool { return pingsSent(c) > cp0 })
	cp1 := pingsSent(c)
	if early := answered.Add(cfg.PingInterval - 100*time.Millisecond).UnixNano(); cp1 < early {
		t.Errorf("the client pinged %v after its answer, before PingInterval", time.Duration(cp1-answered.UnixNano()))
	}
	// An absence: only a span of time shows it, here past the
	// interval after which a busy link would have pinged again.
	time.Sleep(cfg.PingInterval + 500*time.Millisecond)
	if cp, sp := pingsSent(c), pingsSent(s); cp != cp1 || sp != sp0 {
		t.Errorf("answered request cost more PINGs: client at %d (was %d), gateway at %d (was %d)", cp, cp1, sp, sp0)
	}
	for _, end := range []struct {
		name string
		c    *Conn
		idle int
	}{{"client", c, 60}, {"gateway", s, 120}} {
		if _, idle, intvl, cnt := keepaliveOpts(t, end.c); idle != end.idle || intvl != 1 || cnt != minKernelProbes {
			t.Errorf("%s after DATA: keepalive idle %d s, interval %d s, count %d; want %d, 1, %d", end.name, idle, intvl, cnt, end.idle, minKernelProbes)
		}
	}
	roundTrip(t, c, s, "unanswered")
	waitFor(t, 3*cfg.PingInterval, "the waiting client's PING", func() bool { return pingsSent(c) > cp1 })
	if sp := pingsSent(s); sp != sp0 {
		t.Errorf("gateway pinged on a kernel-probed link (%d, was %d)", sp, sp0)
	}
	if st := c.Stats(); st.LinkFailures != 0 || st.State != StateActive {
		t.Errorf("client: %+v", st)
	}
}

// A path that dies (every packet dropped) under a client waiting for its
// answer on a kernel-probed link is found by the client's PINGs within
// PingInterval + LivenessTimeout; the answer, written while the path was
// dead, arrives once it is back.
func TestKernelLinkAwaitingAnswerDeadPath(t *testing.T) {
	cfg := testConfig()
	cfg.PingInterval = time.Second
	cfg.LivenessTimeout = 3 * time.Second
	cfg.KeepaliveInterval = time.Minute
	cfg.ReconnectTimeout = time.Minute
	ns, c, s, _ := netnsPair(t, cfg)
	waitFor(t, 5*time.Second, "the first PONG", func() bool { return c.Stats().RTT > 0 })
	roundTrip(t, c, s, "request")
	waitFor(t, time.Second, "the request acknowledged", func() bool { return unacked(c) == 0 })
	down := time.Now()
	ns.setLoopback(t, false)
	bound := cfg.PingInterval + cfg.LivenessTimeout + 500*time.Millisecond
	waitFor(t, bound, "the waiting client to find the dead path", func() bool { return c.Stats().LinkFailures == 1 })
	if found := time.Since(down); found < cfg.LivenessTimeout-100*time.Millisecond {
		t.Errorf("dead path found after %v, before the liveness timeout", found)
	}
	if _, err := s.Write([]byte("the answer")); err != nil {
		t.Fatal(err)
	}
	ns.setLoopback(t, true)
	got := make([]byte, len("the answer"))
	c.SetReadDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "the answer" {
		t.Fatalf("client read %q, %v", got, err)
	}
	if st := c.Stats(); st.Resumes != 1 || st.State != StateActive {
		t.Errorf("client after the path came back: %+v", st)
	}
}

// A path that dies under an idle TCP session, with no peer kernel to
// answer (every packet dropped), is found by the kernel's probes within
// KeepaliveInterval + max(LivenessTimeout, minKernelProbes s) on the client; the parked reader
// learns it from the poller. Once the path is back the client resumes and
// what the applications wrote meanwhile arrives, byte for byte.
func TestKernelKeepaliveDeadPath(t *testing.T) {
	cfg := testConfig()
	cfg.PingInterval = time.Second
	cfg.LivenessTimeout = 2 * time.Second
	cfg.KeepaliveInterval = time.Second
	ns, c, s, clog := netnsPair(t, cfg)
	if _, _, _, cnt := keepaliveOpts(t, c); cnt != minKernelProbes {
		t.Fatalf("client keepalive count %d, want %d", cnt, minKernelProbes)
	}
	waitIdle(t, c, s, 1)

	down := time.Now()
	ns.setLoopback(t, false)
	waitFor(t, 30*time.Second, "the client to find the dead path", func() bool { return c.Stats().LinkFailures == 1 })
	found := time.Since(down)
	// Silence counts from the last segment, before down: found within
	// idle + probes (minKernelProbes a second apart, more than
	// LivenessTimeout's 2), plus the kernel's timer slack.
	if bound := cfg.KeepaliveInterval + minKernelProbes*time.Second + 1500*time.Millisecond; found > bound {
		t.Errorf("dead path found after %v, want within %v", found, bound)
	}
	if logs := clog.String(); !strings.Contains(logs, "link lost") || !(strings.Contains(logs, "timed out") || strings.Contains(logs, "unreachable")) {
		t.Errorf("client log does not say the kernel timed the link out:\n%s", logs)
	}
	// Both applications write while the path is down.
	up, downMsg := []byte("written while the path was dead"), []byte("and the other way")
	if _, err := c.Write(up); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write(downMsg); err != nil {
		t.Fatal(err)
	}
	ns.setLoopback(t, true)
	got := make([]byte, len(up))
	s.SetReadDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.ReadFull(s, got); err != nil || !bytes.Equal(got, up) {
		t.Fatalf("gateway read %q, %v", got, err)
	}
	got = make([]byte, len(downMsg))
	c.SetReadDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, downMsg) {
		t.Fatalf("client read %q, %v", got, err)
	}
	if st := c.Stats(); st.Resumes < 1 || st.State != StateActive {
		t.Errorf("client after the path came back: %+v", st)
	}
}

func slogText(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type middlebox struct {
	net.Conn
	via bool
}

func (m middlebox) ViaMiddlebox() bool { return m.via }
func (m middlebox) NetConn() net.Conn  { return m.Conn }

// peerSocket finds the TCP socket under the layers a link may come in
// (TLS, TLSSocket, a PROXY conn), and none where the socket ends at a
// middlebox or there is no socket.
func TestPeerSocket(t *testing.T) {
	tc, other := tcpPair(t)
	defer tc.Close()
	defer other.Close()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	for _, c := range []struct {
		name string
		conn net.Conn
		want *net.TCPConn
	}{
		{"tcp", tc, tc},
		{"tls", tls.Client(tc, &tls.Config{}), tc},
		{"tls over TLSSocket", tls.Client(TLSSocket(tc), &tls.Config{}), tc},
		{"direct PROXY conn", middlebox{Conn: tc}, tc},
		{"tls over a direct PROXY conn", tls.Client(TLSSocket(middlebox{Conn: tc}), &tls.Config{}), tc},
		{"through a balancer", middlebox{Conn: tc, via: true}, nil},
		{"tls through a balancer", tls.Client(middlebox{Conn: tc, via: true}, &tls.Config{}), nil},
		{"pipe", a, nil},
	} {
		if got := peerSocket(c.conn); got != c.want {
			t.Errorf("%s: peerSocket %v, want %v", c.name, got, c.want)
		}
	}
}
