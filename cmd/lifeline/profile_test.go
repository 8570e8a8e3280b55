package main

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

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

// ProfileSegmentSignal cuts the profile: each signal closes the current
// file and goes on in the next segment's, and every segment is a profile.
func TestCPUProfileSegments(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cpu.pprof")
	t.Setenv(bench.CPUProfileEnv, path)
	var errb bytes.Buffer
	code := withCPUProfile(&errb, func() int {
		for n := 2; n <= 3; n++ {
			if err := syscall.Kill(os.Getpid(), bench.ProfileSegmentSignal); err != nil {
				t.Error(err)
				return 1
			}
			deadline := time.Now().Add(10 * time.Second)
			for {
				if _, err := os.Stat(bench.ProfileSegment(path, n)); err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("segment %d not started", n)
					return 1
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
		return 0
	})
	if code != 0 {
		t.Fatalf("exit code %d: %s", code, errb.String())
	}
	for n := 1; n <= 3; n++ {
		f := bench.ProfileSegment(path, n)
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatalf("segment %d: %v", n, err)
		}
		// A pprof file is a gzipped protobuf: one that stopped cleanly
		// decompresses to its end.
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err == nil {
			_, err = io.Copy(io.Discard, zr)
		}
		if err != nil {
			t.Errorf("segment %d (%s): %d bytes, not a whole profile: %v", n, f, len(b), err)
		}
	}
	if _, err := os.Stat(bench.ProfileSegment(path, 4)); err == nil {
		t.Error("a fourth segment without a signal")
	}
}
