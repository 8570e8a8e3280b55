// Package bench is lifeline's benchmark harness: throughput, latency,
// memory and idle CPU per session, resume time and a chaos soak, each
// measured for lifeline (over TCP, TLS and QUIC links) and for baselines
// in the same run: no proxy ("direct"), two chained io.Copy relays whose
// hop is TCP ("relay"), crypto/tls ("tls-relay") or a quic-go stream
// ("quic-relay"), and two chained HAProxy processes ("haproxy", when the
// binary is installed).
//
// Every proxy runs as a separate process started from the lifeline binary
// (the gateway and client subcommands, or the hidden bench-relay one) or
// from haproxy, so that its CPU time and resident memory can be read from
// /proc. The upstream services and the load generator run in the calling
// process.
package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lifeline-proxy/lifeline/resume"
)

// Options says what to run.
type Options struct {
	// Scenarios to run, in any order (default: all of Scenarios()).
	Scenarios []string
	// Configs to measure (default: AllConfigs). The baselines direct and
	// relay are always added; tls-relay, quic-relay and haproxy with
	// lifeline-tls, lifeline-quic and lifeline-tcp (their yardsticks).
	Configs []string
	// Short runs everything small and once: the CI mode.
	Short bool
	// The sizes of the run; zero means DefaultOptions(Short)'s.
	// Duration of one throughput measurement.
	Duration time.Duration
	// Runs of each measurement; medians are reported.
	Runs int
	// Sessions held open by the sessions scenario, lowered to what the
	// descriptor limit allows.
	Sessions int
	// SoakDuration and SoakSessions size the soak.
	SoakDuration time.Duration
	SoakSessions int
	// IdleWait is how long the sessions scenario lets its sessions be
	// quiet (after the last echo) before it measures their idle CPU over
	// IdleWindow. The wait should exceed resume.AttentionWindow, after
	// which a link that sent nothing is idle.
	IdleWait   time.Duration
	IdleWindow time.Duration
	// IdleRuns is how many of the sessions scenario's runs (the first
	// ones) measure idle CPU; each costs IdleWait and IdleWindow.
	IdleRuns int
	// ThroughputMode is ModeBulk (default) or ModeVerify.
	ThroughputMode string
	// ProfileDir, if set, receives a CPU profile (pprof) of every lifeline
	// process (proxies and bench relays), written until it exits.
	ProfileDir string
	// OutDir, if set, receives bench.json, bench.md, throughput.svg and
	// latency.svg.
	OutDir string
	// Progress, if set, gets a status line updated with carriage returns.
	Progress io.Writer
	// BinaryPath is the lifeline binary to run the proxies from (default:
	// this executable).
	BinaryPath string
}

// DefaultOptions returns the sizes a run uses where Options leaves them
// zero (Duration, Runs, Sessions, SoakDuration, SoakSessions, IdleWait,
// IdleWindow, IdleRuns): a full run's, or a short one's. A short run's idle wait is
// below the keepalive interval, so its idle CPU is that of links still
// pinging (and says so).
func DefaultOptions(short bool) Options {
	if short {
		return Options{Short: true, Duration: 300 * time.Millisecond, Runs: 1, Sessions: 100,
			SoakDuration: 3 * time.Second, SoakSessions: 16, IdleWait: 200 * time.Millisecond, IdleWindow: time.Second, IdleRuns: 1,
			ThroughputMode: ModeBulk}
	}
	return Options{Duration: 2 * time.Second, Runs: 3, Sessions: 1000, SoakDuration: 45 * time.Second, SoakSessions: 64,
		// The window spans a keepalive interval, so that every idle link's
		// keepalive falls in it once: the steady cost, not a quiet spell.
		IdleWait: resume.AttentionWindow + 5*time.Second, IdleWindow: resume.DefaultKeepaliveInterval + 10*time.Second, IdleRuns: 1, ThroughputMode: ModeBulk}
}

// Throughput modes: ModeBulk sends a constant file with sendfile(2) and
// throws what it receives away with splice(2) into /dev/null, so that the
// load generator touches no byte (its ceiling is the direct row);
// ModeVerify writes a fixed pattern and checks every byte received.
const (
	ModeBulk   = "bulk"
	ModeVerify = "verify"
)

// CPUProfileEnv names the environment variable that makes a lifeline
// process write a CPU profile to the file it names, from start to exit
// (set by the bench on the processes it starts with --profile).
const CPUProfileEnv = "LIFELINE_CPUPROFILE"

// ProfileSegmentSignal makes a process that writes a CPU profile
// (CPUProfileEnv) close it and go on in the next segment's file
// (ProfileSegment): the bench cuts the sessions scenario's idle window out
// of the whole run's profile this way, since an idle window's few
// milliseconds of CPU would drown in the setup's seconds.
const ProfileSegmentSignal = syscall.SIGUSR1

// ProfileSegment is the file of segment n (2, 3, ...) of the CPU profile
// named path; segment 1 is path itself.
func ProfileSegment(path string, n int) string {
	if n <= 1 {
		return path
	}
	return fmt.Sprintf("%s.%d.pprof", strings.TrimSuffix(path, ".pprof"), n)
}

// ErrFailed is returned (with the report) when a check failed: a soak
// mismatch or a lost session.
var ErrFailed = errors.New("benchmark checks failed")

type scenario struct {
	name string
	run  func(context.Context, *runner) error
}

var scenarios = []scenario{
	{"throughput", runThroughput},
	{"latency", runLatency},
	{"sessions", runSessions},
	{"resume", runResume},
	{"soak", runSoak},
}

// Scenarios lists the scenario names in the order they run.
func Scenarios() []string {
	var out []string
	for _, s := range scenarios {
		out = append(out, s.name)
	}
	return out
}

type runner struct {
	opt      Options
	bin      string
	tmp      string
	rep      *Report
	certs    *certFiles
	scenario string         // the scenario running
	profiles map[string]int // profile file names used, under progMu

	progMu   sync.Mutex
	lastProg int
}

func (r *runner) certFiles() (*certFiles, error) {
	if r.certs == nil {
		c, err := makeCerts(r.tmp)
		if err != nil {
			return nil, err
		}
		r.certs = c
	}
	return r.certs, nil
}

func (r *runner) progress(format string, args ...any) {
	if r.opt.Progress == nil {
		return
	}
	r.progMu.Lock()
	defer r.progMu.Unlock()
	s := fmt.Sprintf(format, args...)
	if len(s) > 100 {
		s = s[:100]
	}
	pad := ""
	if n := r.lastProg - len(s); n > 0 {
		pad = strings.Repeat(" ", n)
	}
	r.lastProg = len(s)
	fmt.Fprintf(r.opt.Progress, "\r%s%s", s, pad)
}

// unavailable records a configuration that could not run: "skipped: ..."
// for one this machine lacks (haproxy not installed), "unavailable: ..."
// for QUIC (lifeline's or quic-go's) or HAProxy failing. Any other
// failure to start is an error.
func (r *runner) unavailable(cfg string, err error) error {
	var skip skipError
	msg := ""
	switch {
	case errors.As(err, &skip):
		msg = "skipped: " + skip.why
	case cfg == LifelineQUIC || cfg == QUICRelay || cfg == HAProxy:
		msg = "unavailable: " + err.Error()
	default:
		return err
	}
	if r.rep.Unavailable == nil {
		r.rep.Unavailable = map[string]string{}
	}
	if _, ok := r.rep.Unavailable[cfg]; !ok {
		r.rep.Unavailable[cfg] = oneLine(msg)
	}
	return nil
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " | ")
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return s
}

// Run runs the scenarios and returns the report. With OutDir set it also
// writes the report's files there. The error is ErrFailed (wrapped) when
// the run completed but a check failed.
func Run(ctx context.Context, o Options) (*Report, error) {
	if len(o.Scenarios) == 0 {
		o.Scenarios = Scenarios()
	}
	for _, s := range o.Scenarios {
		if !slices.Contains(Scenarios(), s) {
			return nil, fmt.Errorf("unknown scenario %q (want %s)", s, strings.Join(Scenarios(), ", "))
		}
	}
	if len(o.Configs) == 0 {
		o.Configs = AllConfigs
	}
	for _, c := range o.Configs {
		if !slices.Contains(AllConfigs, c) {
			return nil, fmt.Errorf("unknown configuration %q (want %s)", c, strings.Join(AllConfigs, ", "))
		}
	}
	// Baselines run with what they are the yardstick of: every ratio is
	// against the same run.
	var cfgs []string
	for _, c := range AllConfigs {
		if c == Direct || c == Relay || slices.Contains(o.Configs, c) || slices.Contains(o.Configs, baselineFor[c]) {
			cfgs = append(cfgs, c)
		}
	}
	o.Configs = cfgs
	def := DefaultOptions(o.Short)
	if o.Duration <= 0 {
		o.Duration = def.Duration
	}
	if o.SoakDuration <= 0 {
		o.SoakDuration = def.SoakDuration
	}
	if o.Runs <= 0 {
		o.Runs = def.Runs
	}
	if o.Sessions <= 0 {
		o.Sessions = def.Sessions
	}
	if o.SoakSessions <= 0 {
		o.SoakSessions = def.SoakSessions
	}
	if o.IdleWait <= 0 {
		o.IdleWait = def.IdleWait
	}
	if o.IdleWindow <= 0 {
		o.IdleWindow = def.IdleWindow
	}
	if o.IdleRuns <= 0 {
		o.IdleRuns = def.IdleRuns
	}
	switch o.ThroughputMode {
	case "":
		o.ThroughputMode = ModeBulk
	case ModeBulk, ModeVerify:
	default:
		return nil, fmt.Errorf("unknown throughput mode %q (want %s or %s)", o.ThroughputMode, ModeBulk, ModeVerify)
	}
	if o.ProfileDir != "" {
		abs, err := filepath.Abs(o.ProfileDir)
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(abs, 0o755); err != nil {
			return nil, err
		}
		o.ProfileDir = abs
	}
	if o.BinaryPath == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		o.BinaryPath = exe
	}
	tmp, err := os.MkdirTemp("", "lifeline-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)

	rep := &Report{Machine: machineInfo(), Configs: o.Configs, Scenarios: o.Scenarios,
		Settings: RunSettings{Short: o.Short, Duration: o.Duration.String(), Runs: o.Runs, Sessions: o.Sessions,
			SoakDuration: o.SoakDuration.String(), SoakSessions: o.SoakSessions, IdleWait: o.IdleWait.String(), IdleRuns: o.IdleRuns,
			IdleWindow: o.IdleWindow.String(), ThroughputMode: o.ThroughputMode, ProfileDir: o.ProfileDir}}
	r := &runner{opt: o, bin: o.BinaryPath, tmp: tmp, rep: rep}
	start := time.Now()
	for _, sc := range scenarios {
		if !slices.Contains(o.Scenarios, sc.name) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		t0 := time.Now()
		r.scenario = sc.name
		if err := sc.run(ctx, r); err != nil {
			r.progress("")
			if r.opt.Progress != nil {
				fmt.Fprint(r.opt.Progress, "\r")
			}
			return rep, fmt.Errorf("%s: %w", sc.name, err)
		}
		rep.ScenarioSeconds = append(rep.ScenarioSeconds, NamedValue{sc.name, time.Since(t0).Seconds()})
	}
	rep.TotalSeconds = time.Since(start).Seconds()
	r.progress("done in %.0fs", rep.TotalSeconds)
	if o.Progress != nil {
		fmt.Fprintln(o.Progress)
	}
	rep.evaluateGoals()
	if o.OutDir != "" {
		if err := rep.WriteFiles(o.OutDir); err != nil {
			return rep, err
		}
	}
	if len(rep.Failures) > 0 {
		return rep, fmt.Errorf("%w: %s", ErrFailed, strings.Join(rep.Failures, "; "))
	}
	return rep, nil
}

func machineInfo() Machine {
	m := Machine{GOOS: runtime.GOOS, GOARCH: runtime.GOARCH, NumCPU: runtime.NumCPU(),
		GoVersion: runtime.Version(), Date: time.Now().UTC().Format(time.RFC3339)}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	var rl syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl) == nil {
		m.NofileSoft, m.NofileHard = rl.Cur, rl.Max
	}
	return m
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// ms is d in milliseconds.
func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

// percentile of sorted durations, in microseconds.
func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p*float64(len(sorted))+0.5) - 1
	i = max(0, min(i, len(sorted)-1))
	return float64(sorted[i].Nanoseconds()) / 1e3
}
