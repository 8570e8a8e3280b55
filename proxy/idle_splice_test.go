//go:build linux

package proxy

import (
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// spliceGoroutines counts goroutines that belong to a splice: join's
// directions and a feed's reads.
func spliceGoroutines() int {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "proxy.join") || strings.Contains(g, "resume.(*Feed)") || strings.Contains(g, "proxy.(*core).runSplice") {
			n++
		}
	}
	return n
}

// An idle session keeps no splice goroutine on either end: both ends'
// application -> session reads wait in the shared poller. Everything that
// must reach them still does: new bytes, a FIN, an operator's end on
// either side (which resets the socket, after taking it out of the
// poller), and the proxies' Close.
func TestIdleSpliceKeepsNoGoroutine(t *testing.T) {
	up, ends := recordingEcho(t)
	s := newStack(t, stackOpts{upstream: up})
	const n = 6
	apps := make([]*net.TCPConn, n)
	for i := range apps {
		apps[i] = dialApp(t, s.appAddr)
		defer apps[i].Close()
		echoOnce(t, apps[i], "hello")
	}
	idle := func() {
		t.Helper()
		waitFor(t, "no splice goroutine", 5*time.Second, func() bool { return spliceGoroutines() == 0 })
	}
	idle()
	for i, c := range apps {
		echoOnce(t, c, strings.Repeat(string(rune('a'+i)), 100*(i+1)))
	}
	idle()

	idOf := func(c *net.TCPConn) string {
		for _, si := range s.client.Sessions() {
			if si.App == c.LocalAddr().String() {
				return si.ID
			}
		}
		t.Fatalf("no client session for %s", c.LocalAddr())
		return ""
	}

	// An operator's end on the client: the application gets a reset.
	rec := do(t, s.clAdmin(t), "DELETE", "/sessions/"+idOf(apps[0]), "")
	if rec.Code != 200 {
		t.Fatalf("client DELETE: HTTP %d %s", rec.Code, rec.Body.String())
	}
	testnet.ExpectReset(t, apps[0], 2*time.Second)
	expectUpstreamReset(t, ends)
	idle()

	// On the gateway: the parked upstream read is unparked, the upstream
	// socket reset at once.
	start := time.Now()
	rec = do(t, s.gwAdmin(t), "DELETE", "/sessions/"+idOf(apps[1]), "")
	if rec.Code != 200 {
		t.Fatalf("gateway DELETE: HTTP %d %s", rec.Code, rec.Body.String())
	}
	if d := expectUpstreamReset(t, ends).Sub(start); d > time.Second {
		t.Fatalf("upstream reset %v after the DELETE", d)
	}
	testnet.ExpectReset(t, apps[1], 5*time.Second)
	idle()

	// A FIN from the application reaches its parked read: the upstream
	// sees EOF, echoes what came before it, and closes in turn.
	if _, err := apps[2].Write([]byte("last")); err != nil {
		t.Fatal(err)
	}
	apps[2].CloseWrite()
	apps[2].SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(apps[2])
	if err != nil || string(got) != "last" {
		t.Fatalf("after FIN: %q, %v; want \"last\" then EOF", got, err)
	}
	select {
	case e := <-ends:
		if e.err != nil {
			t.Fatalf("upstream ended with %v, want EOF", e.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("upstream never saw the FIN")
	}
	waitFor(t, "three sessions left", 5*time.Second, func() bool {
		return len(s.client.Sessions()) == n-3 && len(s.gw.Sessions()) == n-3
	})
	idle()

	// The rest still echo, and the proxies' Close (the test's cleanup)
	// ends them with every read parked; goleak checks that nothing stays.
	for _, c := range apps[3:] {
		echoOnce(t, c, "still here")
	}
	idle()
}

func expectUpstreamReset(t *testing.T, ends chan upstreamEnd) time.Time {
	t.Helper()
	select {
	case e := <-ends:
		if !errors.Is(e.err, syscall.ECONNRESET) {
			t.Fatalf("upstream connection ended with %v, want a reset", e.err)
		}
		return e.at
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream connection was not reset")
	}
	return time.Time{}
}
