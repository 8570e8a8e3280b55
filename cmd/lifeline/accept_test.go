package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// brokenListener fails every Accept with a permanent error, as a listening
// socket that the kernel no longer accepts on does.
type brokenListener struct {
	net.Listener
	calls atomic.Int64
}

func (l *brokenListener) Accept() (net.Conn, error) {
	l.calls.Add(1)
	return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: os.NewSyscallError("accept4", syscall.EINVAL)}
}

// A listener that dies for good ends the process with exit code 1 and an
// error line, on the gateway (whose Serve error used to be ignored: a
// zombie that accepts nothing) and on the client sidecar.
func TestDeadListenerEndsProcess(t *testing.T) {
	for _, args := range [][]string{
		{"gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"},
		{"client", "--transport", "tcp", "--listen", "127.0.0.1:0", "--gateway", "127.0.0.1:1"},
	} {
		t.Run(args[0], func(t *testing.T) {
			var broken atomic.Pointer[brokenListener]
			testHookListener = func(l net.Listener) net.Listener {
				b := &brokenListener{Listener: l}
				broken.Store(b)
				return b
			}
			defer func() { testHookListener = nil }()
			code, _, stderr := runCLIWithin(t, 10*time.Second, args...)
			if code != exitRuntime {
				t.Errorf("exit code %d, want %d", code, exitRuntime)
			}
			if b := broken.Load(); b == nil || b.calls.Load() != 1 {
				t.Errorf("broken listener not used once: %v", b)
			}
			lines := strings.Split(strings.TrimRight(stderr, "\n"), "\n")
			last := lines[len(lines)-1]
			if !strings.HasPrefix(last, "lifeline "+args[0]+": "+args[0]+" listener 127.0.0.1:") || !strings.HasSuffix(last, "invalid argument") {
				t.Errorf("last stderr line %q, want the listener's error", last)
			}
			if !strings.Contains(stderr, `msg="listener failed; exiting"`) {
				t.Errorf("no error log line:\n%s", stderr)
			}
		})
	}
}

// statusClient reaches a status endpoint over one kept-alive connection,
// opened before the process runs out of descriptors: a new one could not
// be accepted then.
type statusClient struct {
	t    *testing.T
	c    net.Conn
	r    *bufio.Reader
	addr string
}

func newStatusClient(t *testing.T, addr string) *statusClient {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &statusClient{t: t, c: c, r: bufio.NewReader(c), addr: addr}
}

func (s *statusClient) healthz() (int, string) {
	s.t.Helper()
	s.c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(s.c, "GET /healthz HTTP/1.1\r\nHost: %s\r\n\r\n", s.addr)
	resp, err := http.ReadResponse(s.r, nil)
	if err != nil {
		s.t.Fatalf("/healthz: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		s.t.Fatalf("/healthz body: %v", err)
	}
	return resp.StatusCode, string(b)
}

// waitHealthz polls /healthz until it answers code and returns the body.
func (s *statusClient) waitHealthz(code int, within time.Duration) string {
	s.t.Helper()
	deadline := time.Now().Add(within)
	for {
		c, body := s.healthz()
		if c == code {
			return body
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("/healthz still %d %q after %v, want %d", c, body, within, code)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// limitFiles lowers the descriptor limit of process pid to what it has
// open plus headroom, and returns that limit.
func limitFiles(t *testing.T, pid, headroom int) int {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Skipf("cannot count the descriptors of %d: %v", pid, err)
	}
	n := uint64(len(fds) + headroom)
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: n, Max: n}, nil); err != nil {
		t.Skipf("prlimit: %v", err)
	}
	return int(n)
}

// flood opens n idle connections to addr, closed with the test or by the
// returned func.
func flood(t *testing.T, addr string, n int) (closeAll func()) {
	t.Helper()
	var conns []net.Conn
	closeAll = func() {
		for _, c := range conns {
			c.Close()
		}
		conns = nil
	}
	t.Cleanup(closeAll)
	for range n {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("flood: %v", err)
		}
		conns = append(conns, c)
	}
	return closeAll
}

// checkExhaustion runs the common part: the process p, whose status
// endpoint is statusAddr and whose listener is target, runs out of
// descriptors under conns idle connections to target; /healthz must say so, and
// once they close, serve must succeed (a new session through the process)
// and /healthz be ok again. Failure lines are logged at most once a second.
func checkExhaustion(t *testing.T, p *proc, statusAddr, target string, conns int, serve func() error) {
	st := newStatusClient(t, statusAddr)
	if code, body := st.healthz(); code != http.StatusOK {
		t.Fatalf("/healthz before: %d %q", code, body)
	}
	limit := limitFiles(t, p.cmd.Process.Pid, 12)
	start := time.Now()
	release := flood(t, target, conns)
	body := st.waitHealthz(http.StatusServiceUnavailable, 10*time.Second)
	if !strings.Contains(body, "too many open files") {
		t.Errorf("/healthz %q does not say why (limit %d descriptors)", body, limit)
	}
	p.waitLog("accept failed; retrying", 5*time.Second)
	time.Sleep(1500 * time.Millisecond) // a stretch of failures, for the log rate
	release()
	if err := serve(); err != nil {
		t.Fatalf("after the descriptors returned: %v", err)
	}
	st.waitHealthz(http.StatusOK, 10*time.Second)
	elapsed := time.Since(start)
	// Each listener has its own rate (the status listener fails too if a
	// connection reaches it meanwhile).
	for _, addr := range []string{target, statusAddr} {
		n := failureLines(p, addr)
		if n > int(elapsed/time.Second)+1 {
			t.Errorf("%d accept failure lines for %s in %v: not rate-limited", n, addr, elapsed)
		}
		t.Logf("limit %d: %d failure lines for %s in %v", limit, n, addr, elapsed)
	}
}

// failureLines counts p's accept failure lines for the listener on addr.
func failureLines(p *proc, addr string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, m := range p.logs {
		if m["msg"] == "accept failed; retrying" && m["listen"] == addr {
			n++
		}
	}
	return n
}

// A gateway out of descriptors (EMFILE) keeps its link listener: accepts
// back off and retry, /healthz reports the condition meanwhile, and once
// descriptors return a new link succeeds. It used to stop accepting for
// good while /healthz said ok.
func TestGatewaySurvivesDescriptorExhaustion(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	statusAddr := freeAddr(t)
	gw := startProc(t, append([]string{"gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", testnet.EchoServer(t),
		"--status-addr", statusAddr}, fast...)...)
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	gw.waitLog("admin listening", 5*time.Second)
	checkExhaustion(t, gw, statusAddr, gwAddr, 40, func() error {
		appAddr := freeAddr(t)
		cl := startProc(t, append([]string{"client", "--transport", "tcp", "--listen", appAddr, "--gateway", gwAddr}, fast...)...)
		cl.waitLog("client listening", 30*time.Second)
		return echoCheck(appAddr, randomData(100000, 8), 8)
	})
}

// The same for a client sidecar whose application listener runs out of
// descriptors.
func TestClientSurvivesDescriptorExhaustion(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	gw := startProc(t, append([]string{"gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", testnet.EchoServer(t)}, fast...)...)
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	appAddr, statusAddr := freeAddr(t), freeAddr(t)
	cl := startProc(t, append([]string{"client", "--transport", "tcp", "--listen", appAddr, "--gateway", gwAddr,
		"--status-addr", statusAddr, "--reconnect-timeout", "10s"}, fast...)...)
	cl.waitLog("client listening", 30*time.Second)
	cl.waitLog("admin listening", 5*time.Second)
	// Each application connection costs the client two descriptors (it
	// and its link), and one closed while waiting in the backlog is still
	// accepted and given a session: fewer than for the gateway.
	checkExhaustion(t, cl, statusAddr, appAddr, 20, func() error {
		return echoCheck(appAddr, randomData(100000, 9), 9)
	})
}
