package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// Descriptors the sessions scenario needs in the bench process: per
// session the application's socket and the upstream's, plus the fault
// relay's two when it is in the path; and some for everything else.
const (
	benchFDsPerSession = 2
	faultFDsPerSession = 2
	reservedBenchFDs   = 300
)

// sessionsPlan is how many sessions the bench process's descriptor limit
// allows of those asked for, and whether the fault relay (for the parked
// measurement) fits in it too. Without the relay in the path a session
// costs half as many descriptors, so the largest runs go without it.
func sessionsPlan(asked int, nofile uint64) (n int, fault bool) {
	lim := int(min(nofile, 1<<20)) - reservedBenchFDs
	n = min(asked, max(lim/benchFDsPerSession, 1))
	return n, n*(benchFDsPerSession+faultFDsPerSession) <= lim
}

// procFDsPerSession is what an idle session costs in descriptors in each
// proxy process of a configuration: its two sockets, and in the relay
// baseline a pipe (two descriptors) per direction besides, because
// io.Copy between two TCP sockets splices through a pipe that it holds
// while it waits for data. reservedProcFDs is the rest of a process's.
func procFDsPerSession(cfg string) int {
	if cfg == Relay {
		return 6
	}
	return 2
}

const reservedProcFDs = 200

// sessionsFor is how many of n sessions a configuration's processes can
// hold under the descriptor limit they inherit.
func sessionsFor(cfg string, n int, nofile uint64) int {
	return min(n, max((int(min(nofile, 1<<20))-reservedProcFDs)/procFDsPerSession(cfg), 1))
}

// baselineIdleWindow caps the idle CPU window of the baselines, which
// have no timers to wait out.
const baselineIdleWindow = 10 * time.Second

// idleTimes is how long a configuration's sessions stay quiet before the
// idle CPU window, and the window.
func (r *runner) idleTimes(cfg string) (wait, window time.Duration) {
	if isLifeline(cfg) {
		return r.opt.IdleWait, r.opt.IdleWindow
	}
	return min(r.opt.IdleWait, time.Second), min(r.opt.IdleWindow, baselineIdleWindow)
}

// runSessions is the sessions scenario: the resident memory of idle
// sessions in each configuration's proxy processes, held and parked, the
// CPU they burn while idle, and a check that every one still echoes.
func runSessions(ctx context.Context, r *runner) error {
	srv, err := newServer(echoHandler)
	if err != nil {
		return err
	}
	defer srv.close()
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return err
	}
	n, withFault := sessionsPlan(r.opt.Sessions, rl.Cur)
	r.rep.Settings.Sessions = n
	r.rep.SessionsNote = sessionsNote(n, r.opt.Sessions, rl, withFault)
	wait, window := r.idleTimes(LifelineTCP)
	r.rep.IdleNote = idleNote(wait, window, min(r.opt.IdleRuns, r.opt.Runs))
	for _, cfg := range r.opt.Configs {
		if cfg == Direct {
			continue
		}
		if (cfg == LifelineQUIC || cfg == QUICRelay) && n > transport.DefaultQUICMaxIncomingStreams {
			r.rep.Sessions = append(r.rep.Sessions, SessionsResult{Config: cfg, Sessions: n,
				Skipped: fmt.Sprintf("skipped: one QUIC connection carries at most %d streams (the gateway's default)", transport.DefaultQUICMaxIncomingStreams)})
			continue
		}
		res := SessionsResult{Config: cfg, Sessions: sessionsFor(cfg, n, rl.Cur)}
		if res.Sessions < n {
			res.Note = fmt.Sprintf("%s held %d sessions, not %d: each costs it %d descriptors per process (two sockets, and a splice pipe per direction that io.Copy holds while it waits), and the limit is %d",
				cfg, res.Sessions, n, procFDsPerSession(cfg), rl.Cur)
		}
		per := map[string][]float64{}
		parked := map[string][]float64{}
		ok := true
		for run := range r.opt.Runs {
			if err := ctx.Err(); err != nil {
				return err
			}
			r.progress("sessions: %s, %d idle sessions, run %d/%d", cfg, res.Sessions, run+1, r.opt.Runs)
			sr, err := sessionsRun(ctx, r, cfg, srv.addr(), res.Sessions, withFault && faultCapable(cfg), run < r.opt.IdleRuns)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if err := r.unavailable(cfg, err); err != nil {
					return fmt.Errorf("%s: %w", cfg, err)
				}
				ok = false
				break
			}
			if run == 0 {
				// The RSS readings shown are the first run's, like the RSS
				// after the idle hold (which only the first run may take).
				res.Procs, res.BaselineKB, res.HeldKB, res.ParkedKB, res.ParkNote = sr.Procs, sr.BaselineKB, sr.HeldKB, sr.ParkedKB, sr.ParkNote
				res.IdleWaitS, res.IdleWindowS, res.AfterHoldKB = sr.IdleWaitS, sr.IdleWindowS, sr.AfterHoldKB
			}
			if sr.IdleCPUPercent != nil {
				res.IdleRuns = append(res.IdleRuns, IdleRun{CPUSeconds: sr.IdleCPUSeconds, CPUPercent: sr.IdleCPUPercent, WindowS: sr.IdleWindowS,
					QuietCPUPercent: sr.QuietCPUPercent})
			}
			if run == 0 || sr.Echoed < res.Echoed {
				res.Echoed, res.EchoError = sr.Echoed, sr.EchoError
			}
			if sr.Echoed < res.Sessions {
				r.rep.Failures = append(r.rep.Failures, fmt.Sprintf("sessions: %s run %d: %d of %d sessions did not echo after the hold (%s)",
					cfg, run+1, res.Sessions-sr.Echoed, res.Sessions, sr.EchoError))
			}
			for p, v := range sr.PerSessionKB {
				per[p] = append(per[p], v)
			}
			for p, v := range sr.ParkedPerSessionKB {
				parked[p] = append(parked[p], v)
			}
		}
		if !ok {
			continue
		}
		res.PerSessionKB = map[string]float64{}
		for p, v := range per {
			res.PerSessionKB[p] = median(v)
		}
		if len(res.IdleRuns) > 0 {
			res.IdleCPUSeconds, res.IdleCPUPercent, res.QuietCPUPercent = map[string]float64{}, map[string]float64{}, map[string]float64{}
			for _, p := range res.Procs {
				var secs, pct, quiet []float64
				for _, x := range res.IdleRuns {
					secs, pct, quiet = append(secs, x.CPUSeconds[p]), append(pct, x.CPUPercent[p]), append(quiet, x.QuietCPUPercent[p])
				}
				res.IdleCPUSeconds[p], res.IdleCPUPercent[p], res.QuietCPUPercent[p] = median(secs), median(pct), median(quiet)
			}
		}
		if len(parked) > 0 {
			res.ParkedPerSessionKB = map[string]float64{}
			for p, v := range parked {
				res.ParkedPerSessionKB[p] = median(v)
			}
		}
		r.rep.Sessions = append(r.rep.Sessions, res)
	}
	return nil
}

func sessionsNote(n, asked int, rl syscall.Rlimit, withFault bool) string {
	s := fmt.Sprintf("%d idle sessions held open per configuration (asked for %d), each having echoed one byte. Descriptor limit (RLIMIT_NOFILE) of the bench process: soft %d, hard %d; "+
		"each session costs %d descriptors in the bench process (application socket, upstream socket), %d more while the fault relay is in the path, and 2 in each proxy process. ",
		n, asked, rl.Cur, rl.Max, benchFDsPerSession, faultFDsPerSession)
	if withFault {
		return s + "Parked: the link is reset at a fault relay between client and gateway, which then refuses new links, until every session is DISCONNECTED (gateway) or RECONNECTING (client)."
	}
	most := (int(min(rl.Cur, 1<<20)) - reservedBenchFDs) / (benchFDsPerSession + faultFDsPerSession)
	return s + fmt.Sprintf("Parked: not measured in this run: with the fault relay in the path %d sessions would need %d descriptors in the bench process, so the relay is left out "+
		"(client and gateway are linked directly); run with --sessions %d or fewer to measure parked sessions.", n, n*(benchFDsPerSession+faultFDsPerSession)+reservedBenchFDs, most)
}

func idleNote(wait, window time.Duration, runs int) string {
	s := fmt.Sprintf("Idle CPU: after the last echo the sessions stay quiet for %v, then the CPU time of each proxy process (utime+stime, /proc/<pid>/stat) over the next %v is divided by the window: "+
		"%% of one core; CPU while quiet is the same over the wait itself, from the held RSS reading on. A lifeline client link that sent data pings every ping interval until the answer, for %v at most (resume.AttentionWindow), a gateway's over quic through that window; these sessions' echoes are answered at once. After it an idle link only gets a keepalive probe every %v (tcp and tls: the kernel's TCP keepalive; quic: none of lifeline's). "+
		"Baselines have no timers: they wait min(%v, 1s) and are measured over min(%v, %v). Measured in %d run(s) (--idle-runs), the median reported. After the hold every session echoes 8 bytes of its own again (all of them, byte-checked).",
		wait, window, resume.AttentionWindow, resume.DefaultKeepaliveInterval, wait, window, baselineIdleWindow, runs)
	if wait < resume.AttentionWindow {
		s += fmt.Sprintf(" The wait (%v) is shorter than the attention window: on quic the window may hold the gateway's attention PINGs.", wait)
	}
	return s
}

// cpuPercent is the CPU time used between two readings of a process's
// CPU seconds, as a percentage of one core over the elapsed wall time.
func cpuPercent(cpu0, cpu1 float64, elapsed time.Duration) float64 {
	if elapsed <= 0 {
		return 0
	}
	return (cpu1 - cpu0) / elapsed.Seconds() * 100
}

func sessionsRun(ctx context.Context, r *runner, cfg, upstream string, n int, fault, idle bool) (*SessionsResult, error) {
	st, err := r.startStack(ctx, cfg, upstream, stackOpts{fault: fault, probe: probeEcho,
		session: sessionFlags(cfg, "--reconnect-timeout", "10m")})
	if err != nil {
		return nil, err
	}
	defer st.close()
	res := &SessionsResult{Config: cfg, Sessions: n, Procs: st.procNames(), BaselineKB: map[string]int64{}, HeldKB: map[string]int64{},
		PerSessionKB: map[string]float64{}}
	time.Sleep(300 * time.Millisecond)
	base := st.rss()
	conns := make([]net.Conn, n)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	var wg sync.WaitGroup
	var firstErr error
	var mu sync.Mutex
	var opened atomic.Int64
	sem := make(chan struct{}, 32)
	var failed atomic.Bool
	for i := range n {
		if ctx.Err() != nil || failed.Load() {
			break
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := net.DialTimeout("tcp", st.entry, 10*time.Second)
			if err == nil {
				c.SetDeadline(time.Now().Add(30 * time.Second))
				if _, err = c.Write([]byte{1}); err == nil {
					_, err = io.ReadFull(c, make([]byte, 1))
				}
				c.SetDeadline(time.Time{})
			}
			mu.Lock()
			conns[i] = c
			if err != nil && firstErr == nil {
				firstErr = fmt.Errorf("session %d: %w", i, err)
				failed.Store(true)
			}
			mu.Unlock()
			if k := opened.Add(1); k%500 == 0 {
				r.progress("sessions: %s, %d/%d sessions open", cfg, k, n)
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if firstErr != nil {
		return nil, fmt.Errorf("opening %d sessions: %w", n, firstErr)
	}
	lastEcho := time.Now()
	time.Sleep(500 * time.Millisecond)
	held := st.rss()
	cpuH, tH := st.cpu(), time.Now()
	for i, p := range st.procs {
		res.BaselineKB[p.name], res.HeldKB[p.name] = base[i], held[i]
		res.PerSessionKB[p.name] = float64(held[i]-base[i]) / float64(n)
	}
	if idle {
		wait, window := r.idleTimes(cfg)
		if err := r.sleepProgress(ctx, time.Until(lastEcho.Add(wait)), "sessions: %s, %d sessions quiet", cfg, n); err != nil {
			return nil, err
		}
		// A profiled process writes the window into a segment of its
		// own (the bench's report lists it as the idle window's).
		for _, p := range st.procs {
			if f := p.profileSegment(); f != "" {
				r.addIdleProfile(f)
			}
		}
		cpu0, t0 := st.cpu(), time.Now()
		if err := r.sleepProgress(ctx, window, "sessions: %s, idle CPU of %d sessions", cfg, n); err != nil {
			return nil, err
		}
		cpu1, el := st.cpu(), time.Since(t0)
		for _, p := range st.procs {
			p.profileSegment()
		}
		after := st.rss()
		res.IdleWaitS, res.IdleWindowS = t0.Sub(lastEcho).Seconds(), el.Seconds()
		res.IdleCPUSeconds, res.IdleCPUPercent, res.AfterHoldKB = map[string]float64{}, map[string]float64{}, map[string]int64{}
		res.QuietCPUPercent = map[string]float64{}
		for i, p := range st.procs {
			res.IdleCPUSeconds[p.name] = cpu1[i] - cpu0[i]
			res.IdleCPUPercent[p.name] = cpuPercent(cpu0[i], cpu1[i], el)
			res.QuietCPUPercent[p.name] = cpuPercent(cpuH[i], cpu0[i], t0.Sub(tH))
			res.AfterHoldKB[p.name] = after[i]
		}
	}
	r.progress("sessions: %s, echo check of %d sessions", cfg, n)
	res.Echoed, res.EchoError = echoAll(conns)
	switch {
	case st.fault != nil:
		st.fault.SetDown(true)
		st.fault.Reset()
		deadline := time.Now().Add(60 * time.Second)
		for {
			cp, err1 := countParked(st.clientStatus)
			gp, err2 := countParked(st.gatewayStatus)
			if err := errors.Join(err1, err2); err != nil {
				return nil, err
			}
			if cp >= n && gp >= n {
				break
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("sessions not parked after 60s (client %d, gateway %d of %d)", cp, gp, n)
			}
			time.Sleep(100 * time.Millisecond)
		}
		time.Sleep(500 * time.Millisecond)
		pk := st.rss()
		res.ParkedKB, res.ParkedPerSessionKB = map[string]int64{}, map[string]float64{}
		for i, p := range st.procs {
			res.ParkedKB[p.name] = pk[i]
			res.ParkedPerSessionKB[p.name] = float64(pk[i]-base[i]) / float64(n)
		}
	case !isLifeline(cfg):
		res.ParkNote = fmt.Sprintf("n/a (%s has no sessions without a connection)", cfg)
	case faultCapable(cfg):
		res.ParkNote = "not measured (no fault relay in the path at this many sessions)"
	default:
		res.ParkNote = "n/a (the fault relay carries TCP only)"
	}
	return res, nil
}

// sleepProgress sleeps for d (or until ctx is done), updating the
// progress line with the seconds gone every second.
func (r *runner) sleepProgress(ctx context.Context, d time.Duration, format string, args ...any) error {
	end := time.Now().Add(d)
	for {
		left := time.Until(end)
		r.progress("%s, %.0f/%.0fs", fmt.Sprintf(format, args...), (d - left).Seconds(), d.Seconds())
		if left <= 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(min(left, time.Second)):
		}
	}
}

// echoAll has every session echo 8 bytes of its own (its index), 64 at
// a time, and returns how many got exactly those bytes back, and the
// first error.
func echoAll(conns []net.Conn) (int, string) {
	var ok atomic.Int64
	var mu sync.Mutex
	first := ""
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i, c := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			err := echoCheck(c, uint64(i))
			if err == nil {
				ok.Add(1)
				return
			}
			mu.Lock()
			if first == "" {
				first = fmt.Sprintf("session %d: %v", i, err)
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	return int(ok.Load()), first
}

func echoCheck(c net.Conn, id uint64) error {
	if c == nil {
		return errors.New("not open")
	}
	var want, got [8]byte
	for i, x := 0, id^0x6c6966656c696e65; i < 8; i, x = i+1, x>>8 {
		want[i] = byte(x)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write(want[:]); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, got[:]); err != nil {
		return err
	}
	if !bytes.Equal(want[:], got[:]) {
		return fmt.Errorf("echoed %x, want %x", got, want)
	}
	return nil
}

// countParked reads the sessions without a link from the proxy's
// metrics, not its /sessions list: listing a thousand sessions ten times
// a second would allocate megabytes in the very process whose RSS the
// parked reading then takes.
func countParked(addr string) (int, error) {
	n, err := getMetric(addr, "lifeline_sessions_parked")
	return int(n), err
}

// sessionFlags is extra for a lifeline configuration, nothing for a
// baseline.
func sessionFlags(cfg string, extra ...string) []string {
	if !isLifeline(cfg) {
		return nil
	}
	return extra
}
