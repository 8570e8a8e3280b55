package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/lifeline-proxy/lifeline/resume"
)

// Report holds every number of a run.
type Report struct {
	Machine      Machine            `json:"machine"`
	Settings     RunSettings        `json:"settings"`
	Configs      []string           `json:"configs"`
	Scenarios    []string           `json:"scenarios"`
	Unavailable  map[string]string  `json:"unavailable,omitempty"`
	Throughput   []ThroughputResult `json:"throughput,omitempty"`
	Latency      []LatencyResult    `json:"latency,omitempty"`
	Sessions     []SessionsResult   `json:"sessions,omitempty"`
	SessionsNote string             `json:"sessions_note,omitempty"`
	IdleNote     string             `json:"idle_note,omitempty"`
	Resume       []ResumeResult     `json:"resume,omitempty"`
	Soak         *SoakResult        `json:"soak,omitempty"`
	Goals        []Goal             `json:"goals,omitempty"`
	Failures     []string           `json:"failures,omitempty"`
	Profiles     []string           `json:"profiles,omitempty"` // CPU profiles written (--profile)
	// IdleProfiles are segments of those profiles that hold one idle CPU
	// window of the sessions scenario alone (the profile's files go on in
	// a further segment after the window).
	IdleProfiles    []string     `json:"idle_profiles,omitempty"`
	ScenarioSeconds []NamedValue `json:"scenario_seconds"`
	TotalSeconds    float64      `json:"total_seconds"`
}

// NamedValue is a name and a number.
type NamedValue struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
}

// Machine describes where the run happened.
type Machine struct {
	GOOS       string `json:"goos"`
	GOARCH     string `json:"goarch"`
	NumCPU     int    `json:"num_cpu"`
	CPUModel   string `json:"cpu_model,omitempty"`
	GoVersion  string `json:"go_version"`
	Date       string `json:"date"`
	NofileSoft uint64 `json:"nofile_soft"`
	NofileHard uint64 `json:"nofile_hard"`
}

// RunSettings are the sizes the run used.
type RunSettings struct {
	Short          bool   `json:"short"`
	Duration       string `json:"duration"`
	Runs           int    `json:"runs"`
	Sessions       int    `json:"sessions"`
	SoakDuration   string `json:"soak_duration"`
	SoakSessions   int    `json:"soak_sessions"`
	IdleWait       string `json:"idle_wait"`
	IdleRuns       int    `json:"idle_runs"`
	IdleWindow     string `json:"idle_window"`
	ThroughputMode string `json:"throughput_mode"`
	ProfileDir     string `json:"profile_dir,omitempty"`
}

// ThroughputResult is one configuration in one direction.
type ThroughputResult struct {
	Config    string   `json:"config"`
	Direction string   `json:"direction"` // up, down or both
	Mode      string   `json:"mode"`      // bulk or verify
	Streams   int      `json:"streams"`
	Procs     []string `json:"procs,omitempty"`
	// Medians over runs. MB is 10^6 bytes; both directions count in "both".
	MBps            float64            `json:"mb_per_s"`
	CPUSecPerGB     map[string]float64 `json:"cpu_s_per_gb,omitempty"` // per proxy process
	CPUSecPerGBMean float64            `json:"cpu_s_per_gb_mean,omitempty"`
	VsRelay         float64            `json:"vs_relay,omitempty"`
	VsDirect        float64            `json:"vs_direct,omitempty"`
	CPUVsRelay      float64            `json:"cpu_vs_relay,omitempty"`
	// Yardstick is the baseline of the same kind (haproxy for
	// lifeline-tcp, tls-relay and quic-relay for lifeline-tls and -quic).
	Yardstick      string          `json:"yardstick,omitempty"`
	VsYardstick    float64         `json:"vs_yardstick,omitempty"`
	CPUVsYardstick float64         `json:"cpu_vs_yardstick,omitempty"`
	Runs           []ThroughputRun `json:"runs"`
}

// ThroughputRun is one measurement.
type ThroughputRun struct {
	Bytes      int64              `json:"bytes"`
	UpBytes    int64              `json:"up_bytes"`
	DownBytes  int64              `json:"down_bytes"`
	Seconds    float64            `json:"seconds"`
	MBps       float64            `json:"mb_per_s"`
	CPUSeconds map[string]float64 `json:"cpu_seconds,omitempty"`
	Mismatches int                `json:"mismatches,omitempty"` // verify mode: streams that received other bytes
}

// LatencyResult is one configuration; percentiles are medians over runs.
type LatencyResult struct {
	Config     string       `json:"config"`
	RoundTrips int          `json:"round_trips"`
	Size       int          `json:"size"`
	P50us      float64      `json:"p50_us"`
	P99us      float64      `json:"p99_us"`
	P999us     float64      `json:"p999_us"`
	P50VsRelay float64      `json:"p50_vs_relay,omitempty"`
	P99VsRelay float64      `json:"p99_vs_relay,omitempty"`
	Runs       []LatencyRun `json:"runs"`
}

// LatencyRun is one measurement.
type LatencyRun struct {
	P50us  float64 `json:"p50_us"`
	P99us  float64 `json:"p99_us"`
	P999us float64 `json:"p999_us"`
	MaxUs  float64 `json:"max_us"`
}

// SessionsResult is the memory of idle sessions in one configuration's
// proxy processes. KB is 1024 bytes.
type SessionsResult struct {
	Config   string   `json:"config"`
	Sessions int      `json:"sessions"`
	Procs    []string `json:"procs"`
	// RSS readings of the first run.
	BaselineKB map[string]int64 `json:"baseline_rss_kb"`
	HeldKB     map[string]int64 `json:"held_rss_kb"`
	ParkedKB   map[string]int64 `json:"parked_rss_kb,omitempty"`
	// (RSS with the sessions - baseline) / sessions, median over runs.
	PerSessionKB       map[string]float64 `json:"per_session_kb"`
	ParkedPerSessionKB map[string]float64 `json:"parked_per_session_kb,omitempty"`
	ParkNote           string             `json:"park_note,omitempty"`
	// Idle CPU: the sessions were quiet for IdleWaitS since the last
	// echo, then each process's CPU seconds over IdleWindowS, and as a
	// percentage of one core, medians over IdleRuns; RSS at the end of
	// the first window.
	IdleRuns       []IdleRun          `json:"idle_runs,omitempty"`
	IdleWaitS      float64            `json:"idle_wait_s,omitempty"`
	IdleWindowS    float64            `json:"idle_window_s,omitempty"`
	IdleCPUSeconds map[string]float64 `json:"idle_cpu_seconds,omitempty"`
	IdleCPUPercent map[string]float64 `json:"idle_cpu_percent,omitempty"`
	// QuietCPUPercent is each process's CPU over the quiet spell before
	// the window (from the held RSS reading to the window's start), in %
	// of one core: what sessions cost in the first seconds after their
	// last exchange (a client link that waits for an answer pings then).
	QuietCPUPercent map[string]float64 `json:"quiet_cpu_percent,omitempty"`
	AfterHoldKB     map[string]int64   `json:"after_hold_rss_kb,omitempty"`
	// Echoed is how many sessions echoed their own 8 bytes after the
	// hold (the fewest over runs), EchoError the first failure.
	Echoed    int    `json:"echoed"`
	EchoError string `json:"echo_error,omitempty"`
	// Skipped says why the configuration did not run at this size, Note
	// why it ran at a smaller one.
	Skipped string `json:"skipped,omitempty"`
	Note    string `json:"note,omitempty"`
}

// IdleRun is one idle CPU measurement, per proxy process.
type IdleRun struct {
	WindowS    float64            `json:"window_s"`
	CPUSeconds map[string]float64 `json:"cpu_seconds"`
	CPUPercent map[string]float64 `json:"cpu_percent"`
	// QuietCPUPercent: over the quiet spell before the window.
	QuietCPUPercent map[string]float64 `json:"quiet_cpu_percent,omitempty"`
}

// ResumeResult is one way of breaking the link, medians over runs.
type ResumeResult struct {
	Config            string  `json:"config"`
	Mode              string  `json:"mode"`
	LivenessTimeoutMs float64 `json:"liveness_timeout_ms"`
	DetectClientMs    float64 `json:"detect_client_ms"`
	DetectGatewayMs   float64 `json:"detect_gateway_ms"` // over the runs in which the gateway had bytes in flight (0: none had)
	// GatewayIdleRuns counts runs in which the gateway had nothing in
	// flight when the path went silent: it keeps no watch on an answered
	// kernel-probed link and learned of the break at the client's resume.
	GatewayIdleRuns int         `json:"gateway_idle_runs"`
	ReturnToByteMs  float64     `json:"link_return_to_first_byte_ms"`
	DownToByteMs    float64     `json:"network_up_to_first_byte_ms"`
	AppRTTMs        float64     `json:"app_rtt_ms"`
	NewSessionMs    float64     `json:"new_session_first_byte_ms"` // connect to first echoed byte of a new session
	BytesReplayed   float64     `json:"bytes_replayed"`
	Runs            []ResumeRun `json:"runs"`
}

// ResumeRun is one break.
type ResumeRun struct {
	DetectClientMs  float64 `json:"detect_client_ms"`
	DetectGatewayMs float64 `json:"detect_gateway_ms"` // 0 if GatewayIdle
	// GatewayIdle: the gateway had nothing in flight and was still ACTIVE
	// twice the liveness timeout after the client found the break; it
	// took the client's resume.
	GatewayIdle    bool    `json:"gateway_idle,omitempty"`
	ReturnToByteMs float64 `json:"link_return_to_first_byte_ms"`
	DownToByteMs   float64 `json:"network_up_to_first_byte_ms"`
	AppRTTMs       float64 `json:"app_rtt_ms"`
	BytesReplayed  int64   `json:"bytes_replayed"`
	Resumes        int     `json:"resumes"`
}

// SoakResult is the chaos soak.
type SoakResult struct {
	Config        string           `json:"config"`
	Seconds       float64          `json:"seconds"`
	Sessions      int              `json:"sessions"`
	Settings      string           `json:"settings"`
	Breaks        int64            `json:"breaks"`        // Break calls that hit a link
	LinksBroken   int64            `json:"links_broken"`  // links hit, summed over breaks
	LinkFailures  int64            `json:"link_failures"` // client's lifeline_link_failures_total
	GatewayFails  int64            `json:"gateway_link_failures"`
	Resumes       int64            `json:"resumes"`        // client's lifeline_resumes_total
	BytesReplayed int64            `json:"bytes_replayed"` // both sides
	BytesVerified int64            `json:"bytes_verified"`
	Mismatches    int              `json:"mismatches"`
	Errors        int              `json:"errors"`
	ErrorSamples  []string         `json:"error_samples,omitempty"`
	ByMode        map[string]int64 `json:"breaks_by_mode"`
}

// Goal is one of the issues' targets and whether this run met it.
// NotRun: this run cannot tell (e.g. the goal is at 9,000 sessions and
// the run held fewer); Met is then false.
type Goal struct {
	Goal     string `json:"goal"`
	Measured string `json:"measured"`
	Met      bool   `json:"met"`
	NotRun   bool   `json:"not_run,omitempty"`
}

// WriteFiles writes bench.json, bench.md, throughput.svg and latency.svg
// into dir.
func (r *Report) WriteFiles(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	files := map[string][]byte{
		"bench.json": append(b, '\n'),
		"bench.md":   []byte(r.Markdown()),
	}
	if len(r.Throughput) > 0 {
		files["throughput.svg"] = []byte(r.ThroughputSVG())
	}
	if len(r.Latency) > 0 {
		files["latency.svg"] = []byte(r.LatencySVG())
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// Goal thresholds (issues 10 and 14).
const (
	goalVsRelay        = 0.95 // lifeline-tcp throughput, each direction
	goalCPUVsRelay     = 1.5  // lifeline-tcp CPU s/GB per proxy process
	goalLatencyVsRelay = 1.2  // p50 and p99
	goalHeldKB         = 16.0 // lifeline-tcp, per session per proxy process
	goalParkedKB       = 24.0 // lifeline-tcp parked
	goalTLSHeldKB      = 24.0 // lifeline-tls held
	goalVsOwnRelay     = 0.9  // lifeline-tls vs tls-relay, lifeline-quic vs quic-relay
	goalIdleSessions   = 9000 // sessions of the idle goals
	goalIdleCPUPercent = 2.0  // of one core per proxy process
)

func (r *Report) evaluateGoals() {
	var gs []Goal
	add := func(goal, measured string, met bool) { gs = append(gs, Goal{Goal: goal, Measured: measured, Met: met}) }
	notRun := func(goal, why string) { gs = append(gs, Goal{Goal: goal, Measured: why, NotRun: true}) }
	tp := func(cfg, dir string) *ThroughputResult {
		for i := range r.Throughput {
			if r.Throughput[i].Config == cfg && r.Throughput[i].Direction == dir {
				return &r.Throughput[i]
			}
		}
		return nil
	}
	// missing says why a baseline has no numbers ("" if it has).
	missing := func(cfg string) string {
		if e, ok := r.Unavailable[cfg]; ok {
			return cfg + " " + e
		}
		if !slices.Contains(r.Configs, cfg) {
			return cfg + " not in this run"
		}
		return ""
	}
	// each compares lifeline-X with a baseline in every direction: f gives
	// the measured ratio, ok whether it meets the goal.
	each := func(cfg, base, goal string, f func(t, b *ThroughputResult) float64, ok func(float64) bool) {
		if tp(cfg, "both") == nil {
			return
		}
		if tp(base, "both") == nil {
			if why := missing(base); why != "" {
				notRun(goal, why)
			}
			return
		}
		var parts []string
		met := true
		for _, d := range directions {
			t, b := tp(cfg, d.name), tp(base, d.name)
			if t == nil || b == nil {
				continue
			}
			v := f(t, b)
			parts = append(parts, fmt.Sprintf("%s %.2f", d.name, v))
			met = met && ok(v)
		}
		add(goal, strings.Join(parts, ", "), met)
	}
	mbps := func(t, b *ThroughputResult) float64 { return t.MBps / b.MBps }
	cpu := func(t, b *ThroughputResult) float64 {
		if b.CPUSecPerGBMean <= 0 {
			return 0
		}
		return t.CPUSecPerGBMean / b.CPUSecPerGBMean
	}
	atLeast := func(x float64) func(float64) bool { return func(v float64) bool { return v >= x } }
	atMost := func(x float64) func(float64) bool { return func(v float64) bool { return v > 0 && v <= x } }
	each(LifelineTCP, Relay, fmt.Sprintf("throughput of lifeline-tcp >= %.2f x relay, each direction", goalVsRelay), mbps, atLeast(goalVsRelay))
	each(LifelineTCP, HAProxy, "throughput of lifeline-tcp >= haproxy, each direction", mbps, atLeast(1))
	each(LifelineTCP, HAProxy, "CPU s/GB per proxy process of lifeline-tcp <= haproxy's (mean of the two processes)", cpu, atMost(1))
	each(LifelineTCP, Relay, fmt.Sprintf("CPU s/GB per proxy process of lifeline-tcp <= %.1f x relay's (mean of the two processes)", goalCPUVsRelay), cpu, atMost(goalCPUVsRelay))
	each(LifelineTLS, TLSRelay, fmt.Sprintf("throughput of lifeline-tls >= %.1f x tls-relay, each direction", goalVsOwnRelay), mbps, atLeast(goalVsOwnRelay))
	each(LifelineQUIC, QUICRelay, fmt.Sprintf("throughput of lifeline-quic >= %.1f x quic-relay, each direction", goalVsOwnRelay), mbps, atLeast(goalVsOwnRelay))
	for _, l := range r.Latency {
		if l.Config == LifelineTCP && l.P99VsRelay > 0 {
			add(fmt.Sprintf("p50 and p99 latency of lifeline-tcp <= %.1f x relay", goalLatencyVsRelay),
				fmt.Sprintf("p50 %.2f (%.0f us vs %.0f us), p99 %.2f (%.0f us vs %.0f us)", l.P50VsRelay, l.P50us, l.P50us/l.P50VsRelay, l.P99VsRelay, l.P99us, l.P99us/l.P99VsRelay),
				l.P50VsRelay <= goalLatencyVsRelay && l.P99VsRelay <= goalLatencyVsRelay)
		}
	}
	for _, s := range r.Sessions {
		if !isLifeline(s.Config) || s.Skipped != "" {
			continue
		}
		kb := func(m map[string]float64) (string, float64) {
			worst := 0.0
			var parts []string
			for _, p := range s.Procs {
				if v, ok := m[p]; ok {
					parts = append(parts, fmt.Sprintf("%s %.1f", p, v))
					worst = max(worst, v)
				}
			}
			return strings.Join(parts, ", ") + " KB", worst
		}
		switch s.Config {
		case LifelineTCP:
			m, w := kb(s.PerSessionKB)
			add(fmt.Sprintf("idle session held open <= %.0f KB RSS per proxy process (lifeline-tcp)", goalHeldKB), m, w <= goalHeldKB)
			if len(s.ParkedPerSessionKB) > 0 {
				m, w := kb(s.ParkedPerSessionKB)
				add(fmt.Sprintf("idle session parked <= %.0f KB RSS per proxy process (lifeline-tcp)", goalParkedKB), m, w <= goalParkedKB)
			} else {
				notRun(fmt.Sprintf("idle session parked <= %.0f KB RSS per proxy process (lifeline-tcp)", goalParkedKB), s.ParkNote)
			}
		case LifelineTLS:
			m, w := kb(s.PerSessionKB)
			add(fmt.Sprintf("idle session held open <= %.0f KB RSS per proxy process (lifeline-tls)", goalTLSHeldKB), m, w <= goalTLSHeldKB)
		}
		echoGoal := fmt.Sprintf("%s idle sessions through one client/gateway pair, every one echoing after the hold (%s)", thousands(goalIdleSessions), s.Config)
		cpuGoal := fmt.Sprintf("%s idle sessions: <= %.0f %% of one core per proxy process (%s)", thousands(goalIdleSessions), goalIdleCPUPercent, s.Config)
		var cparts []string
		worst := 0.0
		for _, p := range s.Procs {
			if v, ok := s.IdleCPUPercent[p]; ok {
				cparts = append(cparts, fmt.Sprintf("%s %.2f %%", p, v))
				worst = max(worst, v)
			}
		}
		cpuMeasured := fmt.Sprintf("%s (%d sessions, quiet %.0f s, window %.0f s)", strings.Join(cparts, ", "), s.Sessions, s.IdleWaitS, s.IdleWindowS)
		switch {
		case s.Sessions < goalIdleSessions:
			why := fmt.Sprintf("not run at %s: %d sessions in this run (--sessions %d)", thousands(goalIdleSessions), s.Sessions, goalIdleSessions)
			notRun(echoGoal, fmt.Sprintf("%s; %d of %d echoed", why, s.Echoed, s.Sessions))
			if len(cparts) > 0 {
				why += "; measured: " + cpuMeasured
			}
			notRun(cpuGoal, why)
		default:
			add(echoGoal, fmt.Sprintf("%d of %d echoed", s.Echoed, s.Sessions), s.Echoed == s.Sessions)
			switch {
			case len(cparts) == 0:
				notRun(cpuGoal, "idle CPU not measured")
			case s.IdleWaitS < resume.AttentionWindow.Seconds():
				notRun(cpuGoal, fmt.Sprintf("quiet for %.0f s only, less than the attention window %v: %s", s.IdleWaitS, resume.AttentionWindow, cpuMeasured))
			default:
				add(cpuGoal, cpuMeasured, worst <= goalIdleCPUPercent)
			}
		}
	}
	for _, x := range r.Resume {
		// "1 RTT plus the handshake" on this stack is what a new session
		// takes to its first echoed byte: link dial, handshakes, one round
		// trip; measured in the same run.
		bound := x.NewSessionMs
		add(fmt.Sprintf("%s %s: data flows within 1 RTT + handshake of the link's return", x.Config, x.Mode),
			fmt.Sprintf("%.2f ms (a new session's first byte: %.2f ms; app RTT %.2f ms)", x.ReturnToByteMs, x.NewSessionMs, x.AppRTTMs), x.ReturnToByteMs <= bound)
		if x.Mode == "blackhole" {
			gw := fmt.Sprintf("gateway %.0f ms", x.DetectGatewayMs)
			switch n := len(x.Runs); {
			case x.GatewayIdleRuns == n:
				gw = fmt.Sprintf("gateway idle in all %d runs (nothing in flight; it took the resume)", n)
			case x.GatewayIdleRuns > 0:
				gw += fmt.Sprintf(" in the %d of %d runs it had bytes in flight (idle in the others; it took the resume)", n-x.GatewayIdleRuns, n)
			}
			add(fmt.Sprintf("%s: data in flight on a path gone silent, link declared dead within the liveness timeout", x.Config),
				fmt.Sprintf("client %.0f ms, %s (timeout %.0f ms, +50 ms polling allowance)", x.DetectClientMs, gw, x.LivenessTimeoutMs),
				max(x.DetectClientMs, x.DetectGatewayMs) <= x.LivenessTimeoutMs+50)
		}
	}
	if s := r.Soak; s != nil {
		target := int64(10000)
		if r.Settings.Short {
			target = 1
		}
		add(fmt.Sprintf("soak: zero mismatches over >= %d link failures", target),
			fmt.Sprintf("%d mismatches, %d errors, %d link failures", s.Mismatches, s.Errors, s.LinkFailures),
			s.Mismatches == 0 && s.Errors == 0 && s.LinkFailures >= target)
	}
	r.Goals = gs
}

// thousands writes n with a comma every three digits (9,000).
func thousands(n int) string {
	s := strconv.Itoa(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
