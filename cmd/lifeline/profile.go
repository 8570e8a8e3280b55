package main

import (
	"fmt"
	"io"
	"os"
	"runtime/pprof"

	"github.com/lifeline-proxy/lifeline/bench"
)

// withCPUProfile runs run and returns its exit code. When the environment
// names a file in bench.CPUProfileEnv (LIFELINE_CPUPROFILE), the whole
// run is CPU-profiled into it: "lifeline bench --profile DIR" sets it on
// the proxies and relays it starts. An environment variable rather than
// a flag: it is a bench hook, not part of the proxies' interface
// (docs/bench.md).
func withCPUProfile(stderr io.Writer, run func() int) int {
	path := os.Getenv(bench.CPUProfileEnv)
	if path == "" {
		return run()
	}
	f, err := os.Create(path)
	if err != nil {
		fmt.Fprintf(stderr, "lifeline: %s: %v (no CPU profile)\n", bench.CPUProfileEnv, err)
		return run()
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintf(stderr, "lifeline: %s: %v (no CPU profile)\n", bench.CPUProfileEnv, err)
		f.Close()
		return run()
	}
	code := run()
	pprof.StopCPUProfile()
	if err := f.Close(); err != nil {
		fmt.Fprintf(stderr, "lifeline: %s: %v\n", bench.CPUProfileEnv, err)
	}
	return code
}
