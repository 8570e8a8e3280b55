package main

import (
	"bytes"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// runCLIWithin is runCLI for a command that should end by itself: if it
// has not within d (a proxy that started instead of refusing its
// arguments), the test fails and a SIGTERM, caught by the running proxy,
// drains and ends it.
func runCLIWithin(t *testing.T, d time.Duration, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var o, e bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- run(args, &o, &e) }()
	select {
	case code = <-done:
	case <-time.After(d):
		t.Errorf("lifeline %s still running after %v", strings.Join(args, " "), d)
		syscall.Kill(os.Getpid(), syscall.SIGTERM)
		code = <-done
	}
	return code, o.String(), e.String()
}

// A bad flag or flag value gives the one-line error and a hint on stderr,
// and nothing else: not the usage text (51 lines for gateway) first.
func TestBadFlagPrintsOnlyErrorAndHint(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"gateway", "--connect-timeout", "soon"}, `invalid value "soon" for flag -connect-timeout`},
		{[]string{"gateway", "--bogus"}, "flag provided but not defined: -bogus"},
		{[]string{"client", "--buffer", "lots"}, `bad size "lots"`},
		{[]string{"demo", "--duration", "x"}, `invalid value "x" for flag -duration`},
		{[]string{"bench", "--runs", "many"}, `invalid value "many" for flag -runs`},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			code, stdout, stderr := runCLI(c.args...)
			if code != exitUsage {
				t.Errorf("exit code %d, want %d", code, exitUsage)
			}
			if stdout != "" {
				t.Errorf("stdout has %d lines, want nothing:\n%s", strings.Count(stdout, "\n"), stdout)
			}
			oneLineErr(t, stderr)
			hint := "run 'lifeline " + c.args[0] + " --help' for usage"
			if !strings.Contains(stderr, c.want) || !strings.Contains(stderr, hint) {
				t.Errorf("stderr %q lacks %q or the hint %q", stderr, c.want, hint)
			}
		})
	}
}

// --connect-timeout 0s used to become 5s without a word; a zero or
// negative connect timeout is a usage error, on the command line and in
// the config file.
func TestZeroConnectTimeoutRefused(t *testing.T) {
	code, _, stderr := runCLIWithin(t, 10*time.Second, "gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--connect-timeout", "0s")
	if code != exitUsage || !strings.Contains(stderr, "--connect-timeout 0s: must be positive") {
		t.Errorf("exit code %d, stderr %q; want 2 and must be positive", code, stderr)
	}
	oneLineErr(t, stderr)
	for _, yaml := range []string{
		"gateway:\n  listen: 127.0.0.1:0\n  transport: tcp\n  connect_timeout: 0s\n  routes:\n    - {name: a, upstream: 127.0.0.1:1}\n",
		"gateway:\n  listen: 127.0.0.1:0\n  transport: tcp\n  routes:\n    - {name: a, upstream: 127.0.0.1:1, connect_timeout: 0ms}\n",
	} {
		code, _, stderr := runCLIWithin(t, 10*time.Second, "gateway", "--config", writeFile(t, "gw.yaml", yaml))
		if code != exitUsage || !strings.Contains(stderr, "connect_timeout must be positive") {
			t.Errorf("config %q: exit code %d, stderr %q; want 2 and must be positive", yaml, code, stderr)
		}
	}
}

// --help prints the usage once (bench, demo, gateway and client printed
// it twice), to stdout, and exits 0.
func TestHelpPrintsUsageOnce(t *testing.T) {
	for _, cmd := range []string{"gateway", "client", "demo", "bench"} {
		code, stdout, stderr := runCLI(cmd, "--help")
		if code != exitOK || stderr != "" {
			t.Errorf("%s --help: exit code %d, stderr %q", cmd, code, stderr)
		}
		if n := strings.Count(stdout, "Usage"); n != 1 {
			t.Errorf("%s --help printed the usage %d times:\n%s", cmd, n, stdout)
		}
	}
}
