package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"
)

// descriptorsPerSession in the bench process: the application's socket,
// the upstream's, and the two of the fault relay.
const descriptorsPerSession = 4

// runSessions is the sessions scenario: the resident memory of idle
// sessions in each configuration's proxy processes, held and parked.
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

// sessionFlags is extra for a lifeline configuration, nothing for a
// baseline.
func sessionFlags(cfg string, extra ...string) []string {
	if !isLifeline(cfg) {
		return nil
	}
	return extra
}
