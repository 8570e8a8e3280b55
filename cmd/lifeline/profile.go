package main

import (
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"sync"

	"github.com/lifeline-proxy/lifeline/bench"
)

// withCPUProfile runs run and returns its exit code. When the environment
// names a file in bench.CPUProfileEnv (LIFELINE_CPUPROFILE), the whole
// run is CPU-profiled into it: "lifeline bench --profile DIR" sets it on
// the proxies and relays it starts. An environment variable rather than
// a flag: it is a bench hook, not part of the proxies' interface
// (docs/bench.md). While it profiles, bench.ProfileSegmentSignal (SIGUSR1)
// closes the current file and goes on in the next segment's
// (bench.ProfileSegment), so that the bench can profile a window alone.
func withCPUProfile(stderr io.Writer, run func() int) int {
	path := os.Getenv(bench.CPUProfileEnv)
	if path == "" {
		return run()
	}
	p := &segmentedProfile{path: path, stderr: stderr}
	if !p.start(1) {
		return run()
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, bench.ProfileSegmentSignal)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for n := 2; ; n++ {
			select {
			case <-stop:
				return
			case <-sig:
				p.stop()
				p.start(n)
			}
		}
	}()
	code := run()
	signal.Stop(sig)
	close(stop)
	wg.Wait()
	p.stop()
	return code
}

// segmentedProfile is the CPU profile's current file.
type segmentedProfile struct {
	path   string
	stderr io.Writer
	f      *os.File // nil: not profiling
}

func (p *segmentedProfile) start(n int) bool {
	path := bench.ProfileSegment(p.path, n)
	f, err := os.Create(path)
	if err != nil {
		fmt.Fprintf(p.stderr, "lifeline: %s: %v (no CPU profile)\n", bench.CPUProfileEnv, err)
		return false
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintf(p.stderr, "lifeline: %s: %v (no CPU profile)\n", bench.CPUProfileEnv, err)
		f.Close()
		return false
	}
	p.f = f
	return true
}

func (p *segmentedProfile) stop() {
	if p.f == nil {
		return
	}
	pprof.StopCPUProfile()
	if err := p.f.Close(); err != nil {
		fmt.Fprintf(p.stderr, "lifeline: %s: %v\n", bench.CPUProfileEnv, err)
	}
	p.f = nil
}
