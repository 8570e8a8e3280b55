package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestBenchUsage(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"bench", "--help"}, &out, &errb); code != exitOK {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	for _, w := range []string{"throughput", "soak", "lifeline-quic", "haproxy", "tls-relay", "quic-relay", "-short", "-out",
		"-idle-wait", "-idle-window", "-idle-runs", "-throughput-mode", "-profile"} {
		if !strings.Contains(out.String(), w) {
			t.Errorf("help lacks %q", w)
		}
	}
	for _, args := range [][]string{{"bench", "nosuch"}, {"bench", "--configs", "nosuch"}, {"bench", "--bogus"}, {"bench", "--throughput-mode", "nosuch"}} {
		out.Reset()
		errb.Reset()
		if code := run(args, &out, &errb); code != exitUsage {
			t.Errorf("%v: exit %d, want %d (%s)", args, code, exitUsage, errb.String())
		}
	}
}

func TestBenchRelayUsage(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"bench-relay"}, &out, &errb); code != exitRuntime {
		t.Errorf("bench-relay without --target: exit %d", code)
	}
}

// The command end to end, from the built binary (the proxies are re-exec'd
// from os.Executable, so this test binary cannot stand in for it).
func TestBenchCommandShort(t *testing.T) {
	if testing.Short() {
		t.Skip("starts proxy processes")
	}
	dir := t.TempDir()
	cmd := exec.Command(binary(t), "bench", "latency", "resume", "--short", "--configs", "lifeline-tcp", "--out", dir)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%v: %s", err, errb.String())
	}
	for _, w := range []string{"| lifeline-tcp |", "| relay |", "| direct |", "blackhole", "Goals"} {
		if !strings.Contains(out.String(), w) {
			t.Errorf("output lacks %q:\n%s", w, out.String())
		}
	}
	if !strings.Contains(errb.String(), "\r") {
		t.Errorf("no progress line on stderr: %q", errb.String())
	}
	for _, f := range []string{"bench.json", "bench.md", "latency.svg"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Error(err)
		}
	}
}
