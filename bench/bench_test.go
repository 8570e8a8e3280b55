package bench

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
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
		// clock tick (10 ms) in a short run; the others cannot.
		if x.Config != Direct && x.Config != Relay && x.CPUSecPerGBMean <= 0 {
			t.Errorf("%s %s: no CPU time measured", x.Config, x.Direction)
		}
		if x.Config == LifelineTCP && x.VsRelay <= 0 {
			t.Errorf("lifeline-tcp %s: no ratio vs relay", x.Direction)
		}
		if x.Mode != ModeBulk {
			t.Errorf("%s %s: mode %q, want bulk by default", x.Config, x.Direction, x.Mode)
		}
		if y := yardstick[x.Config]; y != "" && rep.Unavailable[y] == "" && rep.Unavailable[x.Config] == "" && (x.Yardstick != y || x.VsYardstick <= 0) {
			t.Errorf("%s %s: no ratio vs %s: %+v", x.Config, x.Direction, y, x)
		}
	}
	if _, err := haproxyBinary(); err == nil && rep.Unavailable[HAProxy] != "" {
		t.Errorf("haproxy is installed but did not run: %s", rep.Unavailable[HAProxy])
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
		if s.Echoed != s.Sessions || s.Sessions == 0 {
			t.Errorf("%s: %d of %d sessions echoed after the hold: %s", s.Config, s.Echoed, s.Sessions, s.EchoError)
		}
		if len(s.IdleCPUPercent) != len(s.Procs) || s.IdleWindowS <= 0 {
			t.Errorf("%s: idle CPU not measured: %+v", s.Config, s)
		}
		for p, v := range s.IdleCPUPercent {
			if v < 0 || v > 100*float64(runtime.NumCPU()) {
				t.Errorf("%s %s: idle CPU %.2f %%", s.Config, p, v)
			}
		}
		if s.Config != LifelineTCP {
			continue
		}
		got = true
		for _, p := range []string{"client", "gateway"} {
			if s.HeldKB[p] <= 0 || s.ParkedKB[p] <= 0 || s.AfterHoldKB[p] <= 0 {
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
	md := rep.Markdown()
	for _, w := range []string{"Idle CPU", "/proc/<pid>/stat", "shorter than the attention window", "| relay |"} {
		if !strings.Contains(md, w) {
			t.Errorf("report lacks %q", w)
		}
	}
}

func TestCPUPercent(t *testing.T) {
	for _, c := range []struct {
		cpu0, cpu1 float64
		el         time.Duration
		want       float64
	}{
		{10, 10.3, 30 * time.Second, 1},
		{0, 0.6, 30 * time.Second, 2},
		{5, 7, time.Second, 200}, // two cores busy
		{1, 1, 30 * time.Second, 0},
		{1, 2, 0, 0},
	} {
		if got := cpuPercent(c.cpu0, c.cpu1, c.el); got < c.want-1e-9 || got > c.want+1e-9 {
			t.Errorf("cpuPercent(%v, %v, %v) = %v, want %v", c.cpu0, c.cpu1, c.el, got, c.want)
		}
	}
}

func TestSessionsPlan(t *testing.T) {
	for _, c := range []struct {
		asked  int
		nofile uint64
		n      int
		fault  bool
	}{
		{1000, 20000, 1000, true},
		{4925, 20000, 4925, true},
		{4926, 20000, 4926, false},
		{9000, 20000, 9000, false}, // the 9,000-session run: no fault relay
		{30000, 20000, 9850, false},
		{100, 1024, 100, true},
	} {
		n, fault := sessionsPlan(c.asked, c.nofile)
		if n != c.n || fault != c.fault {
			t.Errorf("sessionsPlan(%d, %d) = %d, %v; want %d, %v", c.asked, c.nofile, n, fault, c.n, c.fault)
		}
	}
	if n := sessionsFor(Relay, 9000, 20000); n != 3300 {
		t.Errorf("relay holds %d of 9000 sessions under 20000 descriptors, want 3300 (6 each)", n)
	}
	if n := sessionsFor(LifelineTCP, 9000, 20000); n != 9000 {
		t.Errorf("lifeline-tcp holds %d of 9000 sessions", n)
	}
}

func TestIdleGoals(t *testing.T) {
	res := func(n int, wait, pct float64, echoed int) SessionsResult {
		return SessionsResult{Config: LifelineTCP, Sessions: n, Procs: []string{"client", "gateway"}, Echoed: echoed,
			PerSessionKB: map[string]float64{"client": 10, "gateway": 10}, IdleWaitS: wait, IdleWindowS: 30,
			IdleCPUPercent: map[string]float64{"client": pct, "gateway": pct / 2}}
	}
	goal := func(r *Report, prefix string) Goal {
		t.Helper()
		for _, g := range r.Goals {
			if strings.HasPrefix(g.Goal, prefix) {
				return g
			}
		}
		t.Fatalf("no goal %q in %+v", prefix, r.Goals)
		return Goal{}
	}
	const cpuGoal, echoGoal = "9,000 idle sessions: <= 2 %", "9,000 idle sessions through one client/gateway pair"
	for _, c := range []struct {
		name           string
		s              SessionsResult
		met, notRun    bool
		echoMet, echoN bool
	}{
		{"met", res(9000, 30, 1.5, 9000), true, false, true, false},
		{"too much CPU", res(9000, 30, 2.5, 9000), false, false, true, false},
		{"lost sessions", res(9000, 30, 0.5, 8999), true, false, false, false},
		{"too few sessions", res(1000, 30, 0.1, 1000), false, true, false, true},
		{"not quiet long enough", res(9000, 1, 0.1, 9000), false, true, true, false},
	} {
		r := &Report{Sessions: []SessionsResult{c.s}}
		r.evaluateGoals()
		g, e := goal(r, cpuGoal), goal(r, echoGoal)
		if g.Met != c.met || g.NotRun != c.notRun || e.Met != c.echoMet || e.NotRun != c.echoN {
			t.Errorf("%s: cpu goal %+v, echo goal %+v", c.name, g, e)
		}
	}
	r := &Report{Sessions: []SessionsResult{res(9000, 30, 1.5, 9000)}}
	r.evaluateGoals()
	if md := r.Markdown(); !strings.Contains(md, "| 9,000 idle sessions: <= 2 % of one core per proxy process (lifeline-tcp) | client 1.50 %, gateway 0.75 %") {
		t.Errorf("goal line not in the report:\n%s", md)
	}
}

func TestHAProxyConfig(t *testing.T) {
	if n := haproxyMaxConn(20000); n != 9900 {
		t.Errorf("maxconn %d for 20000 descriptors, want 9900", n)
	}
	cfg := haproxyConfig("127.0.0.1:1234", "127.0.0.1:5678", 9900)
	for _, w := range []string{"maxconn 9900", "mode tcp", "bind 127.0.0.1:1234", "server upstream 127.0.0.1:5678", "timeout client 1h", "timeout server 1h"} {
		if !strings.Contains(cfg, w) {
			t.Errorf("config lacks %q:\n%s", w, cfg)
		}
	}
	bin, err := haproxyBinary()
	if err != nil {
		t.Skip(err)
	}
	// haproxy -c checks the configuration.
	path := filepath.Join(t.TempDir(), "h.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "-c", "-f", path).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s", err, out)
	}
}

// Without haproxy in PATH the baseline is skipped with a note, and the
// run goes on.
func TestHAProxySkippedWhenAbsent(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	o := shortOptions(t, "latency")
	o.Configs = []string{HAProxy}
	rep := run(t, o)
	if !strings.HasPrefix(rep.Unavailable[HAProxy], "skipped: haproxy is not in PATH") {
		t.Errorf("haproxy: %q", rep.Unavailable[HAProxy])
	}
	md := rep.Markdown()
	if !strings.Contains(md, "**haproxy skipped: haproxy is not in PATH") || !strings.Contains(md, "| haproxy | skipped |") {
		t.Errorf("no skip note:\n%s", md)
	}
	if len(rep.Latency) != 2 {
		t.Errorf("%d latency results, want direct and relay", len(rep.Latency))
	}
}

func TestThroughputVerifyShort(t *testing.T) {
	o := shortOptions(t, "throughput")
	o.Configs = []string{LifelineTCP}
	o.ThroughputMode = ModeVerify
	rep := run(t, o)
	for _, x := range rep.Throughput {
		if x.Mode != ModeVerify || x.MBps <= 0 {
			t.Errorf("%s %s: %+v", x.Config, x.Direction, x)
		}
	}
	if !strings.Contains(rep.Markdown(), "verify mode") {
		t.Error("the report does not say verify mode")
	}
}

// A verifying receiver must catch a changed byte; a bulk sender and
// receiver must move the bytes (sendfile, splice) and count them.
func TestBulkAndVerifyStreams(t *testing.T) {
	pair := func(t *testing.T) (*net.TCPConn, *net.TCPConn) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		a, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		b, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { a.Close(); b.Close() })
		return a.(*net.TCPConn), b.(*net.TCPConn)
	}
	for i := verifyPeriod; i < len(verifyStream); i++ {
		if verifyStream[i] != verifyStream[i-verifyPeriod] {
			t.Fatalf("verifyStream does not repeat at %d", i)
		}
	}
	for _, corrupt := range []bool{false, true} {
		a, b := pair(t)
		go func() {
			p := make([]byte, 3*verifyPeriod)
			for i := range p {
				p[i] = verifyStream[i%verifyPeriod]
			}
			if corrupt {
				p[2*verifyPeriod+7] ^= 1
			}
			a.Write(p)
			a.CloseWrite()
		}()
		n, err := receiveStream(b, true)
		if n != 3*verifyPeriod || errors.Is(err, errMismatch) != corrupt || (!corrupt && err != nil) {
			t.Errorf("corrupt %v: %d bytes, %v", corrupt, n, err)
		}
	}
	file := filepath.Join(t.TempDir(), "bulk.bin")
	if err := writeBulkFile(file); err != nil {
		t.Fatal(err)
	}
	a, b := pair(t)
	var stop atomic.Bool
	sent := make(chan int64, 1)
	go func() {
		n, _ := sendStream(a, false, file, stop.Load)
		a.CloseWrite()
		sent <- n
	}()
	time.AfterFunc(100*time.Millisecond, func() { stop.Store(true) })
	n, err := receiveStream(b, false)
	if s := <-sent; err != nil || n <= bulkChunk || n != s {
		t.Errorf("bulk: received %d, sent %d: %v", n, s, err)
	}
}

func TestProfiles(t *testing.T) {
	o := shortOptions(t, "latency")
	o.Configs = []string{LifelineTCP}
	o.ProfileDir = t.TempDir()
	rep := run(t, o)
	for _, name := range []string{"latency-lifeline-tcp-client.pprof", "latency-lifeline-tcp-gateway.pprof", "latency-relay-relay1.pprof"} {
		st, err := os.Stat(filepath.Join(o.ProfileDir, name))
		if err != nil || st.Size() == 0 {
			t.Errorf("%s: %v", name, err)
		}
	}
	if len(rep.Profiles) < 4 {
		t.Errorf("profiles: %v", rep.Profiles)
	}
}

// The sessions scenario's idle window is profiled alone: each lifeline
// process's window is a segment of its own, whole, and the process's
// profile goes on after it; HAProxy gets no signal.
func TestIdleProfiles(t *testing.T) {
	o := shortOptions(t, "sessions")
	o.Configs = []string{LifelineTCP}
	o.ProfileDir = t.TempDir()
	rep := run(t, o)
	want := map[string]bool{}
	for _, name := range []string{"sessions-lifeline-tcp-client", "sessions-lifeline-tcp-gateway", "sessions-relay-relay1", "sessions-relay-relay2"} {
		want[filepath.Join(o.ProfileDir, name+".2.pprof")] = true
	}
	for _, f := range rep.IdleProfiles {
		if !want[f] {
			t.Errorf("idle profile %s not expected", f)
		}
		delete(want, f)
		for _, seg := range []string{f, strings.TrimSuffix(f, ".2.pprof") + ".3.pprof"} {
			b, err := os.ReadFile(seg)
			if err == nil {
				var zr *gzip.Reader
				if zr, err = gzip.NewReader(bytes.NewReader(b)); err == nil {
					_, err = io.Copy(io.Discard, zr)
				}
			}
			if err != nil {
				t.Errorf("%s: not a whole profile: %v", seg, err)
			}
		}
	}
	for f := range want {
		t.Errorf("no idle profile %s (have %v)", f, rep.IdleProfiles)
	}
	if !strings.Contains(rep.Markdown(), "sessions-lifeline-tcp-client.2.pprof") {
		t.Error("bench.md does not name the idle window's profile")
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
		if x.DetectClientMs <= 0 || (x.DetectGatewayMs <= 0 && x.GatewayIdleRuns < len(x.Runs)) || x.DownToByteMs <= 0 || x.ReturnToByteMs == 0 {
			t.Errorf("%s: not measured: %+v", x.Mode, x)
		}
		if x.GatewayIdleRuns > 0 && x.Mode != "blackhole" {
			t.Errorf("%s: the gateway missed a break it is told of (%d idle runs)", x.Mode, x.GatewayIdleRuns)
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
