package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

// taggedUpstream sends its one-byte tag, then echoes.
func taggedUpstream(t *testing.T, tag string) string {
	return testnet.TCPServer(t, func(c *net.TCPConn) {
		c.Write([]byte(tag))
		io.Copy(c, c)
		c.CloseWrite()
	})
}

// openTag connects to a client listener and reads the upstream's tag.
func openTag(t *testing.T, addr string) (*net.TCPConn, string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(60 * time.Second))
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("reading the upstream's tag: %v", err)
	}
	return c.(*net.TCPConn), string(b)
}

// stream sends random data on c in chunks until stop is closed (at most
// 30 s), then half-closes, and reports whether everything came back
// byte-exact.
func stream(c *net.TCPConn, seed uint64, stop <-chan struct{}) <-chan error {
	res := make(chan error, 1)
	var sent bytes.Buffer
	var mu sync.Mutex
	go func() {
		werr := make(chan error, 1)
		go func() {
			end := time.After(30 * time.Second)
			for i := 0; ; i++ {
				chunk := randomData(16<<10+i%977, seed+uint64(i))
				mu.Lock()
				sent.Write(chunk)
				mu.Unlock()
				if _, err := c.Write(chunk); err != nil {
					werr <- err
					return
				}
				select {
				case <-stop:
					werr <- c.CloseWrite()
					return
				case <-end:
					werr <- c.CloseWrite()
					return
				case <-time.After(5 * time.Millisecond):
				}
			}
		}()
		got, err := io.ReadAll(c)
		if err != nil {
			res <- fmt.Errorf("read after %d bytes: %w", len(got), err)
			return
		}
		if err := <-werr; err != nil {
			res <- fmt.Errorf("write: %w", err)
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if !bytes.Equal(got, sent.Bytes()) {
			res <- fmt.Errorf("echo differs: got %d bytes, sent %d, first difference at %d", len(got), sent.Len(), faultnet.FirstDiff(got, sent.Bytes()))
			return
		}
		if len(got) < 256<<10 {
			res <- fmt.Errorf("only %d bytes streamed", len(got))
			return
		}
		res <- nil
	}()
	return res
}

// waitLogN waits for the n-th log line with msg and returns it.
func (p *proc) waitLogN(msg string, n int, d time.Duration) map[string]any {
	p.t.Helper()
	deadline := time.Now().Add(d)
	for {
		p.mu.Lock()
		k := 0
		for _, m := range p.logs {
			if m["msg"] == msg {
				if k++; k == n {
					p.mu.Unlock()
					return m
				}
			}
		}
		p.mu.Unlock()
		select {
		case <-p.done:
			p.t.Fatalf("process exited (code %d) before logging %q %d times:\n%s", p.code, msg, n, p.output())
		default:
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("no %d-th %q log line within %v:\n%s", n, msg, d, p.output())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// lastLog is the last log line with msg, or nil.
func (p *proc) lastLog(msg string) map[string]any {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := len(p.logs) - 1; i >= 0; i-- {
		if p.logs[i]["msg"] == msg {
			return p.logs[i]
		}
	}
	return nil
}

// notifyListener is a stand-in for systemd's notification socket.
type notifyListener struct {
	c   *net.UnixConn
	env string
}

func newNotifyListener(t *testing.T) *notifyListener {
	name := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &notifyListener{c: c, env: notifySocketEnv + "=" + name}
}

// expect reads the next notification and checks it starts with want.
func (n *notifyListener) expect(t *testing.T, want string) {
	t.Helper()
	n.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	b := make([]byte, 4096)
	k, err := n.c.Read(b)
	if err != nil {
		t.Fatalf("waiting for %q from sd_notify: %v", want, err)
	}
	if !strings.HasPrefix(string(b[:k]), want) {
		t.Fatalf("sd_notify sent %q, want %q", b[:k], want)
	}
}

// metric is the value of the sample named exactly name (with labels) in
// a /metrics page, or "".
func metric(page, name string) string {
	for _, l := range strings.Split(page, "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			return v
		}
	}
	return ""
}

const gwReloadConfig = `admin_addr: %s
gateway:
  listen: 127.0.0.1:0
  transport: tcp
  ping_interval: 100ms
  liveness_timeout: 600ms
  handshake_timeout: 2s
  max_sessions: %d
  routes:
    - name: default
      upstream: %s
      reconnect_timeout: %s
`

// SIGHUP with a changed config: the gateway sends new sessions to the new
// upstream with the new session settings while a session opened before
// keeps streaming byte-exact to the old upstream, through a link break
// after the reload too. An invalid file is refused, logged at error and
// counted, and the old config keeps serving; a change that needs a new
// process is named in a warning. systemd hears READY, RELOADING/READY
// and STOPPING.
func TestReloadGatewayConfig(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	upA, upB := taggedUpstream(t, "A"), taggedUpstream(t, "B")
	admin := freeAddr(t)
	cfgPath := writeFile(t, "gw.yaml", fmt.Sprintf(gwReloadConfig, admin, 1000, upA, "30s"))
	rewrite := func(text string) {
		// Atomically, as an operator's tooling should: the reload never
		// reads a half-written file.
		tmp := cfgPath + ".tmp"
		if err := os.WriteFile(tmp, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, cfgPath); err != nil {
			t.Fatal(err)
		}
	}
	notify := newNotifyListener(t)
	gw := startProcEnv(t, []string{notify.env}, "gateway", "--config", cfgPath)
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	notify.expect(t, "READY=1")
	relay, err := faultnet.NewRelay("127.0.0.1:0", gwAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relay.Close() })
	app := freeAddr(t)
	cl := startProc(t, "client", "--transport", "tcp", "--listen", app, "--gateway", relay.Addr(),
		"--reconnect-timeout", "40s", "--ping-interval", "100ms", "--liveness-timeout", "600ms", "--handshake-timeout", "2s")
	cl.waitLog("client listening", 30*time.Second)

	old, tag := openTag(t, app)
	if tag != "A" {
		t.Fatalf("first session reached %q, want A", tag)
	}
	if rt := cl.waitLogN("session start", 1, 10*time.Second)["reconnect_timeout"]; rt != "30s" && rt != float64(30*time.Second) {
		t.Fatalf("first session's reconnect timeout %v, want 30s (the gateway's)", rt)
	}
	stop := make(chan struct{})
	oldDone := stream(old, 1, stop)
	time.Sleep(300 * time.Millisecond) // data in flight across the reload

	// Another upstream and another reconnect timeout for new sessions.
	rewrite(fmt.Sprintf(gwReloadConfig, admin, 1000, upB, "12s"))
	hup := func() {
		gw.cmd.Process.Signal(syscall.SIGHUP)
		notify.expect(t, "RELOADING=1\nMONOTONIC_USEC=")
		notify.expect(t, "READY=1")
	}
	hup()
	line := gw.waitLogN("config reloaded", 1, 10*time.Second)
	changed, _ := line["changed"].(string)
	for _, want := range []string{`route "default" upstream ` + upA + " -> " + upB, `route "default" reconnect_timeout 30s -> 12s`} {
		if !strings.Contains(changed, want) {
			t.Errorf("config reloaded: changed=%q lacks %q", changed, want)
		}
	}

	fresh, tag := openTag(t, app)
	if tag != "B" {
		t.Fatalf("session after the reload reached %q, want B", tag)
	}
	if rt := cl.waitLogN("session start", 2, 10*time.Second)["reconnect_timeout"]; rt != "12s" && rt != float64(12*time.Second) {
		t.Errorf("new session's reconnect timeout %v, want 12s (the reloaded gateway's)", rt)
	}
	freshDone := stream(fresh, 2, stop)
	time.Sleep(200 * time.Millisecond)
	relay.Reset() // both sessions resume, each to its own upstream
	time.Sleep(500 * time.Millisecond)

	// A file that does not parse, then one that does not validate: both
	// refused, logged at error, counted; nothing changes.
	rewrite("gateway: [\n")
	hup()
	e1 := gw.waitLogN("config reload failed; keeping the old config", 1, 10*time.Second)
	rewrite(fmt.Sprintf(gwReloadConfig, admin, 1000, "nowhere", "12s"))
	hup()
	e2 := gw.waitLogN("config reload failed; keeping the old config", 2, 10*time.Second)
	for _, e := range []map[string]any{e1, e2} {
		if e["level"] != "ERROR" || e["err"] == "" {
			t.Errorf("refused reload logged as %v", e)
		}
	}
	if err, _ := e2["err"].(string); !strings.Contains(err, "nowhere") {
		t.Errorf("validation error %q does not name the bad upstream", err)
	}
	third, tag := openTag(t, app)
	if tag != "B" {
		t.Errorf("after refused reloads a new session reached %q, want B (the config kept)", tag)
	}
	third.Close()

	// Limits change in place too, for what comes next.
	rewrite(fmt.Sprintf(gwReloadConfig, admin, 500, upB, "12s"))
	hup()
	gw.waitLogN("config reloaded", 2, 10*time.Second)
	if r := gw.lastLog("config reloaded"); r == nil || !strings.Contains(fmt.Sprint(r["changed"]), "gateway max_sessions 1000 -> 500") {
		t.Errorf("reload did not apply max_sessions: %v", r)
	}
	if w := gw.lastLog("config reload: these changes need an upgrade in place (SIGUSR2) or a restart to take effect; until then the old values stay"); w != nil && strings.Contains(fmt.Sprint(w["settings"]), "max_sessions") {
		t.Errorf("max_sessions still said to need a restart: %v", w)
	}

	close(stop)
	for name, done := range map[string]<-chan error{"old": oldDone, "new": freshDone} {
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%s session: %v", name, err)
			}
		case <-time.After(60 * time.Second):
			t.Fatalf("%s session's stream did not end", name)
		}
	}
	if n := cl.count("session resumed"); n < 2 {
		t.Errorf("%d client resume lines, want both sessions resumed after the break", n)
	}
	var ups []string
	gw.mu.Lock()
	for _, m := range gw.logs {
		if m["msg"] == "session start" && m["upstream"] != nil {
			ups = append(ups, fmt.Sprint(m["upstream"]))
		}
	}
	gw.mu.Unlock()
	if len(ups) != 3 || ups[0] != upA || ups[1] != upB || ups[2] != upB {
		t.Errorf("gateway session upstreams %v, want [A B B] = [%s %s %s]", ups, upA, upB, upB)
	}

	_, page := httpGet(t, "http://"+admin+"/metrics")
	if ok, bad := metric(page, `lifeline_config_reloads_total{result="ok"}`), metric(page, `lifeline_config_reloads_total{result="error"}`); ok != "2" || bad != "2" {
		t.Errorf("lifeline_config_reloads_total ok=%q error=%q, want 2 and 2", ok, bad)
	}
	if v := metric(page, "lifeline_config_last_reload_success_timestamp_seconds"); v == "" || v == "0" {
		t.Errorf("lifeline_config_last_reload_success_timestamp_seconds = %q", v)
	}

	gw.cmd.Process.Signal(syscall.SIGTERM)
	notify.expect(t, "STOPPING=1")
	if code := gw.wait(40 * time.Second); code != 0 {
		t.Errorf("gateway exited %d", code)
	}
}

// A client sidecar's reload changes the route and session settings of
// the connections its listener accepts afterwards; one added listener
// needs a new process and is named in a warning.
func TestReloadClientConfig(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	upA, upB := taggedUpstream(t, "A"), taggedUpstream(t, "B")
	gw := startProc(t, "gateway", "--config", writeFile(t, "gw.yaml", fmt.Sprintf(`gateway:
  listen: 127.0.0.1:0
  transport: tcp
  routes:
    - {name: first, upstream: %s}
    - {name: second, upstream: %s}
`, upA, upB)))
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	app, extra := freeAddr(t), freeAddr(t)
	conf := func(route, rt string, more string) string {
		return fmt.Sprintf("client:\n  listeners:\n    - {listen: %s, gateway: %s, route: %s, transport: tcp, reconnect_timeout: %s}\n%s", app, gwAddr, route, rt, more)
	}
	cfgPath := writeFile(t, "cl.yaml", conf("first", "20s", ""))
	cl := startProc(t, "client", "--config", cfgPath)
	cl.waitLog("client listening", 30*time.Second)

	old, tag := openTag(t, app)
	if tag != "A" {
		t.Fatalf("first session reached %q, want A", tag)
	}
	more := fmt.Sprintf("    - {listen: %s, gateway: %s, transport: tcp}\n  max_redials: 64\n", extra, gwAddr)
	if err := os.WriteFile(cfgPath, []byte(conf("second", "9s", more)), 0o600); err != nil {
		t.Fatal(err)
	}
	cl.cmd.Process.Signal(syscall.SIGHUP)
	line := cl.waitLog("config reloaded", 10*time.Second)
	if c := fmt.Sprint(line["changed"]); !strings.Contains(c, `route "first" -> "second"`) || !strings.Contains(c, "reconnect_timeout 20s -> 9s") {
		t.Errorf("changed=%q", c)
	}
	w := cl.lastLog("config reload: these changes need an upgrade in place (SIGUSR2) or a restart to take effect; until then the old values stay")
	if w == nil || !strings.Contains(fmt.Sprint(w["settings"]), "listener "+extra+" added") {
		t.Errorf("no warning naming the added listener: %v", w)
	}
	if w == nil || !strings.Contains(fmt.Sprint(w["settings"]), "client max_redials 0 -> 64") {
		t.Errorf("no warning naming max_redials: %v", w)
	}
	fresh, tag := openTag(t, app)
	if tag != "B" {
		t.Fatalf("session after the reload reached %q, want B", tag)
	}
	if rt := cl.waitLogN("session start", 2, 10*time.Second)["reconnect_timeout"]; rt != "9s" && rt != float64(9*time.Second) {
		t.Errorf("new session's reconnect timeout %v, want 9s", rt)
	}
	for _, c := range []*net.TCPConn{old, fresh} {
		msg := []byte("still echoing")
		c.Write(msg)
		b := make([]byte, len(msg))
		if _, err := io.ReadFull(c, b); err != nil || !bytes.Equal(b, msg) {
			t.Errorf("echo %q, %v", b, err)
		}
	}
	if _, err := net.DialTimeout("tcp", extra, time.Second); err == nil {
		t.Error("the added listener accepts connections without a restart")
	}
}

// Under systemd (Type=notify, NotifyAccess=all), an upgrade in place
// tells it a reload began, and the new process names itself the main
// process once it serves.
func TestUpgradeNotifiesSystemd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bins := upgradeBinaries(t)
	notify := newNotifyListener(t)
	p := startUpProc(t, bins["v1"], []string{notify.env}, "gateway", "--transport", "tcp", "--listen", "127.0.0.1:0",
		"--upstream", testnet.EchoServer(t))
	notify.expect(t, "READY=1")
	old := p.waitPID()
	p.upgrade(bins["v2"], "v2")
	notify.expect(t, "RELOADING=1\nMONOTONIC_USEC=")
	pid := p.waitPID()
	if pid == old {
		t.Fatalf("pid %d did not change", pid)
	}
	notify.expect(t, fmt.Sprintf("MAINPID=%d\nREADY=1", pid))
}

// What a reload reports as applied and as needing a new process, from
// two parsed files: every gateway setting besides routes, session
// settings and connect_timeout counts as needing a new process, settings
// added to the file format later included.
func TestReloadDiffs(t *testing.T) {
	load := func(text string) *settings {
		t.Helper()
		fc, err := parseConfig("c.yaml", []byte(text))
		if err != nil {
			t.Fatal(err)
		}
		return &settings{fc: fc.withDefaults(), logLevel: "info", drainTimeout: 30 * time.Second}
	}
	old := load(`
gateway:
  listen: 127.0.0.1:7000
  max_sessions: 100
  reconnect_timeout: 60s
  routes:
    - {name: a, upstream: 127.0.0.1:1}
    - {name: b, upstream: 127.0.0.1:2, buffer: 1MiB}
client:
  listeners:
    - {listen: 127.0.0.1:6000, gateway: h:1, route: a}
    - {listen: 127.0.0.1:6001, gateway: h:1, route: b}
`)
	next := load(`
gateway:
  listen: 127.0.0.1:7001
  max_sessions: 200
  reconnect_timeout: 30s
  connect_timeout: 2s
  node_id: n2
  routes:
    - {name: a, upstream: 127.0.0.1:3, proxy_protocol: 2}
    - {name: c, upstream: 127.0.0.1:4}
client:
  listeners:
    - {listen: 127.0.0.1:6000, gateway: h:1, route: c, ping_interval: 2s}
    - {listen: 127.0.0.1:6001, gateway: h:2, route: c}
    - {listen: 127.0.0.1:6002, gateway: h:1}
`)
	next.logLevel, next.drainTimeout = "debug", 10*time.Second
	rl := &reloader{start: old}
	got := rl.changes(old, next)
	want := []string{
		"log.level info -> debug",
		"drain_timeout 30s -> 10s",
		"gateway reconnect_timeout 1m0s -> 30s",
		"gateway max_sessions 100 -> 200",
		"gateway connect_timeout default -> 2s",
		`route "a" upstream 127.0.0.1:1 -> 127.0.0.1:3`,
		`route "a" proxy_protocol 0 -> 2`,
		`route "c" added (upstream 127.0.0.1:4)`,
		`route "b" removed`,
		`listener 127.0.0.1:6000 route "a" -> "c"`,
		"listener 127.0.0.1:6000 ping_interval default -> 2s",
	}
	if !slices.Equal(got, want) {
		t.Errorf("changes:\n got %q\nwant %q", got, want)
	}
	restart := rl.needsRestart(old, next)
	wantRestart := []string{
		"gateway listen [127.0.0.1:7000] -> [127.0.0.1:7001]",
		`gateway node_id "" -> n2`,
		"listener 127.0.0.1:6001 gateway h:1 -> h:2",
		"listener 127.0.0.1:6002 added",
	}
	if !slices.Equal(restart, wantRestart) {
		t.Errorf("needs restart:\n got %q\nwant %q", restart, wantRestart)
	}
	if d := rl.needsRestart(old, old); len(d) != 0 {
		t.Errorf("the same file needs a restart for %q", d)
	}
}

// A SIGHUP (log rotation, config management) while a gateway drains is
// ignored: the session it drains for goes on and ends on its own.
func TestHUPWhileDraining(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	gw := startProc(t, "gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", taggedUpstream(t, "A"), "--drain-timeout", "30s")
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	app := freeAddr(t)
	cl := startProc(t, "client", "--transport", "tcp", "--listen", app, "--gateway", gwAddr)
	cl.waitLog("client listening", 30*time.Second)
	c, tag := openTag(t, app)
	if tag != "A" {
		t.Fatalf("tag %q", tag)
	}
	gw.cmd.Process.Signal(syscall.SIGTERM)
	gw.waitLog("draining", 10*time.Second)
	gw.cmd.Process.Signal(syscall.SIGHUP)
	gw.waitLog("signal ignored while draining", 10*time.Second)
	msg := []byte("still here while draining")
	c.Write(msg)
	b := make([]byte, len(msg))
	if _, err := io.ReadFull(c, b); err != nil || !bytes.Equal(b, msg) {
		t.Fatalf("echo while draining: %q, %v", b, err)
	}
	c.CloseWrite()
	if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
		t.Errorf("after the half-close: %q, %v", rest, err)
	}
	if code := gw.wait(20 * time.Second); code != 0 {
		t.Errorf("gateway exited %d", code)
	}
	if gw.count("second signal: closing now") != 0 {
		t.Error("the SIGHUP closed the sessions")
	}
}
