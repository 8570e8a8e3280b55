package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/lifeline-proxy/lifeline/bench"
	"github.com/lifeline-proxy/lifeline/resume"
)

// runBench is "lifeline bench [scenario...] [flags]".
func runBench(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("lifeline bench", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	short := fs.Bool("short", false, "small sizes and one run of each measurement (the CI mode, seconds per scenario)")
	out := fs.String("out", "bench/out", "`directory` for bench.json, bench.md, throughput.svg and latency.svg")
	configs := fs.String("configs", strings.Join(bench.AllConfigs, ","), "comma-separated `configurations` (direct and relay always run as baselines; haproxy with lifeline-tcp, tls-relay with lifeline-tls, quic-relay with lifeline-quic)")
	// 0: bench's default, of a full or a short run.
	fullRun, shortRun := bench.DefaultOptions(false), bench.DefaultOptions(true)
	dur := fs.Duration("duration", 0, fmt.Sprintf("length of one throughput measurement (default %v, %v with --short)", fullRun.Duration, shortRun.Duration))
	runs := fs.Int("runs", 0, fmt.Sprintf("runs of each measurement, medians reported (default %d, %d with --short)", fullRun.Runs, shortRun.Runs))
	sessions := fs.Int("sessions", 0, fmt.Sprintf("idle sessions for the sessions scenario (default %d, %d with --short; capped by the descriptor limit)", fullRun.Sessions, shortRun.Sessions))
	soak := fs.Duration("soak-duration", 0, fmt.Sprintf("length of the soak (default %v, %v with --short)", fullRun.SoakDuration, shortRun.SoakDuration))
	soakSessions := fs.Int("soak-sessions", 0, fmt.Sprintf("sessions in the soak (default %d, %d with --short)", fullRun.SoakSessions, shortRun.SoakSessions))
	idleWait := fs.Duration("idle-wait", 0, fmt.Sprintf("sessions scenario: how long the sessions stay quiet before their idle CPU is measured, to be above lifeline's attention window (%v, the longest a link pings after it sent data) (default %v, %v with --short)", resume.AttentionWindow, fullRun.IdleWait, shortRun.IdleWait))
	idleWindow := fs.Duration("idle-window", 0, fmt.Sprintf("sessions scenario: the window idle CPU is measured over (default %v, %v with --short)", fullRun.IdleWindow, shortRun.IdleWindow))
	idleRuns := fs.Int("idle-runs", 0, fmt.Sprintf("sessions scenario: how many of its runs also measure idle CPU, each costing the wait and the window (default %d)", fullRun.IdleRuns))
	mode := fs.String("throughput-mode", bench.ModeBulk, "throughput load: "+bench.ModeBulk+" (sendfile and splice, the generator touches no byte) or "+bench.ModeVerify+" (a fixed pattern, every byte checked)")
	profile := fs.String("profile", "", "`directory` for a CPU profile (pprof) of every lifeline proxy and relay process")
	quiet := fs.Bool("quiet", false, "no progress line")
	fs.Usage = func() {
		fmt.Fprintf(stdout, "Usage: lifeline bench [scenario...] [flags]\n\nScenarios: %s (default: all).\nConfigurations: %s.\n\nFlags:\n",
			strings.Join(bench.Scenarios(), ", "), strings.Join(bench.AllConfigs, ", "))
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	// Scenarios may come before or after the flags.
	var names []string
	rest := args
	for {
		if err := parseFlags(fs, rest); err != nil {
			return err
		}
		if fs.NArg() == 0 {
			break
		}
		names = append(names, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	o := bench.Options{Scenarios: names, Short: *short, OutDir: *out, Duration: *dur, Runs: *runs,
		Sessions: *sessions, SoakDuration: *soak, SoakSessions: *soakSessions, IdleWait: *idleWait, IdleWindow: *idleWindow, IdleRuns: *idleRuns,
		ThroughputMode: *mode, ProfileDir: *profile}
	for _, c := range strings.Split(*configs, ",") {
		if c = strings.TrimSpace(c); c != "" {
			o.Configs = append(o.Configs, c)
		}
	}
	if !*quiet {
		o.Progress = stderr
	}
	for _, s := range names {
		if !slices.Contains(bench.Scenarios(), s) {
			return usagef("unknown scenario %q (want %s)", s, strings.Join(bench.Scenarios(), ", "))
		}
	}
	for _, c := range o.Configs {
		if !slices.Contains(bench.AllConfigs, c) {
			return usagef("unknown configuration %q (want %s)", c, strings.Join(bench.AllConfigs, ", "))
		}
	}
	if o.ThroughputMode != bench.ModeBulk && o.ThroughputMode != bench.ModeVerify {
		return usagef("unknown --throughput-mode %q (want %s or %s)", o.ThroughputMode, bench.ModeBulk, bench.ModeVerify)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	start := time.Now()
	rep, err := bench.Run(ctx, o)
	if rep != nil && (err == nil || errors.Is(err, bench.ErrFailed)) {
		fmt.Fprint(stdout, rep.Markdown())
		if o.OutDir != "" {
			fmt.Fprintf(stdout, "Raw numbers: %s/bench.json; charts: %s/throughput.svg, %s/latency.svg (%.0fs).\n", o.OutDir, o.OutDir, o.OutDir, time.Since(start).Seconds())
		}
		if o.ProfileDir != "" {
			fmt.Fprintf(stdout, "CPU profiles: %s (go tool pprof -top %s/<file>).\n", o.ProfileDir, o.ProfileDir)
		}
	}
	return err
}

// runBenchRelay is the hidden "lifeline bench-relay" command, the plain
// relay the benchmark uses as a baseline.
func runBenchRelay(args []string, stderr io.Writer) error {
	return bench.RelayMain(args, stderr)
}
