package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// runDemo runs an echo service, a gateway, a fault-injecting relay on the
// link and a client sidecar in this process, drives random traffic through
// them while breaking the link, and checks every byte.
func runDemo(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("lifeline demo", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	dur := fs.Duration("duration", 20*time.Second, "how long to run")
	sessions := fs.Int("sessions", 8, "concurrent application connections")
	every := fs.Duration("break-every", 2*time.Second, "break the link this often (reset, close, blackhole in turn)")
	level := fs.String("log-level", "error", "log level of the proxies (to stderr): debug, info, warn or error")
	fs.Usage = func() {
		fmt.Fprintln(stdout, "Usage of lifeline demo:")
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	if *dur <= 0 || *sessions <= 0 || *sessions > 1000 || *every <= 0 {
		return usagef("--duration and --break-every must be positive, --sessions 1 to 1000")
	}
	if _, err := parseLevel(*level); err != nil {
		return usageError{err}
	}
	log := newLogger(stderr, "text", *level)

	// Echo service.
	echoLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	var echoWG sync.WaitGroup
	echoWG.Add(1)
	go func() {
		defer echoWG.Done()
		for {
			c, err := echoLn.Accept()
			if err != nil {
				return
			}
			echoWG.Add(1)
			go func() {
				defer echoWG.Done()
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
				io.Copy(io.Discard, c)
				c.Close()
			}()
		}
	}()
	defer func() { echoLn.Close(); echoWG.Wait() }()

	// Short liveness settings so that a blackholed link is found in 1 s.
	cfg := resume.DefaultConfig()
	cfg.PingInterval = 250 * time.Millisecond
	cfg.LivenessTimeout = time.Second
	cfg.ReconnectTimeout = 30 * time.Second
	cfg.BufferSize = 1 << 20
	cfg.Logger = log
	sc := resume.DefaultServerConfig()
	scfg := *cfg
	sc.Session = &scfg
	gw, err := proxy.NewGateway(proxy.GatewayConfig{
		Routes: []proxy.Route{{Name: "echo", Upstream: echoLn.Addr().String()}},
		Server: sc, Logger: log,
	})
	if err != nil {
		return err
	}
	defer gw.Close()
	ll, err := transport.Listen(transport.Config{Name: "tcp", Addr: "127.0.0.1:0"})
	if err != nil {
		return err
	}
	go gw.Serve(ll)
	relay, err := faultnet.NewRelay("127.0.0.1:0", ll.Addr().String())
	if err != nil {
		return err
	}
	defer relay.Close()
	dialer, _ := transport.NewDialer(transport.Config{Name: "tcp", Addr: relay.Addr()})
	cl := proxy.NewClient(proxy.ClientConfig{Logger: log})
	defer cl.Close()
	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go cl.Serve(appLn, proxy.ClientRoute{Route: "echo", Dialer: dialer, Session: cfg, Gateway: relay.Addr()})

	fmt.Fprintf(stdout, "lifeline demo: echo service %s <- gateway %s <- fault relay %s <- client sidecar %s\n",
		echoLn.Addr(), ll.Addr(), relay.Addr(), appLn.Addr())
	fmt.Fprintf(stdout, "%d sessions of random data for %v; the link is broken every %v (reset, close, blackhole in turn).\n",
		*sessions, *dur, *every)
	fmt.Fprintf(stdout, "Liveness settings are short for the demo (ping %v, dead after %v) so blackholes are found quickly.\n",
		cfg.PingInterval, cfg.LivenessTimeout)

	var verified atomic.Int64
	stop := make(chan struct{})
	errs := make(chan error, *sessions)
	var wg sync.WaitGroup
	for i := range *sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := (faultnet.Echo{Seed: uint64(i + 1), Stop: stop, Verified: &verified}.Dial(appLn.Addr().String())); err != nil {
				errs <- fmt.Errorf("session %d: %w", i+1, err)
			}
		}()
	}

	tty := isTerminal(stdout)
	start := time.Now()
	var breaks [3]int
	var lastBreak time.Time
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	breakT := time.NewTicker(*every)
	defer breakT.Stop()
	end := time.After(*dur)
	lastPrint := time.Time{}
	var lastOutage time.Duration
	status := func(final bool) {
		tot := cl.Tracker().Totals()
		var o time.Duration
		for _, s := range cl.Sessions() {
			o = max(o, time.Duration(s.LastOutageMS)*time.Millisecond)
		}
		if o > 0 {
			lastOutage = o
		}
		line := fmt.Sprintf("[%4.1fs] verified %s | link breaks %d | resumes %d | parked now %d | last outage %v | replayed %s",
			time.Since(start).Seconds(), human(verified.Load()), breaks[0]+breaks[1]+breaks[2], tot.Resumes, tot.Parked,
			lastOutage.Round(time.Millisecond), human(int64(tot.BytesReplayed)))
		if !lastBreak.IsZero() {
			line += fmt.Sprintf(" | last break %.1fs ago", time.Since(lastBreak).Seconds())
		}
		if tty {
			fmt.Fprintf(stdout, "\r\033[K%s", line)
			if final {
				fmt.Fprintln(stdout)
			}
		} else if final || time.Since(lastPrint) >= 2*time.Second {
			fmt.Fprintln(stdout, line)
			lastPrint = time.Now()
		}
	}
	var failed error
	mode := 0
loop:
	for {
		select {
		case <-tick.C:
			status(false)
		case <-breakT.C:
			if relay.Break(faultnet.Modes[mode%3]) > 0 {
				breaks[mode%3]++
				lastBreak = time.Now()
			}
			mode++
		case err := <-errs:
			failed = err
			break loop
		case <-end:
			break loop
		}
	}
	close(stop)
	wg.Wait()
	status(true)
	close(errs)
	for err := range errs {
		if failed == nil {
			failed = err
		}
	}
	tot := cl.Tracker().Totals()
	nb := breaks[0] + breaks[1] + breaks[2]
	if failed != nil {
		fmt.Fprintf(stdout, "demo: FAIL after %s verified and %d link breaks: %v\n", human(verified.Load()), nb, failed)
		return fmt.Errorf("byte check failed: %v", failed)
	}
	fmt.Fprintf(stdout, "demo: PASS: %d sessions, %s echoed and verified byte for byte, %d link breaks survived (%d reset, %d close, %d blackhole), %d resumes, %s replayed, 0 bytes lost\n",
		*sessions, human(verified.Load()), nb, breaks[0], breaks[1], breaks[2], tot.Resumes, human(int64(tot.BytesReplayed)))
	return nil
}

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
