package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is a proxy process (lifeline gateway/client or a bench relay)
// started from the lifeline binary.
type proc struct {
	name  string // "client", "gateway", "relay1", ...
	cmd   *exec.Cmd
	addrs map[string]string // log message -> "addr" attribute
	// profile is the CPU profile it writes (CPUProfileEnv), "" if none;
	// segments counts the files it has begun (profileSegment).
	profile  string
	segments int

	mu     sync.Mutex
	tail   []string // first lines of stderr, for error messages
	onLine func()   // called under mu after each line of stderr
	done   chan struct{}
}

// startProc runs bin with args and waits until it has logged (as JSON
// lines on stderr) every message in want with an "addr" attribute. A
// want entry may list alternatives separated by "|" (a message renamed
// between versions). env is added to the bench's own environment (without
// CPUProfileEnv, which only env may set).
func startProc(ctx context.Context, name, bin string, args, env []string, want ...string) (*proc, error) {
	p, err := launch(name, bin, args, env)
	if err != nil {
		return nil, err
	}
	found := make(chan struct{})
	var once sync.Once
	p.onLine = func() {
		for _, w := range want {
			if p.addrLocked(w) == "" {
				return
			}
		}
		once.Do(func() { close(found) })
	}
	p.onLine() // want may be empty
	p.mu.Unlock()
	return p.await(ctx, found)
}

// startReady runs bin with args and waits until ready succeeds, for a
// process that does not log its address (HAProxy).
func startReady(ctx context.Context, name, bin string, args, env []string, ready func() error) (*proc, error) {
	p, err := launch(name, bin, args, env)
	if err != nil {
		return nil, err
	}
	p.mu.Unlock()
	found := make(chan struct{})
	go func() {
		for {
			select {
			case <-p.done:
				return
			case <-ctx.Done():
				return
			default:
			}
			if ready() == nil {
				close(found)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	return p.await(ctx, found)
}

// launch starts the process and its stderr reader, and returns it with
// p.mu held, so that the caller can set onLine before the first line.
func launch(name, bin string, args, env []string) (*proc, error) {
	cmd := exec.Command(bin, args...)
	cmd.Stdout = io.Discard
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, CPUProfileEnv+"=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	pr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, addrs: map[string]string{}, done: make(chan struct{})}
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, CPUProfileEnv+"="); ok {
			p.profile, p.segments = v, 1
		}
	}
	p.mu.Lock()
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			var m struct {
				Msg  string `json:"msg"`
				Addr string `json:"addr"`
			}
			p.mu.Lock()
			if json.Unmarshal([]byte(line), &m) == nil && m.Addr != "" {
				p.addrs[m.Msg] = m.Addr
			}
			if len(p.tail) < 40 && !strings.Contains(line, "session start") && !strings.Contains(line, "session end") {
				p.tail = append(p.tail, line)
			}
			if p.onLine != nil {
				p.onLine()
			}
			p.mu.Unlock()
		}
		io.Copy(io.Discard, pr)
	}()
	return p, nil
}

// await waits for found, the process's exit, 15 s or ctx, whichever
// comes first; it stops the process unless found came first.
func (p *proc) await(ctx context.Context, found <-chan struct{}) (*proc, error) {
	var err error
	t := time.NewTimer(15 * time.Second)
	defer t.Stop()
	select {
	case <-found:
		return p, nil
	case <-p.done:
		err = fmt.Errorf("%s exited at start: %s", p.name, p.stderr())
	case <-t.C:
		err = fmt.Errorf("%s did not start in 15s: %s", p.name, p.stderr())
	case <-ctx.Done():
		err = ctx.Err()
	}
	p.stop()
	return nil, err
}

// addr is the address logged with msg, or with the first of its
// "|"-separated alternatives that was logged.
func (p *proc) addr(msg string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.addrLocked(msg)
}

func (p *proc) addrLocked(msg string) string {
	for _, m := range strings.Split(msg, "|") {
		if a := p.addrs[m]; a != "" {
			return a
		}
	}
	return ""
}

func (p *proc) stderr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := strings.Join(p.tail, "\n")
	if len(s) > 2000 {
		s = s[len(s)-2000:]
	}
	return strings.TrimSpace(s)
}

// stop sends SIGTERM, then SIGKILL after 3 s, and reaps the process.
func (p *proc) stop() {
	if p == nil || p.cmd.Process == nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(3 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
	p.cmd.Wait()
}

// profileSegment makes a profiled process begin its profile's next
// segment (ProfileSegmentSignal) and returns that segment's file, or ""
// when the process writes no profile (HAProxy, or no --profile).
func (p *proc) profileSegment() string {
	if p.profile == "" {
		return ""
	}
	if err := p.cmd.Process.Signal(ProfileSegmentSignal); err != nil {
		return ""
	}
	p.segments++
	return ProfileSegment(p.profile, p.segments)
}

// cpuSeconds is the user+system CPU time of the process so far.
func (p *proc) cpuSeconds() (float64, error) { return procCPU(p.cmd.Process.Pid) }

// rssKB is the resident set size of the process.
func (p *proc) rssKB() (int64, error) { return procRSS(p.cmd.Process.Pid) }

// clkTck is USER_HZ, the unit of /proc/<pid>/stat times (100 on Linux).
const clkTck = 100

func procCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces; fields after ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("bad /proc stat")
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime is field 14, stime field 15.
	if len(f) < 13 {
		return 0, errors.New("short /proc stat")
	}
	u, err1 := strconv.ParseFloat(f[11], 64)
	st, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, errors.New("bad /proc stat times")
	}
	return (u + st) / clkTck, nil
}

func procRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				return strconv.ParseInt(f[0], 10, 64)
			}
		}
	}
	return 0, errors.New("no VmRSS")
}
