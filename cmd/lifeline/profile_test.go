package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lifeline-proxy/lifeline/bench"
)

// LIFELINE_CPUPROFILE makes the process write a CPU profile of the whole
// run; without it nothing is written; an unwritable path only warns.
func TestCPUProfileEnv(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cpu.pprof")
	t.Setenv(bench.CPUProfileEnv, path)
	var errb bytes.Buffer
	if code := withCPUProfile(&errb, func() int { return 3 }); code != 3 {
		t.Errorf("exit code %d, want the run's 3", code)
	}
	if st, err := os.Stat(path); err != nil || st.Size() == 0 {
		t.Errorf("no profile: %v", err)
	}
	t.Setenv(bench.CPUProfileEnv, filepath.Join(t.TempDir(), "no", "such", "dir", "cpu.pprof"))
	if code := withCPUProfile(&errb, func() int { return 0 }); code != 0 {
		t.Errorf("exit code %d", code)
	}
	if !strings.Contains(errb.String(), "no CPU profile") {
		t.Errorf("no warning: %q", errb.String())
	}
	t.Setenv(bench.CPUProfileEnv, "")
	errb.Reset()
	if code := withCPUProfile(&errb, func() int { return 0 }); code != 0 || errb.Len() > 0 {
		t.Errorf("without the variable: exit %d, %q", code, errb.String())
	}
}

// The variable is not a flag: the proxies' help does not mention it.
func TestCPUProfileNotInHelp(t *testing.T) {
	for _, cmd := range []string{"gateway", "client"} {
		var out, errb bytes.Buffer
		run([]string{cmd, "--help"}, &out, &errb)
		if strings.Contains(out.String()+errb.String(), "PROFILE") || strings.Contains(out.String()+errb.String(), "pprof") {
			t.Errorf("%s --help mentions the profile hook", cmd)
		}
	}
}
