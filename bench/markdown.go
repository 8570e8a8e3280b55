package bench

import (
	"fmt"
	"html"
	"path/filepath"
	"slices"
	"strings"
)

func ratio(x float64) string {
	if x == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", x)
}

// Markdown renders the report as Markdown tables.
func (r *Report) Markdown() string {
	var b strings.Builder
	m := r.Machine
	mode := "full"
	if r.Settings.Short {
		mode = "short"
	}
	fmt.Fprintf(&b, "### lifeline bench (%s mode)\n\n", mode)
	fmt.Fprintf(&b, "%s/%s, %d CPUs", m.GOOS, m.GOARCH, m.NumCPU)
	if m.CPUModel != "" {
		fmt.Fprintf(&b, " (%s)", m.CPUModel)
	}
	fmt.Fprintf(&b, ", %s, loopback, %s. Medians of %d run(s); the machine may be shared and noisy.\n\n", m.GoVersion, m.Date, r.Settings.Runs)
	if len(r.Unavailable) > 0 {
		for _, c := range AllConfigs {
			if e, ok := r.Unavailable[c]; ok {
				fmt.Fprintf(&b, "- **%s %s**\n", c, e)
			}
		}
		b.WriteString("\n")
	}
	configs := slices.Clone(r.Configs)

	if len(r.Throughput) > 0 {
		mode := r.Throughput[0].Mode
		fmt.Fprintf(&b, "#### Throughput (%d streams, %s per run, %s mode; MB = 10^6 bytes; \"both\" counts both directions)\n\n", Streams, r.Settings.Duration, mode)
		if mode == ModeVerify {
			b.WriteString("Verify mode: the senders write a fixed pattern and the receivers check every byte; the load generator's own work limits these numbers.\n\n")
		} else {
			b.WriteString("Bulk mode: the senders send a constant file with sendfile(2) and the receivers splice what arrives into /dev/null, so the load generator touches no byte; " +
				"its own ceiling is the direct row. vs baseline: lifeline-tcp against haproxy, lifeline-tls against tls-relay, lifeline-quic against quic-relay.\n\n")
		}
		b.WriteString("| config | direction | MB/s | vs relay | vs baseline | vs direct | CPU s/GB per proxy process | CPU vs relay | CPU vs baseline |\n")
		b.WriteString("|---|---|---:|---:|---:|---:|---|---:|---:|\n")
		for _, c := range configs {
			if e, ok := r.Unavailable[c]; ok {
				fmt.Fprintf(&b, "| %s | all | %s | | | | %s | | |\n", c, unavailWord(e), cell(e))
				continue
			}
			for _, t := range r.Throughput {
				if t.Config != c {
					continue
				}
				cpu := "- (no proxy: the load generator's ceiling)"
				if len(t.Procs) > 0 {
					var parts []string
					for _, p := range t.Procs {
						parts = append(parts, fmt.Sprintf("%s %.2f", p, t.CPUSecPerGB[p]))
					}
					cpu = strings.Join(parts, ", ")
				}
				vsY, cpuY := "-", "-"
				if t.Yardstick != "" {
					vsY, cpuY = t.Yardstick+" "+ratio(t.VsYardstick), t.Yardstick+" "+ratio(t.CPUVsYardstick)
				}
				fmt.Fprintf(&b, "| %s | %s | %.0f | %s | %s | %s | %s | %s | %s |\n", c, t.Direction, t.MBps, ratio(t.VsRelay), vsY, ratio(t.VsDirect), cpu, ratio(t.CPUVsRelay), cpuY)
			}
		}
		b.WriteString("\n")
	}
	if len(r.Latency) > 0 {
		l0 := r.Latency[0]
		fmt.Fprintf(&b, "#### Latency (%d-byte request/response, one outstanding, %d round trips per run)\n\n", l0.Size, l0.RoundTrips)
		b.WriteString("| config | p50 µs | p99 µs | p99.9 µs | p50 vs relay | p99 vs relay |\n|---|---:|---:|---:|---:|---:|\n")
		for _, c := range configs {
			if e, ok := r.Unavailable[c]; ok {
				fmt.Fprintf(&b, "| %s | %s | | | | %s |\n", c, unavailWord(e), cell(e))
				continue
			}
			for _, l := range r.Latency {
				if l.Config == c {
					fmt.Fprintf(&b, "| %s | %.0f | %.0f | %.0f | %s | %s |\n", c, l.P50us, l.P99us, l.P999us, ratio(l.P50VsRelay), ratio(l.P99VsRelay))
				}
			}
		}
		b.WriteString("\n")
	}
	if len(r.Sessions) > 0 {
		r.sessionsMarkdown(&b, configs)
	}
	if len(r.Resume) > 0 {
		b.WriteString("#### Resume (one session with a request/response loop; link broken through a fault relay)\n\n")
		b.WriteString("| config | break | detected by client ms | detected by gateway ms | liveness timeout ms | link back -> first resumed byte ms | new session: first byte ms | network up -> first byte ms | app RTT ms | bytes replayed |\n")
		b.WriteString("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, x := range r.Resume {
			gw := fmt.Sprintf("%.1f", x.DetectGatewayMs)
			switch {
			case x.GatewayIdleRuns == len(x.Runs) && x.GatewayIdleRuns > 0:
				gw = "idle ¹"
			case x.GatewayIdleRuns > 0:
				gw += fmt.Sprintf(" (%d/%d idle ¹)", x.GatewayIdleRuns, len(x.Runs))
			}
			fmt.Fprintf(&b, "| %s | %s | %.1f | %s | %.0f | %.2f | %.2f | %.1f | %.3f | %.0f |\n", x.Config, x.Mode, x.DetectClientMs, gw,
				x.LivenessTimeoutMs, x.ReturnToByteMs, x.NewSessionMs, x.DownToByteMs, x.AppRTTMs, x.BytesReplayed)
		}
		b.WriteString("\n")
		if slices.ContainsFunc(r.Resume, func(x ResumeResult) bool { return x.GatewayIdleRuns > 0 }) {
			b.WriteString("¹ The gateway had nothing in flight when the path went silent (its answers acknowledged, the request that followed lost in the silence), so it kept no watch: on a kernel-probed tcp/tls link it keeps no attention window after its answers, and learned of the break at the client's resume (or would have at its keepalive). The detection figure is the median over the runs in which it had bytes in flight.\n\n")
		}
	}
	if s := r.Soak; s != nil {
		fmt.Fprintf(&b, "#### Soak (%s)\n\n", s.Settings)
		b.WriteString("| config | seconds | sessions | breaks | links broken | link failures (client) | resumes | bytes verified | mismatches | errors |\n")
		b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		fmt.Fprintf(&b, "| %s | %.0f | %d | %d | %d | %d | %d | %d | %d | %d |\n\n", s.Config, s.Seconds, s.Sessions, s.Breaks, s.LinksBroken,
			s.LinkFailures, s.Resumes, s.BytesVerified, s.Mismatches, s.Errors)
		for _, e := range s.ErrorSamples {
			fmt.Fprintf(&b, "- error: %s\n", e)
		}
		if len(s.ErrorSamples) > 0 {
			b.WriteString("\n")
		}
	}
	if len(r.Goals) > 0 {
		b.WriteString("#### Goals (issues 10 and 14; resume and soak: issue 5)\n\n| goal | measured | met |\n|---|---|---|\n")
		for _, g := range r.Goals {
			met := "yes"
			switch {
			case g.NotRun:
				met = "n/a"
			case !g.Met:
				met = "**no**"
			}
			fmt.Fprintf(&b, "| %s | %s | %s |\n", g.Goal, cell(g.Measured), met)
		}
		b.WriteString("\n")
	}
	if len(r.Profiles) > 0 {
		fmt.Fprintf(&b, "CPU profiles (pprof, one per lifeline process, written until it exited): %d files in %s.\n\n", len(r.Profiles), r.Settings.ProfileDir)
		if len(r.IdleProfiles) > 0 {
			names := make([]string, len(r.IdleProfiles))
			for i, f := range r.IdleProfiles {
				names[i] = filepath.Base(f)
			}
			fmt.Fprintf(&b, "The idle CPU windows alone, each in a segment of its process's profile (which goes on in the next segment after the window): %s.\n\n", strings.Join(names, ", "))
		}
	}
	for _, f := range r.Failures {
		fmt.Fprintf(&b, "**FAILED**: %s\n\n", f)
	}
	return b.String()
}

// unavailWord is the table cell of a configuration that did not run:
// "skipped" or "unavailable", as its note begins.
func unavailWord(note string) string {
	w, _, _ := strings.Cut(note, ":")
	return w
}

func (r *Report) sessionsMarkdown(b *strings.Builder, configs []string) {
	fmt.Fprintf(b, "#### Idle sessions (RSS per session per proxy process, KB = 1024 bytes)\n\n%s\n\n", r.SessionsNote)
	b.WriteString("| config | sessions | held open: KB/session | parked: KB/session | RSS baseline -> held -> after the idle hold -> parked (MB, first run) |\n|---|---:|---|---|---|\n")
	var idle []string
	for _, c := range configs {
		if e, ok := r.Unavailable[c]; ok {
			fmt.Fprintf(b, "| %s | %s | %s | | |\n", c, unavailWord(e), cell(e))
			continue
		}
		for _, s := range r.Sessions {
			if s.Config != c {
				continue
			}
			if s.Skipped != "" {
				fmt.Fprintf(b, "| %s | %d | %s | | |\n", c, s.Sessions, cell(s.Skipped))
				continue
			}
			var held, parked, rss, cpu, quiet []string
			for _, p := range s.Procs {
				held = append(held, fmt.Sprintf("%s %.1f", p, s.PerSessionKB[p]))
				if v, ok := s.ParkedPerSessionKB[p]; ok {
					parked = append(parked, fmt.Sprintf("%s %.1f", p, v))
				}
				x := fmt.Sprintf("%s %.1f -> %.1f", p, float64(s.BaselineKB[p])/1024, float64(s.HeldKB[p])/1024)
				if v, ok := s.AfterHoldKB[p]; ok {
					x += fmt.Sprintf(" -> %.1f", float64(v)/1024)
				}
				if v, ok := s.ParkedKB[p]; ok {
					x += fmt.Sprintf(" -> %.1f", float64(v)/1024)
				}
				rss = append(rss, x)
				if v, ok := s.IdleCPUPercent[p]; ok {
					cpu = append(cpu, fmt.Sprintf("%s %.2f (%.2f s)", p, v, s.IdleCPUSeconds[p]))
				}
				if v, ok := s.QuietCPUPercent[p]; ok {
					quiet = append(quiet, fmt.Sprintf("%s %.2f", p, v))
				}
			}
			pk := strings.Join(parked, ", ")
			if pk == "" {
				pk = s.ParkNote
			}
			fmt.Fprintf(b, "| %s | %d | %s | %s | %s |\n", c, s.Sessions, strings.Join(held, ", "), cell(pk), strings.Join(rss, "; "))
			if len(cpu) > 0 {
				idle = append(idle, fmt.Sprintf("| %s | %d | %.1f | %s | %.1f | %s | %d of %d |\n", c, s.Sessions, s.IdleWaitS, strings.Join(quiet, ", "), s.IdleWindowS, strings.Join(cpu, ", "), s.Echoed, s.Sessions))
			} else {
				idle = append(idle, fmt.Sprintf("| %s | %d | | | | not measured | %d of %d |\n", c, s.Sessions, s.Echoed, s.Sessions))
			}
		}
	}
	b.WriteString("\n")
	notes := 0
	for _, s := range r.Sessions {
		if s.Note != "" {
			fmt.Fprintf(b, "- %s.\n", s.Note)
			notes++
		}
	}
	if notes > 0 {
		b.WriteString("\n")
	}
	if len(idle) > 0 {
		fmt.Fprintf(b, "#### Idle CPU (%% of one core per proxy process, sessions held open and quiet)\n\n%s\n\n", r.IdleNote)
		b.WriteString("| config | sessions | quiet s | CPU % while quiet | window s | idle CPU % of one core (CPU s in the window) | echoed after the hold |\n|---|---:|---:|---|---:|---|---:|\n")
		for _, l := range idle {
			b.WriteString(l)
		}
		b.WriteString("\n")
	}
}

func cell(s string) string { return strings.ReplaceAll(s, "|", "\\|") }

// palette: one color per entry of AllConfigs.
var palette = []string{"#7f7f7f", "#bcbd22", "#17becf", "#9467bd", "#8c564b", "#1f77b4", "#2ca02c", "#d62728"}

func colorOf(cfg string) string {
	i := slices.Index(AllConfigs, cfg)
	if i < 0 {
		return "#444"
	}
	return palette[i]
}

// barChart draws horizontal bars: one group per entry of groups, one bar
// per configuration in each group.
func barChart(title, unit string, groups []string, configs []string, value func(group, cfg string) (float64, bool), note string) string {
	const (
		left   = 130
		width  = 460
		barH   = 16
		gap    = 4
		groupG = 26
		top    = 56
	)
	maxV := 0.0
	for _, g := range groups {
		for _, c := range configs {
			if v, ok := value(g, c); ok {
				maxV = max(maxV, v)
			}
		}
	}
	if maxV == 0 {
		maxV = 1
	}
	var body strings.Builder
	y := top
	for _, g := range groups {
		fmt.Fprintf(&body, `<text x="10" y="%d" font-weight="bold">%s</text>`+"\n", y+12, html.EscapeString(g))
		y += 18
		for _, c := range configs {
			v, ok := value(g, c)
			fmt.Fprintf(&body, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", left-8, y+12, html.EscapeString(c))
			if !ok {
				fmt.Fprintf(&body, `<text x="%d" y="%d" fill="#888">unavailable</text>`+"\n", left+4, y+12)
			} else {
				w := int(v / maxV * width)
				fmt.Fprintf(&body, `<rect x="%d" y="%d" width="%d" height="%d" fill="%s"/>`+"\n", left, y, max(w, 1), barH, colorOf(c))
				fmt.Fprintf(&body, `<text x="%d" y="%d">%s %s</text>`+"\n", left+max(w, 1)+6, y+12, fmtVal(v), html.EscapeString(unit))
			}
			y += barH + gap
		}
		y += groupG - gap
	}
	h := y + 24
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", left+width+110, h, left+width+110, h)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="10" y="22" font-size="15" font-weight="bold">%s</text>`+"\n", html.EscapeString(title))
	fmt.Fprintf(&b, `<text x="10" y="40" fill="#555">%s</text>`+"\n", html.EscapeString(note))
	b.WriteString(body.String())
	b.WriteString("</svg>\n")
	return b.String()
}

func fmtVal(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

func (r *Report) note() string {
	m := r.Machine
	return fmt.Sprintf("%d CPUs, loopback, %s, %s; medians of %d run(s)", m.NumCPU, m.GoVersion, m.Date[:10], r.Settings.Runs)
}

// ThroughputSVG is a bar chart of the throughput scenario.
func (r *Report) ThroughputSVG() string {
	var groups []string
	for _, d := range directions {
		groups = append(groups, d.name)
	}
	return barChart(fmt.Sprintf("Throughput, %d streams (higher is better)", Streams), "MB/s", groups, r.Configs,
		func(g, c string) (float64, bool) {
			for _, t := range r.Throughput {
				if t.Config == c && t.Direction == g {
					return t.MBps, true
				}
			}
			return 0, false
		}, r.note())
}

// LatencySVG is a bar chart of the latency scenario.
func (r *Report) LatencySVG() string {
	groups := []string{"p50", "p99", "p99.9"}
	return barChart(fmt.Sprintf("Latency, %d-byte request/response, one outstanding (lower is better)", LatencySize), "µs", groups, r.Configs,
		func(g, c string) (float64, bool) {
			for _, l := range r.Latency {
				if l.Config == c {
					return map[string]float64{"p50": l.P50us, "p99": l.P99us, "p99.9": l.P999us}[g], true
				}
			}
			return 0, false
		}, r.note())
}
