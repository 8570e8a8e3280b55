package main

import (
	"bufio"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
)

// An unmodified Redis client INCRs a counter through the client sidecar
// and gateway while the link breaks every 300 ms: every reply is the next
// number and the final GET (by redis-cli) equals the number of INCRs.
func TestRedisThroughBrokenLink(t *testing.T) {
	if testing.Short() {
		t.Skip("runs redis-server and the binary")
	}
	server, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server not on PATH (.ci/run installs it)")
	}
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		t.Skip("redis-cli not on PATH")
	}
	redisAddr := freeAddr(t)
	_, port, _ := net.SplitHostPort(redisAddr)
	rs := exec.Command(server, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no")
	if err := rs.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rs.Process.Kill(); rs.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", redisAddr)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server did not start: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	gw := startProc(t, append([]string{"gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", redisAddr}, fast...)...)
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	relay, err := faultnet.NewRelay("127.0.0.1:0", gwAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	appAddr := freeAddr(t)
	cl := startProc(t, append([]string{"client", "--transport", "tcp", "--listen", appAddr, "--gateway", relay.Addr()}, fast...)...)
	cl.waitLog("client listening", 30*time.Second)

	c, err := net.Dial("tcp", appAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	r := bufio.NewReader(c)
	cmd := func(args ...string) string {
		var b strings.Builder
		fmt.Fprintf(&b, "*%d\r\n", len(args))
		for _, a := range args {
			fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
		}
		if _, err := c.Write([]byte(b.String())); err != nil {
			t.Fatalf("write: %v", err)
		}
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("read reply: %v", err)
		}
		return strings.TrimRight(line, "\r\n")
	}
	if got := cmd("DEL", "lifeline:counter"); !strings.HasPrefix(got, ":") {
		t.Fatalf("DEL: %q", got)
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	breaks := 0
	wg.Add(1)
	go func() {
		defer wg.Done()
		tk := time.NewTicker(300 * time.Millisecond)
		defer tk.Stop()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-tk.C:
			}
			if relay.Break(faultnet.Modes[i%3]) > 0 {
				breaks++
			}
		}
	}()
	n := 0
	start := time.Now()
	for n < 200 || time.Since(start) < 4*time.Second {
		n++
		if got, want := cmd("INCR", "lifeline:counter"), ":"+strconv.Itoa(n); got != want {
			close(stop)
			wg.Wait()
			t.Fatalf("INCR #%d replied %q, want %q", n, got, want)
		}
	}
	close(stop)
	wg.Wait()
	if breaks < 5 {
		t.Errorf("only %d breaks hit the link", breaks)
	}
	// An unmodified redis-cli through the sidecar sees the final value.
	out, err := exec.Command(cli, "-h", "127.0.0.1", "-p", portOf(appAddr), "GET", "lifeline:counter").CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli: %v: %s", err, out)
	}
	if got := strings.TrimSpace(string(out)); got != strconv.Itoa(n) {
		t.Fatalf("redis-cli GET = %q, want %d", got, n)
	}
	t.Logf("%d INCRs through %d link breaks, every reply correct; redis-cli GET = %d", n, breaks, n)
}

func portOf(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}
