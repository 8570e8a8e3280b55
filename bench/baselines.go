package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The baselines other than direct: two chained bench relays whose hop is
// TCP (relay), crypto/tls (tls-relay) or a quic-go stream (quic-relay),
// and two chained HAProxy processes in tcp mode (haproxy).

// relayHop is the hop between relay1 and relay2 of each relay baseline.
var relayHop = map[string]string{Relay: "tcp", TLSRelay: "tls", QUICRelay: "quic"}

func (r *runner) startRelays(ctx context.Context, s *stack, upstream string, o stackOpts) (*stack, error) {
	hop := relayHop[s.config]
	var in2, out1 []string
	if hop != "tcp" {
		c, err := r.certFiles()
		if err != nil {
			return nil, err
		}
		// relay2 is the TLS server (the gateway's certificate), relay1 the
		// client (the client's), mutual, as lifeline's proxies.
		in2 = []string{"--in", hop, "--tls-cert", c.ServerCert, "--tls-key", c.ServerKey, "--tls-ca", c.CA}
		out1 = []string{"--out", hop, "--tls-cert", c.ClientCert, "--tls-key", c.ClientKey, "--tls-ca", c.CA}
	}
	r2, err := startProc(ctx, "relay2", r.bin, append([]string{"bench-relay", "--listen", "127.0.0.1:0", "--target", upstream}, in2...),
		r.profileEnv(s.config, "relay2"), "relay listening")
	if err != nil {
		return nil, err
	}
	r1, err := startProc(ctx, "relay1", r.bin, append([]string{"bench-relay", "--listen", "127.0.0.1:0", "--target", r2.addr("relay listening")}, out1...),
		r.profileEnv(s.config, "relay1"), "relay listening")
	if err != nil {
		r2.stop()
		return nil, err
	}
	s.procs = []*proc{r1, r2}
	s.entry = r1.addr("relay listening")
	return s, s.probe(o)
}

// probe checks the path end to end (and closes the stack if it fails).
func (s *stack) probe(o stackOpts) error {
	if o.probe == nil {
		return nil
	}
	if err := o.probe(s.entry); err != nil {
		s.close()
		return fmt.Errorf("%s carries nothing: %w", s.config, err)
	}
	return nil
}

// skipError is a configuration that cannot run on this machine, such as
// haproxy without the binary: the report says so and the run goes on.
type skipError struct{ why string }

func (e skipError) Error() string { return e.why }

// haproxyBinary finds the haproxy binary in PATH.
func haproxyBinary() (string, error) {
	p, err := exec.LookPath("haproxy")
	if err != nil {
		return "", skipError{"haproxy is not in PATH (install it, e.g. apt-get install haproxy, to measure this baseline)"}
	}
	return p, nil
}

func (r *runner) startHAProxies(ctx context.Context, s *stack, upstream string, o stackOpts) (*stack, error) {
	bin, err := haproxyBinary()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(r.tmp, "haproxy-")
	if err != nil {
		return nil, err
	}
	h2, addr2, err := startHAProxy(ctx, "haproxy2", bin, dir, upstream)
	if err != nil {
		return nil, err
	}
	h1, addr1, err := startHAProxy(ctx, "haproxy1", bin, dir, addr2)
	if err != nil {
		h2.stop()
		return nil, err
	}
	s.procs = []*proc{h1, h2}
	s.entry = addr1
	return s, s.probe(o)
}

// startHAProxy runs one HAProxy in the foreground (-db) with a
// configuration written to dir that forwards a free loopback port to
// target, and waits until the port accepts connections.
func startHAProxy(ctx context.Context, name, bin, dir, target string) (*proc, string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, "", err
	}
	listen := ln.Addr().String()
	ln.Close()
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return nil, "", err
	}
	path := filepath.Join(dir, name+".cfg")
	if err := os.WriteFile(path, []byte(haproxyConfig(listen, target, haproxyMaxConn(rl.Cur))), 0o644); err != nil {
		return nil, "", err
	}
	p, err := startReady(ctx, name, bin, []string{"-f", path, "-db"}, nil, func() error {
		c, err := net.DialTimeout("tcp", listen, 200*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err
	})
	return p, listen, err
}

// haproxyMaxConn is HAProxy's maxconn for a descriptor limit: each
// connection holds two descriptors (client and server side), and HAProxy
// keeps a few for itself.
func haproxyMaxConn(nofile uint64) int {
	n := (int(min(nofile, 1<<20)) - 200) / 2
	return max(n, 256)
}

// haproxyConfig is the configuration of one HAProxy of the chain: tcp
// mode, defaults otherwise (threads: one per CPU; no splice, which a
// default configuration does not turn on), timeouts long enough that
// idle sessions stay open through the sessions scenario.
func haproxyConfig(listen, target string, maxconn int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# lifeline bench: one HAProxy of the haproxy baseline's chain\n")
	fmt.Fprintf(&b, "global\n\tmaxconn %d\n\n", maxconn)
	b.WriteString("defaults\n\tmode tcp\n\ttimeout connect 10s\n\ttimeout client 1h\n\ttimeout server 1h\n\n")
	fmt.Fprintf(&b, "frontend bench\n\tbind %s\n\tdefault_backend upstream\n\n", listen)
	fmt.Fprintf(&b, "backend upstream\n\tserver upstream %s\n", target)
	return b.String()
}

// profileEnv is the environment that makes a lifeline process (proxy or
// bench relay) write a CPU profile until it exits, when --profile is set:
// DIR/<scenario>-<config>-<process>[-<n>].pprof.
func (r *runner) profileEnv(cfg, procName string) []string {
	if r.opt.ProfileDir == "" {
		return nil
	}
	r.progMu.Lock()
	defer r.progMu.Unlock()
	base := fmt.Sprintf("%s-%s-%s", r.scenario, cfg, procName)
	if r.profiles == nil {
		r.profiles = map[string]int{}
	}
	r.profiles[base]++
	if n := r.profiles[base]; n > 1 {
		base += fmt.Sprintf("-%d", n)
	}
	path := filepath.Join(r.opt.ProfileDir, base+".pprof")
	r.rep.Profiles = append(r.rep.Profiles, path)
	return []string{CPUProfileEnv + "=" + path}
}

// addIdleProfile records a profile segment that holds one idle CPU
// window of the sessions scenario alone.
func (r *runner) addIdleProfile(path string) {
	r.progMu.Lock()
	defer r.progMu.Unlock()
	r.rep.IdleProfiles = append(r.rep.IdleProfiles, path)
}
