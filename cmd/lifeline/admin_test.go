package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/resume"
)

// cliResult is one run of the lifeline binary as a command.
type cliResult struct {
	code           int
	stdout, stderr string
}

// runBinary runs the real binary with args and waits for it (at most 30
// s: a proxy that should have refused to start is killed).
func runBinary(t *testing.T, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary(t), args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatal(err)
	}
	return cliResult{cmd.ProcessState.ExitCode(), o.String(), e.String()}
}

// sessionsCLI runs "lifeline sessions" against addr with args.
func sessionsCLI(t *testing.T, addr string, args ...string) cliResult {
	t.Helper()
	return runBinary(t, append(append([]string{"sessions"}, args...), "--admin-addr", addr)...)
}

// wantExit checks a CLI result's exit code and that stderr names code.
func wantExit(t *testing.T, what string, r cliResult, exit int, code string) {
	t.Helper()
	if r.code != exit || !strings.Contains(r.stderr, code) {
		t.Errorf("%s: exit %d, stderr %q; want exit %d and %s", what, r.code, r.stderr, exit, code)
	} else {
		oneLineErr(t, r.stderr)
	}
}

// listJSON lists the sessions on addr through the binary (--json).
func listJSON(t *testing.T, addr string, args ...string) []proxy.SessionInfo {
	t.Helper()
	r := sessionsCLI(t, addr, append(args, "--json")...)
	if r.code != 0 {
		t.Fatalf("lifeline sessions --json: exit %d %s", r.code, r.stderr)
	}
	var ans struct {
		Sessions []proxy.SessionInfo `json:"sessions"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &ans); err != nil {
		t.Fatalf("lifeline sessions --json: %v\n%s", err, r.stdout)
	}
	return ans.Sessions
}

// pollSessions lists the sessions on addr (through the binary) until cond
// holds for the list.
func pollSessions(t *testing.T, what, addr string, within time.Duration, cond func([]proxy.SessionInfo) bool, args ...string) []proxy.SessionInfo {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		ss := listJSON(t, addr, args...)
		if cond(ss) {
			return ss
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s; sessions: %+v", within, what, ss)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// addrs returns the addr of every log line of p with msg.
func (p *proc) addrs(msg string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, m := range p.logs {
		if m["msg"] == msg {
			if a, ok := m["addr"].(string); ok {
				out = append(out, a)
			}
		}
	}
	return out
}

// The admin API and "lifeline sessions" through the real binaries: a
// gateway listening on two addresses with a token, a client sidecar
// without one (loopback). Every endpoint, every error kind and its exit
// code from its real cause; goaway --to moves a live session to the
// second listener with no gap in a verified stream; end of a parked
// session closes the upstream socket within a second and resets the
// application when the network returns.
func TestBinaryAdmin(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	dir := t.TempDir()
	tok := filepath.Join(dir, "token")
	if err := os.WriteFile(tok, []byte("correct-horse\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	wrongTok := filepath.Join(dir, "wrong")
	os.WriteFile(wrongTok, []byte("battery-staple"), 0o600)
	upEnds := make(chan error, 16)
	up := testnet.TCPServer(t, func(c *net.TCPConn) {
		c.SetReadDeadline(time.Now().Add(60 * time.Second))
		_, err := io.Copy(c, c)
		if err == nil {
			c.CloseWrite()
		}
		upEnds <- err
	})
	gwAdmin, clAdmin := freeAddr(t), freeAddr(t)
	gw := startProc(t, append([]string{"gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0",
		"--upstream", up, "--admin-addr", gwAdmin, "--admin-token-file", tok}, fast...)...)
	gw.waitLog("admin listening", 30*time.Second)
	var lns []string
	for deadline := time.Now().Add(10 * time.Second); len(lns) < 2; lns = gw.addrs("gateway listening") {
		if time.Now().After(deadline) {
			t.Fatalf("gateway listens on %v, want two addresses", lns)
		}
		time.Sleep(10 * time.Millisecond)
	}
	relay, err := faultnet.NewRelay("127.0.0.1:0", lns[0])
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	// Two client listeners: "direct" to the first gateway address, and
	// "relayed" through a relay that can break the link.
	direct, relayed := freeAddr(t), freeAddr(t)
	ccfg := "client:\n  listeners:\n" +
		"    - {listen: " + direct + ", gateway: " + lns[0] + ", transport: tcp, ping_interval: 100ms, liveness_timeout: 600ms, handshake_timeout: 2s}\n" +
		"    - {listen: " + relayed + ", gateway: " + relay.Addr() + ", transport: tcp, ping_interval: 100ms, liveness_timeout: 600ms, handshake_timeout: 2s}\n"
	cl := startProc(t, "client", "--config", writeFile(t, "cl.yaml", ccfg), "--admin-addr", clAdmin)
	cl.waitLog("admin listening", 30*time.Second)

	auth := []string{"--token-file", tok}
	// Nothing yet: an empty table.
	r := sessionsCLI(t, gwAdmin, auth...)
	if r.code != 0 || !strings.HasPrefix(r.stdout, "ID ") || !strings.Contains(r.stdout, "0 session(s)") {
		t.Fatalf("empty list: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}

	// A verified stream through the direct listener.
	stop := make(chan struct{})
	var verified atomic.Int64
	echoErr := make(chan error, 1)
	go func() {
		echoErr <- faultnet.Echo{Seed: 11, Stop: stop, Verified: &verified, MaxWrite: 8 << 10, MaxPause: 2 * time.Millisecond,
			Timeout: 20 * time.Second}.Dial(direct)
	}()
	waitFor(t, "data flowing", 10*time.Second, func() bool { return verified.Load() > 64<<10 })
	gs := pollSessions(t, "one gateway session", gwAdmin, 10*time.Second, func(ss []proxy.SessionInfo) bool { return len(ss) == 1 }, auth...)
	id := gs[0].ID

	// The tables, on both sides.
	r = sessionsCLI(t, gwAdmin, auth...)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if r.code != 0 || len(lines) != 3 || !strings.Contains(lines[1], id) || lines[2] != "1 session(s)" {
		t.Fatalf("gateway table: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if f := strings.Fields(lines[0]); strings.Join(f, " ") != "ID SIDE ROUTE STATE PEER APP AGE OUTAGE RESUMES SENT RECEIVED" {
		t.Errorf("header %q", lines[0])
	}
	if f := strings.Fields(lines[1]); len(f) != 11 || f[0] != id || f[1] != "gateway" || f[2] != "default" || f[3] != "ACTIVE" ||
		!strings.HasPrefix(f[4], "127.0.0.1:") || f[5] != up || f[7] != "-" || f[8] != "0" {
		t.Errorf("gateway row %q", lines[1])
	}
	r = sessionsCLI(t, clAdmin)
	lines = strings.Split(strings.TrimSpace(r.stdout), "\n")
	if r.code != 0 || len(lines) != 3 {
		t.Fatalf("client table: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if f := strings.Fields(lines[1]); len(f) != 11 || f[0] != id || f[1] != "client" || f[3] != "ACTIVE" || f[4] != lns[0] ||
		!strings.HasPrefix(f[5], "127.0.0.1:") {
		t.Errorf("client row %q", lines[1])
	}
	if r := sessionsCLI(t, gwAdmin, append([]string{"show", id}, auth...)...); r.code != 0 || !strings.Contains(r.stdout, id) {
		t.Errorf("show: exit %d %s%s", r.code, r.stdout, r.stderr)
	}

	// Errors, each from its cause, with its exit code.
	wantExit(t, "no token", sessionsCLI(t, gwAdmin), 3, proxy.APIAccessDenied)
	wantExit(t, "wrong token", sessionsCLI(t, gwAdmin, "--token-file", wrongTok), 3, proxy.APIAccessDenied)
	wantExit(t, "unknown session", sessionsCLI(t, gwAdmin, append([]string{"end", "00000000000000ff"}, auth...)...), 4, proxy.APIResourceNotFound)
	wantExit(t, "bad state filter", sessionsCLI(t, gwAdmin, append([]string{"--state", "SLEEPING"}, auth...)...), 2, proxy.APIValidation)
	wantExit(t, "goaway on a client", sessionsCLI(t, clAdmin, "goaway", id), 2, proxy.APIValidation)
	wantExit(t, "admin API down", sessionsCLI(t, freeAddr(t)), 1, "connection refused")
	if code, body := httpGet(t, "http://"+gwAdmin+"/nope"); code != 404 || !strings.Contains(body, proxy.APIResourceNotFound) {
		t.Errorf("GET /nope: %d %s", code, body)
	}

	// goaway --to the second listener: the session moves, the stream
	// goes on with no gap.
	r = sessionsCLI(t, gwAdmin, append([]string{"goaway", id, "--to", lns[1]}, auth...)...)
	if r.code != 0 || !strings.Contains(r.stdout, "moving") {
		t.Fatalf("goaway --to: exit %d %s%s", r.code, r.stdout, r.stderr)
	}
	pollSessions(t, "client session on the second listener", clAdmin, 10*time.Second, func(ss []proxy.SessionInfo) bool {
		return len(ss) == 1 && ss[0].Peer == lns[1] && ss[0].Resumes == 1 && ss[0].LinkFailures == 0
	})
	at := verified.Load()
	waitFor(t, "data flowing after the move", 10*time.Second, func() bool { return verified.Load() > at+64<<10 })
	close(stop)
	if err := <-echoErr; err != nil {
		t.Fatalf("verified stream across goaway --to: %v", err)
	}
	<-upEnds

	// A session through the relay, parked: goaway is a conflict, end
	// closes the upstream socket within a second, and the application
	// gets a reset once the network is back.
	app, err := net.Dial("tcp", relayed)
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	app.SetDeadline(time.Now().Add(10 * time.Second))
	app.Write([]byte("ping"))
	if _, err := io.ReadFull(app, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	relay.SetDown(true)
	relay.Reset()
	gs = pollSessions(t, "parked gateway session", gwAdmin, 10*time.Second, func(ss []proxy.SessionInfo) bool {
		return len(ss) == 1 && ss[0].State == "DISCONNECTED"
	}, append([]string{"--state", "disconnected"}, auth...)...)
	parked := gs[0].ID
	r = sessionsCLI(t, gwAdmin, auth...)
	if f := strings.Fields(strings.Split(r.stdout, "\n")[1]); len(f) != 11 || f[3] != "DISCONNECTED" || f[7] == "-" {
		t.Errorf("parked row %q: want state DISCONNECTED and an outage", strings.Split(r.stdout, "\n")[1])
	}
	wantExit(t, "goaway on a parked session", sessionsCLI(t, gwAdmin, append([]string{"goaway", parked}, auth...)...), 5, proxy.APIConflict)
	start := time.Now()
	r = sessionsCLI(t, gwAdmin, append([]string{"end", parked}, auth...)...)
	if r.code != 0 || !strings.Contains(r.stdout, "ended session "+parked) {
		t.Fatalf("end: exit %d %s%s", r.code, r.stdout, r.stderr)
	}
	select {
	case err := <-upEnds:
		if d := time.Since(start); d > time.Second+500*time.Millisecond || !errors.Is(err, syscall.ECONNRESET) {
			// The CLI's own start-up is in d; the gateway resets at once.
			t.Errorf("upstream connection ended %v after the command with %v, want a reset within 1s", d, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("upstream connection not closed after end")
	}
	relay.SetDown(false)
	testnet.ExpectReset(t, app, 10*time.Second)

	// /healthz, /readyz and /metrics need no token.
	for _, a := range []string{gwAdmin, clAdmin} {
		if code, body := httpGet(t, "http://"+a+"/healthz"); code != 200 || body != "ok\n" {
			t.Errorf("%s /healthz: %d %q", a, code, body)
		}
		if code, body := httpGet(t, "http://"+a+"/readyz"); code != 200 || body != "ready\n" {
			t.Errorf("%s /readyz: %d %q", a, code, body)
		}
	}
	_, m := httpGet(t, "http://"+gwAdmin+"/metrics")
	for _, want := range []string{`lifeline_session_ends_total{cause="admin",route="default",side="gateway"} 1`,
		`lifeline_outage_seconds_count{side="gateway"}`, `lifeline_sessions{side="gateway",state="ACTIVE"} 0`,
		`lifeline_build_info{goversion="` + runtime.Version() + `",version="` + versionString() + `"} 1`} {
		if !strings.Contains(m, want) {
			t.Errorf("gateway /metrics lacks %s", want)
		}
	}
	_, m = httpGet(t, "http://"+clAdmin+"/metrics")
	for _, want := range []string{`lifeline_outage_seconds_count{side="client"}`, `lifeline_resume_first_byte_seconds_count{side="client"}`,
		`lifeline_session_starts_total{route="default",side="client"} 2`} {
		if !strings.Contains(m, want) {
			t.Errorf("client /metrics lacks %s", want)
		}
	}

	// Wrong tokens past the budget (10 a source): throttled, exit 6,
	// even with the right token.
	var last cliResult
	for range 12 {
		if last = sessionsCLI(t, gwAdmin, "--token-file", wrongTok); last.code == 6 {
			break
		}
	}
	wantExit(t, "wrong tokens past the budget", last, 6, proxy.APIThrottling)
	if !strings.Contains(last.stderr, "retry after") {
		t.Errorf("no retry delay in %q", last.stderr)
	}
	wantExit(t, "right token while throttled", sessionsCLI(t, gwAdmin, auth...), 6, proxy.APIThrottling)

	// The token file gone: the gateway fails closed.
	kept := filepath.Join(dir, "kept")
	os.Rename(tok, kept)
	deadline := time.Now().Add(15 * time.Second)
	for {
		r = sessionsCLI(t, gwAdmin, "--token-file", kept)
		if r.code != 6 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond) // the throttle refills one token a second
	}
	wantExit(t, "token file unreadable", r, 1, proxy.APIInternalServer)

	// Draining (a session keeps the client running): /readyz is 503,
	// /healthz stays ok.
	last2, err := net.Dial("tcp", direct)
	if err != nil {
		t.Fatal(err)
	}
	defer last2.Close()
	last2.SetDeadline(time.Now().Add(10 * time.Second))
	last2.Write([]byte("ping"))
	if _, err := io.ReadFull(last2, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	cl.cmd.Process.Signal(syscall.SIGTERM)
	cl.waitLog("draining", 10*time.Second)
	if code, body := httpGet(t, "http://"+clAdmin+"/readyz"); code != 503 || body != "draining\n" {
		t.Errorf("/readyz while draining: %d %q", code, body)
	}
	if code, body := httpGet(t, "http://"+clAdmin+"/healthz"); code != 200 || body != "ok (draining)\n" {
		t.Errorf("/healthz while draining: %d %q", code, body)
	}
}

// The admin API needs a token beyond loopback: a gateway or client with a
// non-loopback --admin-addr and no --admin-token-file does not start;
// --status-addr still works as the older name.
func TestBinaryAdminTokenRequiredBeyondLoopback(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	up := testnet.EchoServer(t)
	for _, addr := range []string{"0.0.0.0:9100", ":9100", "[::]:9100", "gw.example.net:9100", "gw.localhost:9100"} {
		r := runBinary(t, "gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", up, "--admin-addr", addr)
		if r.code != 2 || !strings.Contains(r.stderr, "--admin-token-file") {
			t.Errorf("gateway --admin-addr %s without a token: exit %d %q", addr, r.code, r.stderr)
		}
		oneLineErr(t, r.stderr)
	}
	cfg := writeFile(t, "cl.yaml", "admin_addr: 0.0.0.0:9100\nclient:\n  listeners:\n    - {listen: 127.0.0.1:0, gateway: h:1}\n")
	if r := runBinary(t, "client", "--config", cfg); r.code != 2 || !strings.Contains(r.stderr, "--admin-token-file") {
		t.Errorf("client config admin_addr 0.0.0.0 without a token: exit %d %q", r.code, r.stderr)
	}
	if r := runBinary(t, "client", "--config", cfg, "--admin-token-file", "/nonexistent/token"); r.code != 1 ||
		!strings.Contains(r.stderr, "/nonexistent/token") {
		t.Errorf("missing token file: exit %d %q", r.code, r.stderr)
	}

	// On loopback: no token needed; --status-addr is the same flag.
	st := freeAddr(t)
	gw := startProc(t, "gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", up, "--status-addr", st)
	if m := gw.waitLog("admin listening", 30*time.Second); m["addr"] != st || m["token"] != false {
		t.Errorf("admin listening %v", m)
	}
	if code, _ := httpGet(t, "http://"+st+"/sessions"); code != 200 {
		t.Errorf("/sessions on loopback without a token: %d", code)
	}
	stopProc(t, gw)
}

func waitFor(t testing.TB, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Mistakes on the command line of lifeline sessions are usage errors
// (exit 2) before any request.
func TestSessionsCommandUsage(t *testing.T) {
	t.Setenv("LIFELINE_ADMIN_ADDR", "")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"sessions"}, "--admin-addr is required"},
		{[]string{"sessions", "frobnicate", "--admin-addr", "127.0.0.1:1"}, `unknown subcommand "frobnicate"`},
		{[]string{"sessions", "end", "--admin-addr", "127.0.0.1:1"}, "takes one session id"},
		{[]string{"sessions", "end", "a", "b", "--admin-addr", "127.0.0.1:1"}, "takes one session id"},
		{[]string{"sessions", "end", "a", "--to", "h:1", "--admin-addr", "127.0.0.1:1"}, "--to does not apply"},
		{[]string{"sessions", "goaway", "a", "--to", "nope", "--admin-addr", "127.0.0.1:1"}, "--to: "},
		{[]string{"sessions", "--bogus"}, "flag provided but not defined"},
	} {
		code, _, stderr := runCLI(c.args...)
		if code != exitUsage || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d %q, want 2 and %q", c.args, code, stderr, c.want)
		}
		oneLineErr(t, stderr)
	}
	if code, stdout, _ := runCLI("sessions", "--help"); code != 0 || !strings.Contains(stdout, "Exit codes") {
		t.Errorf("--help: exit %d %q", code, stdout)
	}
}

// The admin and keepalive settings: --status-addr is --admin-addr's older
// name (both given must agree), a token file needs an admin address,
// keepalive_interval is a session setting like the others, and a quic
// link turns idle keepalive PINGs off unless it is set.
func TestAdminAndKeepaliveSettings(t *testing.T) {
	base := []string{"--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--admin-addr", "127.0.0.1:1", "--status-addr", "127.0.0.1:2"}, "give one"},
		{[]string{"--admin-token-file", "/t"}, "without --admin-addr"},
		{[]string{"--admin-addr", "nope"}, "--admin-addr: "},
		{[]string{"--keepalive-interval", "500ms"}, "KeepaliveInterval"},
	} {
		code, _, stderr := runCLI(append(append([]string{"gateway"}, base...), c.args...)...)
		if code != exitUsage || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d %q, want 2 and %q", c.args, code, stderr, c.want)
		}
	}
	st, err := parseOptions("gateway", append(base, "--status-addr", "127.0.0.1:9", "--keepalive-interval", "0s",
		"--listen", "127.0.0.1:0"), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if st.adminAddr != "127.0.0.1:9" || len(st.fc.Gateway.Listen) != 2 {
		t.Errorf("admin %q, listen %v", st.adminAddr, st.fc.Gateway.Listen)
	}
	if c, err := st.fc.Gateway.sessionFile.sessionConfigFor("tcp"); err != nil || c.KeepaliveInterval != 0 || c.KeepalivePing {
		t.Errorf("--keepalive-interval 0s: %v, ping %v, %v", c.KeepaliveInterval, c.KeepalivePing, err)
	}
	st, err = parseOptions("gateway", append(base, "--keepalive-ping"), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := st.fc.Gateway.sessionFile.sessionConfigFor("tcp"); err != nil || !c.KeepalivePing || c.KeepaliveInterval != resume.DefaultKeepaliveInterval {
		t.Errorf("--keepalive-ping: ping %v, interval %v, %v", c.KeepalivePing, c.KeepaliveInterval, err)
	}
	if code, _, stderr := runCLI(append(append([]string{"gateway"}, base...), "--keepalive-ping=maybe")...); code != exitUsage || !strings.Contains(stderr, "bad boolean") {
		t.Errorf("--keepalive-ping=maybe: exit %d %q", code, stderr)
	}

	fc, err := parseConfig("c.yaml", []byte(`
admin_addr: 127.0.0.1:9
admin_token_file: /etc/lifeline/token
gateway:
  listen: [127.0.0.1:7000, 127.0.0.1:7001]
  transport: quic
  keepalive_interval: 10s
  routes:
    - {name: a, upstream: 127.0.0.1:1}
    - {name: b, upstream: 127.0.0.1:2, keepalive_interval: 0s}
    - {name: c, upstream: 127.0.0.1:3, keepalive_ping: true}
client:
  listeners:
    - {listen: 127.0.0.1:0, gateway: h:1, transport: quic}
    - {listen: 127.0.0.1:1, gateway: h:1, transport: tls}
`))
	if err != nil {
		t.Fatal(err)
	}
	g := fc.Gateway
	if fc.AdminAddr != "127.0.0.1:9" || fc.AdminTokenFile != "/etc/lifeline/token" || strings.Join(g.Listen, ",") != "127.0.0.1:7000,127.0.0.1:7001" {
		t.Errorf("parsed %+v %+v", fc, g)
	}
	for i, want := range []time.Duration{10 * time.Second, 0} {
		c, err := g.sessionFile.over(g.Routes[i].sessionFile).sessionConfigFor(g.Transport)
		if err != nil || c.KeepaliveInterval != want {
			t.Errorf("route %d keepalive %v %v, want %v", i, c.KeepaliveInterval, err, want)
		}
	}
	for i, want := range []bool{false, false, true} {
		c, err := g.sessionFile.over(g.Routes[i].sessionFile).sessionConfigFor(g.Transport)
		if err != nil || c.KeepalivePing != want {
			t.Errorf("route %d keepalive_ping %v %v, want %v", i, c.KeepalivePing, err, want)
		}
	}
	if _, err := parseConfig("c.yaml", []byte("gateway:\n  keepalive_ping: sometimes\n")); err == nil || !strings.Contains(err.Error(), "bad boolean") {
		t.Errorf("keepalive_ping: sometimes: %v", err)
	}
	for i, want := range []time.Duration{0, resume.DefaultKeepaliveInterval} {
		l := fc.Client.Listeners[i]
		if c, err := l.sessionFile.sessionConfigFor(l.Transport); err != nil || c.KeepaliveInterval != want {
			t.Errorf("client listener %d (%s) keepalive %v %v, want %v", i, l.Transport, c.KeepaliveInterval, err, want)
		}
	}
	if _, err := parseConfig("c.yaml", []byte("gateway:\n  listen: {a: b}\n")); err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Errorf("listen as a map: %v", err)
	}
}
