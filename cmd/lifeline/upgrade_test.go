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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// In-place upgrades, end to end: real processes, a binary installed over
// the running one's path, USR2, and sessions that must not notice.

var (
	upOnce sync.Once
	upBins map[string]string
	upErr  error
)

// upgradeBinaries builds the binary once per version string (v1..v4).
func upgradeBinaries(t testing.TB) map[string]string {
	t.Helper()
	upOnce.Do(func() {
		upBins = map[string]string{}
		var wg sync.WaitGroup
		var mu sync.Mutex
		for _, v := range []string{"v1", "v2", "v3", "v4"} {
			p := filepath.Join(binDir, "lifeline-"+v)
			upBins[v] = p
			wg.Add(1)
			go func() {
				defer wg.Done()
				out, err := exec.Command("go", "build", upgradeBuildFlags(), "-ldflags", "-X main.version="+v, "-o", p, ".").CombinedOutput()
				if err != nil {
					mu.Lock()
					upErr = fmt.Errorf("go build %s: %v\n%s", v, err, out)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
	})
	if upErr != nil {
		t.Fatal(upErr)
	}
	return upBins
}

// install puts a copy of src at dst the way a package manager does: a
// new file renamed over the old path (the running process keeps its own
// image).
func install(t testing.TB, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	tmp := dst + ".new"
	if err := os.WriteFile(tmp, b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		t.Fatal(err)
	}
}

// upProc is a gateway or client that upgrades itself: its processes
// share one stderr pipe, and the pid file says which one is current.
type upProc struct {
	t       testing.TB
	cmd     *exec.Cmd
	path    string // the installed binary
	pidFile string
	mu      sync.Mutex
	logs    []map[string]any
	raw     bytes.Buffer
	eof     chan struct{}
}

func startUpProc(t testing.TB, bin string, env []string, args ...string) *upProc {
	t.Helper()
	dir := t.TempDir()
	p := &upProc{t: t, path: filepath.Join(dir, "lifeline"), pidFile: filepath.Join(dir, "lifeline.pid"), eof: make(chan struct{})}
	install(t, bin, p.path)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd = exec.Command(p.path, append(args, "--log-format", "json", "--pid-file", p.pidFile)...)
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stderr = w
	p.cmd.Stdout = io.Discard
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	go func() {
		defer close(p.eof)
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var m map[string]any
			p.mu.Lock()
			p.raw.Write(sc.Bytes())
			p.raw.WriteByte('\n')
			if json.Unmarshal(sc.Bytes(), &m) == nil {
				p.logs = append(p.logs, m)
			}
			p.mu.Unlock()
		}
		r.Close()
	}()
	go p.cmd.Wait() // reaps the first process; later ones are not our children
	t.Cleanup(func() {
		// Every process of the chain: the pid file's, and the first.
		if pid := p.pidNow(); pid > 0 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		p.cmd.Process.Kill()
		for _, pid := range p.pids() {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		select {
		case <-p.eof:
		case <-time.After(10 * time.Second):
			t.Error("a process of the upgrade chain kept the log pipe open")
		}
		if strings.Contains(p.output(), "WARNING: DATA RACE") {
			t.Error("a data race in a lifeline process (see its log)")
		}
		if t.Failed() || os.Getenv("LIFELINE_UPGRADE_LOG") == "1" {
			t.Logf("%s log:\n%s", args[0], p.output())
		}
	})
	return p
}

func (p *upProc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.raw.String()
}

// pids are the processes that said they took over.
func (p *upProc) pids() []int {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []int
	for _, m := range p.logs {
		if m["msg"] == "upgrade: took over" {
			if f, ok := m["pid"].(float64); ok {
				out = append(out, int(f))
			}
		}
	}
	return out
}

func (p *upProc) pidNow() int {
	b, err := os.ReadFile(p.pidFile)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// waitFor waits for a log line, after the first skip lines, for which
// match holds.
func (p *upProc) waitFor(skip int, d time.Duration, what string, match func(map[string]any) bool) map[string]any {
	p.t.Helper()
	deadline := time.Now().Add(d)
	for {
		p.mu.Lock()
		for _, m := range p.logs[min(skip, len(p.logs)):] {
			if match(m) {
				p.mu.Unlock()
				return m
			}
		}
		p.mu.Unlock()
		if time.Now().After(deadline) {
			p.t.Fatalf("no log line %s within %v:\n%s", what, d, p.output())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (p *upProc) lines() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.logs)
}

func msgIs(msg string) func(map[string]any) bool {
	return func(m map[string]any) bool { return m["msg"] == msg }
}

// waitPID waits for the pid file to name a live process and returns it.
func (p *upProc) waitPID() int {
	p.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		if pid := p.pidNow(); pid > 0 && alive(pid) {
			return pid
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("pid file %s names no live process:\n%s", p.pidFile, p.output())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// upgrade installs bin over the running binary's path, sends USR2 and
// waits for the new process (version) to take over: the old one exits
// and the pid file names the new one.
func (p *upProc) upgrade(bin, version string) {
	p.t.Helper()
	old := p.waitPID()
	skip := p.lines()
	install(p.t, bin, p.path)
	start := time.Now()
	if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
		p.t.Fatal(err)
	}
	m := p.waitFor(skip, 30*time.Second, "upgrade: took over, version "+version, func(m map[string]any) bool {
		return m["msg"] == "upgrade: took over" || strings.HasPrefix(m["msg"].(string), "upgrade failed")
	})
	if m["msg"] != "upgrade: took over" {
		p.t.Fatalf("upgrade to %s failed: %v", version, m)
	}
	if m["version"] != version {
		p.t.Fatalf("new process reports version %v, want %s", m["version"], version)
	}
	pid := int(m["pid"].(float64))
	deadline := time.Now().Add(15 * time.Second)
	for p.pidNow() != pid || alive(old) {
		if time.Now().After(deadline) {
			p.t.Fatalf("after the upgrade: pid file says %d (new process %d); old process %d alive: %v", p.pidNow(), pid, old, alive(old))
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.t.Logf("upgraded to %s: pid %d -> %d in %v, %v sessions", version, old, pid, time.Since(start).Round(time.Millisecond), m["sessions"])
}

// failedUpgrade sends USR2 after installing bin and waits for the old
// process to say the upgrade failed; it must still be the one in the pid
// file, and alive.
func (p *upProc) failedUpgrade(bin string) map[string]any {
	p.t.Helper()
	old := p.waitPID()
	skip := p.lines()
	install(p.t, bin, p.path)
	if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
		p.t.Fatal(err)
	}
	m := p.waitFor(skip, 40*time.Second, "upgrade failed", func(m map[string]any) bool {
		return strings.HasPrefix(m["msg"].(string), "upgrade failed") || m["msg"] == "upgrade: took over"
	})
	if !strings.HasPrefix(m["msg"].(string), "upgrade failed") {
		p.t.Fatalf("upgrade did not fail: %v", m)
	}
	if got := p.pidNow(); got != old || !alive(old) {
		p.t.Fatalf("pid file %d, old process %d alive %v", got, old, alive(old))
	}
	return m
}

// traffic is n sessions streaming verified data both ways through addr,
// and a Redis INCR loop when redis-server is installed.
type traffic struct {
	t        testing.TB
	stop     chan struct{}
	verified []*atomic.Int64
	errs     chan error
	wg       sync.WaitGroup
	redis    *redisLoop
}

func startTraffic(t testing.TB, addr string, n int, redis *redisLoop) *traffic {
	tr := &traffic{t: t, stop: make(chan struct{}), errs: make(chan error, n), redis: redis}
	for i := range n {
		v := new(atomic.Int64)
		tr.verified = append(tr.verified, v)
		tr.wg.Add(1)
		go func() {
			defer tr.wg.Done()
			e := faultnet.Echo{Seed: uint64(1000 + i), Stop: tr.stop, MaxWrite: 4 << 10, MaxPause: 20 * time.Millisecond,
				Verified: v, Timeout: 40 * time.Second}
			if err := e.Dial(addr); err != nil {
				tr.errs <- fmt.Errorf("session %d: %w", i, err)
			}
		}()
	}
	if redis != nil {
		redis.start(tr.stop)
	}
	return tr
}

// flowing waits until every session has verified more bytes than it had.
func (tr *traffic) flowing(what string) {
	tr.t.Helper()
	before := make([]int64, len(tr.verified))
	for i, v := range tr.verified {
		before[i] = v.Load()
	}
	rn := tr.redis.count()
	deadline := time.Now().Add(30 * time.Second)
	for {
		stuck := 0
		for i, v := range tr.verified {
			if v.Load() <= before[i] {
				stuck++
			}
		}
		if stuck == 0 && (tr.redis == nil || tr.redis.count() > rn) {
			if d := time.Since(deadline.Add(-30 * time.Second)); d > time.Second {
				tr.t.Logf("%s: every session moved within %v", what, d.Round(time.Millisecond))
			}
			return
		}
		select {
		case err := <-tr.errs:
			tr.t.Fatalf("%s: %v", what, err)
		default:
		}
		if time.Now().After(deadline) {
			tr.t.Fatalf("%s: %d sessions made no progress in 30 s (redis %d -> %d)", what, stuck, rn, tr.redis.count())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// finish stops the writers and checks that every byte came back.
func (tr *traffic) finish() {
	tr.t.Helper()
	close(tr.stop)
	tr.wg.Wait()
	close(tr.errs)
	for err := range tr.errs {
		tr.t.Error(err)
	}
	var total int64
	for _, v := range tr.verified {
		total += v.Load()
	}
	tr.t.Logf("%d sessions: %d bytes verified both ways", len(tr.verified), total)
	if tr.redis != nil {
		tr.redis.finish(tr.t)
	}
}

// redisLoop INCRs a counter through lifeline and checks every reply.
type redisLoop struct {
	addr string // through lifeline
	cli  string
	n    atomic.Int64
	err  chan error
	done chan struct{}
}

// startRedis starts redis-server, or returns nil when it is not
// installed.
func startRedis(t testing.TB) (server string, cli string) {
	srvBin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Log("redis-server not on PATH: no Redis loop")
		return "", ""
	}
	cli, err = exec.LookPath("redis-cli")
	if err != nil {
		return "", ""
	}
	addr := freeAddr(t)
	rs := exec.Command(srvBin, "--port", portOf(addr), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no")
	if err := rs.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rs.Process.Kill(); rs.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return addr, cli
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server did not start: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *redisLoop) count() int64 {
	if r == nil {
		return 0
	}
	return r.n.Load()
}

func (r *redisLoop) start(stop <-chan struct{}) {
	r.err, r.done = make(chan error, 1), make(chan struct{})
	go func() {
		defer close(r.done)
		c, err := net.Dial("tcp", r.addr)
		if err != nil {
			r.err <- err
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		cmd := func(args ...string) (string, error) {
			var b strings.Builder
			fmt.Fprintf(&b, "*%d\r\n", len(args))
			for _, a := range args {
				fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
			}
			c.SetDeadline(time.Now().Add(40 * time.Second))
			if _, err := c.Write([]byte(b.String())); err != nil {
				return "", err
			}
			line, err := br.ReadString('\n')
			return strings.TrimRight(line, "\r\n"), err
		}
		if _, err := cmd("DEL", "lifeline:upgrade"); err != nil {
			r.err <- err
			return
		}
		for {
			select {
			case <-stop:
				return
			default:
			}
			n := r.n.Load() + 1
			got, err := cmd("INCR", "lifeline:upgrade")
			if err != nil || got != ":"+strconv.FormatInt(n, 10) {
				r.err <- fmt.Errorf("INCR #%d replied %q, %v", n, got, err)
				return
			}
			r.n.Store(n)
			time.Sleep(2 * time.Millisecond)
		}
	}()
}

func (r *redisLoop) finish(t testing.TB) {
	<-r.done
	select {
	case err := <-r.err:
		t.Fatalf("redis: %v", err)
	default:
	}
	out, err := exec.Command(r.cli, "-h", "127.0.0.1", "-p", portOf(r.addr), "GET", "lifeline:upgrade").CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli: %v: %s", err, out)
	}
	if got := strings.TrimSpace(string(out)); got != strconv.FormatInt(r.n.Load(), 10) {
		t.Fatalf("redis-cli GET = %q, want %d", got, r.n.Load())
	}
	t.Logf("redis: %d INCRs, every reply the next number, GET = %d", r.n.Load(), r.n.Load())
}

// upgradeStack is an upstream echo (and Redis), a gateway and a client
// sidecar; side names the one that upgrades itself (upProc), the other
// runs the test's usual binary. A relay sits between client and gateway.
type upgradeStack struct {
	up       *upProc
	relay    *faultnet.Relay
	echoApp  string // sessions to the echo upstream
	redisApp string // sessions to Redis ("" without redis-server)
	cli      string
}

func newUpgradeStack(t *testing.T, side string, env []string) *upgradeStack {
	return newUpgradeStackOver(t, side, "tcp", env)
}

// newUpgradeStackOver is newUpgradeStack with links over tr (tcp, tls).
func newUpgradeStackOver(t *testing.T, side, tr string, env []string) *upgradeStack {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	bins := upgradeBinaries(t)
	echo := testnet.EchoServer(t)
	redisAddr, cli := startRedis(t)
	s := &upgradeStack{cli: cli}
	// The gateway's config names its routes; the client has one listener
	// per route.
	cfg := "gateway:\n  transport: " + tr + "\n  listen: 127.0.0.1:0\n  reconnect_timeout: 60s\n" + fastYAML + "  routes:\n    - name: echo\n      upstream: " + echo + "\n"
	if redisAddr != "" {
		cfg += "    - name: redis\n      upstream: " + redisAddr + "\n"
	}
	gwConf := writeFile(t, "gateway.yaml", cfg)
	var gwAddr, pin string
	const pinMsg = "gateway certificate: self-signed, kept in the state directory; clients pin its fingerprint (--tls-pin)"
	if side == "gateway" {
		s.up = startUpProc(t, bins["v1"], env, "gateway", "--config", gwConf)
		gwAddr = s.up.waitFor(0, 30*time.Second, "gateway listening", msgIs("gateway listening"))["addr"].(string)
		if tr != "tcp" {
			pin = s.up.waitFor(0, 10*time.Second, "the certificate's pin", msgIs(pinMsg))["sha256"].(string)
		}
	} else {
		gw := startProc(t, "gateway", "--config", gwConf)
		gwAddr = gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
		if tr != "tcp" {
			pin = gw.waitLog(pinMsg, 10*time.Second)["sha256"].(string)
		}
	}
	tlsYAML := ""
	if tr != "tcp" {
		tlsYAML = "      tls:\n        pin: " + pin + "\n"
	}
	relay, err := faultnet.NewRelay("127.0.0.1:0", gwAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relay.Close() })
	s.relay = relay
	linkAddr := relay.Addr()
	if tr == "quic" {
		linkAddr = gwAddr // the relay is TCP
	}
	s.echoApp = freeAddr(t)
	ccfg := "client:\n  listeners:\n    - listen: " + s.echoApp + "\n      gateway: " + linkAddr + "\n      route: echo\n      transport: " + tr + "\n      reconnect_timeout: 60s\n" + indent(fastYAML) + tlsYAML
	if redisAddr != "" {
		s.redisApp = freeAddr(t)
		ccfg += "    - listen: " + s.redisApp + "\n      gateway: " + linkAddr + "\n      route: redis\n      transport: " + tr + "\n      reconnect_timeout: 60s\n" + indent(fastYAML) + tlsYAML
	}
	clConf := writeFile(t, "client.yaml", ccfg)
	if side == "client" {
		s.up = startUpProc(t, bins["v1"], env, "client", "--config", clConf)
		s.up.waitFor(0, 30*time.Second, "client listening", msgIs("client listening"))
	} else {
		cl := startProc(t, "client", "--config", clConf)
		cl.waitLog("client listening", 30*time.Second)
	}
	return s
}

func (s *upgradeStack) traffic(t *testing.T, n int) *traffic {
	var r *redisLoop
	if s.redisApp != "" {
		r = &redisLoop{addr: s.redisApp, cli: s.cli}
	}
	return startTraffic(t, s.echoApp, n, r)
}

// Three upgrades in a row of the gateway, then of the client sidecar,
// under 50 streaming sessions and a Redis INCR loop: every byte exact,
// every INCR the next number, the new version reported, the pid file
// current.
func TestUpgradeGateway(t *testing.T) { testUpgradeThrice(t, "gateway") }
func TestUpgradeClient(t *testing.T)  { testUpgradeThrice(t, "client") }

func testUpgradeThrice(t *testing.T, side string) {
	s := newUpgradeStack(t, side, nil)
	bins := upgradeBinaries(t)
	tr := s.traffic(t, 50)
	tr.flowing("before the upgrades")
	for _, v := range []string{"v2", "v3", "v4"} {
		s.up.upgrade(bins[v], v)
		tr.flowing("after the upgrade to " + v)
	}
	tr.finish()
}

// A new process that refuses the snapshot, and a binary that exits at
// start: the old process keeps serving every session, nothing lost.
func TestUpgradeRefusedAndBroken(t *testing.T) {
	// A quic gateway stops its QUIC listener for the hand-over and must
	// start it again on the rollback.
	for _, c := range []struct{ side, link string }{{"gateway", "tcp"}, {"client", "tcp"}, {"gateway", "quic"}} {
		t.Run(c.side+"-"+c.link, func(t *testing.T) {
			s := newUpgradeStackOver(t, c.side, c.link, []string{refuseEnv + "=1"})
			bins := upgradeBinaries(t)
			tr := s.traffic(t, 10)
			tr.flowing("before")
			m := s.up.failedUpgrade(bins["v2"])
			if !strings.Contains(fmt.Sprint(m["err"]), "refused") {
				t.Errorf("failure logged as %v, want the refusal", m)
			}
			tr.flowing("after a refused upgrade")
			broken := filepath.Join(t.TempDir(), "broken")
			if err := os.WriteFile(broken, []byte("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			s.up.failedUpgrade(broken)
			tr.flowing("after a binary that exits at start")
			tr.finish()
		})
	}
}

// Upgrade while the path between client and gateway is down: the parked
// sessions go over to the new process and resume when the path is back.
func TestUpgradeWhileDown(t *testing.T) {
	for _, side := range []string{"gateway", "client"} {
		t.Run(side, func(t *testing.T) {
			s := newUpgradeStack(t, side, nil)
			bins := upgradeBinaries(t)
			tr := s.traffic(t, 10)
			tr.flowing("before")
			s.relay.SetDown(true)
			s.relay.Reset()
			time.Sleep(300 * time.Millisecond)
			s.up.upgrade(bins["v2"], "v2")
			time.Sleep(500 * time.Millisecond)
			s.relay.SetDown(false)
			tr.flowing("after the path came back")
			tr.finish()
		})
	}
}

// fastYAML is fast as config file settings (two-space indent).
const fastYAML = "  ping_interval: 100ms\n  liveness_timeout: 600ms\n  handshake_timeout: 2s\n"

// indent moves fastYAML's lines under a listener entry.
func indent(s string) string { return strings.ReplaceAll(s, "  ", "      ") }

// alive reports whether pid runs. A zombie does not: a process of the
// chain whose parent exited is reaped by init, which in a container may
// never do it.
func alive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// pid (comm) state ...: the state follows the last ')'.
	if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) {
		return b[i+2] != 'Z'
	}
	return true
}

// upgradeBuildFlags: LIFELINE_UPGRADE_RACE=1 builds the upgrading
// binaries with the race detector (slower; a race makes a process exit
// 66 with a report in the log).
func upgradeBuildFlags() string {
	if os.Getenv("LIFELINE_UPGRADE_RACE") == "1" {
		return "-race"
	}
	return "-trimpath=false"
}

// The same over tls and quic (the gateway's self-signed certificate,
// pinned): the gateway upgrades twice, the client once.
func TestUpgradeTLS(t *testing.T)  { testUpgradeOver(t, "tls") }
func TestUpgradeQUIC(t *testing.T) { testUpgradeOver(t, "quic") }

func testUpgradeOver(t *testing.T, link string) {
	for _, side := range []string{"gateway", "client"} {
		t.Run(side, func(t *testing.T) {
			s := newUpgradeStackOver(t, side, link, nil)
			bins := upgradeBinaries(t)
			tr := s.traffic(t, 10)
			tr.flowing("before")
			s.up.upgrade(bins["v2"], "v2")
			tr.flowing("after the upgrade")
			if side == "gateway" {
				s.up.upgrade(bins["v3"], "v3")
				tr.flowing("after the second upgrade")
			}
			tr.finish()
		})
	}
}
