package proxy

import (
	"io"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// TestClusterMeasure measures what forwarding costs (docs/cluster.md):
// the time from a link's reset to the next echo through a resume on the
// session's owner versus one forwarded from another node, and the
// throughput of one session through its owner versus through another
// node. Run with LIFELINE_CLUSTER_MEASURE=1 (and without -race for
// meaningful numbers).
func TestClusterMeasure(t *testing.T) {
	if os.Getenv("LIFELINE_CLUSTER_MEASURE") == "" {
		t.Skip("set LIFELINE_CLUSTER_MEASURE=1")
	}
	s := newClusterStack(t, 2, testnet.EchoServer(t))
	app := dialApp(t, s.appAddr)
	defer app.Close()
	echoOnce(t, app, "x")
	owner := 0
	if len(s.gws[1].Sessions()) == 1 {
		owner = 1
	}
	other := 1 - owner
	resumeTime := func(via int) time.Duration {
		s.lb.SetDown(via, false)
		s.lb.SetDown(1-via, true)
		var ds []time.Duration
		for range 40 {
			start := time.Now()
			s.lb.Break(faultnet.Reset)
			echoOnce(t, app, "ping")
			ds = append(ds, time.Since(start))
		}
		slices.Sort(ds)
		return ds[len(ds)/2]
	}
	local := resumeTime(owner)
	fwd := resumeTime(other)
	t.Logf("link reset to next echo (median of 40): through the owner %v, forwarded through another node %v", local, fwd)

	throughput := func(via int) float64 {
		s.lb.SetDown(via, false)
		s.lb.SetDown(1-via, true)
		s.lb.Break(faultnet.Reset)
		echoOnce(t, app, "ping")
		const size = 256 << 20
		buf := make([]byte, 256<<10)
		done := make(chan error, 1)
		start := time.Now()
		go func() {
			var n int
			for n < size {
				w, err := app.Write(buf)
				if err != nil {
					done <- err
					return
				}
				n += w
			}
			done <- nil
		}()
		app.SetReadDeadline(time.Now().Add(60 * time.Second))
		if _, err := io.CopyN(io.Discard, app, size); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		return float64(size) / time.Since(start).Seconds() / (1 << 20)
	}
	tl := throughput(owner)
	tf := throughput(other)
	t.Logf("echo throughput of one session (256 MiB each way at once): through the owner %.0f MiB/s, forwarded %.0f MiB/s", tl, tf)
}
