package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/proxy"
)

// descriptorsPerSession in the bench process: the application's socket,
// the upstream's, and the two of the fault relay.
const descriptorsPerSession = 4

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
	n := r.opt.Sessions
	if lim := (int(min(rl.Cur, 1<<20)) - 300) / descriptorsPerSession; n > lim {
		n = max(lim, 1)
	}
	r.rep.Settings.Sessions = n
	r.rep.SessionsNote = fmt.Sprintf("%d idle sessions held open per configuration (asked for %d). Descriptor limit (RLIMIT_NOFILE) of the bench process: soft %d, hard %d; "+
		"each session costs up to %d descriptors in the bench process (application socket, upstream socket, the fault relay's two) and 2 in each proxy process. "+
		"Parked: the link is reset at a fault relay between client and gateway, which then refuses new links, until every session is DISCONNECTED (gateway) or RECONNECTING (client).",
		n, r.opt.Sessions, rl.Cur, rl.Max, descriptorsPerSession)
	for _, cfg := range r.opt.Configs {
		if cfg == Direct {
			continue
		}
		res := SessionsResult{Config: cfg, Sessions: n}
		per := map[string][]float64{}
		parked := map[string][]float64{}
		ok := true
		for run := range r.opt.Runs {
			if err := ctx.Err(); err != nil {
				return err
			}
			r.progress("sessions: %s, %d idle sessions, run %d/%d", cfg, n, run+1, r.opt.Runs)
			sr, err := sessionsRun(ctx, r, cfg, srv.addr(), n)
			if err != nil {
				if err := r.unavailable(cfg, err); err != nil {
					return fmt.Errorf("%s: %w", cfg, err)
				}
				ok = false
				break
			}
			res.Procs, res.BaselineKB, res.HeldKB, res.ParkedKB, res.ParkNote = sr.Procs, sr.BaselineKB, sr.HeldKB, sr.ParkedKB, sr.ParkNote
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

func sessionsRun(ctx context.Context, r *runner, cfg, upstream string, n int) (*SessionsResult, error) {
	st, err := r.startStack(ctx, cfg, upstream, stackOpts{fault: faultCapable(cfg), probe: probeEcho,
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
	sem := make(chan struct{}, 16)
	for i := range n {
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
				firstErr = err
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return nil, fmt.Errorf("opening %d sessions: %w", n, firstErr)
	}
	time.Sleep(500 * time.Millisecond)
	held := st.rss()
	for i, p := range st.procs {
		res.BaselineKB[p.name], res.HeldKB[p.name] = base[i], held[i]
		res.PerSessionKB[p.name] = float64(held[i]-base[i]) / float64(n)
	}
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
	case cfg == Relay:
		res.ParkNote = "n/a (a relay has no sessions without a connection)"
	default:
		res.ParkNote = "n/a (the fault relay carries TCP only)"
	}
	return res, nil
}

func countParked(addr string) (int, error) {
	ss, err := getSessions(addr)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, s := range ss {
		if s.State == "DISCONNECTED" || s.State == "RECONNECTING" {
			n++
		}
	}
	return n, nil
}

// Liveness settings of the resume and soak scenarios.
const (
	pingInterval    = 100 * time.Millisecond
	livenessTimeout = 400 * time.Millisecond
)

func sessionFlags(cfg string, extra ...string) []string {
	if !isLifeline(cfg) {
		return nil
	}
	return extra
}

func runResume(ctx context.Context, r *runner) error {
	srv, err := newServer(echoHandler)
	if err != nil {
		return err
	}
	defer srv.close()
	for _, cfg := range r.opt.Configs {
		if !faultCapable(cfg) {
			continue
		}
		r.progress("resume: starting %s", cfg)
		st, err := r.startStack(ctx, cfg, srv.addr(), stackOpts{fault: true, probe: probeEcho,
			session:    []string{"--ping-interval", pingInterval.String(), "--liveness-timeout", livenessTimeout.String()},
			clientOnly: []string{"--reconnect-strategy", "fixed", "--reconnect-interval", "10ms"}})
		if err != nil {
			return fmt.Errorf("%s: %w", cfg, err)
		}
		// A new session's first round trip (link dial, handshakes, one
		// round trip of data) is the yardstick for a resume.
		var fresh []float64
		for range 5 {
			t := time.Now()
			if err := probeEcho(st.entry); err != nil {
				st.close()
				return fmt.Errorf("%s: %w", cfg, err)
			}
			fresh = append(fresh, ms(time.Since(t)))
		}
		for _, mode := range faultnet.Modes {
			res := ResumeResult{Config: cfg, Mode: mode.String(), LivenessTimeoutMs: float64(livenessTimeout.Milliseconds()), NewSessionMs: median(fresh)}
			for run := range r.opt.Runs {
				if err := ctx.Err(); err != nil {
					st.close()
					return err
				}
				r.progress("resume: %s, break by %s, run %d/%d", cfg, mode, run+1, r.opt.Runs)
				rr, err := resumeRun(st, mode)
				if err != nil {
					st.close()
					return fmt.Errorf("%s %s: %w", cfg, mode, err)
				}
				res.Runs = append(res.Runs, rr)
			}
			var a, b, c, d, e, f []float64
			for _, x := range res.Runs {
				a, b, c = append(a, x.DetectClientMs), append(b, x.DetectGatewayMs), append(c, x.ReturnToByteMs)
				d, e, f = append(d, x.DownToByteMs), append(e, x.AppRTTMs), append(f, float64(x.BytesReplayed))
			}
			res.DetectClientMs, res.DetectGatewayMs, res.ReturnToByteMs = median(a), median(b), median(c)
			res.DownToByteMs, res.AppRTTMs, res.BytesReplayed = median(d), median(e), median(f)
			r.rep.Resume = append(r.rep.Resume, res)
		}
		st.close()
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func sessionByPeer(addr, peer, id string) (*proxy.SessionInfo, error) {
	ss, err := getSessions(addr)
	if err != nil {
		return nil, err
	}
	for i := range ss {
		if (peer != "" && ss[i].Peer == peer) || (id != "" && ss[i].ID == id) {
			return &ss[i], nil
		}
	}
	return nil, fmt.Errorf("session %s%s not listed by %s", peer, id, addr)
}

func resumeRun(st *stack, mode faultnet.Mode) (ResumeRun, error) {
	var rr ResumeRun
	c, err := net.DialTimeout("tcp", st.entry, 10*time.Second)
	if err != nil {
		return rr, err
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)

	// The application: one 64-byte request outstanding, a new one 1 ms
	// after each answer.
	var mu sync.Mutex
	var echoes []time.Time
	var rtts []time.Duration
	var stop atomic.Bool
	loopErr := make(chan error, 1)
	go func() {
		req, resp := make([]byte, 64), make([]byte, 64)
		for i := 0; !stop.Load(); i++ {
			req[0], req[1], req[2] = byte(i), byte(i>>8), byte(i>>16)
			t := time.Now()
			c.SetDeadline(t.Add(30 * time.Second))
			if _, err := c.Write(req); err != nil {
				loopErr <- err
				return
			}
			if _, err := io.ReadFull(c, resp); err != nil {
				loopErr <- err
				return
			}
			now := time.Now()
			if !bytes.Equal(req, resp) {
				loopErr <- errors.New("echo mismatch")
				return
			}
			mu.Lock()
			echoes = append(echoes, now)
			rtts = append(rtts, now.Sub(t))
			mu.Unlock()
			time.Sleep(time.Millisecond)
		}
		loopErr <- nil
	}()
	fail := func(err error) (ResumeRun, error) {
		stop.Store(true)
		c.Close()
		<-loopErr
		return rr, err
	}
	time.Sleep(300 * time.Millisecond)
	cs, err := sessionByPeer(st.clientStatus, c.LocalAddr().String(), "")
	if err != nil {
		return fail(err)
	}
	gs, err := sessionByPeer(st.gatewayStatus, "", cs.ID)
	if err != nil {
		return fail(err)
	}
	mu.Lock()
	var before []time.Duration
	before = append(before, rtts...)
	mu.Unlock()
	before = before[max(0, len(before)-200):]
	var rttF []float64
	for _, d := range before {
		rttF = append(rttF, ms(d))
	}
	rr.AppRTTMs = median(rttF)

	st.fault.SetDown(true)
	t0 := time.Now()
	st.fault.Break(mode)
	detect := func(addr string) (time.Duration, error) {
		for time.Since(t0) < 20*time.Second {
			s, err := sessionByPeer(addr, "", cs.ID)
			if err != nil {
				return 0, err
			}
			if s.State != "ACTIVE" {
				return time.Since(t0), nil
			}
			time.Sleep(500 * time.Microsecond)
		}
		return 0, errors.New("break not detected in 20s")
	}
	var dc, dg time.Duration
	var ec, eg error
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); dc, ec = detect(st.clientStatus) }()
	go func() { defer wg.Done(); dg, eg = detect(st.gatewayStatus) }()
	wg.Wait()
	if err := errors.Join(ec, eg); err != nil {
		st.fault.SetDown(false)
		return fail(err)
	}
	rr.DetectClientMs, rr.DetectGatewayMs = ms(dc), ms(dg)
	time.Sleep(50 * time.Millisecond)

	acc := st.fault.Accepted()
	tUp := time.Now()
	st.fault.SetDown(false)
	var tAcc time.Time
	for {
		if st.fault.Accepted() > acc {
			tAcc = time.Now()
			break
		}
		if time.Since(tUp) > 20*time.Second {
			return fail(errors.New("no new link in 20s"))
		}
		time.Sleep(20 * time.Microsecond)
	}
	var tFirst time.Time
	for tFirst.IsZero() {
		mu.Lock()
		for _, t := range echoes[max(0, len(echoes)-5):] {
			if t.After(tUp) {
				tFirst = t
				break
			}
		}
		mu.Unlock()
		if time.Since(tUp) > 20*time.Second {
			return fail(errors.New("no data after the link came back in 20s"))
		}
		time.Sleep(20 * time.Microsecond)
	}
	// Find the earliest echo after tUp (the loop above may have seen a
	// later one first).
	mu.Lock()
	for _, t := range echoes {
		if t.After(tUp) {
			tFirst = t
			break
		}
	}
	mu.Unlock()
	rr.ReturnToByteMs = ms(tFirst.Sub(tAcc))
	rr.DownToByteMs = ms(tFirst.Sub(tUp))
	time.Sleep(200 * time.Millisecond)
	cs2, err1 := sessionByPeer(st.clientStatus, "", cs.ID)
	gs2, err2 := sessionByPeer(st.gatewayStatus, "", cs.ID)
	if err := errors.Join(err1, err2); err != nil {
		return fail(err)
	}
	rr.BytesReplayed = int64(cs2.BytesReplayed-cs.BytesReplayed) + int64(gs2.BytesReplayed-gs.BytesReplayed)
	rr.Resumes = cs2.Resumes - cs.Resumes
	stop.Store(true)
	if err := <-loopErr; err != nil {
		return rr, err
	}
	return rr, nil
}

func runSoak(ctx context.Context, r *runner) error {
	cfg := ""
	for _, c := range r.opt.Configs {
		if faultCapable(c) {
			cfg = c
			break
		}
	}
	if cfg == "" {
		return nil
	}
	srv, err := newServer(echoHandler)
	if err != nil {
		return err
	}
	defer srv.close()
	st, err := r.startStack(ctx, cfg, srv.addr(), stackOpts{fault: true, probe: probeEcho,
		session: []string{"--ping-interval", pingInterval.String(), "--liveness-timeout", livenessTimeout.String(), "--reconnect-timeout", "60s"}})
	if err != nil {
		return fmt.Errorf("%s: %w", cfg, err)
	}
	defer st.close()
	n, dur := r.opt.SoakSessions, r.opt.SoakDuration
	res := &SoakResult{Config: cfg, Sessions: n, ByMode: map[string]int64{},
		Settings: fmt.Sprintf("%d sessions of random data both ways for %v through %s; a fault relay between client and gateway breaks every link at once every 20-50 ms (random), in a random way (reset, close, blackhole); --ping-interval %v --liveness-timeout %v, client redial backoff as default",
			n, dur, cfg, pingInterval, livenessTimeout)}
	r.rep.Soak = res

	seed := rand.Uint64()
	var verified atomic.Int64
	var wg sync.WaitGroup
	stopWrite := make(chan struct{})
	var mu sync.Mutex
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := soakEcho(seed+uint64(i), stopWrite, &verified).Dial(st.entry)
			if err != nil {
				mu.Lock()
				if errors.Is(err, faultnet.ErrMismatch) {
					res.Mismatches++
				} else {
					res.Errors++
				}
				if len(res.ErrorSamples) < 5 {
					res.ErrorSamples = append(res.ErrorSamples, fmt.Sprintf("session %d: %v", i, err))
				}
				mu.Unlock()
			}
		}()
	}
	rng := rand.New(rand.NewPCG(seed, 1))
	end := start.Add(dur)
	lastProg := time.Time{}
	for time.Now().Before(end) && ctx.Err() == nil {
		time.Sleep(time.Duration(20+rng.IntN(31)) * time.Millisecond)
		mode := faultnet.Modes[rng.IntN(len(faultnet.Modes))]
		if k := st.fault.Break(mode); k > 0 {
			res.LinksBroken += int64(k)
			res.ByMode[mode.String()]++
		}
		if time.Since(lastProg) > 500*time.Millisecond {
			lastProg = time.Now()
			r.progress("soak: %s, %.0f/%.0fs, %d links broken, %.1f MB verified", cfg, time.Since(start).Seconds(), dur.Seconds(),
				res.LinksBroken, float64(verified.Load())/1e6)
		}
	}
	close(stopWrite)
	r.progress("soak: draining %d sessions", n)
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	res.Breaks = st.fault.Breaks()
	res.BytesVerified = verified.Load()
	lf, err1 := getMetric(st.clientStatus, "lifeline_link_failures_total")
	gf, err2 := getMetric(st.gatewayStatus, "lifeline_link_failures_total")
	rs, err3 := getMetric(st.clientStatus, "lifeline_resumes_total")
	rc, err4 := getMetric(st.clientStatus, "lifeline_replayed_bytes_total")
	rg, err5 := getMetric(st.gatewayStatus, "lifeline_replayed_bytes_total")
	if err := errors.Join(err1, err2, err3, err4, err5); err != nil {
		return err
	}
	res.LinkFailures, res.GatewayFails, res.Resumes, res.BytesReplayed = int64(lf), int64(gf), int64(rs), int64(rc+rg)
	if res.Mismatches > 0 || res.Errors > 0 {
		r.rep.Failures = append(r.rep.Failures, fmt.Sprintf("soak: %d mismatches, %d sessions failed", res.Mismatches, res.Errors))
	}
	if res.BytesVerified == 0 {
		r.rep.Failures = append(r.rep.Failures, "soak: no bytes verified")
	}
	return ctx.Err()
}

// soakEcho is the stream of one soak session: random data in writes of up
// to 8 KiB, 1 to 4 ms apart, until stop; then the check that exactly the
// same bytes came back.
func soakEcho(seed uint64, stop <-chan struct{}, verified *atomic.Int64) faultnet.Echo {
	return faultnet.Echo{Seed: seed, Stop: stop, MaxWrite: 8 << 10, MaxPause: 4 * time.Millisecond, Verified: verified}
}
