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
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
)

// runResume is the resume scenario: for each way of breaking the link,
// how soon each side notices and how soon data flows again once the link
// is back.
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
				a, c = append(a, x.DetectClientMs), append(c, x.ReturnToByteMs)
				if x.GatewayIdle {
					res.GatewayIdleRuns++
				} else {
					b = append(b, x.DetectGatewayMs)
				}
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

// sessionByApp finds a session by its application's address (app) or by
// its ID.
func sessionByApp(addr, app, id string) (*sessionInfo, error) {
	ss, err := getSessions(addr)
	if err != nil {
		return nil, err
	}
	for i := range ss {
		if (app != "" && (ss[i].App == app || ss[i].Peer == app)) || (id != "" && ss[i].ID == id) {
			return &ss[i], nil
		}
	}
	return nil, fmt.Errorf("session %s%s not listed by %s", app, id, addr)
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
	cs, err := sessionByApp(st.clientStatus, c.LocalAddr().String(), "")
	if err != nil {
		return fail(err)
	}
	gs, err := sessionByApp(st.gatewayStatus, "", cs.ID)
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
	// The client must find the silent path: it always waits for the
	// answer to the request the silence swallowed. The gateway watches an
	// answered link only while it has something in flight (bytes not
	// acknowledged); on a kernel-probed tcp/tls link it keeps no attention
	// window after its answers (resume.link.attentionFrom), and learns of
	// the dead path at the client's resume or at its keepalive. So a
	// gateway that is still ACTIVE twice the liveness timeout after the client
	// found the break, with nothing buffered, is idle, not late; one with
	// bytes buffered is late, and fails the run.
	var dc, dg time.Duration
	var idle bool
	var clientErr, gatewayErr error
	for (dc == 0 || dg == 0) && !idle {
		if time.Since(t0) > 20*time.Second {
			if dc == 0 {
				clientErr = errors.New("client: break not detected in 20s")
			}
			if dg == 0 {
				gatewayErr = errors.New("gateway: break not detected in 20s, with bytes in flight")
			}
			break
		}
		if dc == 0 {
			s, err := sessionByApp(st.clientStatus, "", cs.ID)
			if err != nil {
				st.fault.SetDown(false)
				return fail(err)
			}
			if s.State != "ACTIVE" {
				dc = time.Since(t0)
			}
		}
		if dg == 0 {
			s, err := sessionByApp(st.gatewayStatus, "", cs.ID)
			if err != nil {
				st.fault.SetDown(false)
				return fail(err)
			}
			switch {
			case s.State != "ACTIVE":
				dg = time.Since(t0)
			case dc != 0 && time.Since(t0) > dc+2*livenessTimeout && s.Buffered == 0:
				idle = true
			}
		}
		time.Sleep(500 * time.Microsecond)
	}
	if err := errors.Join(clientErr, gatewayErr); err != nil {
		st.fault.SetDown(false)
		return fail(err)
	}
	rr.GatewayIdle = idle
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
	cs2, err1 := sessionByApp(st.clientStatus, "", cs.ID)
	gs2, err2 := sessionByApp(st.gatewayStatus, "", cs.ID)
	if err := errors.Join(err1, err2); err != nil {
		return fail(err)
	}
	rr.BytesReplayed = int64(cs2.BytesReplayed-cs.BytesReplayed) + int64(gs2.BytesReplayed-gs.BytesReplayed)
	rr.Resumes = cs2.Resumes - cs.Resumes
	if rr.GatewayIdle && gs2.Resumes <= gs.Resumes {
		return fail(fmt.Errorf("gateway was idle through the silence and took no resume after it (resumes %d -> %d)", gs.Resumes, gs2.Resumes))
	}
	stop.Store(true)
	if err := <-loopErr; err != nil {
		return rr, err
	}
	return rr, nil
}
