package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
)

// binary is the lifeline binary the proxies run from, built once (without
// the race detector: the proxies are measured, not checked).
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "lifeline-bench-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "lifeline")
	build := exec.Command("go", "build", "-o", binary, "github.com/lifeline-proxy/lifeline/cmd/lifeline")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building lifeline:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

func shortOptions(t *testing.T, scenarios ...string) Options {
	o := Options{Scenarios: scenarios, Short: true, BinaryPath: binary, OutDir: t.TempDir()}
	if raceEnabled {
		o.Duration = 200 * time.Millisecond
		o.Sessions = 50
		o.SoakSessions = 8
	}
	if testing.Verbose() {
		o.Progress = os.Stderr
	}
	return o
}

func run(t *testing.T, o Options) *Report {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 80*time.Second)
	defer cancel()
	rep, err := Run(ctx, o)
	if err != nil {
		if rep != nil {
			t.Log(rep.Markdown())
		}
		t.Fatal(err)
	}
	t.Log("\n" + rep.Markdown())
	return rep
}

func TestThroughputShort(t *testing.T) {
	o := shortOptions(t, "throughput")
	rep := run(t, o)
	md := rep.Markdown()
	for _, c := range AllConfigs {
		if !strings.Contains(md, "| "+c+" |") {
			t.Errorf("table lacks %s", c)
		}
	}
	n := 0
	for _, x := range rep.Throughput {
		n++
		if x.MBps <= 0 {
			t.Errorf("%s %s: %.1f MB/s", x.Config, x.Direction, x.MBps)
		}
		// The relay moves bytes with splice(2) and can use less than one
		// clock tick (10 ms) in a short run; lifeline cannot.
		if x.Config != Direct && x.Config != Relay && x.CPUSecPerGBMean <= 0 {
			t.Errorf("%s %s: no CPU time measured", x.Config, x.Direction)
		}
		if x.Config == LifelineTCP && x.VsRelay <= 0 {
			t.Errorf("lifeline-tcp %s: no ratio vs relay", x.Direction)
		}
	}
	if want := 3 * (len(AllConfigs) - len(rep.Unavailable)); n != want {
		t.Errorf("%d throughput results, want %d", n, want)
	}
	for _, f := range []string{"bench.json", "bench.md", "throughput.svg"} {
		b, err := os.ReadFile(filepath.Join(o.OutDir, f))
		if err != nil || len(b) == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
}

func TestLatencyShort(t *testing.T) {
	o := shortOptions(t, "latency")
	rep := run(t, o)
	if len(rep.Latency) < 3 {
		t.Fatalf("%d latency results", len(rep.Latency))
	}
	for _, l := range rep.Latency {
		if l.P50us <= 0 || l.P99us < l.P50us || l.P999us < l.P99us {
			t.Errorf("%s: p50 %v p99 %v p99.9 %v", l.Config, l.P50us, l.P99us, l.P999us)
		}
	}
	svg, err := os.ReadFile(filepath.Join(o.OutDir, "latency.svg"))
	if err != nil || !strings.Contains(string(svg), "lifeline-tcp") {
		t.Errorf("latency.svg: %v", err)
	}
}

func TestSessionsShort(t *testing.T) {
	o := shortOptions(t, "sessions")
	o.Configs = []string{LifelineTCP}
	rep := run(t, o)
	var got bool
	for _, s := range rep.Sessions {
		if s.Config != LifelineTCP {
			continue
		}
		got = true
		for _, p := range []string{"client", "gateway"} {
			if s.HeldKB[p] <= 0 || s.ParkedKB[p] <= 0 {
				t.Errorf("%s: RSS not measured: %+v", p, s)
			}
		}
	}
	if !got {
		t.Fatal("no lifeline-tcp sessions result")
	}
	if !strings.Contains(rep.SessionsNote, "RLIMIT_NOFILE") {
		t.Error("the descriptor limit is not stated")
	}
}

func TestResumeShort(t *testing.T) {
	o := shortOptions(t, "resume")
	o.Configs = []string{LifelineTCP}
	rep := run(t, o)
	if len(rep.Resume) != 3 {
		t.Fatalf("%d resume results, want one per break mode", len(rep.Resume))
	}
	for _, x := range rep.Resume {
		if x.DetectClientMs <= 0 || x.DetectGatewayMs <= 0 || x.DownToByteMs <= 0 || x.ReturnToByteMs == 0 {
			t.Errorf("%s: not measured: %+v", x.Mode, x)
		}
		for _, r := range x.Runs {
			if r.Resumes < 1 {
				t.Errorf("%s: no resume counted", x.Mode)
			}
		}
		if x.Mode == "blackhole" && x.DetectClientMs < float64(livenessTimeout.Milliseconds())/2 {
			t.Errorf("blackhole detected after %.0f ms, before the liveness timeout could fire", x.DetectClientMs)
		}
	}
}

func TestSoakShort(t *testing.T) {
	o := shortOptions(t, "soak")
	o.Configs = []string{LifelineTCP}
	rep := run(t, o)
	s := rep.Soak
	if s == nil {
		t.Fatal("no soak result")
	}
	if s.Mismatches != 0 || s.Errors != 0 {
		t.Fatalf("%d mismatches, %d errors: %v", s.Mismatches, s.Errors, s.ErrorSamples)
	}
	if s.BytesVerified == 0 || s.LinksBroken == 0 || s.LinkFailures == 0 || s.Resumes == 0 {
		t.Fatalf("soak did nothing: %+v", s)
	}
}

// A mismatch must fail the run: check the verifier itself against an
// upstream that corrupts one byte.
func TestSoakDetectsMismatch(t *testing.T) {
	srv, err := newServer(func(c *net.TCPConn) {
		buf := make([]byte, 4096)
		n, _ := io.ReadAtLeast(c, buf, 100)
		buf[50] ^= 1
		c.Write(buf[:n])
		io.Copy(c, c)
		c.CloseWrite()
	})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.close()
	stop := make(chan struct{})
	var verified atomic.Int64
	time.AfterFunc(100*time.Millisecond, func() { close(stop) })
	err = soakEcho(1, stop, &verified).Dial(srv.addr())
	if !errors.Is(err, faultnet.ErrMismatch) {
		t.Fatalf("got %v, want a mismatch", err)
	}
}
