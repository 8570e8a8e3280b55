package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
)

// runSoak is the soak scenario: sessions of random data both ways while
// a fault relay breaks every link at once, again and again; every byte is
// checked.
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
