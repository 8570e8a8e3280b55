package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

// clusterStack is n gateways, each a cluster node, behind a round-robin
// balancer, with one client sidecar dialing the balancer.
type clusterStack struct {
	gws     []*Gateway
	cls     []*Cluster
	lb      *faultnet.Balancer
	client  *Client
	appAddr string
	metrics *PromMetrics // the client's
}

func newClusterStack(t *testing.T, n int, upstream string) *clusterStack {
	t.Helper()
	log := testLogger(t)
	s := &clusterStack{}
	// Cluster sockets first, so that every node knows every address.
	var addrs []string
	for i := range n {
		c, err := NewCluster(ClusterConfig{NodeName: fmt.Sprintf("gw-%d", i), Key: testKey, Listen: "127.0.0.1:0",
			ForwardTimeout: time.Second, IdleTimeout: 1500 * time.Millisecond, Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, c.Addr().String())
		c.Close() // only its address was wanted
	}
	var links []string
	for i := range n {
		c, err := NewCluster(ClusterConfig{NodeName: fmt.Sprintf("gw-%d", i), Key: testKey, Listen: addrs[i], Peers: addrs,
			ForwardTimeout: time.Second, IdleTimeout: 1500 * time.Millisecond, Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		sc := defaultServerForTest()
		sc.Session.Logger = log
		gw, err := NewGateway(GatewayConfig{Routes: []Route{{Name: "default", Upstream: upstream, ConnectTimeout: time.Second}},
			Server: sc, Logger: log, Cluster: c})
		if err != nil {
			c.Close()
			t.Fatal(err)
		}
		ll, err := transport.Listen(transport.Config{Name: "tcp", Addr: "127.0.0.1:0", Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		go gw.Serve(ll)
		s.gws, s.cls = append(s.gws, gw), append(s.cls, c)
		links = append(links, ll.Addr().String())
	}
	for _, c := range s.cls {
		for _, a := range addrs {
			if a != c.Addr().String() {
				waitPeer(t, c, a, true)
			}
		}
	}
	lb, err := faultnet.NewBalancer("127.0.0.1:0", links, false)
	if err != nil {
		t.Fatal(err)
	}
	s.lb = lb
	dialer, err := transport.NewDialer(transport.Config{Name: "tcp", Addr: lb.Addr(), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	s.metrics = NewPromMetrics()
	s.client = NewClient(ClientConfig{Logger: log, Metrics: s.metrics})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.client.Serve(ln, ClientRoute{Route: "default", Dialer: dialer, Session: fastConfig(), Gateway: lb.Addr()})
	s.appAddr = ln.Addr().String()
	t.Cleanup(func() {
		s.client.Close()
		lb.Close()
		for _, gw := range s.gws {
			gw.Close()
		}
	})
	return s
}

// TestClusterGatewaysResumeAnywhere: sessions through three gateways
// behind a round-robin balancer whose links are broken every 150 ms
// resume on whichever node the balancer picks, forwarded to their owner;
// every byte comes back exact.
func TestClusterGatewaysResumeAnywhere(t *testing.T) {
	s := newClusterStack(t, 3, testnet.EchoServer(t))
	const sessions = 9
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, sessions)
	var verified atomic.Int64
	for i := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- faultnet.Echo{Seed: uint64(i + 1), Stop: stop, MaxWrite: 4 << 10, MaxPause: 3 * time.Millisecond,
				Timeout: 20 * time.Second, Verified: &verified}.Dial(s.appAddr)
		}()
	}
	breaks := 0
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		time.Sleep(150 * time.Millisecond)
		if s.lb.Break(faultnet.Modes[breaks%2]) > 0 { // reset, close
			breaks++
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	var fwd int
	for i, c := range s.cls {
		in := testutil.ToFloat64(c.m.forwardedIn)
		fwd += int(in)
		t.Logf("node %d: links %d, forwarded in %v out %v", i, s.lb.Accepted(i), in, testutil.ToFloat64(c.m.forwardedOut))
	}
	t.Logf("%d breaks, %d bytes verified, %d links forwarded", breaks, verified.Load(), fwd)
	if fwd == 0 {
		t.Error("no link was forwarded")
	}
	if verified.Load() == 0 {
		t.Error("nothing verified")
	}
}

// TestClusterGatewayOwnerGone: a node dies while its sessions' links
// are down; their resumes through the other node get NOT_FOUND "owner
// node ... is gone" at once and their applications a reset, while the
// other node's session carries on.
func TestClusterGatewayOwnerGone(t *testing.T) {
	s := newClusterStack(t, 2, testnet.EchoServer(t))
	// One session on each node: the balancer alternates.
	var apps []*net.TCPConn
	for range 2 {
		app := dialApp(t, s.appAddr)
		defer app.Close()
		echoOnce(t, app, "ping")
		apps = append(apps, app)
	}
	owner := map[string]int{}
	for i, gw := range s.gws {
		for _, si := range gw.Sessions() {
			owner[si.ID] = i
		}
	}
	if len(owner) != 2 {
		t.Fatalf("sessions by owner %v, want one on each node", owner)
	}
	// The links go silent, so node 1's RESET never reaches its client;
	// node 1 then dies and leaves the balancer.
	s.lb.SetDown(1, true)
	s.lb.Break(faultnet.Blackhole)
	s.gws[1].Close()
	died := time.Now()
	// Which app is node 1's? The one whose session the client lists
	// with node 1's id.
	id1 := NodeIDOf("gw-1").String()
	var gone, alive *net.TCPConn
	for _, si := range s.client.Sessions() {
		if si.Node == id1 {
			t.Logf("node 1's session %s", si.ID)
		}
	}
	for _, app := range apps {
		app.SetReadDeadline(time.Now().Add(5 * time.Second))
	}
	errs := make(chan error, 2)
	for _, app := range apps {
		go func() {
			_, err := app.Read(make([]byte, 1))
			if err == nil {
				err = errors.New("data")
			}
			errs <- err
		}()
	}
	err := <-errs
	d := time.Since(died)
	if isTimeout(err) {
		t.Fatal("node 1's session did not end")
	}
	t.Logf("an application got %v %v after its owner died", err, d.Round(time.Millisecond))
	if d > 3*time.Second {
		t.Errorf("owner's death noticed after %v, want within the liveness timeout and a resume", d)
	}
	// Which one was it: the other must still echo.
	for _, app := range apps {
		app.SetReadDeadline(time.Now())
	}
	<-errs
	for _, app := range apps {
		app.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := app.Write([]byte("pong")); err != nil {
			gone = app
			continue
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(app, buf); err != nil || string(buf) != "pong" {
			gone = app
			continue
		}
		alive = app
	}
	if alive == nil || gone == nil {
		t.Fatalf("alive %v, gone %v: want one of each", alive != nil, gone != nil)
	}
	// The application's reset comes first; the session's end is counted
	// when its splice has finished, a moment later.
	notFound := func() float64 {
		return testutil.ToFloat64(s.metrics.ends.WithLabelValues("client", "default", "not_found"))
	}
	for deadline := time.Now().Add(5 * time.Second); notFound() != 1 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if got := notFound(); got != 1 {
		t.Errorf("client sessions ended with NOT_FOUND: %v, want 1", got)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestClusterForwardRefusalCode: a RESUME for a session of an unknown
// node is answered with REJECT NOT_FOUND naming the owner, at once.
func TestClusterForwardRefusalCode(t *testing.T) {
	c, err := NewCluster(ClusterConfig{NodeName: "gw-a", Key: testKey, Listen: "127.0.0.1:0", Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	sc := defaultServerForTest()
	gw, err := NewGateway(GatewayConfig{Routes: []Route{{Name: "default", Upstream: "127.0.0.1:1", ConnectTimeout: time.Second}},
		Server: sc, Cluster: c})
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	ll, err := transport.Listen(transport.Config{Name: "tcp", Addr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	go gw.Serve(ll)
	conn, err := net.Dial("tcp", ll.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var sid [frame.SessionIDLen]byte
	sid[frame.SessionIDLen-1] = 7 // node 00000007: not in the cluster
	msg := frame.AppendPreamble(nil)
	msg = frame.AppendResume(msg, &frame.Resume{SessionID: sid, Counter: 1})
	start := time.Now()
	conn.Write(msg)
	conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	fr := frame.NewReader(conn, 4096)
	h, err := fr.Next()
	if err != nil {
		t.Fatal(err)
	}
	p, err := fr.Payload(h)
	if err != nil {
		t.Fatal(err)
	}
	d := time.Since(start)
	if h.Type != frame.TypeReject {
		t.Fatalf("got %v, want REJECT", h.Type)
	}
	rj, err := frame.ParseReject(p)
	if err != nil {
		t.Fatal(err)
	}
	if rj.Code != frame.CodeNotFound || !strings.Contains(rj.Reason, "owner node 00000007 is gone") {
		t.Errorf("REJECT %v %q, want NOT_FOUND owner node 00000007 is gone", rj.Code, rj.Reason)
	}
	if d > 200*time.Millisecond {
		t.Errorf("refused after %v, want at once", d)
	}
	t.Logf("REJECT %v %q after %v", rj.Code, rj.Reason, d)
}

// TestClusterGatewayDrain: node 0 drains (its /readyz fails, the balancer
// takes it out of the rotation a moment later). Its session keeps
// resuming through node 1, forwarded, byte-exact, until it ends; new
// sessions that still reach node 0 get SHUTTING_DOWN and land on node 1
// at the client's next dial instead of failing; node 0's drain ends when
// its last session does.
func TestClusterGatewayDrain(t *testing.T) {
	s := newClusterStack(t, 2, testnet.EchoServer(t))
	// A long echo on each node.
	stop := make(chan struct{})
	errs := make(chan error, 2)
	var verified atomic.Int64
	for i := range 2 {
		go func() {
			errs <- faultnet.Echo{Seed: uint64(100 + i), Stop: stop, MaxWrite: 2 << 10, MaxPause: 3 * time.Millisecond,
				Timeout: 20 * time.Second, Verified: &verified}.Dial(s.appAddr)
		}()
	}
	waitFor(t, "a session on each node", 5*time.Second, func() bool {
		return len(s.gws[0].Sessions()) == 1 && len(s.gws[1].Sessions()) == 1
	})
	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		drained <- s.gws[0].Shutdown(ctx)
	}()
	waitFor(t, "node 0 draining", 2*time.Second, s.gws[0].Draining)
	// Before the balancer notices, new sessions still reach node 0 half
	// the time: every one must open all the same.
	for i := range 4 {
		app := dialApp(t, s.appAddr)
		echoOnce(t, app, fmt.Sprintf("new-%d", i))
		app.Close()
	}
	s.lb.SetDown(0, true)
	for range 6 {
		time.Sleep(150 * time.Millisecond)
		s.lb.Break(faultnet.Reset)
	}
	close(stop)
	for range 2 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	select {
	case err := <-drained:
		if err != nil {
			t.Errorf("drain: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("node 0's drain did not end with its last session")
	}
	if in := testutil.ToFloat64(s.cls[0].m.forwardedIn); in == 0 {
		t.Error("node 0 took no forwarded resume while draining")
	}
	t.Logf("%d bytes verified; node 0 took %v forwarded links", verified.Load(), testutil.ToFloat64(s.cls[0].m.forwardedIn))
}
