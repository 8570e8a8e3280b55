package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"time"
)

// Streams is the number of concurrent streams of a throughput run.
const Streams = 4

var directions = []struct {
	name string
	mode byte
}{{"up", 'U'}, {"down", 'D'}, {"both", 'B'}}

// yardstick is the baseline each lifeline configuration is held against
// besides the relay (issue 10): HAProxy for TCP links, the tls and quic
// relays for TLS and QUIC links.
var yardstick = map[string]string{LifelineTCP: HAProxy, LifelineTLS: TLSRelay, LifelineQUIC: QUICRelay}

func runThroughput(ctx context.Context, r *runner) error {
	b := &bulk{file: filepath.Join(r.tmp, "bulk.bin")}
	if err := writeBulkFile(b.file); err != nil {
		return err
	}
	verify := r.opt.ThroughputMode == ModeVerify
	srv, err := newServer(b.handle)
	if err != nil {
		return err
	}
	defer srv.close()
	for _, cfg := range r.opt.Configs {
		r.progress("throughput: starting %s", cfg)
		st, err := r.startStack(ctx, cfg, srv.addr(), stackOpts{probe: probeBulk})
		if err != nil {
			if err := r.unavailable(cfg, err); err != nil {
				return fmt.Errorf("%s: %w", cfg, err)
			}
			continue
		}
		for _, dir := range directions {
			res := ThroughputResult{Config: cfg, Direction: dir.name, Mode: r.opt.ThroughputMode, Streams: Streams, Procs: st.procNames()}
			for run := range r.opt.Runs {
				if err := ctx.Err(); err != nil {
					st.close()
					return err
				}
				r.progress("throughput: %s %s, %d streams, run %d/%d", cfg, dir.name, Streams, run+1, r.opt.Runs)
				tr, err := throughputRun(st, b, dir.mode, verify, r.opt.Duration)
				if err != nil {
					st.close()
					return fmt.Errorf("%s %s: %w", cfg, dir.name, err)
				}
				if tr.Mismatches > 0 {
					r.rep.Failures = append(r.rep.Failures, fmt.Sprintf("throughput: %s %s run %d: %d streams received other bytes than were sent", cfg, dir.name, run+1, tr.Mismatches))
				}
				res.Runs = append(res.Runs, tr)
			}
			var mbps []float64
			for _, x := range res.Runs {
				mbps = append(mbps, x.MBps)
			}
			res.MBps = median(mbps)
			if len(st.procs) > 0 {
				res.CPUSecPerGB = map[string]float64{}
				var all []float64
				for _, p := range st.procs {
					var xs []float64
					for _, x := range res.Runs {
						xs = append(xs, x.CPUSeconds[p.name]/(float64(x.Bytes)/1e9))
					}
					res.CPUSecPerGB[p.name] = median(xs)
					all = append(all, median(xs))
				}
				res.CPUSecPerGBMean = (all[0] + all[len(all)-1]) / 2
			}
			r.rep.Throughput = append(r.rep.Throughput, res)
		}
		st.close()
	}
	// Ratios against the baselines of this run.
	find := func(cfg, dir string) *ThroughputResult {
		for i := range r.rep.Throughput {
			if t := &r.rep.Throughput[i]; t.Config == cfg && t.Direction == dir {
				return t
			}
		}
		return nil
	}
	for i := range r.rep.Throughput {
		t := &r.rep.Throughput[i]
		if rel := find(Relay, t.Direction); rel != nil && rel.MBps > 0 {
			t.VsRelay = t.MBps / rel.MBps
			if rel.CPUSecPerGBMean > 0 && t.CPUSecPerGBMean > 0 {
				t.CPUVsRelay = t.CPUSecPerGBMean / rel.CPUSecPerGBMean
			}
		}
		if d := find(Direct, t.Direction); d != nil && d.MBps > 0 {
			t.VsDirect = t.MBps / d.MBps
		}
		if y := find(yardstick[t.Config], t.Direction); y != nil && y.MBps > 0 {
			t.Yardstick = y.Config
			t.VsYardstick = t.MBps / y.MBps
			if y.CPUSecPerGBMean > 0 && t.CPUSecPerGBMean > 0 {
				t.CPUVsYardstick = t.CPUSecPerGBMean / y.CPUSecPerGBMean
			}
		}
	}
	return nil
}

func throughputRun(st *stack, b *bulk, mode byte, verify bool, d time.Duration) (ThroughputRun, error) {
	up0, bad0 := b.up.Load(), b.mismatches.Load()
	cpu0 := st.cpu()
	start := time.Now()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var down int64
	var firstErr error
	mismatches := 0
	for range Streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := bulkStream(st.entry, mode, verify, b.file, d)
			mu.Lock()
			down += n
			if errors.Is(err, errMismatch) {
				mismatches++
			} else if err != nil && firstErr == nil {
				firstErr = err
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	el := time.Since(start).Seconds()
	cpu1 := st.cpu()
	if firstErr != nil {
		return ThroughputRun{}, firstErr
	}
	// The server counts the last uploaded bytes just before it closes.
	time.Sleep(5 * time.Millisecond)
	up := b.up.Load() - up0
	mismatches += int(b.mismatches.Load() - bad0)
	tr := ThroughputRun{Bytes: up + down, UpBytes: up, DownBytes: down, Seconds: el, CPUSeconds: map[string]float64{}, Mismatches: mismatches}
	tr.MBps = float64(tr.Bytes) / el / 1e6
	if tr.Bytes == 0 {
		return tr, fmt.Errorf("no bytes moved")
	}
	for i, p := range st.procs {
		tr.CPUSeconds[p.name] = cpu1[i] - cpu0[i]
	}
	return tr, nil
}

// LatencySize is the request and response size of the latency scenario.
const LatencySize = 64

func runLatency(ctx context.Context, r *runner) error {
	srv, err := newServer(echoHandler)
	if err != nil {
		return err
	}
	defer srv.close()
	n := 20000
	if r.opt.Short {
		n = 1000
	}
	for _, cfg := range r.opt.Configs {
		r.progress("latency: starting %s", cfg)
		st, err := r.startStack(ctx, cfg, srv.addr(), stackOpts{probe: probeEcho})
		if err != nil {
			if err := r.unavailable(cfg, err); err != nil {
				return fmt.Errorf("%s: %w", cfg, err)
			}
			continue
		}
		res := LatencyResult{Config: cfg, RoundTrips: n, Size: LatencySize}
		for run := range r.opt.Runs {
			if err := ctx.Err(); err != nil {
				st.close()
				return err
			}
			r.progress("latency: %s, %d round trips of %d bytes, run %d/%d", cfg, n, LatencySize, run+1, r.opt.Runs)
			lr, err := latencyRun(st.entry, n)
			if err != nil {
				st.close()
				return fmt.Errorf("%s: %w", cfg, err)
			}
			res.Runs = append(res.Runs, lr)
		}
		st.close()
		var p50, p99, p999 []float64
		for _, x := range res.Runs {
			p50, p99, p999 = append(p50, x.P50us), append(p99, x.P99us), append(p999, x.P999us)
		}
		res.P50us, res.P99us, res.P999us = median(p50), median(p99), median(p999)
		r.rep.Latency = append(r.rep.Latency, res)
	}
	var rel *LatencyResult
	for i := range r.rep.Latency {
		if r.rep.Latency[i].Config == Relay {
			rel = &r.rep.Latency[i]
		}
	}
	for i := range r.rep.Latency {
		if rel != nil && rel.P99us > 0 {
			r.rep.Latency[i].P99VsRelay = r.rep.Latency[i].P99us / rel.P99us
			r.rep.Latency[i].P50VsRelay = r.rep.Latency[i].P50us / rel.P50us
		}
	}
	return nil
}

func latencyRun(addr string, n int) (LatencyRun, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return LatencyRun{}, err
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	c.SetDeadline(time.Now().Add(5 * time.Minute))
	req := make([]byte, LatencySize)
	resp := make([]byte, LatencySize)
	samples := make([]time.Duration, 0, n)
	warm := n / 20
	for i := range n + warm {
		req[0], req[1] = byte(i), byte(i>>8)
		t := time.Now()
		if _, err := c.Write(req); err != nil {
			return LatencyRun{}, err
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return LatencyRun{}, err
		}
		d := time.Since(t)
		if resp[0] != req[0] || resp[1] != req[1] {
			return LatencyRun{}, fmt.Errorf("echo mismatch")
		}
		if i >= warm {
			samples = append(samples, d)
		}
	}
	slices.Sort(samples)
	return LatencyRun{P50us: percentile(samples, 0.50), P99us: percentile(samples, 0.99),
		P999us: percentile(samples, 0.999), MaxUs: percentile(samples, 1)}, nil
}
