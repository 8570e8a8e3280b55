package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

var (
	binDir   string
	binOnce  sync.Once
	binPath  string
	binError error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "lifeline-test-")
	if err != nil {
		panic(err)
	}
	binDir = dir
	// A tls or quic gateway without --tls-cert keeps its key pair in the
	// state directory: never the user's or /var/lib/lifeline in tests.
	os.Setenv("LIFELINE_STATE_DIR", filepath.Join(dir, "state"))
	goleak.VerifyTestMain(m, goleak.Cleanup(func(int) { os.RemoveAll(dir) }))
}

// binary builds the real lifeline binary once per test run.
func binary(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		binPath = filepath.Join(binDir, "lifeline")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			binError = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binError != nil {
		t.Fatal(binError)
	}
	return binPath
}

// proc is a lifeline process with its JSON log lines.
type proc struct {
	t    testing.TB
	cmd  *exec.Cmd
	mu   sync.Mutex
	logs []map[string]any
	raw  bytes.Buffer
	done chan struct{}
	code int
}

func startProc(t testing.TB, args ...string) *proc {
	t.Helper()
	return startProcEnv(t, nil, args...)
}

// startProcEnv is startProc with env added to the test's environment.
func startProcEnv(t testing.TB, env []string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(binary(t), append(args, "--log-format", "json")...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = io.Discard
	p := &proc{t: t, cmd: cmd, done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			var m map[string]any
			p.mu.Lock()
			p.raw.Write(line)
			p.raw.WriteByte('\n')
			if json.Unmarshal(line, &m) == nil {
				p.logs = append(p.logs, m)
			}
			p.mu.Unlock()
		}
		cmd.Wait()
		p.code = cmd.ProcessState.ExitCode()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("%s log:\n%s", args[0], p.output())
		}
	})
	return p
}

func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.raw.String()
}

// waitLog waits for a log line with msg and returns it.
func (p *proc) waitLog(msg string, d time.Duration) map[string]any {
	p.t.Helper()
	deadline := time.Now().Add(d)
	for {
		p.mu.Lock()
		for _, m := range p.logs {
			if m["msg"] == msg {
				p.mu.Unlock()
				return m
			}
		}
		p.mu.Unlock()
		select {
		case <-p.done:
			p.t.Fatalf("process exited (code %d) before logging %q:\n%s", p.code, msg, p.output())
		default:
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("no %q log line within %v:\n%s", msg, d, p.output())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (p *proc) count(msg string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, m := range p.logs {
		if m["msg"] == msg {
			n++
		}
	}
	return n
}

func (p *proc) wait(d time.Duration) int {
	p.t.Helper()
	select {
	case <-p.done:
		return p.code
	case <-time.After(d):
		p.t.Fatalf("process did not exit within %v", d)
		return -1
	}
}

// fast are session flags for tests on loopback.
var fast = []string{"--ping-interval", "100ms", "--liveness-timeout", "600ms", "--handshake-timeout", "2s"}

func writeFile(t testing.TB, name, text string) string {
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// runCLI runs the command in-process.
func runCLI(args ...string) (code int, stdout, stderr string) {
	var o, e bytes.Buffer
	code = run(args, &o, &e)
	return code, o.String(), e.String()
}

func freeAddr(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func oneLineErr(t testing.TB, s string) {
	t.Helper()
	if strings.Count(strings.TrimRight(s, "\n"), "\n") != 0 || s == "" {
		t.Errorf("want a one-line error, got %q", s)
	}
}
