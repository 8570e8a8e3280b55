package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"

	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

// main dispatches to the commands: gateway and client (serve.go),
// sessions (sessions.go), demo, bench, version and help.
func main() {
	upgradesEnabled = true // the real binary: USR2 upgrades it in place (upgrade.go)
	os.Exit(withCPUProfile(os.Stderr, func() int { return run(os.Args[1:], os.Stdout, os.Stderr) }))
}

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const (
	exitOK      = 0
	exitRuntime = 1
	exitUsage   = 2
)

const usageText = `lifeline keeps the TCP sessions of unmodified applications alive through
network drops.

Usage:
  lifeline gateway --listen 0.0.0.0:7000 --upstream 127.0.0.1:6379 [flags]
  lifeline client  --listen 127.0.0.1:6380 --gateway gw.example.net:7000 [flags]
  lifeline gateway|client --config FILE
  lifeline sessions [end|goaway ID] --admin-addr ADDR [--token-file FILE]
  lifeline demo [--duration 20s] [--sessions 8] [--break-every 2s]
  lifeline version
  lifeline help [command]

Run "lifeline <command> --help" for the flags of a command.
`

// usageError is a mistake in the command line or config file (exit 2).
type usageError struct{ error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// run runs the command in args and returns the exit code: exitUsage for a
// mistake in the command line or config file, exitRuntime for any other
// error. Errors are one line on stderr.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return exitUsage
	}
	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "gateway", "client":
		err = runProxy(cmd, rest, stdout, stderr)
	case "sessions":
		err = runSessions(rest, stdout)
	case "demo":
		err = runDemo(rest, stdout, stderr)
	case "bench":
		err = runBench(rest, stdout, stderr)
	case "bench-relay":
		err = runBenchRelay(rest, stderr)
	case "version", "--version", "-version":
		fmt.Fprintf(stdout, "lifeline %s (%s)\n", versionString(), strings.Join(transport.Names(), ", "))
	case "help", "--help", "-help", "-h":
		if len(rest) > 0 && (rest[0] == "gateway" || rest[0] == "client" || rest[0] == "demo" || rest[0] == "sessions") {
			return run([]string{rest[0], "--help"}, stdout, stderr)
		}
		fmt.Fprint(stdout, usageText)
	default:
		err = usagef("unknown command %q (want gateway, client, sessions, demo, version or help)", cmd)
	}
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	fmt.Fprintf(stderr, "lifeline %s: %s\n", cmd, oneLine(err.Error()))
	var ue usageError
	if errors.As(err, &ue) {
		return exitUsage
	}
	var ee exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return exitRuntime
}

func versionString() string {
	if version != "dev" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return version
}
