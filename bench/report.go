package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Report holds every number of a run.
type Report struct {
	Machine         Machine            `json:"machine"`
	Settings        RunSettings        `json:"settings"`
	Configs         []string           `json:"configs"`
	Scenarios       []string           `json:"scenarios"`
	Unavailable     map[string]string  `json:"unavailable,omitempty"`
	Throughput      []ThroughputResult `json:"throughput,omitempty"`
	Latency         []LatencyResult    `json:"latency,omitempty"`
	Sessions        []SessionsResult   `json:"sessions,omitempty"`
	SessionsNote    string             `json:"sessions_note,omitempty"`
	Resume          []ResumeResult     `json:"resume,omitempty"`
	Soak            *SoakResult        `json:"soak,omitempty"`
	Goals           []Goal             `json:"goals,omitempty"`
	Failures        []string           `json:"failures,omitempty"`
	ScenarioSeconds []NamedValue       `json:"scenario_seconds"`
	TotalSeconds    float64            `json:"total_seconds"`
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
	Short        bool   `json:"short"`
	Duration     string `json:"duration"`
	Runs         int    `json:"runs"`
	Sessions     int    `json:"sessions"`
	SoakDuration string `json:"soak_duration"`
	SoakSessions int    `json:"soak_sessions"`
}

// ThroughputResult is one configuration in one direction.
type ThroughputResult struct {
	Config    string   `json:"config"`
	Direction string   `json:"direction"` // up, down or both
	Streams   int      `json:"streams"`
	Procs     []string `json:"procs,omitempty"`
	// Medians over runs. MB is 10^6 bytes; both directions count in "both".
	MBps            float64            `json:"mb_per_s"`
	CPUSecPerGB     map[string]float64 `json:"cpu_s_per_gb,omitempty"` // per proxy process
	CPUSecPerGBMean float64            `json:"cpu_s_per_gb_mean,omitempty"`
	VsRelay         float64            `json:"vs_relay,omitempty"`
	VsDirect        float64            `json:"vs_direct,omitempty"`
	CPUVsRelay      float64            `json:"cpu_vs_relay,omitempty"`
	Runs            []ThroughputRun    `json:"runs"`
}

// ThroughputRun is one measurement.
type ThroughputRun struct {
	Bytes      int64              `json:"bytes"`
	UpBytes    int64              `json:"up_bytes"`
	DownBytes  int64              `json:"down_bytes"`
	Seconds    float64            `json:"seconds"`
	MBps       float64            `json:"mb_per_s"`
	CPUSeconds map[string]float64 `json:"cpu_seconds,omitempty"`
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
	Config     string           `json:"config"`
	Sessions   int              `json:"sessions"`
	Procs      []string         `json:"procs"`
	BaselineKB map[string]int64 `json:"baseline_rss_kb"`
	HeldKB     map[string]int64 `json:"held_rss_kb"`
	ParkedKB   map[string]int64 `json:"parked_rss_kb,omitempty"`
	// (RSS with the sessions - baseline) / sessions, median over runs.
	PerSessionKB       map[string]float64 `json:"per_session_kb"`
	ParkedPerSessionKB map[string]float64 `json:"parked_per_session_kb,omitempty"`
	ParkNote           string             `json:"park_note,omitempty"`
}

// ResumeResult is one way of breaking the link, medians over runs.
type ResumeResult struct {
	Config            string      `json:"config"`
	Mode              string      `json:"mode"`
	LivenessTimeoutMs float64     `json:"liveness_timeout_ms"`
	DetectClientMs    float64     `json:"detect_client_ms"`
	DetectGatewayMs   float64     `json:"detect_gateway_ms"`
	ReturnToByteMs    float64     `json:"link_return_to_first_byte_ms"`
	DownToByteMs      float64     `json:"network_up_to_first_byte_ms"`
	AppRTTMs          float64     `json:"app_rtt_ms"`
	NewSessionMs      float64     `json:"new_session_first_byte_ms"` // connect to first echoed byte of a new session
	BytesReplayed     float64     `json:"bytes_replayed"`
	Runs              []ResumeRun `json:"runs"`
}

// ResumeRun is one break.
type ResumeRun struct {
	DetectClientMs  float64 `json:"detect_client_ms"`
	DetectGatewayMs float64 `json:"detect_gateway_ms"`
	ReturnToByteMs  float64 `json:"link_return_to_first_byte_ms"`
	DownToByteMs    float64 `json:"network_up_to_first_byte_ms"`
	AppRTTMs        float64 `json:"app_rtt_ms"`
	BytesReplayed   int64   `json:"bytes_replayed"`
	Resumes         int     `json:"resumes"`
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

// Goal is one of issue 5's targets and whether this run met it.
type Goal struct {
	Goal     string `json:"goal"`
	Measured string `json:"measured"`
	Met      bool   `json:"met"`
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

func (r *Report) evaluateGoals() {
	var gs []Goal
	tp := func(cfg, dir string) *ThroughputResult {
		for i := range r.Throughput {
			if r.Throughput[i].Config == cfg && r.Throughput[i].Direction == dir {
				return &r.Throughput[i]
			}
		}
		return nil
	}
	if tp(LifelineTCP, "both") != nil && tp(Relay, "both") != nil {
		var parts []string
		ok := true
		worstCPU := 0.0
		var cparts []string
		for _, d := range directions {
			t := tp(LifelineTCP, d.name)
			parts = append(parts, fmt.Sprintf("%s %.2f", d.name, t.VsRelay))
			ok = ok && t.VsRelay >= 0.90
			cparts = append(cparts, fmt.Sprintf("%s %.2f", d.name, t.CPUVsRelay))
			worstCPU = max(worstCPU, t.CPUVsRelay)
		}
		gs = append(gs, Goal{"throughput of lifeline-tcp >= 0.90 x relay", strings.Join(parts, ", "), ok})
		gs = append(gs, Goal{"CPU s/GB per proxy process <= 1.25 x relay's", strings.Join(cparts, ", ") + " (mean of the two processes)", worstCPU <= 1.25})
	}
	for _, l := range r.Latency {
		if l.Config == LifelineTCP && l.P99VsRelay > 0 {
			gs = append(gs, Goal{"p99 latency of lifeline-tcp <= 1.2 x relay", fmt.Sprintf("%.2f (%.0f us vs %.0f us)", l.P99VsRelay, l.P99us, l.P99us/l.P99VsRelay), l.P99VsRelay <= 1.2})
		}
	}
	for _, s := range r.Sessions {
		if !isLifeline(s.Config) {
			continue
		}
		worst := 0.0
		var parts []string
		for _, p := range s.Procs {
			worst = max(worst, s.PerSessionKB[p])
			parts = append(parts, fmt.Sprintf("%s %.1f", p, s.PerSessionKB[p]))
			if v, ok := s.ParkedPerSessionKB[p]; ok {
				worst = max(worst, v)
				parts[len(parts)-1] += fmt.Sprintf(" (parked %.1f)", v)
			}
		}
		gs = append(gs, Goal{fmt.Sprintf("idle session <= 20 KB RSS per proxy process (%s)", s.Config), strings.Join(parts, ", ") + " KB", worst <= 20})
	}
	for _, x := range r.Resume {
		// "1 RTT plus the handshake" on this stack is what a new session
		// takes to its first echoed byte: link dial, handshakes, one round
		// trip; measured in the same run.
		bound := x.NewSessionMs
		gs = append(gs, Goal{fmt.Sprintf("%s %s: data flows within 1 RTT + handshake of the link's return", x.Config, x.Mode),
			fmt.Sprintf("%.2f ms (a new session's first byte: %.2f ms; app RTT %.2f ms)", x.ReturnToByteMs, x.NewSessionMs, x.AppRTTMs), x.ReturnToByteMs <= bound})
		if x.Mode == "blackhole" {
			gs = append(gs, Goal{fmt.Sprintf("%s: silent link detected within the liveness timeout", x.Config),
				fmt.Sprintf("client %.0f ms, gateway %.0f ms (timeout %.0f ms, +50 ms polling allowance)", x.DetectClientMs, x.DetectGatewayMs, x.LivenessTimeoutMs),
				max(x.DetectClientMs, x.DetectGatewayMs) <= x.LivenessTimeoutMs+50})
		}
	}
	if s := r.Soak; s != nil {
		target := int64(10000)
		if r.Settings.Short {
			target = 1
		}
		gs = append(gs, Goal{fmt.Sprintf("soak: zero mismatches over >= %d link failures", target),
			fmt.Sprintf("%d mismatches, %d errors, %d link failures", s.Mismatches, s.Errors, s.LinkFailures),
			s.Mismatches == 0 && s.Errors == 0 && s.LinkFailures >= target})
	}
	r.Goals = gs
}
