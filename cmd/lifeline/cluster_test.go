package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy"
)

// freeUDP returns a UDP address on loopback that was free a moment ago.
func freeUDP(t testing.TB) string {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	return pc.LocalAddr().String()
}

// lbSource is the address HAProxy connects to the gateways from, so that
// they see the balancer at one address and the clients (127.0.0.1) at
// another: the PROXY header must be what names them.
const lbSource = "127.0.0.3"

// startHAProxy runs HAProxy in tcp mode, round robin over links, with
// send-proxy-v2 and a health check on each gateway's /readyz.
func startHAProxy(t *testing.T, bin, listen string, links, admins []string) {
	t.Helper()
	var b strings.Builder
	b.WriteString("global\n\tmaxconn 4000\n\ndefaults\n\tmode tcp\n\ttimeout connect 2s\n\ttimeout client 60s\n\ttimeout server 60s\n\n")
	fmt.Fprintf(&b, "frontend links\n\tbind %s\n\tdefault_backend gateways\n\n", listen)
	b.WriteString("backend gateways\n\tbalance roundrobin\n\toption httpchk GET /readyz\n\thttp-check expect status 200\n")
	fmt.Fprintf(&b, "\tdefault-server inter 200ms fall 1 rise 2 send-proxy-v2 source %s\n", lbSource)
	for i, l := range links {
		_, port, _ := net.SplitHostPort(admins[i])
		fmt.Fprintf(&b, "\tserver gw%d %s check port %s\n", i, l, port)
	}
	cfg := writeFile(t, "haproxy.cfg", b.String())
	cmd := exec.Command(bin, "-f", cfg, "-db")
	out := &strings.Builder{}
	var mu sync.Mutex
	cmd.Stdout, cmd.Stderr = lockedWriter{&mu, out}, lockedWriter{&mu, out}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		if t.Failed() {
			mu.Lock()
			t.Logf("haproxy:\n%s", out.String())
			mu.Unlock()
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", listen)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("haproxy not listening: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *strings.Builder
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// adminSessions is GET /sessions of an admin API.
func adminSessions(addr string) ([]proxy.SessionInfo, error) {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + addr + "/sessions")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out struct {
		Sessions []proxy.SessionInfo `json:"sessions"`
	}
	return out.Sessions, json.NewDecoder(resp.Body).Decode(&out)
}

// TestClusterBinaries: three gateway processes, each a cluster node,
// behind HAProxy (tcp, round robin, send-proxy-v2, /readyz checks; the
// test's own balancer where HAProxy is not installed), one client
// sidecar, fifty echo sessions with links broken every 300 ms so that
// resumes land on every node. Then one node is killed (SIGKILL): its
// sessions end with NOT_FOUND "owner node ... is gone" at their next
// resume, the others carry on byte-exact. Then another is drained
// (SIGTERM): its sessions keep resuming through the last node until they
// end, new sessions land on the last node, and no session is lost.
func TestClusterBinaries(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	const n, sessions = 3, 50
	key := writeFile(t, "cluster.key", "this-is-the-shared-cluster-secret-of-the-test-0123456789\n")
	echo := testnet.EchoServer(t)
	links, admins, clusters := make([]string, n), make([]string, n), make([]string, n)
	for i := range n {
		links[i], admins[i], clusters[i] = freeAddr(t), freeAddr(t), freeUDP(t)
	}
	gws := make([]*proc, n)
	for i := range n {
		gws[i] = startProc(t, append([]string{"gateway", "--listen", links[i], "--upstream", echo, "--transport", "tcp",
			"--node-id", fmt.Sprintf("gw-%d", i), "--cluster-listen", clusters[i], "--cluster-peers", strings.Join(clusters, ","),
			"--cluster-key-file", key, "--admin-addr", admins[i], "--proxy-protocol-from", lbSource + "/32",
			"--drain-timeout", "30s", "--reconnect-timeout", "30s"}, fast...)...)
	}
	for i := range n {
		gws[i].waitLog("gateway listening", 30*time.Second)
		deadline := time.Now().Add(10 * time.Second)
		for gws[i].count("cluster peer up") < n-1 {
			if time.Now().After(deadline) {
				t.Fatalf("node %d: peers not up:\n%s", i, gws[i].output())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	lbAddr := freeAddr(t)
	var lbNoHealth *faultnet.Balancer
	if bin, err := exec.LookPath("haproxy"); err == nil {
		startHAProxy(t, bin, lbAddr, links, admins)
		t.Logf("balancer: %s", bin)
	} else {
		// No HAProxy: the test's balancer, with PROXY v2 but without
		// health checks (the test takes nodes out by hand).
		t.Log("balancer: faultnet.Balancer (haproxy not installed)")
		lb, err := faultnet.NewBalancer(lbAddr, links, true)
		if err != nil {
			t.Fatal(err)
		}
		lb.SetSource(lbSource)
		t.Cleanup(func() { lb.Close() })
		lbNoHealth = lb
	}
	// The links are broken between the client and the balancer.
	relay, err := faultnet.NewRelay("127.0.0.1:0", lbAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	app := freeAddr(t)
	cl := startProc(t, append([]string{"client", "--listen", app, "--gateway", relay.Addr(), "--transport", "tcp",
		"--reconnect-timeout", "30s"}, fast...)...)
	cl.waitLog("client listening", 30*time.Second)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	results := make([]error, sessions)
	started := make(chan struct{}, sessions)
	for i := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = faultnet.Echo{Seed: uint64(i + 1), Stop: stop, MaxWrite: 2 << 10, MaxPause: 20 * time.Millisecond,
				Timeout: 30 * time.Second, MarkAt: 1, Mark: func() { started <- struct{}{} }}.Dial(app)
		}()
	}
	for range sessions {
		select {
		case <-started:
		case <-time.After(20 * time.Second):
			t.Fatal("sessions did not start")
		}
	}
	breakFor := func(d time.Duration) int {
		breaks := 0
		for end := time.Now().Add(d); time.Now().Before(end); {
			time.Sleep(300 * time.Millisecond)
			if relay.Break(faultnet.Modes[breaks%2]) > 0 { // reset, close
				breaks++
			}
		}
		return breaks
	}
	breaks := breakFor(4 * time.Second)

	// Every node holds sessions and took forwarded resumes; /sessions
	// shows the client's address (127.0.0.1), not the balancer's.
	owned := map[int]int{}
	for i := range n {
		ss, err := adminSessions(admins[i])
		if err != nil {
			t.Fatal(err)
		}
		owned[i] = len(ss)
		for _, s := range ss {
			if s.Node != proxy.NodeIDOf(fmt.Sprintf("gw-%d", i)).String() {
				t.Errorf("node %d lists session %s of node %s", i, s.ID, s.Node)
			}
			if host, _, _ := net.SplitHostPort(s.Peer); s.State == "ACTIVE" && host != "127.0.0.1" {
				t.Errorf("node %d: session %s peer %s, want the client's 127.0.0.1 address", i, s.ID, s.Peer)
			}
		}
	}
	t.Logf("sessions by node: %v after %d breaks", owned, breaks)
	// The logs name the client too, never the balancer.
	for i := range n {
		gws[i].mu.Lock()
		for _, m := range gws[i].logs {
			for _, k := range []string{"remote", "link"} {
				if a, ok := m[k].(string); ok && strings.HasPrefix(a, lbSource+":") {
					t.Errorf("node %d logs the balancer's address: %v", i, m)
				}
			}
		}
		gws[i].mu.Unlock()
	}
	for i := range n {
		if owned[i] == 0 {
			t.Errorf("node %d owns no session", i)
		}
		if fwd := metricValue(t, admins[i], `lifeline_cluster_forwarded_links_total{direction="in"}`); fwd == 0 {
			t.Errorf("node %d took no forwarded resume", i)
		} else {
			t.Logf("node %d: %v forwarded resumes taken, %v forwarded out", i, fwd,
				metricValue(t, admins[i], `lifeline_cluster_forwarded_links_total{direction="out"}`))
		}
	}

	// Kill node 2 without a word.
	killed := owned[2]
	gws[2].cmd.Process.Signal(syscall.SIGKILL)
	if lbNoHealth != nil {
		lbNoHealth.SetDown(2, true)
	}
	breaks += breakFor(4 * time.Second)

	// Drain node 1: its sessions go on through node 0 until they end.
	gws[1].cmd.Process.Signal(syscall.SIGTERM)
	if lbNoHealth != nil {
		lbNoHealth.SetDown(1, true)
	}
	breaks += breakFor(2 * time.Second)
	// New sessions open all the same (on node 0).
	for i := range 5 {
		if err := echoCheck(app, randomData(20_000, uint64(1000+i)), uint64(i)); err != nil {
			t.Errorf("new session during the drain: %v", err)
		}
	}
	breaks += breakFor(2 * time.Second)
	close(stop)
	wg.Wait()

	failed := 0
	for i, err := range results {
		if err == nil {
			continue
		}
		failed++
		if errors.Is(err, faultnet.ErrMismatch) {
			t.Errorf("session %d: %v", i, err)
		}
	}
	t.Logf("%d breaks; %d of %d sessions ended when node 2 was killed (it owned %d)", breaks, failed, sessions, killed)
	if failed != killed {
		t.Errorf("%d sessions failed, want exactly node 2's %d", failed, killed)
	}
	gone := 0
	cl.mu.Lock()
	for _, m := range cl.logs {
		// The splice's end line (resume logs one of its own too).
		if m["msg"] == "session end" && m["cause"] == "not_found" &&
			strings.Contains(fmt.Sprint(m["err"]), "owner node "+proxy.NodeIDOf("gw-2").String()+" is gone") {
			gone++
		}
	}
	cl.mu.Unlock()
	if gone != killed {
		t.Errorf("%d client sessions ended with owner node gone, want %d", gone, killed)
	}
	// The drained node exits once its last session has ended.
	if code := gws[1].wait(15 * time.Second); code != 0 {
		t.Errorf("drained node exited with %d", code)
	}
}

// metricValue reads one sample from an admin API's /metrics.
func metricValue(t *testing.T, admin, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			var f float64
			fmt.Sscan(v, &f)
			return f
		}
	}
	return 0
}
